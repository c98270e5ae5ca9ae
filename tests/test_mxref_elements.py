"""mxref element conversion against the independent Fraction oracle (tests/oracle.py).

* every code of every element format decodes to the value its bit layout gives, and
  to the published value tables (known answers from the OCP spec / mx_spec.md §1.3);
* encode(decode(c)) == c for every code, with the documented exceptions;
* EXHAUSTIVE: all 65,536 bfloat16 and all 65,536 float16 bit patterns, every element
  format, every preset profile, at scale exponents 0, -3, +5 and one that brings the
  input dtype's subnormals into the element range (where flushing shows);
* float32 and float64: exhaustive over sign, the exponents that matter and the
  rounding-relevant top mantissa bits, with sticky low-bit variants.
Comparisons are of integer codes (bit-exact), never of values with a tolerance.
"""
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

import mxref
import oracle

FORMATS = sorted(mxref.FORMATS)
PROFILES = sorted(mxref.PRESETS)
UINT = {"bfloat16": np.uint16, "float16": np.uint16, "float32": np.uint32,
        "float64": np.uint64}
NP_DTYPE = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32,
            "float64": np.float64}


def describe(bits, dtype, fmt, profile, scale_exp, got, want, limit=8):
    """A readable list of the first mismatches (input bits, value, mxref, oracle)."""
    bad = np.flatnonzero(got != want)
    x = np.asarray(bits, dtype=UINT[dtype]).view(NP_DTYPE[dtype]).astype(np.float64)
    rows = [f"{dtype} bits {int(bits[i]):#x} ({x[i]!r}) -> {fmt}/{profile} scale 2^{scale_exp}:"
            f" mxref {int(got[i]):#04x}, oracle {int(want[i]):#04x}" for i in bad[:limit]]
    return f"{len(bad)} mismatches:\n" + "\n".join(rows)


# =========================================================================== decode
def test_special_codes_follow_the_bit_layout():
    # OFP8: E5M2 is IEEE-like (exponent all ones = Inf/NaN); E4M3 keeps only S.1111.111
    # as NaN and has no Inf; FP4/FP6/INT8 have neither. Checked against the spec data.
    e5 = mxref.get_format("fp8_e5m2")
    assert e5.inf_codes == (0b11111_00,) and e5.nan_codes == (0b11111_01, 0b11111_10,
                                                               0b11111_11)
    e4 = mxref.get_format("fp8_e4m3")
    assert e4.inf_codes == () and e4.nan_codes == (0b1111_111,)
    for key in ("fp4_e2m1", "fp6_e2m3", "fp6_e3m2", "int8"):
        f = mxref.get_format(key)
        assert f.inf_codes == () and f.nan_codes == ()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("out_dtype", [np.float32, np.float64])
def test_every_code_decodes_to_its_layout_value(fmt, out_dtype):
    f = mxref.get_format(fmt)
    grid = oracle.grid_for(f)
    codes = np.arange(f.n_codes, dtype=np.uint8)
    got = mxref.decode(codes, fmt, dtype=out_dtype)
    for c in range(f.n_codes):
        want, v = grid.code_value(c), got[c]
        if want == "nan":
            assert np.isnan(v), (fmt, hex(c), v)
        elif want in ("+inf", "-inf"):
            assert np.isinf(v) and (v < 0) == (want == "-inf"), (fmt, hex(c), v)
        elif want == "-0":
            assert v == 0 and np.signbit(v), (fmt, hex(c), v)
        else:
            assert Fraction(float(v)) == want, (fmt, hex(c), v, want)
            assert not np.signbit(v) or want != 0, (fmt, hex(c), "zero must be +0")


# Known answers, transcribed from the OCP MX v1.0 tables (mx_spec.md §1.2/§1.3) and
# the OFP8 spec; negative codes are the positive code with the sign bit set.
SPEC_TABLES = {
    "fp4_e2m1": [0, 0.5, 1, 1.5, 2, 3, 4, 6],
    "fp6_e2m3": [i / 8 for i in range(8)] + [1 + i / 8 for i in range(8)]
                + [2 + i / 4 for i in range(8)] + [4 + i / 2 for i in range(8)],
    "fp6_e3m2": [0, 0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.4375,
                 0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 1.75,
                 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0,
                 8.0, 10.0, 12.0, 14.0, 16.0, 20.0, 24.0, 28.0],
}
SPEC_ANCHORS = {
    "fp8_e4m3": {0x01: 2.0 ** -9, 0x07: 0.875 * 2.0 ** -6, 0x08: 2.0 ** -6, 0x38: 1.0,
                 0x7E: 448.0, 0xFE: -448.0, 0x80: -0.0},
    "fp8_e5m2": {0x01: 2.0 ** -16, 0x03: 0.75 * 2.0 ** -14, 0x04: 2.0 ** -14, 0x3C: 1.0,
                 0x7B: 57344.0, 0x7C: np.inf, 0xFC: -np.inf},
    "int8": {0x00: 0.0, 0x01: 1 / 64, 0x40: 1.0, 0x7F: 127 / 64, 0x80: -2.0, 0x81: -127 / 64,
             0xFF: -1 / 64},
}


@pytest.mark.parametrize("fmt", sorted(SPEC_TABLES))
def test_fp4_fp6_decode_matches_spec_value_tables(fmt):
    f = mxref.get_format(fmt)
    table = SPEC_TABLES[fmt]
    assert len(table) == f.sign_bit
    pos = mxref.decode(np.arange(f.sign_bit, dtype=np.uint8), fmt, dtype=np.float64)
    neg = mxref.decode(np.arange(f.sign_bit, dtype=np.uint8) | f.sign_bit, fmt,
                       dtype=np.float64)
    assert pos.tolist() == table
    assert (-neg).tolist() == table
    assert np.signbit(neg[0]) and not np.signbit(pos[0])  # code S.0...0 is -0


@pytest.mark.parametrize("fmt", sorted(SPEC_ANCHORS))
def test_fp8_int8_decode_matches_spec_anchors(fmt):
    for code, want in SPEC_ANCHORS[fmt].items():
        got = mxref.decode(np.array([code], np.uint8), fmt, dtype=np.float64)[0]
        assert got == want and np.signbit(got) == np.signbit(want), (fmt, hex(code))
    nan_code = 0x7F if fmt == "fp8_e4m3" else 0x7D
    if fmt != "int8":
        assert np.isnan(mxref.decode(np.array([nan_code, nan_code | 0x80], np.uint8), fmt)).all()


def test_e8m0_scale_values_are_exact_powers_of_two():
    codes = np.arange(256, dtype=np.uint8)
    got = mxref.scale_values(codes, dtype=np.float64)
    assert np.isnan(got[0xFF])
    for c in range(255):
        assert Fraction(float(got[c])) == oracle.pow2(c - oracle.SCALE_BIAS), hex(c)
    # 0x00 = 2^-127 is an FP32 subnormal; it must not become 0 in float32 either
    assert mxref.scale_values(np.array([0], np.uint8), np.float32).view(np.uint32)[0] \
        == 0x00400000


# =========================================================================== round trip
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("profile", PROFILES)
def test_encode_of_decode_is_identity_except_documented_codes(fmt, profile):
    f = mxref.get_format(fmt)
    p = mxref.get_profile(profile)
    codes = np.arange(f.n_codes, dtype=np.uint8)
    values = mxref.decode(codes, fmt, dtype=np.float32)
    back = mxref.encode(values, fmt, profile)
    # Documented exceptions (mx_spec.md §1.5, semantics of the profiles):
    expected = codes.copy()
    nan = {c | s for c in f.nan_codes for s in (0, f.sign_bit)}
    for c in nan:  # decode gives a NaN without sign: re-encodes to the positive NaN code
        expected[c] = f.nan_codes[0]
    for c in f.inf_codes:  # Inf saturates to +/-max unless FP8 overflow mode is OVF
        for s in (0, f.sign_bit):
            expected[c | s] = (c | s) if p.fp8_overflow == "ovf" else (f.max_code | s)
    if f.is_int and p.int8_range == "symmetric":
        expected[0x80] = 0x81  # -2.0 clamps to -127/64: symmetric INT8 never emits -128
    assert back.tolist() == expected.tolist()


# =========================================================================== exhaustive
_CACHE = {}


def all_patterns(dtype):
    """Every bit pattern of a 16-bit dtype, decoded once by the oracle (cached)."""
    if dtype not in _CACHE:
        bits = np.arange(1 << 16, dtype=np.uint16)
        decoded = [oracle.decode_float_bits(b, dtype) for b in bits.tolist()]
        _CACHE[dtype] = bits, oracle.MagnitudeIndex(decoded)
    return _CACHE[dtype]


def subnormal_revealing_scale(dtype, fmt):
    """A scale exponent that maps the dtype's largest subnormals near the format's
    largest power of two, so flushing them (ocp_ftz) changes the codes."""
    ebits, _ = oracle.FLOAT_LAYOUTS[dtype]
    dtype_emin = 2 - (1 << (ebits - 1))
    return dtype_emin - 1 - mxref.get_format(fmt).emax


def check_exhaustive(dtype, fmt, profile, scale_exp):
    bits, index = all_patterns(dtype)
    p = mxref.get_profile(profile)
    got = mxref.encode(bits.view(NP_DTYPE[dtype]), fmt, p, scale_exp)
    want = np.array(oracle.encode_many(index, mxref.get_format(fmt), p, scale_exp), np.uint8)
    assert np.array_equal(got, want), describe(bits, dtype, fmt, profile, scale_exp, got, want)
    return got


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("profile", PROFILES)
def test_exhaustive_16bit_inputs_match_oracle(dtype, fmt, profile):
    # -300 / 300: far outside every range (everything saturates / underflows), checks
    # that no shift or exponent arithmetic wraps around
    for scale_exp in (0, -3, 5, subnormal_revealing_scale(dtype, fmt), -300, 300):
        check_exhaustive(dtype, fmt, profile, scale_exp)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_flush_changes_exactly_the_dtype_subnormals(dtype, fmt):
    # The exhaustive test above would pass if ocp_ftz silently equalled ocp; this one
    # shows the flush does something, and only to subnormal inputs.
    s = subnormal_revealing_scale(dtype, fmt)
    bits, _ = all_patterns(dtype)
    x = bits.view(NP_DTYPE[dtype])
    kept = mxref.encode(x, fmt, "ocp", s)
    flushed = mxref.encode(x, fmt, "ocp_ftz", s)
    ebits, mbits = oracle.FLOAT_LAYOUTS[dtype]
    sub = ((bits >> mbits) & ((1 << ebits) - 1) == 0) & (bits & ((1 << mbits) - 1) != 0)
    differ = kept != flushed
    assert differ.any()
    assert not differ[~sub].any()
    f = mxref.get_format(fmt)
    negative = (bits >> (ebits + mbits)) == 1
    zero = np.where(negative & (not f.is_int), f.sign_bit, 0)
    assert np.array_equal(flushed[sub], zero[sub])


def rounding_relevant_patterns(dtype, fmt, exp_fields):
    """Sign x exponent fields x the top (element bits + 2) mantissa bits x sticky
    variants of the remaining bits: every pattern that can round differently."""
    ebits, mbits = oracle.FLOAT_LAYOUTS[dtype]
    top = min(mxref.get_format(fmt).step_bits + 2, mbits)
    low = mbits - top
    sticky = sorted({0, 1, (1 << low) - 1, 1 << max(low - 1, 0)}) if low else [0]
    mant = (np.arange(1 << top, dtype=np.uint64)[:, None] << np.uint64(low)) \
        | np.array(sticky, dtype=np.uint64)[None, :]
    e = np.asarray(exp_fields, dtype=np.uint64)
    pos = (e[:, None] << np.uint64(mbits)) | mant.reshape(-1)[None, :]
    pos = pos.reshape(-1)
    return np.concatenate([pos, pos | (np.uint64(1) << np.uint64(ebits + mbits))])


def float32_case(fmt):
    """Rounding-relevant float32 patterns for fmt, decoded once by the oracle (cached).

    Exponent fields: the subnormal edge (reached at scale 2^-130), the range around
    1.0 (unit scale) and the top of the range with Inf/NaN; the fields in between
    only ever saturate or underflow, which the 16-bit exhaustive tests cover."""
    key = ("float32", fmt)
    if key not in _CACHE:
        fields = list(range(0, 30)) + list(range(100, 150)) + [253, 254, 255]
        bits = rounding_relevant_patterns("float32", fmt, fields).astype(np.uint32)
        decoded = [oracle.decode_float_bits(b, "float32") for b in bits.tolist()]
        _CACHE[key] = bits, oracle.MagnitudeIndex(decoded)
    return _CACHE[key]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("profile", ["ocp", "microxcaling", "ocp_ovf", "ocp_ftz", "int8_asym"])
def test_float32_rounding_relevant_patterns_match_oracle(fmt, profile):
    bits, index = float32_case(fmt)
    for scale_exp in (0, -130):  # -130: FP32 subnormals land inside the element range
        want = np.array(oracle.encode_many(index, mxref.get_format(fmt),
                                           mxref.get_profile(profile), scale_exp), np.uint8)
        got = mxref.encode(bits.view(np.float32), fmt, profile, scale_exp)
        assert np.array_equal(got, want), describe(bits, "float32", fmt, profile, scale_exp,
                                                   got, want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_float64_rounding_relevant_patterns_match_oracle(fmt):
    # exponents where anything happens at unit scale; around 2^-126 (FP32 subnormal
    # magnitudes, normal in float64: flushed by ocp_ftz, shown at scale 2^-130); the
    # float64 subnormal edge and Inf/NaN
    fields = (list(range(1023 - 40, 1023 + 20)) + list(range(1023 - 150, 1023 - 120))
              + [0, 1, 2, 0x7FE, 0x7FF])
    bits = rounding_relevant_patterns("float64", fmt, fields)
    index = oracle.MagnitudeIndex([oracle.decode_float_bits(b, "float64")
                                   for b in bits.tolist()])
    for profile, scale_exp in (("ocp", 0), ("microxcaling", 0), ("ocp", -130),
                               ("ocp_ftz", -130)):
        want = np.array(oracle.encode_many(index, mxref.get_format(fmt),
                                           mxref.get_profile(profile), scale_exp), np.uint8)
        got = mxref.encode(bits.view(np.float64), fmt, profile, scale_exp)
        assert np.array_equal(got, want), describe(bits, "float64", fmt, profile, scale_exp,
                                                   got, want)


# =========================================================================== oracle checks
@pytest.mark.parametrize("fmt", FORMATS)
def test_oracle_bulk_sweep_agrees_with_scalar_oracle(fmt):
    # encode_many (sweep) and ElementGrid.encode (per-value bisection) are two
    # formulations of the oracle's rule; they must agree before either is trusted.
    bits, index = all_patterns("bfloat16")
    f = mxref.get_format(fmt)
    grid = oracle.grid_for(f)
    for profile in ("ocp", "microxcaling", "ocp_ovf", "ocp_ftz", "int8_asym"):
        p = mxref.get_profile(profile)
        for s in (0, -3, subnormal_revealing_scale("bfloat16", fmt)):
            bulk = oracle.encode_many(index, f, p, s)
            for i in range(0, 1 << 16, 37):
                assert grid.encode(index.decoded[i], p, s) == bulk[i], (profile, s, hex(i))


# Known answers shared by torchao (test_custom_cast.py), gfloat, ml_dtypes and the
# microxcaling tests (verification.md §4; mx_spec.md §2.6): the oracle and mxref must
# both give them, so a misconception shared by the two cannot hide.
KNOWN = [
    # fmt, profile, input, expected code
    ("fp4_e2m1", "ocp", 0.25, 0x0), ("fp4_e2m1", "ocp", 0.75, 0x2),
    ("fp4_e2m1", "ocp", 1.25, 0x2), ("fp4_e2m1", "ocp", 1.75, 0x4),
    ("fp4_e2m1", "ocp", 2.5, 0x4), ("fp4_e2m1", "ocp", 3.5, 0x6),
    ("fp4_e2m1", "ocp", 5.0, 0x6), ("fp4_e2m1", "ocp", 6.1, 0x7),
    ("fp4_e2m1", "ocp", -0.25, 0x8), ("fp4_e2m1", "ocp", -0.0, 0x8),
    ("fp4_e2m1", "ocp", -7.0, 0xF), ("fp4_e2m1", "ocp", np.inf, 0x7),
    ("fp4_e2m1", "ocp", np.nan, 0x0),
    ("fp4_e2m1", "microxcaling", 0.25, 0x1), ("fp4_e2m1", "microxcaling", 0.75, 0x2),
    ("fp4_e2m1", "microxcaling", 2.5, 0x5), ("fp4_e2m1", "microxcaling", 5.0, 0x7),
    ("fp4_e2m1", "microxcaling", -2.5, 0xD),
    ("fp6_e2m3", "ocp", np.nan, 0x00), ("fp6_e3m2", "ocp", -np.inf, 0x3F),
    ("fp6_e3m2", "ocp", 30.0, 0x1F), ("fp6_e3m2", "ocp", 1.125, 0x0C),
    ("fp8_e4m3", "ocp", 464.0, 0x7E), ("fp8_e4m3", "ocp", 465.0, 0x7E),
    ("fp8_e4m3", "ocp", 1e9, 0x7E), ("fp8_e4m3", "ocp", -np.nan, 0xFF),
    ("fp8_e4m3", "ocp_ovf", 464.0, 0x7E), ("fp8_e4m3", "ocp_ovf", 465.0, 0x7F),
    ("fp8_e4m3", "ocp_ovf", -np.inf, 0xFF), ("fp8_e4m3", "ocp", 400.0, 0x7C),
    ("fp8_e4m3", "microxcaling", 400.0, 0x7D),  # microxcaling test_fp8_e4m3_fix: 400 -> 416
    ("fp8_e4m3", "ocp", 2.0 ** -10, 0x00), ("fp8_e4m3", "ocp", 3 * 2.0 ** -10, 0x02),
    ("fp8_e5m2", "ocp", 61440.0, 0x7B), ("fp8_e5m2", "ocp_ovf", 61440.0, 0x7C),
    ("fp8_e5m2", "ocp_ovf", 61439.0, 0x7B), ("fp8_e5m2", "ocp", np.inf, 0x7B),
    ("fp8_e5m2", "ocp_ovf", -np.inf, 0xFC), ("fp8_e5m2", "ocp", np.nan, 0x7D),
    ("int8", "ocp", 2.0 ** -7, 0x00), ("int8", "microxcaling", 2.0 ** -7, 0x01),
    ("int8", "ocp", 3 * 2.0 ** -7, 0x02), ("int8", "ocp", -0.0, 0x00),
    ("int8", "ocp", -1.995, 0x81), ("int8", "int8_asym", -1.995, 0x80),
    ("int8", "ocp", 5.0, 0x7F), ("int8", "ocp", -np.inf, 0x81),
    ("int8", "int8_asym", -np.inf, 0x80), ("int8", "ocp", np.nan, 0x00),
]


@pytest.mark.parametrize("fmt,profile,value,code", KNOWN)
def test_known_answers(fmt, profile, value, code):
    x = np.array([value], dtype=np.float64)
    assert int(mxref.encode(x, fmt, profile)[0]) == code
    d = oracle.decode_float_bits(int(x.view(np.uint64)[0]), "float64")
    assert oracle.grid_for(mxref.get_format(fmt)).encode(d, mxref.get_profile(profile)) == code


def test_ftz_flushes_fp32_subnormal_magnitudes_of_float64_input():
    # Regression (fixed in mxref 09c115d): ocp_ftz once flushed only subnormals of the
    # input dtype, so float64 1e-39 (bits 0x37D5C72FB1552D83) at scale 2^-130 gave 0x3B.
    x = np.array([1e-39, -1e-39], np.float64)
    assert mxref.encode(x, "fp8_e4m3", "ocp_ftz", -130).tolist() == [0x00, 0x80]
