"""mxref.pack: byte layouts (known answers), round trips, llama.cpp blocks, bad input."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mxref
from mxref.pack import (pack_codes, pack_llamacpp_mxfp4, packed_row_bytes, packing_name,
                        unpack_codes, unpack_llamacpp_mxfp4)

PACKED_FORMATS = ["fp4_e2m1", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2", "int8"]


def codes_for(fmt, shape):
    n = mxref.get_format(fmt).n_codes
    return hnp.arrays(np.uint8, shape, elements=st.integers(0, n - 1))


# ---------------------------------------------------------------- known answers
def test_fp4_low_nibble_first_and_odd_padding():
    codes = np.array([[0x1, 0x2, 0x3], [0xF, 0x0, 0x8]], dtype=np.uint8)
    packed = pack_codes(codes, "fp4_e2m1")
    assert packed.dtype == np.uint8
    assert packed.tolist() == [[0x21, 0x03], [0x0F, 0x08]]


def test_fp6_little_endian_24bit_word():
    # a=1, b=2, c=3, d=4: word = 1 | 2<<6 | 3<<12 | 4<<18 = 0x103081
    codes = np.array([1, 2, 3, 4], dtype=np.uint8)
    assert pack_codes(codes, "fp6_e2m3").tolist() == [0x81, 0x30, 0x10]
    # all-ones codes fill every bit; a 5th code starts a new, zero-padded group
    codes = np.array([0x3F] * 4 + [0x2A], dtype=np.uint8)
    assert pack_codes(codes, "fp6_e3m2").tolist() == [0xFF, 0xFF, 0xFF, 0x2A, 0x00, 0x00]


def test_fp6_matches_byte_formula_from_the_reference():
    # mx_spec.md §4.9: byte0 = a + ((b&3)<<6), byte1 = (b>>2) + ((c&0xF)<<4), byte2 = (c>>4) + (d<<2)
    rng = np.random.default_rng(0)
    c = rng.integers(0, 64, size=(50, 4)).astype(np.int64)
    a, b, cc, d = c.T
    expect = np.stack([a + ((b & 3) << 6), (b >> 2) + ((cc & 0xF) << 4), (cc >> 4) + (d << 2)], 1)
    assert np.array_equal(pack_codes(c.astype(np.uint8), "fp6_e2m3"), expect.astype(np.uint8))


def test_byte_formats_are_identity():
    codes = np.arange(256, dtype=np.uint8).reshape(4, 64)
    for fmt in ("fp8_e4m3", "fp8_e5m2", "int8"):
        assert np.array_equal(pack_codes(codes, fmt), codes)


@pytest.mark.parametrize("fmt,K,expect", [("fp4_e2m1", 0, 0), ("fp4_e2m1", 1, 1),
                                          ("fp4_e2m1", 32, 16), ("fp4_e2m1", 33, 17),
                                          ("fp6_e2m3", 1, 3), ("fp6_e2m3", 4, 3),
                                          ("fp6_e3m2", 5, 6), ("fp6_e3m2", 32, 24),
                                          ("fp8_e4m3", 33, 33), ("int8", 7, 7)])
def test_packed_row_bytes(fmt, K, expect):
    assert packed_row_bytes(K, fmt) == expect


def test_packing_names():
    assert [packing_name(f) for f in ("mxfp4", "fp6_e3m2", "mxfp8", "int8")] == \
        ["fp4-lo-first", "fp6-le24", "byte", "byte"]


# ---------------------------------------------------------------- round trips
@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(PACKED_FORMATS), data=st.data(),
       lead=st.lists(st.integers(0, 3), max_size=2), K=st.integers(0, 70))
def test_pack_unpack_round_trip(fmt, data, lead, K):
    codes = data.draw(codes_for(fmt, tuple(lead) + (K,)))
    packed = pack_codes(codes, fmt)
    assert packed.shape == tuple(lead) + (packed_row_bytes(K, fmt),)
    back = unpack_codes(packed, fmt, K)
    assert back.dtype == np.uint8 and np.array_equal(back, codes)


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(["fp4_e2m1", "fp6_e2m3"]), data=st.data(), K=st.integers(1, 40))
def test_every_packed_byte_pattern_unpacks_and_repacks(fmt, data, K):
    # packed -> codes -> packed is the identity once the padding bits are zero
    nbytes = packed_row_bytes(K, fmt)
    raw = data.draw(hnp.arrays(np.uint8, (2, nbytes)))
    codes = unpack_codes(raw, fmt, K)
    assert codes.max(initial=0) < mxref.get_format(fmt).n_codes
    assert np.array_equal(unpack_codes(pack_codes(codes, fmt), fmt, K), codes)


def test_pack_of_real_quantized_weights_round_trips():
    x = np.random.default_rng(1).standard_normal((8, 96)).astype(np.float32)
    for fmt in PACKED_FORMATS:
        mx = mxref.quantize(x, fmt)
        assert np.array_equal(unpack_codes(pack_codes(mx.codes, fmt), fmt, 96), mx.codes)


# ---------------------------------------------------------------- llama.cpp MXFP4
def test_llamacpp_known_block():
    codes = np.arange(32, dtype=np.uint8) % 16
    scales = np.array([0x7F], dtype=np.uint8)
    blk = pack_llamacpp_mxfp4(codes, scales)
    assert blk.shape == (17,)
    assert blk[0] == 0x7F
    # byte j = element j | element j+16 << 4; elements j and j+16 are both j % 16
    assert blk[1:].tolist() == [j | (j << 4) for j in range(16)]


@settings(max_examples=40, deadline=None)
@given(data=st.data(), lead=st.integers(0, 3), nb=st.integers(0, 4))
def test_llamacpp_round_trip(data, lead, nb):
    codes = data.draw(codes_for("fp4_e2m1", (lead, 32 * nb)))
    scales = data.draw(hnp.arrays(np.uint8, (lead, nb)))
    blocks = pack_llamacpp_mxfp4(codes, scales)
    assert blocks.shape == (lead, 17 * nb)
    c2, s2 = unpack_llamacpp_mxfp4(blocks, 32 * nb)
    assert np.array_equal(c2, codes) and np.array_equal(s2, scales)


def test_llamacpp_blocks_decode_like_gguf_py():
    """gguf-py's MXFP4 dequantizer (a mirror of ggml's C code) reads our blocks to our values."""
    from gguf import quants   # gguf-py (test extra) is the independent decoder
    from gguf import GGMLQuantizationType
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((16, 128)) * np.exp2(rng.integers(-20, 20, (16, 1)))).astype(np.float32)
    mx = mxref.quantize(x, "mxfp4")
    blocks = pack_llamacpp_mxfp4(mx.codes, mx.scales)
    theirs = quants.dequantize(blocks, GGMLQuantizationType.MXFP4).reshape(16, 128)
    # ggml's codebook has no negative zero (kvalues[8] = 0), so -0.0 is compared as +0.0
    ours = mxref.dequantize(mx) + np.float32(0.0)
    assert np.array_equal(theirs.view(np.uint32), ours.view(np.uint32))


# ---------------------------------------------------------------- bad input
def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(mxref.MXError, match="out of range"):
        pack_codes(np.array([16], dtype=np.uint8), "fp4_e2m1")
    with pytest.raises(mxref.MXError, match="out of range"):
        pack_codes(np.array([64], dtype=np.int32), "fp6_e2m3")
    with pytest.raises(mxref.MXError, match="integers"):
        pack_codes(np.array([1.0]), "fp4_e2m1")
    with pytest.raises(mxref.MXError, match="at least one dimension"):
        pack_codes(np.uint8(3), "fp4_e2m1")
    with pytest.raises(mxref.MXError, match="pack into 2"):
        unpack_codes(np.zeros(3, np.uint8), "fp4_e2m1", 4)
    with pytest.raises(mxref.MXError, match="uint8"):
        unpack_codes(np.zeros(2, np.int16), "fp4_e2m1", 4)
    with pytest.raises(mxref.MXError, match="non-negative"):
        packed_row_bytes(-1, "fp4_e2m1")
    with pytest.raises(mxref.MXError, match="unknown format"):
        packed_row_bytes(4, "fp5")
    with pytest.raises(mxref.MXError, match="multiple of 32"):
        pack_llamacpp_mxfp4(np.zeros(40, np.uint8), np.zeros(1, np.uint8))
    with pytest.raises(mxref.MXError, match="scales shape"):
        pack_llamacpp_mxfp4(np.zeros(64, np.uint8), np.zeros(1, np.uint8))
    with pytest.raises(mxref.MXError, match="needs 34"):
        unpack_llamacpp_mxfp4(np.zeros(33, np.uint8), 64)
    with pytest.raises(mxref.MXError, match="multiple of 32"):
        unpack_llamacpp_mxfp4(np.zeros(17, np.uint8), 31)


# ---------------------------------------------------------------- quantize_packed / fast path
def _f32_blocks(data, n_blocks, bs):
    """float32 blocks built to hit every branch of the fast path: random bits (NaN, Inf,
    subnormals), tiny blocks (scale clamped to 2^-127, the general-kernel fallback),
    exact ties and values around max normal, and the hand-made edge blocks of
    _edge_blocks (scale at the fast path's lower limit, rceil boundaries, ...)."""
    kind = st.sampled_from(["bits", "tiny", "ties", "wide", "edge"])
    out = []
    for _ in range(n_blocks):
        k = data.draw(kind)
        if k == "bits":
            b = data.draw(hnp.arrays(np.uint32, bs))
        elif k == "tiny":
            b = data.draw(hnp.arrays(np.uint32, bs, elements=st.integers(0, 0x02000000)))
            b |= data.draw(hnp.arrays(np.uint32, bs, elements=st.sampled_from([0, 1 << 31])))
        elif k == "ties":
            m = data.draw(hnp.arrays(np.int64, bs, elements=st.integers(-255, 255)))
            e = data.draw(st.integers(-140, 120))
            b = (np.ldexp(m / 16.0, e)).astype(np.float32).view(np.uint32)
        elif k == "edge":
            fmt = data.draw(st.sampled_from(PACKED_FORMATS))
            edge = _edge_blocks(fmt, bs, np.random.default_rng(data.draw(st.integers(0, 99))))
            b = edge[data.draw(st.integers(0, len(edge) - 1))].view(np.uint32)
        else:
            g = data.draw(hnp.arrays(np.float64, bs, elements=st.floats(-1e4, 1e4)))
            b = (g * 2.0 ** data.draw(st.integers(-130, 100))).astype(np.float32).view(np.uint32)
        out.append(np.asarray(b, np.uint32))
    return np.concatenate(out).view(np.float32)


def _edge_blocks(fmt, bs, rng) -> list:
    """Blocks of bs float32 values at the edges of the float32 fast path for ``fmt``.

    The fast element arithmetic is exact for scale exponents s >= min_fast (it reads
    FP32 subnormals as values below 2^-126 that must round to zero); blocks just at and
    just below that limit hold subnormals, signed zeros and exact ties of the element
    grid. Also: NaN/Inf/zero/all-subnormal blocks, the rceil boundary (amax at
    max_normal * 2^k and one ulp either side), an FP32-subnormal amax, ties just
    above max normal (overflow), the largest float32 and mixed binades.
    """
    from mxref.kernels_f32 import min_fast_scale
    f = mxref.get_format(fmt)
    min_fast = min_fast_scale(f, mxref.get_profile("ocp"))
    m, emin, emax = f.step_bits, f.emin, f.emax

    def f32(v):
        return np.asarray(v, np.float64).astype(np.float32)

    def block(vals):
        vals = np.resize(f32(vals), bs)
        return vals * np.where(rng.random(bs) < 0.5, -1, 1).astype(np.float32)

    def subnormals(k):
        return rng.integers(0, 1 << 23, k).astype(np.uint32).view(np.float32)

    out = []
    for s in (min_fast, min_fast - 1, min_fast + 1):
        grid = 2.0 ** (emin - m + s)           # element min subnormal at this scale
        amax = 2.0 ** (s + emax) * 1.5         # floor scale = s
        ties = (rng.integers(0, 16, bs) + 0.5) * grid
        vals = np.concatenate([[amax], subnormals(bs // 3 + 1), [0.0], ties])
        out.append(block(rng.permutation(vals[:max(bs, 1)])) if bs > 1 else block([amax]))
        out.append(block(np.concatenate([[amax], subnormals(bs)])))
    mn = f.max_normal
    for k in (-127, -100, -3, 0, 7, 100):
        top = mn * 2.0 ** k
        for a in (top, np.nextafter(f32(top), np.inf), np.nextafter(f32(top), 0)):
            out.append(block(np.concatenate([[a], rng.standard_normal(bs) * top / 4])))
    sub = subnormals(bs)
    out += [block([np.nan] + [1.0] * bs), block([np.inf] + [0.5] * bs),
            block([-np.inf, np.nan]), block(np.zeros(bs)), block(sub),
            block(np.concatenate([[np.uint32(0x7FFFFF).view(np.float32)], sub])),
            block([np.finfo(np.float32).max, 1.0, np.finfo(np.float32).tiny]),
            block(rng.standard_normal(bs) * 2.0 ** rng.integers(-149, 127, bs))]
    step = 2.0 ** (emax - m)                   # ulp at max normal for scale 0
    over = [mn + step / 2, mn + step / 4, mn - step / 2, mn + step, mn, 2 * mn]
    out += [block(np.array(over) * 2.0 ** s) for s in (0, -20, 30)]
    return [np.resize(b, bs) for b in out]


def _assert_fast_path_equals_general(x, fmt, profile, bs):
    """float32, bfloat16 and float16 (widened exactly to float32) take the fast path;
    float64 input runs the general integer kernel on the same values."""
    with np.errstate(all="ignore"):
        fast = mxref.quantize(x, fmt, block_size=bs, profile=profile)
        general = mxref.quantize(x.astype(np.float64), fmt, block_size=bs, profile=profile)
    assert np.array_equal(fast.scales, general.scales)
    assert np.array_equal(fast.codes, general.codes)
    packed = mxref.quantize_packed(x, fmt, block_size=bs, profile=profile)
    assert np.array_equal(packed.scales, general.scales)
    assert np.array_equal(packed.packed, pack_codes(general.codes, fmt))
    assert packed.unpack() == fast


def _assert_encode_equals_general(x, fmt, profile, scales):
    with np.errstate(all="ignore"):
        for s in scales:
            assert np.array_equal(mxref.encode(x, fmt, profile, s),
                                  mxref.encode(x.astype(np.float64), fmt, profile, s)), s


@settings(max_examples=80, deadline=None)
@given(data=st.data(), fmt=st.sampled_from(PACKED_FORMATS),
       profile=st.sampled_from(sorted(mxref.PRESETS)), bs=st.sampled_from([32, 16, 24, 3]),
       rows=st.integers(1, 3), extra=st.integers(0, 5),
       dtype=st.sampled_from([np.float32, np.float32, ml_dtypes.bfloat16, np.float16]))
def test_float32_fast_path_equals_the_general_kernel(data, fmt, profile, bs, rows, extra, dtype):
    if dtype is np.float16 and profile == "ocp_ftz":
        return  # float16 subnormals flush as input subnormals; as float64 they do not
    with np.errstate(all="ignore"):
        x = _f32_blocks(data, rows * 3, bs)[: rows * (3 * bs - extra)].reshape(rows, -1)
        x = x.astype(dtype)
    _assert_fast_path_equals_general(x, fmt, profile, bs)
    _assert_encode_equals_general(x, fmt, profile, [3])


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("profile", sorted(mxref.PRESETS))
@pytest.mark.parametrize("fmt", PACKED_FORMATS)
def test_float32_fast_path_equals_the_general_kernel_on_edge_blocks(fmt, profile, dtype):
    # every format x profile x input dtype, every edge block, at block sizes 32 (its own
    # kernel), 16, 24 and 3 (the any-size kernel's 16-lane, 8-lane and scalar maxima)
    # and in a ragged tail
    if dtype is np.float16 and profile == "ocp_ftz":
        return  # as in the test above
    from mxref.kernels_f32 import FAST_MAX_SCALE, min_fast_scale
    rng = np.random.default_rng(PACKED_FORMATS.index(fmt))
    for bs in (32, 16, 24, 3):
        blocks = _edge_blocks(fmt, bs, rng)
        with np.errstate(all="ignore"):
            x = np.concatenate(blocks).reshape(len(blocks), bs)
            rows = np.stack([rng.permutation(x).reshape(-1) for _ in range(3)])
            rows = np.concatenate([rows, rows[:, : bs + 5]], axis=1).astype(dtype)
        _assert_fast_path_equals_general(rows, fmt, profile, bs)
    lo = min_fast_scale(mxref.get_format(fmt), mxref.get_profile(profile))
    _assert_encode_equals_general(rows, fmt, profile,
                                  [0, 3, -5, lo, lo - 1, lo + 1, FAST_MAX_SCALE,
                                   FAST_MAX_SCALE + 1])


@pytest.mark.parametrize("fmt", PACKED_FORMATS)
def test_float32_fast_path_threads_equal_the_general_kernel(fmt):
    # big enough (>= PARALLEL_MIN elements) to be split over threads
    import numba

    from mxref.kernels_f32 import PARALLEL_MIN
    rng = np.random.default_rng(11)
    blocks = np.concatenate(_edge_blocks(fmt, 32, rng)).view(np.uint32)
    x = rng.standard_normal((64, PARALLEL_MIN // 64 + 32)).astype(np.float32)
    x *= np.exp2(rng.integers(-60, 60, (64, 1))).astype(np.float32)
    x.reshape(-1)[: blocks.size] = blocks.view(np.float32)
    before = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        for profile in ("ocp", "rceil"):
            _assert_fast_path_equals_general(x, fmt, profile, 32)
            _assert_encode_equals_general(x, fmt, profile, [0])
    finally:
        numba.set_num_threads(before)


def test_quantize_packed_layouts_and_axes():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 50, 5)).astype(np.float32)
    for fmt in ("fp4_e2m1", "fp6_e3m2", "int8"):
        for dtype in (np.float32, np.float16):
            p = mxref.quantize_packed(x.astype(dtype), fmt, axis=1)
            mx = mxref.quantize(x.astype(dtype), fmt, axis=1)
            assert p.packed.shape == (3, 5, packed_row_bytes(50, fmt))
            assert p.packing == packing_name(fmt) and p.shape == x.shape and p.axis == 1
            assert p.unpack() == mx


def test_quantize_packed_splits_long_single_rows_identically():
    # one long row is split into several rows internally so both cores get work
    x = np.random.default_rng(5).standard_normal(32 * 1000).astype(np.float32)
    p = mxref.quantize_packed(x, "fp4_e2m1")
    mx = mxref.quantize(x.astype(np.float64), "fp4_e2m1")
    assert np.array_equal(p.packed, pack_codes(mx.codes, "fp4_e2m1"))
    assert np.array_equal(p.scales, mx.scales)
