"""mxref.dot against an independent oracle built from Fractions of the decode tables."""
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mxref
from mxref.dot import mx_dot, mx_dot_exact, mx_matmul

FORMATS = ["fp4_e2m1", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2", "int8"]
F32_OVERFLOW = Fraction(2) ** 128 - Fraction(2) ** 103   # RN(x) = Inf from here up


# ---------------------------------------------------------------- the oracle
def make_mx(codes, scales, fmt, block_size):
    """An MXArray straight from codes and scales (any codes, NaN/Inf codes included)."""
    codes = np.asarray(codes, dtype=np.uint8)
    return mxref.MXArray(codes, np.asarray(scales, dtype=np.uint8), mxref.get_format(fmt),
                         codes.shape, codes.ndim - 1, block_size, mxref.get_profile("ocp"))


def oracle_blocks(a, b):
    """Per-block exact values (Fraction) or IEEE NaN/Inf floats, straight from the spec formula."""
    ta, tb = a.fmt.decode_table, b.fmt.decode_table
    K, bs = a.codes.shape[-1], a.block_size
    out = []
    for j in range(-(-K // bs)):
        sa, sb = int(a.scales[j]), int(b.scales[j])
        pa = [float(ta[c]) for c in a.codes[j * bs:(j + 1) * bs]]
        pb = [float(tb[c]) for c in b.codes[j * bs:(j + 1) * bs]]
        if sa == 0xFF or sb == 0xFF:
            out.append(math.nan)
        elif not all(map(math.isfinite, pa + pb)):
            out.append(sum(x * y for x, y in zip(pa, pb)))   # IEEE: Inf*0, Inf-Inf -> NaN
        else:
            s = sum(Fraction(x) * Fraction(y) for x, y in zip(pa, pb))
            out.append(s * Fraction(2) ** (sa - 127) * Fraction(2) ** (sb - 127))
    return out


def round_f32(v):
    """Correctly rounded float32 (ties to even) of a Fraction, by comparing neighbours."""
    if not isinstance(v, Fraction):
        return np.float32(v)
    if abs(v) >= F32_OVERFLOW:
        return np.float32(math.copysign(math.inf, v))
    c = np.float32(float(v))
    cands = [np.nextafter(c, np.float32(-np.inf)), c, np.nextafter(c, np.float32(np.inf))]
    cands = [x for x in cands if np.isfinite(x)]
    best = min(abs(Fraction(float(x)) - v) for x in cands)
    ties = [x for x in cands if abs(Fraction(float(x)) - v) == best]
    return min(ties, key=lambda x: int(np.array(x).view(np.uint32)) & 1)


def round_f64(v):
    return np.float64(float(v))  # CPython rounds Fractions correctly (ties to even)


def accumulate(vals, dtype, order):
    with np.errstate(invalid="ignore", over="ignore"):   # Inf - Inf is part of the contract
        return _accumulate(vals, dtype, order)


def _accumulate(vals, dtype, order):
    vals = [dtype(v) for v in vals]
    if not vals:
        return dtype(0)
    if order == "sequential":
        acc = vals[0]
        for v in vals[1:]:
            acc = dtype(acc + v)
        return acc
    while len(vals) > 1:   # adder tree: adjacent pairs, odd last value carried up
        nxt = [dtype(vals[i] + vals[i + 1]) for i in range(0, len(vals) - 1, 2)]
        if len(vals) % 2:
            nxt.append(vals[-1])
        vals = nxt
    return vals[0]


def oracle_dot(a, b, accum, order):
    blocks = oracle_blocks(a, b)
    if accum == "exact":
        if any(isinstance(v, float) and math.isnan(v) for v in blocks):
            return math.nan
        infs = {v for v in blocks if isinstance(v, float)}
        if infs:
            return math.nan if len(infs) > 1 else infs.pop()
        return float(sum(blocks, Fraction(0)))
    if accum == "float32":
        return float(accumulate([round_f32(v) for v in blocks], np.float32, order))
    return float(accumulate([round_f64(v) for v in blocks], np.float64, order))


def same(x, y):
    return (math.isnan(x) and math.isnan(y)) or \
        np.array(x, np.float64).view(np.uint64) == np.array(y, np.float64).view(np.uint64)


# ---------------------------------------------------------------- random operands
@st.composite
def operand_pair(draw):
    fa, fb = draw(st.sampled_from(FORMATS)), draw(st.sampled_from(FORMATS))
    bs = draw(st.sampled_from([1, 4, 32]))
    K = draw(st.integers(0, 100))
    nbk = -(-K // bs)
    scale = st.one_of(st.integers(112, 142), st.integers(0, 255))
    codes = lambda f: draw(st.lists(st.integers(0, mxref.get_format(f).n_codes - 1),
                                    min_size=K, max_size=K))
    a = make_mx(codes(fa), draw(st.lists(scale, min_size=nbk, max_size=nbk)), fa, bs)
    b = make_mx(codes(fb), draw(st.lists(scale, min_size=nbk, max_size=nbk)), fb, bs)
    return a, b


@settings(max_examples=150, deadline=None)
@given(pair=operand_pair(), accum=st.sampled_from(["float32", "float64", "exact"]),
       order=st.sampled_from(["sequential", "pairwise"]))
def test_dot_matches_fraction_oracle(pair, accum, order):
    a, b = pair
    assert same(mx_dot(a, b, accum, order), oracle_dot(a, b, accum, order))


@settings(max_examples=60, deadline=None)
@given(pair=operand_pair())
def test_exact_dot_is_the_exact_fraction(pair):
    a, b = pair
    blocks = oracle_blocks(a, b)
    got = mx_dot_exact(a, b)
    if all(isinstance(v, Fraction) for v in blocks):
        assert isinstance(got, Fraction) and got == sum(blocks, Fraction(0))
    else:
        assert same(float(got), oracle_dot(a, b, "exact", "sequential"))


def test_block_sum_wider_than_float64_rounds_once():
    # 2^24 + 1 + 2^-32 needs 57 bits: rounding to float64 first would land on the float32
    # midpoint 2^24 + 1 and tie down to 2^24; the correct float32 is 2^24 + 2.
    e5 = mxref.get_format("fp8_e5m2")
    code = {float(v): c for c, v in enumerate(e5.decode_table) if np.isfinite(v)}
    ca = [code[2.0 ** 12], code[1.0], code[2.0 ** -16]]
    a = make_mx(ca, [127], "fp8_e5m2", 32)
    assert mx_dot_exact(a, a) == Fraction(2 ** 24 + 1) + Fraction(1, 2 ** 32)
    assert mx_dot(a, a, "float32") == 2.0 ** 24 + 2
    assert mx_dot(a, a, "float64") == 2.0 ** 24 + 1   # nearest float64


def test_largest_e5m2_products_do_not_overflow():
    e5 = mxref.get_format("fp8_e5m2")
    top = int(np.argmax(np.where(np.isfinite(e5.decode_table), e5.decode_table, 0)))
    a = make_mx([top] * 64, [127, 127], "fp8_e5m2", 32)
    assert mx_dot_exact(a, a) == 64 * Fraction(57344) ** 2


def test_nan_scale_and_special_elements():
    ones = mxref.quantize(np.ones(64, np.float32), "fp8_e4m3")
    nan_blk = make_mx(ones.codes, [0xFF, 127], "fp8_e4m3", 32)
    assert math.isnan(mx_dot(nan_blk, ones))
    e5 = mxref.get_format("fp8_e5m2")
    inf = e5.inf_codes[0]
    a = make_mx([inf, 0], [127], "fp8_e5m2", 32)
    b = make_mx([0x3C, 0], [127], "fp8_e5m2", 32)       # 1.0, 0
    assert mx_dot(a, b) == math.inf
    assert math.isnan(mx_dot(a, make_mx([0, 0], [127], "fp8_e5m2", 32)))   # Inf * 0


def test_matmul_matches_dot_in_both_layouts():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 70)).astype(np.float32)
    w = rng.standard_normal((4, 70)).astype(np.float32)
    a = mxref.quantize(x, "fp4_e2m1")
    b_nk = mxref.quantize(w, "fp8_e4m3", axis=1)          # [N, K] weight layout
    b_kn = mxref.quantize(w.T.copy(), "fp8_e4m3", axis=0)  # [K, N] blocked along K
    for accum in ("float32", "float64", "exact"):
        c1 = mx_matmul(a, b_nk, accum)
        c2 = mx_matmul(a, b_kn, accum)
        assert c1.shape == (5, 4) and np.array_equal(c1, c2)
        for m in range(5):
            for n in range(4):
                row = mxref.quantize(x[m], "fp4_e2m1")
                col = mxref.quantize(w[n], "fp8_e4m3")
                assert same(float(c1[m, n]), mx_dot(row, col, accum))
    exact = mxref.dequantize(a, np.float64) @ mxref.dequantize(b_nk, np.float64).T
    assert np.array_equal(mx_matmul(a, b_nk, "exact"), exact)  # small sums: float64 is exact


def test_bad_inputs():
    a = mxref.quantize(np.ones(64, np.float32), "fp4")
    with pytest.raises(mxref.MXError, match="accum"):
        mx_dot(a, a, accum="float16")
    with pytest.raises(mxref.MXError, match="order"):
        mx_dot(a, a, order="random")
    with pytest.raises(mxref.MXError, match="block sizes differ"):
        mx_dot(a, mxref.quantize(np.ones(64, np.float32), "fp4", block_size=16))
    with pytest.raises(mxref.MXError, match="reduction lengths differ"):
        mx_dot(a, mxref.quantize(np.ones(32, np.float32), "fp4"))
    with pytest.raises(mxref.MXError, match="MXArray"):
        mx_dot(a, np.ones(64))
    with pytest.raises(mxref.MXError, match="1-D"):
        mx_dot(mxref.quantize(np.ones((2, 32), np.float32), "fp4"), a)
    with pytest.raises(mxref.MXError, match="axis 1"):
        m = mxref.quantize(np.ones((32, 2), np.float32), "fp4", axis=0)
        mx_matmul(m, m)
    big = mxref.quantize(np.ones(1 << 15, np.float32), "fp8_e5m2", block_size=1 << 15)
    with pytest.raises(mxref.MXError, match="too large"):
        mx_dot(big, big)
