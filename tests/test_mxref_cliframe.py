"""mxref.cliframe: the one error frame of mxref, mxverify and dmx (exit codes, one line)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mxref.cliframe import (EXIT_BAD_INPUT, EXIT_BROKEN_PIPE, EXIT_FAILED, EXIT_INTERRUPTED,
                            run_cli)
from mxref.errors import MXError

ROOT = Path(__file__).resolve().parent.parent


def _raise(exc):
    def body():
        raise exc
    return body


def test_return_value_and_none(capsys):
    assert run_cli("t", lambda: None) == 0
    assert run_cli("t", lambda: 3) == 3
    assert capsys.readouterr().err == ""


def test_bad_input_is_one_line_exit_2(capsys):
    assert run_cli("tool sub", _raise(MXError("bad file x.npz\n  details: here"))) \
        == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "tool sub: error: bad file x.npz details: here\n"


def test_extra_bad_input_classes(capsys):
    rc = run_cli("t", _raise(json.JSONDecodeError("Expecting value", "{x", 1)),
                 bad_input=(json.JSONDecodeError,))
    assert rc == EXIT_BAD_INPUT and capsys.readouterr().err.startswith("t: error: Expecting")


def test_os_error_is_one_line_exit_1(capsys):
    assert run_cli("t", _raise(OSError(28, "No space left on device"))) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err == "t: error: [Errno 28] No space left on device\n"


def test_broken_pipe_is_quiet(capsys):
    assert run_cli("t", _raise(BrokenPipeError())) == EXIT_BROKEN_PIPE
    # also when a tool names OSError as bad input: the pipe is checked first
    assert run_cli("t", _raise(BrokenPipeError()), bad_input=(OSError,)) == EXIT_BROKEN_PIPE
    assert capsys.readouterr().err == ""


def test_interrupt_is_130(capsys):
    assert run_cli("t", _raise(KeyboardInterrupt()), interrupt_note="; nothing written") \
        == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "t: interrupted; nothing written\n"


def test_bugs_still_raise():
    with pytest.raises(ZeroDivisionError):
        run_cli("t", lambda: 1 / 0)


@pytest.mark.parametrize("argv", [["mxref", "formats"],
                                  ["verification", "gen", "--format", "fp4_e2m1", "--op",
                                   "dequantize", "--emit", "npz", "--out", "suite"]])
def test_closed_stdout_exits_1_quietly_in_every_cli(argv, tmp_path):
    """``tool | head`` with the reader gone: exit 1 and nothing on stderr, in mxref and
    mxverify alike (before: 1 in mxref, 2 with an error line in mxverify)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r, w = os.pipe()
    os.close(r)   # the reader is gone before the tool writes
    p = subprocess.run([sys.executable, "-m", *argv], stdout=w, stderr=subprocess.PIPE,
                       env=env, cwd=tmp_path, timeout=300)
    os.close(w)
    assert p.returncode == 1 and p.stderr == b"", p.stderr.decode()
