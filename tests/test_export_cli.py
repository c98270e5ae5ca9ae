"""`dmx export` on the command line: exit codes, one-line errors, --force, nothing partial."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dmx.outdir.integrity import reseal
from tiny_out import build_out

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return build_out(tmp_path_factory.mktemp("cli"), "qwen3")


def _cli(*args):
    """Run the export command as a user would: `dmx export` once the dmx CLI has it,
    else `python -m dmx.export` (same parser and action)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dmx.export", *map(str, args)]
    if (REPO / "dmx" / "cli.py").exists():
        cmd = [sys.executable, "-c", "import sys; from dmx.cli import main; sys.exit(main())",
               "export", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def _run(args):
    """The same command in-process (fast path for the many error cases)."""
    from dmx.cli import main
    return main(["export", *map(str, args)])


def _one_line_error(err: str):
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_success_then_refuses_overwrite_then_force(out, tmp_path, capsys):
    dest = tmp_path / "served"
    r = _cli(out, "--to", "gguf", "-o", dest)           # one real process, as a user runs it
    assert r.returncode == 0, r.stderr
    assert "bit-exact" in r.stdout and "MXFP4" in r.stdout and "Q8_0" in r.stdout
    assert (dest / "model.gguf").exists()
    before = (dest / "model.gguf").stat().st_mtime_ns

    assert _run([out, "--to", "compressed-tensors", "-o", dest]) == 2
    assert "already exists; pass --force" in _one_line_error(capsys.readouterr().err)
    assert (dest / "model.gguf").stat().st_mtime_ns == before        # untouched

    assert _run([out, "--to", "compressed-tensors", "-o", dest, "--force"]) == 0
    qc = json.loads((dest / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert list(dest.glob("model-*.safetensors"))                    # replaced, not merged
    assert not (dest / "model.gguf").exists()
    assert not (dest / "model.safetensors.index.json").read_text().count("weight_packed") == 0
    assert not list(tmp_path.glob(".served.*"))                        # no temp dir left


def test_missing_manifest(out, tmp_path, capsys):
    bad = tmp_path / "nomanifest"
    shutil.copytree(out, bad)
    (bad / "dmx_manifest.json").unlink()
    assert _run([bad, "--to", "gguf", "-o", tmp_path / "x"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "no dmx_manifest.json" in line and "dmx search" in line
    assert not (tmp_path / "x").exists()


def test_not_a_directory(tmp_path, capsys):
    assert _run([tmp_path / "nowhere", "--to", "quark", "-o", tmp_path / "x"]) == 2
    assert "no such directory; pass an OUT directory" in _one_line_error(capsys.readouterr().err)


def test_mismatched_hash(out, tmp_path, capsys):
    bad = tmp_path / "tampered"
    shutil.copytree(out, bad)
    m = json.loads((bad / "dmx_manifest.json").read_text())
    m["layers"]["model.layers.0.self_attn.o_proj"]["sha256"] = "0" * 64
    (bad / "dmx_manifest.json").write_text(json.dumps(m))
    assert _run([bad, "--to", "compressed-tensors", "-o", tmp_path / "x"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "dmx_manifest.json: its content does not match its manifest_sha256" in line
    reseal(bad)   # the manifest's own hash re-recorded: each layer's sha256 still catches it
    assert _run([bad, "--to", "compressed-tensors", "-o", tmp_path / "x"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "o_proj: weight bytes do not match the manifest sha256" in line
    assert not (tmp_path / "x").exists()


def test_unsupported_layer_format_in_manifest(out, tmp_path, capsys):
    bad = tmp_path / "fmt"
    shutil.copytree(out, bad)
    m = json.loads((bad / "dmx_manifest.json").read_text())
    m["layers"]["model.layers.0.self_attn.o_proj"]["format"] = "fp5_e2m2"
    (bad / "dmx_manifest.json").write_text(json.dumps(m))
    assert _run([bad, "--to", "quark", "-o", tmp_path / "x"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "o_proj" in line and "fp5_e2m2" in line


def test_unknown_target_is_an_argparse_error(out, tmp_path, capsys):
    assert _run([out, "--to", "onnx", "-o", tmp_path / "x"]) == 2
    assert "invalid choice: 'onnx'" in _one_line_error(capsys.readouterr().err)
