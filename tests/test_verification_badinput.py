"""Every malformed suite or DUT file gives exit 2 and one line naming the file (and line)."""
import json
import os
import shutil

import pytest

from verification.cli import main
from verification.vectors import build


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("bad") / "v")
    build(d, "quantize", "fp4_e2m1", "1", seed=2)
    return d


def _run(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def _dut(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
    return str(p)


def _lines(suite):
    return open(os.path.join(suite, "expected.hex")).read().splitlines()


CASES = {
    "invalid_hex_digit": ("dut.hex", lambda L: "\n".join(["G" + L[0][1:]] + L[1:]) + "\n",
                          "dut.hex:1: invalid hex digit"),
    "wrong_width": ("dut.hex", lambda L: "\n".join([L[0], L[1] + "0"] + L[2:]) + "\n",
                    "dut.hex:2: line has"),
    "truncated_hex": ("dut.hex", lambda L: "\n".join(L[:-3]) + "\n", "vectors, the suite has"),
    "extra_lines": ("dut.hex", lambda L: "\n".join(L + [L[0]]) + "\n", "vectors, the suite has"),
    "non_ascii": ("dut.hex", lambda L: b"\xff\xfe" + "\n".join(L).encode(), "not a text file"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_hex_dut(suite, tmp_path, capsys, name):
    fname, make, msg = CASES[name]
    p = _dut(tmp_path, fname, make(_lines(suite)))
    rc, err = _run(["check", "--vectors", suite, "--dut", p], capsys)
    assert rc == 2 and msg in err and "\n" not in err and "Traceback" not in err


def test_truncated_bin(suite, tmp_path, capsys):
    blob = open(os.path.join(suite, "expected.bin"), "rb").read()
    rc, err = _run(["check", "--vectors", suite, "--dut", _dut(tmp_path, "d.bin", blob[:-5])],
                   capsys)
    assert rc == 2 and "d.bin" in err and "whole number" in err
    rc, err = _run(["check", "--vectors", suite, "--dut", _dut(tmp_path, "e.bin", blob[:-33])],
                   capsys)
    assert rc == 2 and "records, the suite has" in err


def test_malformed_npz(suite, tmp_path, capsys):
    rc, err = _run(["check", "--vectors", suite, "--dut", _dut(tmp_path, "d.npz", b"PK junk")],
                   capsys)
    assert rc == 2 and "d.npz" in err and "\n" not in err


def test_manifest_hash_mismatch(suite, tmp_path, capsys):
    d = str(tmp_path / "copy")
    shutil.copytree(suite, d)
    with open(os.path.join(d, "vectors.bin"), "r+b") as fh:
        fh.seek(10)
        b = fh.read(1)
        fh.seek(10)
        fh.write(bytes([b[0] ^ 1]))
    rc, err = _run(["check", "--vectors", d, "--dut", os.path.join(d, "expected.hex")], capsys)
    assert rc == 2 and "vectors.bin" in err and "SHA-256" in err


def test_missing_manifest_and_bad_json(tmp_path, capsys):
    rc, err = _run(["check", "--vectors", str(tmp_path), "--dut", "x.hex"], capsys)
    assert rc == 2 and "manifest.json" in err
    (tmp_path / "manifest.json").write_text("{not json")
    rc, err = _run(["check", "--vectors", str(tmp_path), "--dut", "x.hex"], capsys)
    assert rc == 2 and "manifest.json:1" in err


def test_bad_gen_arguments(tmp_path, capsys):
    rc, err = _run(["gen", "--format", "fp5", "--op", "quantize", "--out", str(tmp_path / "a")],
                   capsys)
    assert rc == 2 and "unknown format" in err
    rc, err = _run(["gen", "--format", "fp4", "--op", "dot", "--level", "exhaustive",
                    "--out", str(tmp_path / "b")], capsys)
    assert rc == 2 and "no exhaustive" in err
    rc, err = _run(["gen", "--format", "fp4", "--op", "quantize", "--emit", "csv",
                    "--out", str(tmp_path / "c")], capsys)
    assert rc == 2 and "--emit" in err
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "c")
    with pytest.raises(SystemExit) as e:
        main(["gen", "--op", "quantize"])
    assert e.value.code == 2


def test_existing_report_needs_force(suite, tmp_path, capsys):
    rep = tmp_path / "r.json"
    old = '{"verdict": "fail"}\n'   # an earlier report: what --force may replace
    rep.write_text(old)
    dut = os.path.join(suite, "expected.hex")
    rc, err = _run(["check", "--vectors", suite, "--dut", dut, "--report", str(rep)], capsys)
    assert rc == 2 and "--force" in err and rep.read_text() == old
    rc, _ = _run(["check", "--vectors", suite, "--dut", dut, "--report", str(rep), "--force"],
                 capsys)
    assert rc == 0 and json.loads(rep.read_text())["verdict"] == "pass"


def test_force_never_replaces_a_file_that_is_not_a_report(suite, tmp_path, capsys):
    notes = tmp_path / "notes.json"
    notes.write_text("my notes")
    dut = os.path.join(suite, "expected.hex")
    rc, err = _run(["check", "--vectors", suite, "--dut", dut, "--report", str(notes),
                    "--force"], capsys)
    assert rc == 2 and "not an output of mxverify" in err and notes.read_text() == "my notes"
