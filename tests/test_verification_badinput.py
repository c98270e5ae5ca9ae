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


# ------------------------------------------------------------------ issue 13: trust
def _expected_fields(suite):
    from verification import vectors as V
    from verification.check import load_suite
    s = load_suite(suite)
    blob = open(os.path.join(suite, "expected.bin"), "rb").read()
    return s, V.from_bin(s.outs, blob, s.n)


@pytest.mark.parametrize("field, dtype, delta", [
    ("codes", "uint16", 0x100),        # truncated to 8 bits it is the right code again
    ("scale", "uint64", 1 << 40),
    ("codes", "int64", -0x100),        # negative: wraps to the right code
])
def test_npz_dut_values_must_fit_their_field(suite, tmp_path, capsys, field, dtype, delta):
    """Before, these DUTs passed ("no errors found"): the values were cut to 8 bits."""
    import numpy as np
    s, arrays = _expected_fields(suite)
    field = next(f.name for f in s.outs if f.name.startswith(field))
    arrays = {k: v.astype(dtype) for k, v in arrays.items()}
    value = int(arrays[field][3, 0]) + delta
    arrays[field][3, 0] = value
    p = tmp_path / "dut.npz"
    np.savez(p, **arrays)
    rc, err = _run(["check", "--vectors", suite, "--dut", str(p)], capsys)
    assert rc == 2 and "\n" not in err, err
    assert f"{field}[3][0] = {value} does not fit the field's 8 unsigned bits" in err


def test_corrupted_npz_dut_is_one_line(suite, tmp_path, capsys):
    import numpy as np
    _, arrays = _expected_fields(suite)
    p = tmp_path / "dut.npz"
    np.savez(p, **arrays)
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF   # inside the first member: a CRC error when numpy reads it
    p.write_bytes(bytes(data))
    rc, err = _run(["check", "--vectors", suite, "--dut", str(p)], capsys)
    assert rc == 2 and "dut.npz" in err and "\n" not in err and "Traceback" not in err


def _edited_suite(suite, tmp_path, change, keep_self_hash: bool):
    d = str(tmp_path / "edited")
    shutil.copytree(suite, d)
    mpath = os.path.join(d, "manifest.json")
    man = json.load(open(mpath))
    change(man)
    if not keep_self_hash:   # as if edited by someone who also dropped the self hash
        man.pop("manifest_sha256")
    json.dump(man, open(mpath, "w"), indent=1)
    return d


@pytest.mark.parametrize("change", [
    lambda m: m.update(n_vectors=m["n_vectors"] - 1),
    lambda m: m.update(format="fp6_e2m3"),
])
@pytest.mark.parametrize("keep_self_hash", [True, False])
def test_edited_suite_manifest_is_blamed_not_the_dut(suite, tmp_path, capsys, change,
                                                     keep_self_hash):
    d = _edited_suite(suite, tmp_path, change, keep_self_hash)
    rc, err = _run(["check", "--vectors", d, "--dut", os.path.join(suite, "expected.hex")],
                   capsys)
    assert rc == 2 and "\n" not in err, err
    assert "the suite is inconsistent" in err and "regenerate the suite" in err
    if keep_self_hash:
        assert "does not match its manifest_sha256" in err


def test_report_never_replaces_the_suite(suite, tmp_path, capsys):
    d = str(tmp_path / "v")
    shutil.copytree(suite, d)
    mpath = os.path.join(d, "manifest.json")
    before = open(mpath).read()
    rc, err = _run(["check", "--vectors", d, "--dut", os.path.join(d, "expected.hex"),
                    "--report", mpath, "--force"], capsys)
    assert rc == 2 and "is part of the input" in err
    assert open(mpath).read() == before


def test_gen_force_never_replaces_a_foreign_directory(tmp_path, capsys):
    other = tmp_path / "mine"
    (other / "sub").mkdir(parents=True)
    (other / "notes.txt").write_text("keep")
    rc, err = _run(["gen", "--format", "fp4", "--op", "quantize", "--out", str(other),
                    "--force"], capsys)
    assert rc == 2 and "not an output of mxverify gen" in err
    assert (other / "notes.txt").read_text() == "keep" and (other / "sub").is_dir()


GEN_RACER = """
import sys, time
from pathlib import Path
from verification import vectors
from verification.cli import main
out, me, peer = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
bar = out.parent / "barrier"
write = vectors.write_suite
def write_then_wait(*args, **kwargs):   # inside the writer, after every check passed
    result = write(*args, **kwargs)
    (bar / me).touch()
    t0 = time.time()
    while not (bar / peer).exists() and time.time() - t0 < 60:
        time.sleep(0.01)
    return result
vectors.write_suite = write_then_wait
seed = "1" if me == "a" else "2"
sys.exit(main(["gen", "--format", "fp4", "--op", "quantize", "--seed", seed, "--emit", "bin",
               "--out", str(out)]))
"""


def test_two_gens_to_the_same_out_one_wins(tmp_path):
    """Two real `mxverify gen --out same` processes past the existence check at once:
    before, both exited 0 and one suite silently replaced the other."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "vec"
    (tmp_path / "barrier").mkdir()
    env = dict(os.environ, PYTHONPATH=str(root))
    procs = {me: subprocess.Popen([sys.executable, "-c", GEN_RACER, str(out), me, peer],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for me, peer in (("a", "b"), ("b", "a"))}
    res = {me: (p.wait(timeout=120), p.stderr.read().strip()) for me, p in procs.items()}
    assert sorted(rc for rc, _ in res.values()) == [0, 2], res
    winner = next(me for me, (rc, _) in res.items() if rc == 0)
    err = next(e for rc, e in res.values() if rc == 2)
    assert "\n" not in err and "was written by another process" in err and "kept at" in err
    assert json.load(open(out / "manifest.json"))["seed"] == (1 if winner == "a" else 2)


# ------------------------------------------------------------------ CLI audit (2026-12-07)
def _flipped_dut(suite, tmp_path, vector=7):
    L = _lines(suite)
    L[vector] = L[vector][:4] + "%X" % (int(L[vector][4], 16) ^ 1) + L[vector][5:]
    return _dut(tmp_path, "flip.hex", "\n".join(L) + "\n")


@pytest.mark.parametrize("change", [
    lambda m: m.update(files=[]),
    lambda m: m["files"].update({"vectors.hex": "x"}),
    lambda m: m["files"]["vectors.hex"].update(sha256=5),
    lambda m: m.update(profile=None),
    lambda m: m.update(layout="x"),
    lambda m: m.update(category_counts=[1]),
], ids=["files_list", "files_entry_str", "sha256_int", "profile_null", "layout_str",
        "category_counts_list"])
def test_manifest_with_wrong_types_is_one_line_not_a_traceback(suite, tmp_path, capsys,
                                                               change):
    """Before: AttributeError/TypeError tracebacks (exit 1) for a hand-edited manifest."""
    d = _edited_suite(suite, tmp_path, change, keep_self_hash=False)
    rc, err = _run(["check", "--vectors", d, "--dut", os.path.join(suite, "expected.hex")],
                   capsys)
    assert rc == 2 and "\n" not in err and "the suite is inconsistent" in err, err


def test_junit_fails_when_the_manifest_has_no_category_counts(suite, tmp_path, capsys):
    """Before: a failing DUT got a JUnit file with tests="0" failures="0" (a CI pass)."""
    d = _edited_suite(suite, tmp_path, lambda m: m.pop("category_counts"),
                      keep_self_hash=False)
    rep = tmp_path / "r.xml"
    rc, _ = _run(["check", "--vectors", d, "--dut", _flipped_dut(suite, tmp_path),
                  "--report", str(rep)], capsys)
    assert rc == 1
    assert 'failures="1"' in rep.read_text() and "<failure " in rep.read_text()


def test_category_counts_disagreeing_with_runs_blame_the_suite(suite, tmp_path, capsys):
    """Before: exit 1 with a JUnit file whose one testcase ("foo") passed."""
    d = _edited_suite(suite, tmp_path, lambda m: m.update(category_counts={"foo": 1}),
                      keep_self_hash=False)
    rep = tmp_path / "r.xml"
    rc, err = _run(["check", "--vectors", d, "--dut", _flipped_dut(suite, tmp_path),
                    "--report", str(rep)], capsys)
    assert rc == 2 and "category_counts do not match category_runs" in err
    assert not rep.exists()


def test_transposed_npz_dut_is_bad_input_not_a_failing_dut(suite, tmp_path, capsys):
    """Before: [count, N] arrays were reshaped to [N, count]: a correct DUT 'FAIL'ed."""
    import numpy as np
    _, arrays = _expected_fields(suite)
    p = tmp_path / "dut.npz"
    np.savez(p, **{k: np.ascontiguousarray(v.T) for k, v in arrays.items()})
    rc, err = _run(["check", "--vectors", suite, "--dut", str(p)], capsys)
    assert rc == 2 and "has shape [1, " in err and "\n" not in err, err
    np.savez(p, **{k: v.reshape(-1) for k, v in arrays.items()})   # flat is fine
    assert _run(["check", "--vectors", suite, "--dut", str(p)], capsys)[0] == 0


def test_report_named_twice_is_refused_before_the_check(suite, tmp_path, capsys):
    """Before: the check ran, printed its verdict and wrote r.json, then exited 2."""
    rep = tmp_path / "r.json"
    rc = main(["check", "--vectors", suite, "--dut", os.path.join(suite, "expected.hex"),
               "--report", str(rep), "--report", str(tmp_path / "." / "r.json")])
    out, err = capsys.readouterr()
    assert rc == 2 and "given twice" in err and out == "" and not rep.exists()


@pytest.mark.parametrize("argv", [["conformance", "--against", ""],
                                  ["conformance", "--against", "ml_dtypes", "--format", ","]])
def test_conformance_with_an_empty_list_is_bad_input(argv, capsys):
    """Before: nothing compared, an empty matrix and exit 0."""
    rc, err = _run(argv, capsys)
    assert rc == 2 and "is empty" in err


@pytest.mark.parametrize("seed", ["-1", str(1 << 64)])
def test_seed_outside_64_bits_is_refused(tmp_path, capsys, seed):
    """Before: taken modulo 2^64 (-1 gave seed 2^64-1's vectors), recorded as given."""
    with pytest.raises(SystemExit) as e:
        main(["gen", "--format", "fp4", "--op", "convert", "--seed", seed,
              "--out", str(tmp_path / "v")])
    assert e.value.code == 2 and "0 .. 2^64-1" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_bad_integer_option_names_the_type_int(capsys):
    with pytest.raises(SystemExit):
        main(["exhaustive", "--format", "fp4", "--limit", "abc"])
    assert "invalid int value: 'abc'" in capsys.readouterr().err   # was "invalid _int value"


def test_hex_dut_with_a_utf8_bom_is_text(suite, tmp_path, capsys):
    """Before: 'not a text file (non-ASCII bytes); use --dut-format bin'."""
    p = _dut(tmp_path, "bom.hex", b"\xef\xbb\xbf" + "\n".join(_lines(suite)).encode() + b"\n")
    assert _run(["check", "--vectors", suite, "--dut", p], capsys)[0] == 0


@pytest.mark.parametrize("make, msg", [
    (lambda L: ["xx" + L[0][2:]] + L[1:], "dut.hex:1: 'x' is an unknown (X/Z) value"),
    (lambda L: [L[0], "0x" + L[1]] + L[2:], "dut.hex:2: '0x' prefix"),
])
def test_hex_dut_x_values_and_0x_prefixes_are_named(suite, tmp_path, capsys, make, msg):
    """Before: both were "invalid hex digit 'x'; each line must be 66 hex digits"."""
    p = _dut(tmp_path, "dut.hex", "\n".join(make(_lines(suite))) + "\n")
    rc, err = _run(["check", "--vectors", suite, "--dut", p], capsys)
    assert rc == 2 and msg in err and "\n" not in err, err


def test_hex_file_checked_as_npz_says_it_is_not_a_zip(suite, capsys):
    """Before: numpy's 'pickled (object) data ... allow_pickle' advice."""
    rc, err = _run(["check", "--vectors", suite, "--dut", os.path.join(suite, "expected.hex"),
                    "--dut-format", "npz"], capsys)
    assert rc == 2 and "not an .npz (zip) file" in err and "pickle" not in err, err


def test_hex_dut_can_be_a_pipe_and_a_directory_is_named(suite, tmp_path, capsys):
    """Before: a FIFO (`vvp ... | mxverify check --dut /dev/stdin`) was 'DUT file not
    found', and so was a directory."""
    import threading
    fifo = tmp_path / "dut.fifo"
    os.mkfifo(fifo)
    text = open(os.path.join(suite, "expected.hex")).read()
    writer = threading.Thread(target=lambda: fifo.write_text(text), daemon=True)
    writer.start()
    rc, err = _run(["check", "--vectors", suite, "--dut", str(fifo), "--dut-format", "hex"],
                   capsys)
    writer.join(timeout=10)
    assert rc == 0, err
    rc, err = _run(["check", "--vectors", suite, "--dut", str(tmp_path)], capsys)
    assert rc == 2 and "is a directory" in err
