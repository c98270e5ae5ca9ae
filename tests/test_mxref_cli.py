"""The mxref CLI: commands, the .npz layout, one-line errors with exit 2, and the sweep checks."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mxref
from mxref import sweep as sweep_mod
from mxref.cli import main
from mxref.npzfile import load_npz, save_npz


def run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_bad_input(argv, capsys, match):
    rc, out, err = run(argv, capsys)
    assert rc == 2, (rc, out, err)
    assert err.startswith("mxref: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and match in err, err


@pytest.fixture
def npy(tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 70)).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, x)
    return x, str(path)


# ---------------------------------------------------------------- formats / decode
def test_formats_table_lists_every_format_and_e8m0(capsys):
    rc, out, _ = run(["formats"], capsys)
    assert rc == 0
    for key, f in mxref.FORMATS.items():
        row = next(line for line in out.splitlines() if line.startswith(key + " "))
        assert repr(f.max_normal) in row and repr(f.min_subnormal) in row
    assert "e8m0" in out and "0xff" in out
    assert "0x7c, 0xfc" in out            # E5M2 infinities, both signs


def test_decode_prints_code_bits_value(capsys):
    rc, out, _ = run(["decode", "--format", "fp8_e4m3", "0x7e", "0x3f", "0xff", "1"], capsys)
    assert rc == 0
    assert out.splitlines() == ["0x7e  0.1111.110  448.0", "0x3f  0.0111.111  1.875",
                                "0xff  1.1111.111  nan", "0x01  0.0000.001  0.001953125"]
    rc, out, _ = run(["decode", "-f", "e8m0", "0x7f", "0xff"], capsys)
    assert out.splitlines() == ["0x7f  01111111  1.0", "0xff  11111111  nan"]


def test_decode_bad_codes(capsys):
    assert_bad_input(["decode", "-f", "fp4_e2m1", "0x10"], capsys, "out of range")
    assert_bad_input(["decode", "-f", "fp4_e2m1", "seven"], capsys, "not an integer")
    assert_bad_input(["decode", "-f", "fp5", "1"], capsys, "unknown format")


# ---------------------------------------------------------------- quantize / dequantize
def test_quantize_dequantize_round_trip(npy, tmp_path, capsys):
    x, path = npy
    out = str(tmp_path / "q.npz")
    rc, _, _ = run(["quantize", path, "--format", "fp6_e3m2", "--axis", "0",
                    "--block-size", "2", "--profile", "microxcaling", "-o", out], capsys)
    assert rc == 0
    z = np.load(out)
    assert set(z.files) >= {"codes", "scales", "shape", "axis", "block_size", "format", "profile"}
    assert str(z["format"]) == "fp6_e3m2" and int(z["axis"]) == 0 and int(z["block_size"]) == 2
    prof = json.loads(str(z["profile"]))
    assert prof["name"] == "microxcaling" and prof["hash"] == mxref.get_profile("microxcaling").hash
    expect = mxref.quantize(x, "fp6_e3m2", axis=0, block_size=2, profile="microxcaling")
    assert load_npz(out) == expect
    y = str(tmp_path / "y.npy")
    assert run(["dequantize", out, "-o", y, "--dtype", "float64"], capsys)[0] == 0
    got = np.load(y)
    assert got.dtype == np.float64
    assert np.array_equal(got.view(np.uint64), mxref.dequantize(expect, np.float64).view(np.uint64))


def test_refuses_to_overwrite_without_force(npy, tmp_path, capsys):
    _, path = npy
    out = tmp_path / "q.npz"
    out.write_bytes(b"keep me")
    assert_bad_input(["quantize", path, "-f", "fp4", "-o", str(out)], capsys, "--force")
    assert out.read_bytes() == b"keep me"
    # --force replaces only an earlier mxref output, never a file of someone else's
    assert_bad_input(["quantize", path, "-f", "fp4", "-o", str(out), "--force"], capsys,
                     "not an output of mxref")
    assert out.read_bytes() == b"keep me"
    out.unlink()
    assert run(["quantize", path, "-f", "fp4", "-o", str(out)], capsys)[0] == 0
    assert run(["quantize", path, "-f", "fp8_e4m3", "-o", str(out), "--force"], capsys)[0] == 0
    assert load_npz(str(out)).fmt.key == "fp8_e4m3"
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_quantize_bad_inputs(npy, tmp_path, capsys):
    _, path = npy
    out = str(tmp_path / "q.npz")
    assert_bad_input(["quantize", str(tmp_path / "missing.npy"), "-f", "fp4", "-o", out],
                     capsys, "does not exist")
    assert_bad_input(["quantize", path, "-f", "fp4", "-o", str(tmp_path / "q.bin")],
                     capsys, "must end in .npz")
    assert_bad_input(["quantize", path, "-f", "fp4", "--axis", "5", "-o", out], capsys,
                     "axis 5")
    assert_bad_input(["quantize", path, "-f", "fp4", "--block-size", "0", "-o", out], capsys,
                     "block size")
    ints = str(tmp_path / "i.npy")
    np.save(ints, np.arange(4))
    assert_bad_input(["quantize", ints, "-f", "fp4", "-o", out], capsys, "dtype")
    assert_bad_input(["quantize", path, "-o", out], capsys, "--format")
    assert not os.path.exists(out)


def _write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("corrupt,match", [
    (lambda d: d.pop("scales"), "lacks key(s) scales"),
    (lambda d: d.update(codes=d["codes"].astype(np.int16)), "must be uint8"),
    (lambda d: d.update(shape=np.array([3, 71])), "does not match shape"),
    (lambda d: d.update(scales=d["scales"][:, :2]), "scales shape"),
    (lambda d: d.update(profile=d["profile"].replace('"rounding": "rne"',
                                                     '"rounding": "away"')), "hash"),
    (lambda d: d.update(profile=np.str_("{not json")), "not valid JSON"),
    (lambda d: d.update(format=np.str_("fp5")), "unknown format"),
    (lambda d: d.update(codes=d["codes"] | 0xF0), "out of range"),
    (lambda d: d.update(axis=np.int64(4)), "axis 4"),
])
def test_dequantize_validates_the_npz(npy, tmp_path, capsys, corrupt, match):
    x, _ = npy
    good = str(tmp_path / "good.npz")
    save_npz(good, mxref.quantize(x, "fp4_e2m1"))
    d = {k: v for k, v in np.load(good).items()}
    d["profile"] = np.str_(str(d["profile"]))
    corrupt(d)
    bad = str(tmp_path / "bad.npz")
    _write_npz(bad, **d)
    assert_bad_input(["dequantize", bad, "-o", str(tmp_path / "y.npy")], capsys, match)
    assert not os.path.exists(tmp_path / "y.npy")


def test_dequantize_rejects_non_npz(tmp_path, capsys):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    assert_bad_input(["dequantize", str(junk), "-o", str(tmp_path / "y.npy")], capsys,
                     "not a readable")


def test_pack_command_layouts(npy, tmp_path, capsys):
    x, path = npy
    q = str(tmp_path / "q.npz")
    run(["quantize", path, "-f", "fp4", "-o", q], capsys)
    p = str(tmp_path / "p.npz")
    assert run(["pack", q, "-o", p], capsys)[0] == 0
    z = np.load(p)
    mx = mxref.quantize(x, "fp4")
    assert str(z["layout"]) == "fp4-lo-first"
    assert np.array_equal(z["packed"], mxref.pack_codes(mx.codes, "fp4"))
    assert_bad_input(["pack", q, "--layout", "llamacpp", "-o", str(tmp_path / "l.npz")],
                     capsys, "multiple of 32")   # K = 70


# ---------------------------------------------------------------- sweep
def test_sweep_passes_for_every_format_and_profile_on_a_strided_subset(capsys):
    for fmt in mxref.FORMATS:
        for profile in mxref.PRESETS:
            res = sweep_mod.sweep_format(fmt, profile, stride=65521, chunk=1 << 14,
                                         progress=False)
            assert res.ok, res.summary()
            assert res.n_inputs == 2 * (0x7F800000 // 65521 + 1) + 2 * (0x7FFFFE // 65521 + 1)


def test_sweep_counts_every_pattern_once_when_stride_is_1():
    # the runs cover -Inf..-0, +0..+Inf and both NaN ranges: 2^32 patterns exactly
    assert sum(r[2] for r in sweep_mod._ranges(1)) == 2 ** 32


def test_sweep_cli_prints_throughput(capsys):
    rc, out, _ = run(["sweep", "-f", "fp8_e4m3", "--stride", "2^16", "--no-progress"], capsys)
    assert rc == 0 and "monotonic   ok" in out and "M elements/s" in out


def test_sweep_detects_wrong_ties(monkeypatch, capsys):
    # an encoder that rounds ties away from zero must fail the RNE profile's nearest check
    real = sweep_mod.encode
    monkeypatch.setattr(sweep_mod, "encode",
                        lambda x, fmt, profile: real(x, fmt, "microxcaling"))
    # stride 2^16 visits every bfloat16 pattern, so every FP4 tie (0.25, 0.75, ...) is hit
    res = sweep_mod.sweep_format("fp4_e2m1", "ocp", stride=1 << 16, progress=False)
    assert res.violations["nearest"] > 0 and not res.ok
    rc, out, _ = run(["sweep", "-f", "fp4_e2m1", "--stride", "2^16", "--no-progress"], capsys)
    assert rc == 1 and "FAIL" in out


def test_sweep_detects_non_monotonic_and_bad_round_trip(monkeypatch):
    real = sweep_mod.encode

    def swapped(x, fmt, profile):   # swap codes 2 and 3 (1.0 and 1.5 in FP4)
        c = real(x, fmt, profile)
        return np.where(c == 2, 3, np.where(c == 3, 2, c)).astype(np.uint8)

    monkeypatch.setattr(sweep_mod, "encode", swapped)
    res = sweep_mod.sweep_format("fp4_e2m1", "ocp", stride=4099, progress=False)
    assert res.violations["monotonic"] > 0 and res.violations["nearest"] > 0
    assert res.violations["round_trip"] > 0


def test_sweep_bad_arguments(capsys):
    assert_bad_input(["sweep", "-f", "fp4", "--chunk", "lots"], capsys, "not a count")
    assert_bad_input(["sweep", "-f", "fp4", "--stride", "0"], capsys, "stride")
    assert_bad_input(["sweep", "-f", "fp4", "--profile", "nope"], capsys, "invalid choice")


def test_python_dash_m_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mxref", "decode", "-f", "fp4", "0x10"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("mxref: error:") and not r.stdout


# ---------------------------------------------------------------- issue 13: trust
def test_corrupted_npz_is_one_line(npy, tmp_path, capsys):
    """Before: a zipfile.BadZipFile traceback (numpy reads members lazily)."""
    _, path = npy
    q = tmp_path / "q.npz"
    assert run(["quantize", path, "-f", "fp4", "-o", str(q)], capsys)[0] == 0
    data = bytearray(q.read_bytes())
    data[100] ^= 0xFF   # inside the first member's bytes: its CRC no longer matches
    q.write_bytes(bytes(data))
    assert_bad_input(["dequantize", str(q), "-o", str(tmp_path / "y.npy")], capsys,
                     "is truncated or corrupted")


def test_bfloat16_npy_is_accepted(tmp_path, capsys):
    """np.save of an ml_dtypes.bfloat16 array records dtype |V2; before, it was refused."""
    import ml_dtypes
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(ml_dtypes.bfloat16)
    p = tmp_path / "b.npy"
    np.save(p, x)
    assert run(["quantize", str(p), "-f", "fp8_e4m3", "-o", str(tmp_path / "b.npz")],
               capsys)[0] == 0
    got = load_npz(str(tmp_path / "b.npz"))
    want = mxref.quantize(x, "fp8_e4m3")
    assert np.array_equal(got.codes, want.codes) and np.array_equal(got.scales, want.scales)


def test_force_never_overwrites_the_input(npy, tmp_path, capsys):
    _, path = npy
    q = tmp_path / "q.npz"
    assert run(["quantize", path, "-f", "fp4", "-o", str(q)], capsys)[0] == 0
    before = q.read_bytes()
    assert_bad_input(["pack", str(q), "-o", str(q), "--force"], capsys,
                     "is also an input of this command")
    assert q.read_bytes() == before


QUANTIZE_RACER = """
import sys, time
from pathlib import Path
import numpy as np
from mxref.cli import main
src, out, me, peer = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
bar = out.parent / "barrier"
savez = np.savez
def savez_then_wait(*args, **kwargs):  # inside the writer: both are past the existence check
    savez(*args, **kwargs)
    (bar / me).touch()
    t0 = time.time()
    while not (bar / peer).exists() and time.time() - t0 < 60:
        time.sleep(0.01)
np.savez = savez_then_wait
fmt = "fp4_e2m1" if me == "a" else "fp8_e4m3"
sys.exit(main(["quantize", src, "--format", fmt, "-o", str(out)]))
"""


def test_two_quantizes_to_the_same_npz_one_wins(tmp_path):
    """Two real `mxref quantize -o same.npz` processes past the existence check at once:
    one result lands, the other exits 2 with one line saying where its result was kept
    (before: both exited 0 and one file silently replaced the other)."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "w.npy"
    np.save(src, np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32))
    out = tmp_path / "same.npz"
    (tmp_path / "barrier").mkdir()
    env = dict(os.environ, PYTHONPATH=str(root))
    procs = {me: subprocess.Popen([sys.executable, "-c", QUANTIZE_RACER, str(src), str(out),
                                   me, peer], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
             for me, peer in (("a", "b"), ("b", "a"))}
    res = {me: (p.wait(timeout=120), p.stderr.read().strip()) for me, p in procs.items()}
    assert sorted(rc for rc, _ in res.values()) == [0, 2], res
    winner = next(me for me, (rc, _) in res.items() if rc == 0)
    err = next(e for rc, e in res.values() if rc == 2)
    assert "\n" not in err and "kept at" in err, err
    assert str(load_npz(str(out)).fmt.key) == ("fp4_e2m1" if winner == "a" else "fp8_e4m3")


# ---------------------------------------------------------------- CLI audit (new-user pass)
def test_empty_npy_file_is_one_line(tmp_path, capsys):
    """A 0-byte input: numpy raises EOFError, which was a traceback (exit 1)."""
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    out = tmp_path / "q.npz"
    assert_bad_input(["quantize", str(empty), "-f", "fp4", "-o", str(out)], capsys,
                     "is not a readable .npy file")
    assert not out.exists()


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">f2"])
def test_big_endian_npy_quantizes_its_values(tmp_path, capsys, dtype):
    """A big-endian .npy (same dtype name, float32 etc.) was read byte-swapped: silently
    wrong codes and scales (0..63 quantized to all zeros)."""
    x = np.arange(64, dtype=dtype).reshape(2, 32)
    src, out = tmp_path / "be.npy", tmp_path / "be.npz"
    np.save(src, x)
    assert run(["quantize", str(src), "-f", "fp4", "-o", str(out)], capsys)[0] == 0
    got = load_npz(str(out))
    assert got == mxref.quantize(x.astype(dtype.replace(">", "<")), "fp4")
    # by hand: block 0 has amax 31 -> X = 2^(4-2); 0, 1, 2, 3 scale to 0, 0.25, 0.5, 0.75,
    # which round (ties to even) to codes 0, 0, 1 (0.5), 2 (1.0)
    assert got.scales[0, 0] == 127 + 2 and list(got.codes[0, :4]) == [0, 0, 1, 2]
    assert mxref.encode(np.array([1.0, 3.0], dtype=dtype), "fp4").tolist() == [2, 5]


def test_block_size_beyond_int64_is_one_line(npy, tmp_path, capsys):
    """Before: a numba TypingError traceback (float32 input)."""
    _, path = npy
    out = tmp_path / "q.npz"
    assert_bad_input(["quantize", path, "-f", "fp4", "--block-size", str(2 ** 64), "-o",
                      str(out)], capsys, "block size")
    assert not out.exists()
    # the largest int64 is still a block size (one block per row)
    assert run(["quantize", path, "-f", "fp4", "--block-size", str(2 ** 63 - 1), "-o",
                str(out)], capsys)[0] == 0
    assert load_npz(str(out)).scales.shape == (3, 1)


@pytest.mark.parametrize("field,value", [("rounding", ["rne"]), ("scale_rule", {})])
def test_npz_profile_field_of_wrong_type_is_one_line(npy, tmp_path, capsys, field, value):
    """An edited profile JSON with a list/dict value: `in table` raised TypeError
    (unhashable), a traceback."""
    x, _ = npy
    good = str(tmp_path / "good.npz")
    save_npz(good, mxref.quantize(x, "fp4_e2m1"))
    d = {k: v for k, v in np.load(good).items()}
    prof = json.loads(str(d["profile"]))
    prof[field] = value
    d["profile"] = np.str_(json.dumps(prof))
    bad = str(tmp_path / "bad.npz")
    _write_npz(bad, **d)
    for cmd in (["dequantize", bad, "-o", str(tmp_path / "y.npy")],
                ["pack", bad, "-o", str(tmp_path / "p.npz")]):
        assert_bad_input(cmd, capsys, f"profile field {field}=")
    assert sorted(os.listdir(tmp_path)) == ["bad.npz", "good.npz", "x.npy"]


def test_decode_prints_nothing_when_a_code_is_bad(capsys):
    """Before: the valid codes' lines were printed, then the error (a partial table)."""
    for argv in (["decode", "-f", "fp6_e2m3", "0x01", "0x40"],
                 ["decode", "-f", "e8m0", "0x7f", "0x100"]):
        rc, out, err = run(argv, capsys)
        assert rc == 2 and out == "" and "out of range" in err, (rc, out, err)


def test_sweep_stride_beyond_int64(capsys):
    """--stride past int64 was a numba TypingError traceback; any stride past 2^31 checks
    the first pattern of each of the 4 runs."""
    rc, out, _ = run(["sweep", "-f", "fp4", "--stride", str(10 ** 30), "--no-progress"],
                     capsys)
    assert rc == 0 and "4 float32 inputs" in out


def test_sweep_huge_chunk_is_one_line(capsys):
    """--chunk 2^31 or more was OOM-killed while allocating (no message at all)."""
    assert_bad_input(["sweep", "-f", "fp4", "--chunk", "2^32"], capsys,
                     "chunk 4294967296 is too large")


def test_sweep_count_with_a_huge_exponent_is_refused_at_once(capsys):
    """10^99999999 was computed (minutes, and GBs) before any check."""
    assert_bad_input(["sweep", "-f", "fp4", "--stride", "10^99999999"], capsys,
                     "no count here is above 2^64")


def test_write_failure_names_the_output(npy, tmp_path, capsys, monkeypatch):
    """A full disk surfaced as numpy's bare "262144 requested and 25568 written" (exit 1):
    the line now names the output and what to do; nothing is left behind."""
    _, path = npy

    def full_disk(*args, **kwargs):
        raise OSError("262144 requested and 25568 written")

    monkeypatch.setattr(np, "savez", full_disk)
    out = tmp_path / "q.npz"
    rc, _, err = run(["quantize", path, "-f", "fp4", "-o", str(out)], capsys)
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"could not write -o/--output {out}" in err and "262144 requested" in err, err
    assert sorted(os.listdir(tmp_path)) == ["x.npy"]


def test_pipes_are_read_as_input(npy, tmp_path):
    """`cat x.npy | mxref quantize /dev/stdin` and `cat q.npz | mxref dequantize /dev/stdin`
    work: numpy seeks in what it loads, so a pipe used to be refused as 'truncated or
    corrupted'. The codes equal those of the file read directly (bit for bit)."""
    x, path = npy
    direct, piped, back = tmp_path / "d.npz", tmp_path / "p.npz", tmp_path / "b.npy"
    assert main(["quantize", path, "--format", "fp4_e2m1", "-o", str(direct)]) == 0
    cli = [sys.executable, "-m", "mxref"]
    # input= feeds a real pipe (a file handed as stdin would be seekable)
    with open(path, "rb") as f:
        r = subprocess.run(cli + ["quantize", "/dev/stdin", "--format", "fp4_e2m1", "-o",
                                  str(piped)], input=f.read(), capture_output=True)
    assert r.returncode == 0, r.stderr
    a, b = load_npz(str(direct)), load_npz(str(piped))
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.scales, b.scales)
    with open(direct, "rb") as f:
        r = subprocess.run(cli + ["dequantize", "/dev/stdin", "-o", str(back)],
                           input=f.read(), capture_output=True)
    assert r.returncode == 0, r.stderr
    expect = mxref.dequantize(a)
    assert np.load(back).view(np.uint32).tolist() == expect.view(np.uint32).tolist()


def test_output_under_a_file_says_the_parent_is_a_file(npy, tmp_path, capsys):
    _, path = npy
    (tmp_path / "afile").write_text("x")
    assert_bad_input(["quantize", path, "--format", "fp4_e2m1", "-o",
                      str(tmp_path / "afile" / "q.npz")], capsys, "afile: is a file")
