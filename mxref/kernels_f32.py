"""Fast float32 kernels: the integer rounding of mxref.kernels, written branch-free.

Same arithmetic as :func:`mxref.kernels.encode_finite` (value = sig * 2^(e - 23),
divide by 2^s by subtracting s from the exponent, round the significand with an
integer shift), restricted so that LLVM can vectorise it:

* the shift is capped at 25: the significand is below 2^24, so any shift >= 25
  rounds to 0 exactly as the uncapped shift does;
* FP32-subnormal inputs are NOT normalised. That is exact as long as the scaled value
  stays below the element's normal range (then ``q = round(sig >> shift)`` is the
  same whether sig is normalised or not) -- true whenever ``s > -112`` because
  |x| < 2^-126 and every element's emin is >= -14. Blocks with ``s <= -112`` (only
  when the block's amax is below ~2^-100) go through the general kernel instead;
* NaN/Inf never reach the element loop of a block (the block gets the NaN scale);
  for element-only conversion they are handled with selects.

Bit-identity with the general kernels is checked by the exhaustive ``mxref sweep``
(scale 0) and by tests comparing both paths at every scale.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from mxref.pack import pack_row
from mxref.kernels import (SCALE_BIAS, SCALE_NAN, encode_finite, scale_from_amax,
                           unpack_bits)

_NB = dict(nogil=True, cache=True, fastmath=False)
F32_LAYOUT = np.array([23, 127, 0xFF, 8], dtype=np.int64)
MIN_FAST_SCALE = -111       # see the module docstring: s <= -112 takes the general path


@nb.njit(inline="always")
def encode_f32_bits(xb, s, m, emin, bits, maxmag, ovf_mag, is_int, asym, away, flush,
                    nan_code):
    """Element code of float32 bit pattern xb divided by 2^s (branch-free).

    ovf_mag: magnitude code for overflow (max code when saturating, the Inf/NaN code
    in the OFP8 OVF mode); nan_code: full code for NaN inputs (+0 without NaN).
    """
    a = np.int64(xb & 0x7FFFFFFF)
    sign = np.int64(xb >> 31)
    E = a >> 23
    if flush and E == 0:
        a = np.int64(0)
    sig = (a & 0x7FFFFF) | (min(E, 1) << 23)
    e2 = max(E, 1) - 127 - s
    sh = min(23 - m + max(emin - e2, 0), 25)
    half = np.int64(1) << (sh - 1)
    if away:
        q = (sig + half) >> sh
    else:
        q = (sig + half - 1 + ((sig >> sh) & 1)) >> sh
    mag = (max(e2 - emin, 0) << m) + q
    if E == 0xFF:
        mag = maxmag + 2  # Inf overflows at every scale (NaN is replaced below)
    if is_int:
        mag = min(mag, maxmag + (sign & asym))
        code = ((-mag) & 0xFF) if sign == 1 else mag
    else:
        if mag > maxmag:
            mag = ovf_mag
        code = (sign << (bits - 1)) | mag
    if a > 0x7F800000:
        code = nan_code | (sign << (bits - 1)) if nan_code != 0 else np.int64(0)
    return code


def fast_params(ep: np.ndarray, pp: np.ndarray) -> tuple:
    """(m, emin, bits, maxmag, ovf_mag, is_int, asym, away, flush, nan_mag) from kernel params."""
    is_int, bits, m, emin, _, maxmag, nan, inf = (int(v) for v in ep[:8])
    ovf_mag = maxmag
    if pp[2] == 1 and bits == 8 and not is_int:
        ovf_mag = inf if inf >= 0 else nan
    return (m, emin, bits, maxmag, ovf_mag, bool(is_int), int(pp[4]), bool(pp[1] == 1),
            bool(pp[3] == 1), max(nan, 0))


@nb.njit(parallel=True, **_NB)
def encode_f32_kernel(xb, out, s, m, emin, bits, maxmag, ovf_mag, is_int, asym, away,
                      flush, nan_mag):
    """Element-only conversion of float32 bit patterns at scale 2^s (s > MIN_FAST_SCALE)."""
    for i in nb.prange(xb.size):
        out[i] = encode_f32_bits(xb[i], s, m, emin, bits, maxmag, ovf_mag, is_int, asym,
                                 away, flush, nan_mag)


@nb.njit(**_NB)
def _general_element(xb, s, ep, pp):
    """One element through the general integer kernel (blocks with s <= -112)."""
    sign, kind, sig, e = unpack_bits(xb, 23, 127, 0xFF, 8, pp[3])
    if kind == 1:
        return encode_finite(sign, sig, e, 23, s, ep, pp)
    return 0 if ep[0] == 1 else (sign << (ep[1] - 1))


@nb.njit(inline="always")
def _floor_scale(amax, emax):
    """§6.3 floor rule from float32 amax bits: biased E8M0 code (0x00 for zero, 0xFF NaN/Inf).

    floor(log2 amax) is the exponent field minus 127; an FP32-subnormal amax gives
    k <= -127 - emax and is clamped to -127 like its exact value would be.
    """
    k = np.int64(amax >> 23) - SCALE_BIAS - emax
    k = min(max(k, -SCALE_BIAS), SCALE_BIAS) + SCALE_BIAS
    if amax == 0:
        k = 0
    if amax >= 0x7F800000:
        k = SCALE_NAN
    return k


@nb.njit(inline="always")
def _one_block(row, codes_row, lo, n, ep, pp, m, emin, bits, maxmag, ovf_mag, is_int, asym,
               away, flush):
    """Quantize row[lo:lo+n]; returns the scale code. Inlined with n constant when it can be."""
    amax = np.uint32(0)
    for i in range(n):
        a = row[lo + i] & np.uint32(0x7FFFFFFF)
        if flush and a < np.uint32(0x800000):
            a = np.uint32(0)
        amax = max(amax, a)
    if pp[0] == 0:
        sc = _floor_scale(amax, ep[4])
    else:
        sc = scale_from_amax(np.uint64(amax), F32_LAYOUT, ep, pp)
    if sc == SCALE_NAN:
        for i in range(n):
            codes_row[lo + i] = 0
        return sc
    s = np.int64(sc) - SCALE_BIAS
    if s >= MIN_FAST_SCALE:
        for i in range(n):
            codes_row[lo + i] = encode_f32_bits(row[lo + i], s, m, emin, bits, maxmag,
                                                ovf_mag, is_int, asym, away, flush, 0)
    else:
        for i in range(n):
            codes_row[lo + i] = _general_element(row[lo + i], s, ep, pp)
    return sc


@nb.njit(inline="always")
def _row_blocks(row, codes_row, scales_row, block, ep, pp, m, emin, bits, maxmag, ovf_mag,
                is_int, asym, away, flush):
    """Quantize one row of float32 bits: scales_row[b], codes_row[i].

    Full blocks first, with ``block`` a compile-time constant for the default 32 so LLVM
    unrolls and vectorises the fixed-length loops; then the ragged tail, if any.
    """
    K = row.size
    nfull = K // block
    if block == 32:
        for b in range(nfull):
            scales_row[b] = _one_block(row, codes_row, b * 32, 32, ep, pp, m, emin, bits,
                                       maxmag, ovf_mag, is_int, asym, away, flush)
    else:
        for b in range(nfull):
            scales_row[b] = _one_block(row, codes_row, b * block, block, ep, pp, m, emin,
                                       bits, maxmag, ovf_mag, is_int, asym, away, flush)
    if K % block:
        scales_row[nfull] = _one_block(row, codes_row, nfull * block, K % block, ep, pp, m,
                                       emin, bits, maxmag, ovf_mag, is_int, asym, away,
                                       flush)


@nb.njit(parallel=True, **_NB)
def quantize_f32_kernel(raw, codes, scales, block, ep, pp, m, emin, bits, maxmag, ovf_mag,
                        is_int, asym, away, flush):
    """raw (N, K) float32 bits -> codes (N, K), scales (N, nbk); one row per task."""
    for r in nb.prange(raw.shape[0]):
        _row_blocks(raw[r], codes[r], scales[r], block, ep, pp, m, emin, bits, maxmag,
                    ovf_mag, is_int, asym, away, flush)


@nb.njit(parallel=True, **_NB)
def quantize_packed_f32_kernel(raw, packed, scales, block, ep, pp, m, emin, bits, maxmag,
                               ovf_mag, is_int, asym, away, flush):
    """Like quantize_f32_kernel, but each row's codes go straight into its packed bytes."""
    N, K = raw.shape
    for r in nb.prange(N):
        buf = np.empty(K, dtype=np.uint8)
        _row_blocks(raw[r], buf, scales[r], block, ep, pp, m, emin, bits, maxmag, ovf_mag,
                    is_int, asym, away, flush)
        pack_row(buf, packed[r], bits)
