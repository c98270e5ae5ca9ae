"""The three command lines build their parsers (every ``--help``) without loading the heavy
modules: torch and transformers load when a dmx command runs, numba and ml_dtypes when the
golden model computes. Import costs only, no timings (the machines are noisy)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "numba", "ml_dtypes")

# every parser and subparser, with its help text formatted (choices, defaults included)
BUILD_ALL = f"""
import argparse, sys
from dmx.cli import build_parser as dmx_parser
from mxref.cli import build_parser as mxref_parser
from verification.cli import build_parser as mxverify_parser
for build in (dmx_parser, mxref_parser, mxverify_parser):
    p = build()
    p.format_help()
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                sub.format_help()
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_parsers_load_no_heavy_module():
    r = _run("-c", BUILD_ALL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"loaded while building the parsers: {r.stdout}"


def test_packages_import_lazily():
    """``import mxref`` / ``import dmx.quant`` / ``import dmx.nn`` load nothing heavy;
    their names still resolve (the first use loads the module that defines them)."""
    r = _run("-c", "import sys, mxref, dmx.quant, dmx.nn, dmx.nn.names, dmx.quant.ladders; "
                   f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_lazy_names_resolve():
    import mxref
    import dmx.nn
    import dmx.quant
    from dmx.nn import layers, names
    for mod in (mxref, dmx.quant, dmx.nn):
        for name in mod.__all__:
            assert getattr(mod, name) is not None, (mod.__name__, name)
        assert set(mod.__all__) <= set(dir(mod))
        with pytest.raises(AttributeError):
            mod.no_such_name  # noqa: B018
    from mxref import quantize  # noqa: F401 (from-import of a lazy name)
    assert mxref.formats.DEFAULT_BLOCK_SIZE == mxref.DEFAULT_BLOCK_SIZE  # as before: a module
    # moved, not copied: dmx.nn.layers re-exports the torch-free names
    for name in names.__all__:
        assert getattr(layers, name) is getattr(names, name)


@pytest.mark.parametrize("module", ["dmx", "mxref", "verification"])
def test_help_exits_0(module):
    r = _run("-m", module, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage:") and r.stderr == ""


def test_mxverify_interrupt_while_parsing_is_one_line(monkeypatch, capsys):
    """Ctrl-C while mxverify's parser loads its modules: the frame's line, exit 130."""
    from verification import cli

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["gen"]) == 130
    assert capsys.readouterr().err == "mxverify: interrupted\n"
