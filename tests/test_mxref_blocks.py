"""mxref block quantization (scale rule + elements) against the Fraction oracle, and
properties that hold whatever the oracle says (ties to even, monotonicity, saturation,
scale bounds, NaN/Inf/zero blocks, clamping, shapes and ragged blocks).

Inputs come from the public strategies in verification/strategies.py.
"""
from fractions import Fraction

import ml_dtypes
import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mxref
import oracle
from verification.strategies import mx_blocks, mx_tensors, profiles

FORMATS = sorted(mxref.FORMATS)


@pytest.fixture(autouse=True, scope="module")
def one_numba_thread():
    # Hundreds of tiny (one-block) quantize calls: on a loaded machine each parallel
    # kernel launch waits on thread scheduling (~20 ms instead of ~20 us). Results do
    # not depend on the thread count (test_thread_count_does_not_change_results; the
    # exhaustive element tests run with the default threads).
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)
UINT = {"bfloat16": np.uint16, "float16": np.uint16, "float32": np.uint32,
        "float64": np.uint64}
NP_DTYPE = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32,
            "float64": np.float64}


def raw_bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(UINT[x.dtype.name])


def oracle_quantize(x, fmt, axis=-1, block_size=32, profile="ocp"):
    """(codes [..., K], scales [..., nblocks]) by the oracle, blocked axis moved last."""
    f, p = mxref.get_format(fmt), mxref.get_profile(profile)
    moved = np.moveaxis(x, axis, -1)
    k = moved.shape[-1]
    rows = raw_bits(moved).reshape(-1, k)
    nbk = -(-k // block_size)
    codes = np.zeros(rows.shape, np.uint8)
    scales = np.zeros((rows.shape[0], nbk), np.uint8)
    for r, row in enumerate(rows):
        s, c = oracle.quantize_row(row.tolist(), x.dtype.name, f, p, block_size)
        scales[r], codes[r] = s, c
    return codes.reshape(moved.shape), scales.reshape(moved.shape[:-1] + (nbk,))


def assert_matches_oracle(x, fmt, axis=-1, block_size=32, profile="ocp"):
    mx = mxref.quantize(x, fmt, axis=axis, block_size=block_size, profile=profile)
    codes, scales = oracle_quantize(x, fmt, axis, block_size, profile)
    if not (np.array_equal(mx.scales, scales) and np.array_equal(mx.codes, codes)):
        bits = [hex(b) for b in raw_bits(np.moveaxis(x, axis, -1)).reshape(-1)[:64].tolist()]
        pytest.fail(f"{fmt}/{mxref.get_profile(profile).name} bs={block_size} axis={axis} "
                    f"input bits {bits}\nscales mxref {mx.scales.tolist()} "
                    f"oracle {scales.tolist()}\ncodes mxref {mx.codes.tolist()}\n"
                    f"oracle {codes.tolist()}")
    return mx


def exact(v) -> Fraction:
    return Fraction(float(v))


# =========================================================================== vs oracle
@pytest.mark.parametrize("fmt", FORMATS)
@given(data=st.data())
def test_float32_blocks_match_oracle(fmt, data):
    block = data.draw(mx_blocks(fmt, block_size=32, dtype="float32"), label="block")
    assert_matches_oracle(block, fmt, profile=data.draw(profiles(), label="profile"))


# bfloat16 / float16 / float64: covered less often than float32.
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
@settings(max_examples=40)
@given(data=st.data())
def test_other_dtype_blocks_match_oracle(fmt, dtype, data):
    block = data.draw(mx_blocks(fmt, block_size=data.draw(st.sampled_from([8, 32])),
                                dtype=dtype), label="block")
    assert_matches_oracle(block, fmt, profile=data.draw(profiles(), label="profile"))


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=60)
@given(data=st.data())
def test_tensors_shapes_axes_ragged_blocks(fmt, data):
    dtype = data.draw(st.sampled_from(["float32", "float32", "bfloat16", "float16",
                                       "float64"]), label="dtype")
    x, axis, bs = data.draw(mx_tensors(fmt, max_dims=3, dtype=dtype, max_side=4),
                            label="tensor")
    profile = data.draw(profiles(), label="profile")
    mx = assert_matches_oracle(x, fmt, axis, bs, profile)
    # layout: codes with the blocked axis last, one scale per (ragged) block
    moved_shape = np.moveaxis(x, axis, -1).shape
    assert mx.codes.shape == moved_shape and mx.codes.dtype == np.uint8
    assert mx.scales.shape == moved_shape[:-1] + (-(-moved_shape[-1] // bs),)
    # what the output records about how it was made
    assert (mx.fmt.key, mx.shape, mx.axis, mx.block_size) == (fmt, x.shape, axis % x.ndim, bs)
    assert mx.profile == profile and mx.profile.hash == profile.hash
    # dequantize: original shape, value = element * 2^(scale - 127) exactly
    for dtype in (np.float64, np.float32):
        y = mxref.dequantize(mx, dtype)
        assert y.shape == x.shape and y.dtype == dtype
        want = expected_dequantized(mx, dtype)
        assert np.array_equal(raw_bits(np.moveaxis(y, axis, -1)), raw_bits(want))


def expected_dequantized(mx, dtype):
    """Oracle values of an MXArray (blocked axis last), cast once from exact Fractions:
    exact in float64; in float32 exact unless beyond its range (then +/-Inf)."""
    grid = oracle.grid_for(mx.fmt)
    out = np.empty(mx.codes.shape, np.float64)
    flat_codes = mx.codes.reshape(-1, mx.codes.shape[-1])
    flat_scales = mx.scales.reshape(-1, mx.scales.shape[-1])
    flat_out = out.reshape(flat_codes.shape)
    for r in range(flat_codes.shape[0]):
        for i, c in enumerate(flat_codes[r].tolist()):
            s = int(flat_scales[r, i // mx.block_size])
            v = grid.code_value(c)
            if s == oracle.SCALE_NAN_CODE or v == "nan":
                flat_out[r, i] = np.nan
            elif v in ("+inf", "-inf"):
                flat_out[r, i] = -np.inf if v == "-inf" else np.inf
            elif v == "-0":
                flat_out[r, i] = -0.0
            else:
                flat_out[r, i] = float(v * oracle.pow2(s - oracle.SCALE_BIAS))
    with np.errstate(over="ignore"):
        return out.astype(dtype)


# =========================================================================== properties
@pytest.mark.parametrize("fmt", FORMATS)
@given(data=st.data())
def test_scale_brackets_block_max(fmt, data):
    # floor: X * 2^emax <= amax < X * 2^(emax+1);  rceil: X * maxn / 2 < amax <= X * maxn
    # (unless the exponent was clamped to [-127, 127]).
    block = data.draw(mx_blocks(fmt, dtype="float32", allow_nan=False, allow_inf=False))
    profile = data.draw(st.sampled_from(["ocp", "rceil"]))
    mx = mxref.quantize(block, fmt, profile=profile)
    amax = max(abs(exact(v)) for v in block.astype(np.float64))
    code = int(mx.scales[0])
    if amax == 0:
        assert code == 0
        return
    f = mxref.get_format(fmt)
    x = oracle.pow2(code - 127)
    maxn = exact(f.max_normal)
    if profile == "ocp":
        lo, hi = x * oracle.pow2(f.emax), x * oracle.pow2(f.emax + 1)
        assert (lo <= amax or code == 0) and amax < hi
    else:
        assert (x * maxn / 2 < amax or code == 0) and (amax <= x * maxn or code == 0xFE)


@pytest.mark.parametrize("fmt", FORMATS)
@given(data=st.data())
def test_monotone_within_a_block(fmt, data):
    block = data.draw(mx_blocks(fmt, dtype="float32", allow_nan=False, allow_inf=False))
    profile = data.draw(profiles())
    y = mxref.quantize_dequantize(block, fmt, profile=profile, dtype=np.float64)
    order = np.argsort(block.astype(np.float64), kind="stable")
    y = y[order]
    y = y[~np.isnan(y)]  # FP8 overflow under ocp_ovf: E4M3 gives NaN (E5M2 Inf is ordered)
    assert np.all(y[1:] >= y[:-1])


@pytest.mark.parametrize("fmt", FORMATS)
@given(data=st.data())
def test_block_max_lands_in_top_binade_or_saturates(fmt, data):
    # Floor rule: amax / X is in [2^emax, 2^(emax+1)), so the amax element decodes to
    # a value >= 2^emax (2^emax is representable) and <= max_normal; it is exactly
    # max_normal whenever amax / X > max_normal (saturation).
    block = data.draw(mx_blocks(fmt, dtype="float32", allow_nan=False, allow_inf=False))
    mx = mxref.quantize(block, fmt, profile="ocp")
    f = mxref.get_format(fmt)
    i = int(np.argmax(np.abs(block.astype(np.float64))))
    amax = abs(exact(block[i]))
    code = int(mx.scales[0])
    if amax == 0 or code == 0:  # zero block or clamped scale
        return
    r = amax / oracle.pow2(code - 127)
    p = abs(exact(mxref.decode(mx.codes[[i]], fmt, np.float64)[0]))
    assert oracle.pow2(f.emax) <= p <= exact(f.max_normal)
    if r > exact(f.max_normal):
        assert int(mx.codes[i]) & (f.sign_bit - 1) == (f.max_code & (f.sign_bit - 1)) or \
            (f.is_int and int(mx.codes[i]) == 0x81)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("profile", ["ocp", "microxcaling"])
def test_exact_ties_at_block_scale(fmt, profile):
    # amax = 2^k fixes X = 2^(k - emax); every midpoint m between neighbouring element
    # values, times X, is an exact tie. RNE picks the code with an even last bit,
    # ties-away the one with the larger magnitude.
    f = mxref.get_format(fmt)
    grid = oracle.grid_for(f)
    vals = grid.magnitudes[:grid.max_mag + 1]
    for k in (-100, -3, 0, 7, 90):
        for sign in (1, -1):
            mids = [(a + b) / 2 for a, b in zip(vals, vals[1:])]
            block = np.array([2.0 ** k] + [sign * float(m * oracle.pow2(k - f.emax))
                                           for m in mids], np.float32)
            mx = mxref.quantize(block, fmt, block_size=len(block), profile=profile)
            assert int(mx.scales[0]) == k - f.emax + 127
            p = mxref.decode(mx.codes[1:], fmt, np.float64)
            for j, (m, got) in enumerate(zip(mids, p.tolist())):
                lo, hi = vals[j], vals[j + 1]
                if profile == "microxcaling":
                    want = hi
                else:
                    want = lo if j % 2 == 0 else hi  # even magnitude index = even code
                assert exact(abs(got)) == want, (fmt, profile, k, float(m), got)
                if not (f.is_int and want == 0):  # INT8 has a single, unsigned zero
                    assert np.signbit(got) == (sign < 0), (fmt, profile, k, float(m), got)


@pytest.mark.parametrize("fmt", FORMATS)
@given(data=st.data())
def test_nan_or_inf_anywhere_gives_nan_scale_and_zero_codes(fmt, data):
    n = data.draw(st.integers(1, 40))
    block = data.draw(mx_blocks(fmt, block_size=n, dtype="float32", allow_nan=False,
                                allow_inf=False)).copy()
    special = data.draw(st.sampled_from([np.nan, -np.nan, np.inf, -np.inf]))
    block[data.draw(st.integers(0, n - 1))] = special
    mx = mxref.quantize(block, fmt, block_size=n, profile=data.draw(profiles()))
    assert mx.scales.tolist() == [0xFF]
    assert not mx.codes.any()
    assert np.isnan(mxref.dequantize(mx)).all()


@pytest.mark.parametrize("fmt", FORMATS)
@given(signs=st.lists(st.booleans(), min_size=1, max_size=64), profile=profiles())
def test_all_zero_block(fmt, signs, profile):
    block = np.where(signs, -0.0, 0.0).astype(np.float32)
    mx = mxref.quantize(block, fmt, block_size=64, profile=profile)
    f = mxref.get_format(fmt)
    assert mx.scales.tolist() == [0x00]
    # FP formats keep the sign of zero; INT8 has a single zero
    want = [0 if f.is_int else (f.sign_bit if s else 0) for s in signs]
    assert mx.codes.tolist() == want


@pytest.mark.parametrize("fmt", FORMATS)
def test_amax_just_below_a_power_of_two(fmt):
    # float32 log2 rounds 2^k(1 - 2^-24) up to k; the exact floor is k - 1 (the
    # scale must not double). FP4: 7.9999995 -> scale 0x7F, element 6.0.
    f = mxref.get_format(fmt)
    for dtype in ("float32", "bfloat16", "float16", "float64"):
        for k in (-100, -20, -3, 0, 1, 3, 10, 15, 60, 100, 126):
            with np.errstate(over="ignore"):
                top = np.array([2.0 ** k], NP_DTYPE[dtype])
            if not np.isfinite(top[0]) or top[0] == 0 or float(top[0]) != 2.0 ** k:
                continue  # outside this dtype's normal range
            below = (raw_bits(top) - 1).view(NP_DTYPE[dtype])
            mx = mxref.quantize(below, fmt, block_size=1)
            want = max(k - 1 - f.emax, -127) + 127
            assert int(mx.scales[0]) == want, (fmt, dtype, k)
            normal = int(raw_bits(below)[0]) >> oracle.FLOAT_LAYOUTS[dtype][1] != 0
            if want > 0 and normal:  # unclamped scale, full precision: saturates to max
                assert int(mx.codes[0]) == f.max_code, (fmt, dtype, k)
    fp4 = mxref.quantize(np.array([7.9999995], np.float32), "fp4_e2m1")
    assert (fp4.scales.tolist(), fp4.codes.tolist()) == ([0x7F], [0x7])
    assert mxref.dequantize(fp4).tolist() == [6.0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_scale_clamps_at_both_ends(fmt):
    f = mxref.get_format(fmt)
    # tiny: amax = 2^-149 (smallest FP32 subnormal) -> exponent -149 - emax < -127
    tiny = np.array([2.0 ** -149, -2.0 ** -149], np.float32)
    assert mxref.quantize(tiny, fmt).scales.tolist() == [0x00]
    # a normal just at the clamp edge: 2^(emax - 127) gives exactly 2^-127 -> code 0
    edge = np.array([2.0 ** (f.emax - 127)], np.float64)
    assert mxref.quantize(edge, fmt).scales.tolist() == [0x00]
    assert mxref.quantize(edge * 2, fmt).scales.tolist() == [0x01]
    # huge float64: floor(log2 2^300) - emax > 127 -> clamped to 0xFE, elements saturate
    huge = np.array([2.0 ** 300, -(2.0 ** 200), 1.0], np.float64)
    mx = assert_matches_oracle(huge, fmt)
    assert mx.scales.tolist() == [0xFE]
    assert int(mx.codes[0]) == f.max_code
    # rceil at the top of float32: ceil(log2(maxf32 / max_normal)) may be 128 -> 127
    top = np.array([np.finfo(np.float32).max], np.float32)
    mx = assert_matches_oracle(top, fmt, profile="rceil")
    assert int(mx.scales[0]) <= 0xFE


@pytest.mark.parametrize("fmt", FORMATS)
def test_rceil_boundary_at_max_normal_times_power_of_two(fmt):
    # rceil: X = 2^ceil(log2(amax / max_normal)); amax = max_normal * 2^k gives exactly
    # X = 2^k (element = max normal, no saturation), one ulp more gives 2^(k+1).
    f = mxref.get_format(fmt)
    for k in (-30, -1, 0, 5, 40):
        at = np.array([np.ldexp(f.max_normal, k)], np.float32)
        above = (raw_bits(at) + 1).view(np.float32)
        below = (raw_bits(at) - 1).view(np.float32)
        for x, want in ((at, k), (above, k + 1), (below, k)):
            mx = assert_matches_oracle(x, fmt, profile="rceil")
            assert int(mx.scales[0]) == want + 127, (fmt, k, float(x[0]))
        assert int(mxref.quantize(at, fmt, profile="rceil").codes[0]) == f.max_code


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp32_subnormal_inputs_kept_or_flushed(fmt):
    f = mxref.get_format(fmt)
    # the largest FP32 subnormals, at scale 2^-127 (clamped), land inside every
    # element range: kept by ocp, read as signed zero by ocp_ftz
    block = np.array([0x007FFFFF, 0x807FFFFF, 0x00400000, 0x80000001], np.uint32).view(np.float32)
    kept = assert_matches_oracle(block, fmt, profile="ocp")
    flushed = assert_matches_oracle(block, fmt, profile="ocp_ftz")
    assert kept.scales.tolist() == flushed.scales.tolist() == [0x00]
    assert kept.codes[:3].all()
    zero_neg = 0 if f.is_int else f.sign_bit
    assert flushed.codes.tolist() == [0, zero_neg, 0, zero_neg]


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_ftz_flushes_fp32_subnormal_magnitudes_of_float64_input(fmt):
    # Regression (fixed in mxref 09c115d): FP32-subnormal magnitudes of float64 input
    # (1e-39, bits 0x37D5C72FB1552D83) must flush under ocp_ftz, not only f64 subnormals.
    x = np.array([1e-39, -2e-39, 5e-40], np.float64)
    mx = mxref.quantize(x, fmt, profile="ocp_ftz")
    zero_neg = 0 if mxref.get_format(fmt).is_int else 0x80
    assert (mx.scales.tolist(), mx.codes.tolist()) == ([0x00], [0, zero_neg, 0])


@pytest.mark.parametrize("fmt", FORMATS)
@given(data=st.data())
def test_blocks_are_independent(fmt, data):
    # quantizing two blocks together equals quantizing each alone
    a = data.draw(mx_blocks(fmt, block_size=16))
    b = data.draw(mx_blocks(fmt, block_size=16))
    profile = data.draw(profiles())
    both = mxref.quantize(np.concatenate([a, b]), fmt, block_size=16, profile=profile)
    one, two = (mxref.quantize(v, fmt, block_size=16, profile=profile) for v in (a, b))
    assert both.scales.tolist() == one.scales.tolist() + two.scales.tolist()
    assert both.codes.tolist() == one.codes.tolist() + two.codes.tolist()


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=25)
@given(data=st.data())
def test_non_contiguous_and_fortran_inputs(fmt, data):
    # strided, reversed and Fortran-ordered views quantize like their contiguous copies
    x, axis, bs = data.draw(mx_tensors(fmt, max_dims=3, max_side=4))
    want = mxref.quantize(np.ascontiguousarray(x), fmt, axis, bs)
    for view in (np.asfortranarray(x), x[..., ::-1][..., ::-1], np.flip(np.flip(x, 0), 0)):
        got = mxref.quantize(view, fmt, axis, bs)
        assert got == want
    rev = x[::-1]
    assert_matches_oracle(rev, fmt, axis, bs)


@pytest.mark.parametrize("block_size", [1, 3, 31, 32, 33, 64])
def test_ragged_last_block_is_scaled_on_its_own(block_size):
    # the ragged tail uses only its own values (as if padded with zeros)
    x = np.concatenate([np.full(block_size, 1000.0), [0.75, -0.5]]).astype(np.float32)
    mx = assert_matches_oracle(x, "fp4_e2m1", block_size=block_size)
    assert int(mx.scales[-1]) == 127 - 2 - 1  # floor(log2 0.75) - 2 = -3


# =========================================================================== the strategies
@given(data=st.data())
def test_float_bits_respects_its_flags(data):
    from verification.strategies import DTYPES, float_bits
    dtype = data.draw(st.sampled_from(sorted(DTYPES)))
    nan, inf, sub = (data.draw(st.booleans()) for _ in range(3))
    b = data.draw(float_bits(dtype, allow_nan=nan, allow_inf=inf, allow_subnormal=sub))
    d = oracle.decode_float_bits(b, dtype)
    assert 0 <= b < 1 << (1 + sum(oracle.FLOAT_LAYOUTS[dtype]))
    assert nan or d.kind != "nan"
    assert inf or d.kind != "inf"
    assert sub or not d.subnormal


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
@settings(max_examples=30)
@given(data=st.data())
def test_mx_blocks_and_tensors_have_the_promised_form(dtype, data):
    fmt = data.draw(st.sampled_from(FORMATS))
    n = data.draw(st.integers(1, 40))
    block = data.draw(mx_blocks(fmt, block_size=n, dtype=dtype, allow_nan=False,
                                allow_inf=False))
    assert block.shape == (n,) and block.dtype.name == dtype
    assert np.isfinite(block.astype(np.float64)).all()
    x, axis, bs = data.draw(mx_tensors(fmt, dtype=dtype, max_dims=3, max_side=3))
    assert 1 <= x.ndim <= 3 and -x.ndim <= axis < x.ndim and 1 <= bs <= 64
    assert x.dtype.name == dtype


def test_thread_count_does_not_change_results():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((64, 1000)) * np.exp2(rng.integers(-30, 30, (64, 1)))
         ).astype(np.float32)
    x[3, 17] = np.nan
    x[5, :40] = 0.0
    for fmt in FORMATS:
        with_one = mxref.quantize(x, fmt, axis=0, block_size=32)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        try:
            with_all = mxref.quantize(x, fmt, axis=0, block_size=32)
        finally:
            numba.set_num_threads(1)
        assert with_one == with_all
