"""mxref against ml_dtypes' scalar casts, on every bfloat16 and float16 bit pattern.

ml_dtypes (jax-ml) implements the OCP element types as numpy scalar types with RNE
casts. Where its semantics and ours coincide the codes must be identical; where they
differ, the difference must be exactly the one listed in DIFFERENCES below (so a
change in either library makes this test say what changed).
"""
import ml_dtypes
import numpy as np
import pytest

import mxref
import oracle

ML_TYPES = {
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
}
INPUTS = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

# (format, profile) -> {input class: (mxref code, ml_dtypes code)}; every input outside
# the listed classes must convert identically. Classes: "+nan"/"-nan" (by sign bit),
# "+inf"/"-inf", "+overflow"/"-overflow" (finite inputs that RNE rounds past max normal).
_FP4_FP6_NAN = "ml_dtypes turns +NaN into the -0 code (its quiet_NaN() of FP4/FP6); ours: +0"
DIFFERENCES = {
    ("fp4_e2m1", "ocp"): {"+nan": (0x00, 0x08)},
    ("fp4_e2m1", "ocp_ovf"): {"+nan": (0x00, 0x08)},
    ("fp6_e2m3", "ocp"): {"+nan": (0x00, 0x20)},
    ("fp6_e2m3", "ocp_ovf"): {"+nan": (0x00, 0x20)},
    ("fp6_e3m2", "ocp"): {"+nan": (0x00, 0x20)},
    ("fp6_e3m2", "ocp_ovf"): {"+nan": (0x00, 0x20)},
    # E4M3FN casts do not saturate: overflow and Inf give NaN. Our ocp saturates (§6.3);
    # under ocp_ovf (OFP8 OVF mode) the two agree on every input.
    ("fp8_e4m3", "ocp"): {"+overflow": (0x7E, 0x7F), "-overflow": (0xFE, 0xFF),
                          "+inf": (0x7E, 0x7F), "-inf": (0xFE, 0xFF)},
    ("fp8_e4m3", "ocp_ovf"): {},
    # E5M2: ml_dtypes overflows to Inf and writes NaN as 0x7E/0xFE (S.11111.10);
    # ours writes the first NaN code of the spec table, 0x7D/0xFD (S.11111.01).
    ("fp8_e5m2", "ocp"): {"+overflow": (0x7B, 0x7C), "-overflow": (0xFB, 0xFC),
                          "+inf": (0x7B, 0x7C), "-inf": (0xFB, 0xFC),
                          "+nan": (0x7D, 0x7E), "-nan": (0xFD, 0xFE)},
    ("fp8_e5m2", "ocp_ovf"): {"+nan": (0x7D, 0x7E), "-nan": (0xFD, 0xFE)},
}


def classify(bits: np.ndarray, dtype: str, fmt: str) -> np.ndarray:
    """The DIFFERENCES class of every input pattern ("" = an ordinary value)."""
    grid = oracle.grid_for(mxref.get_format(fmt))
    out = []
    for b in bits.tolist():
        d = oracle.decode_float_bits(b, dtype)
        sign = "-" if d.sign else "+"
        if d.kind in ("nan", "inf"):
            out.append(sign + d.kind)
        elif d.kind == "finite" and grid.round_magnitude(d.magnitude, "rne") > grid.max_mag:
            out.append(sign + "overflow")
        else:
            out.append("")
    return np.array(out)


_CLASSES = {}


def all_inputs(dtype, fmt):
    bits = np.arange(1 << 16, dtype=np.uint16)
    if (dtype, fmt) not in _CLASSES:
        _CLASSES[dtype, fmt] = classify(bits, dtype, fmt)
    return bits, bits.view(INPUTS[dtype]), _CLASSES[dtype, fmt]


@pytest.mark.parametrize("dtype", sorted(INPUTS))
@pytest.mark.parametrize("fmt,profile", sorted(DIFFERENCES))
def test_casts_agree_except_listed_differences(dtype, fmt, profile):
    bits, x, cls = all_inputs(dtype, fmt)
    ours = mxref.encode(x, fmt, profile)
    with np.errstate(invalid="ignore", over="ignore"):
        theirs = x.astype(ML_TYPES[fmt]).view(np.uint8)
    listed = DIFFERENCES[fmt, profile]
    ordinary = ~np.isin(cls, list(listed))
    bad = np.flatnonzero(ordinary & (ours != theirs))
    assert bad.size == 0, [(hex(int(bits[i])), int(ours[i]), int(theirs[i])) for i in bad[:8]]
    for name, (our_code, their_code) in listed.items():
        sel = cls == name
        assert sel.any(), f"class {name} has no {dtype} inputs: the table is stale"
        assert set(ours[sel].tolist()) == {our_code}, (name, set(ours[sel].tolist()))
        assert set(theirs[sel].tolist()) == {their_code}, (name, set(theirs[sel].tolist()))


@pytest.mark.parametrize("fmt", sorted(ML_TYPES))
def test_decode_of_every_code_agrees(fmt):
    f = mxref.get_format(fmt)
    codes = np.arange(f.n_codes, dtype=np.uint8)
    ours = mxref.decode(codes, fmt, np.float32)
    theirs = codes.view(ML_TYPES[fmt]).astype(np.float32)
    nan = np.isnan(ours)
    assert np.array_equal(nan, np.isnan(theirs))
    assert np.array_equal(ours[~nan].view(np.uint32), theirs[~nan].view(np.uint32))


# ----------------------------------------------------------------------------- E8M0
def test_e8m0_decode_agrees():
    codes = np.arange(256, dtype=np.uint8)
    ours = mxref.scale_values(codes, np.float64)
    theirs = codes.view(ml_dtypes.float8_e8m0fnu).astype(np.float64)
    assert np.isnan(ours[255]) and np.isnan(theirs[255])
    assert np.array_equal(ours[:255], theirs[:255])


# How ml_dtypes' float -> float8_e8m0fnu cast differs from the scale our floor rule
# gives a one-element MXINT8 block (emax_elem = 0, so the scale is 2^floor(log2 |v|)):
E8M0_DIFFERENCES = {
    "zero": "ml_dtypes 0xFF (NaN); ours 0x00 (the all-zero block rule)",
    "negative": "ml_dtypes 0xFF (NaN); ours uses |v|",
    "significand >= 1.5": "ml_dtypes rounds to nearest, ties up: one code higher than "
                          "ours (0xFE + 1 = 0xFF = NaN at the top); ours floors",
}


def test_e8m0_cast_differs_from_floor_scale_exactly_as_listed():
    bits = np.arange(1 << 16, dtype=np.uint16)
    x = bits.view(ml_dtypes.bfloat16)
    efield = (bits >> 7) & 0xFF
    normal = (efield >= 1) & (efield <= 254)
    negative = (bits >> 15) == 1
    zero = (bits & 0x7FFF) == 0
    with np.errstate(invalid="ignore", over="ignore"):
        theirs = x.astype(ml_dtypes.float8_e8m0fnu).view(np.uint8).astype(int)
    ours = mxref.quantize(x.reshape(-1, 1), "int8", block_size=1).scales[:, 0].astype(int)
    assert set(E8M0_DIFFERENCES) == {"zero", "negative", "significand >= 1.5"}
    # zero
    assert set(theirs[zero].tolist()) == {0xFF} and set(ours[zero].tolist()) == {0x00}
    # negative normals
    assert set(theirs[normal & negative].tolist()) == {0xFF}
    assert np.array_equal(ours[normal & negative], ours[normal & ~negative])  # uses |v|
    # positive normals: ours = floor, theirs = ours + (significand >= 1.5)
    pos = normal & ~negative
    round_up = (bits & 0x40) != 0  # first mantissa bit set <=> significand >= 1.5
    assert np.array_equal(theirs[pos], ours[pos] + round_up[pos])
    assert np.array_equal(ours[pos], efield[pos].astype(int))  # floor(log2 v) + 127
