"""mxverify gen + check: self-check passes, every flipped bit is found, runs are reproducible."""
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from verification import check as C
from verification.cli import main
from verification.vectors import build, layout, outputs_of

OPS = ["quantize", "dequantize", "dot", "convert"]


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    root = tmp_path_factory.mktemp("suites")
    out = {}
    for op in OPS:
        d = str(root / op)
        build(d, op, "fp8_e4m3" if op == "dot" else "fp4_e2m1", "1", seed=3)
        out[op] = d
    return out


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind", ["hex", "bin"])
def test_expected_outputs_pass_their_own_check(suites, op, kind, capsys):
    d = suites[op]
    assert main(["check", "--vectors", d, "--dut", os.path.join(d, f"expected.{kind}")]) == 0
    assert "no errors found" in capsys.readouterr().out


def test_npz_dut_and_reports(suites, tmp_path):
    d = suites["quantize"]
    z = np.load(os.path.join(d, "vectors.npz"))
    dut = tmp_path / "dut.npz"
    np.savez(dut, scale=z["scale"], codes=z["codes"])
    rj, rx = tmp_path / "r.json", tmp_path / "r.xml"
    assert main(["check", "--vectors", d, "--dut", str(dut), "--report", str(rj),
                 "--report", str(rx)]) == 0
    assert json.loads(rj.read_text())["verdict"] == "pass"
    assert 'failures="0"' in rx.read_text()


def test_same_seed_gives_byte_identical_files(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    build(a, "quantize", "fp6_e3m2", "1", seed=11)
    build(b, "quantize", "fp6_e3m2", "1", seed=11)
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for n in names:
        assert open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read(), n
    c = str(tmp_path / "c")
    build(c, "quantize", "fp6_e3m2", "1", seed=12)
    assert open(os.path.join(a, "vectors.bin"), "rb").read() != \
        open(os.path.join(c, "vectors.bin"), "rb").read()


def test_manifest_records_profile_counts_layout_hashes(suites):
    m = json.load(open(os.path.join(suites["quantize"], "manifest.json")))
    assert m["profile"]["name"] == "ocp" and len(m["profile"]["hash"]) == 16
    assert sum(m["category_counts"].values()) == m["n_vectors"]
    assert {"amax_position", "tie", "near_tie", "nan_inf", "all_zero", "scale_min",
            "scale_max", "saturate", "underflow", "subnormal_result"} <= set(m["categories"])
    assert [f["name"] for f in m["layout"]["fields"]] == ["x", "scale", "codes"]
    assert set(m["files"]) == {"vectors.hex", "expected.hex", "vectors.bin", "expected.bin",
                               "vectors.npz", "vectors.jsonl"}


@settings(max_examples=25)
@given(data=st.data())
def test_one_flipped_bit_is_found_and_located(suites, tmp_path_factory, data):
    op = data.draw(st.sampled_from(OPS))
    d = suites[op]
    s = C.load_suite(d)
    blob = bytearray(open(os.path.join(d, "expected.bin"), "rb").read())
    outs = outputs_of(layout(s.man["op"], s.man["block_size"]))
    rec = sum(f.nbytes for f in outs)
    byte = data.draw(st.integers(0, len(blob) - 1))
    bit = data.draw(st.integers(0, 7))
    blob[byte] ^= 1 << bit
    dut = tmp_path_factory.mktemp("flip") / "dut.bin"
    dut.write_bytes(bytes(blob))
    r = C.compare(s, C.read_dut(str(dut), s, None), nan="exact", zero_sign="strict",
                  max_errors=0)
    # where the flip landed: vector, field, element
    v, off = divmod(byte, rec)
    for f in outs:
        if off < f.nbytes:
            el = off // (f.bits // 8)
            break
        off -= f.nbytes
    assert r["verdict"] == "fail" and r["mismatches"] == 1
    fl = r["failures"][0]
    assert (fl["vector"], fl["field"]) == (v, f.name)
    assert fl["element"] == (el if f.count > 1 and f.kind != "scale" else None)
    flipped = 1 << (bit + 8 * (byte - (byte // (f.bits // 8)) * (f.bits // 8)))
    assert int(fl["xor"], 16) == flipped


def test_flip_in_hex_reports_xor_and_steps(suites, tmp_path, capsys):
    d = suites["convert"]
    lines = open(os.path.join(d, "expected.hex")).read().splitlines()
    s = C.load_suite(d)
    i = 20
    lines[i] = "%02X" % (int(lines[i], 16) ^ 0x01)
    dut = tmp_path / "dut.hex"
    dut.write_text("\n".join(lines) + "\n")
    assert main(["check", "--vectors", d, "--dut", str(dut)]) == 1
    out = capsys.readouterr().out
    assert f"vector {i} " in out and "xor 01" in out and "FAIL: 1 of" in out
    assert s.n == len(lines)


def test_force_replaces_and_refuses_without(tmp_path, capsys):
    d = str(tmp_path / "v")
    assert main(["gen", "--format", "int8", "--op", "dequantize", "--out", d]) == 0
    assert main(["gen", "--format", "int8", "--op", "dequantize", "--out", d]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["gen", "--format", "int8", "--op", "dequantize", "--out", d, "--force",
                 "--seed", "5"]) == 0
    assert json.load(open(os.path.join(d, "manifest.json")))["seed"] == 5
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_exhaustive_dequantize_covers_every_scale_and_code(tmp_path):
    m = build(str(tmp_path / "e"), "dequantize", "fp4_e2m1", "exhaustive", emit=("bin",))
    assert m["n_vectors"] == 256 * 1   # 16 codes fit one 32-element block per scale
    m = build(str(tmp_path / "c"), "convert", "fp8_e5m2", "exhaustive", emit=("bin",))
    assert m["category_counts"] == {"exhaustive_bf16": 65536, "exhaustive_fp16": 65536}


def test_dot_expected_is_mx_dot_per_vector():
    import mxref
    from mxref.core import MXArray
    from verification.cases import generate
    from verification.vectors import expected
    cs = generate("dot", "fp8_e5m2", "1", 4)
    y = expected("dot", "fp8_e5m2", "ocp", 32, cs.fields)["y"][:, 0]
    f, fmt, p = cs.fields, mxref.get_format("fp8_e5m2"), mxref.get_profile("ocp")
    for i in range(0, cs.n, 7):
        a = MXArray(f["codes_a"][i].copy(), f["scale_a"][i].copy(), fmt, (64,), 0, 32, p)
        b = MXArray(f["codes_b"][i].copy(), f["scale_b"][i].copy(), fmt, (64,), 0, 32, p)
        assert np.float32(mxref.mx_dot(a, b)).view(np.uint32) == y[i]
