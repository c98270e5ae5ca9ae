"""Numba kernels: element encode/decode and block quantize/dequantize on raw bit patterns.

Every input float is read as its IEEE bit pattern (uint16 for bfloat16/float16,
uint32 for float32, uint64 for float64) with the input layout passed as
(in_mbits, in_bias, in_emask). All rounding is integer arithmetic on the
significand; no floating-point log2 or division is used anywhere (float32
``floor(log2(x))`` is wrong just below powers of two, see specs/semantics.md).
These general kernels serve every dtype; float32 input takes the vectorised copy of the
same arithmetic in :mod:`mxref.kernels_f32`, which must stay bit-identical to them.

Element parameters (``ep``, an int64 array built by :func:`element_params`):
  0 is_int   1 bits   2 m (mantissa/fraction bits)   3 emin   4 emax
  5 max_code_mag      6 nan_code_mag (-1 none)       7 inf_code_mag (-1 none)
  8 maxn_P  9 maxn_Q  (max_normal = P * 2^Q, P odd; for the rceil scale rule)
Profile parameters (``pp``): 0 scale_rule 1 rounding 2 fp8_overflow 3 flush 4 int8_range
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

from mxref.formats import DEFAULT_BLOCK_SIZE, E8M0, FLOAT32, IEEE_LAYOUTS, FormatInfo

_NB = dict(nogil=True, cache=True)

SCALE_NAN = E8M0.nan_code
SCALE_BIAS = E8M0.bias
SCALE_MIN = E8M0.min_exp
SCALE_MAX = E8M0.max_exp


def element_params(fmt: FormatInfo) -> np.ndarray:
    p, q = fmt.max_normal_odd
    mag = fmt.sign_bit - 1
    nan = fmt.nan_codes[0] if fmt.nan_codes else -1
    inf = fmt.inf_codes[0] if fmt.inf_codes else -1
    return np.array([int(fmt.is_int), fmt.bits, fmt.step_bits, fmt.emin, fmt.emax,
                     fmt.max_code & mag, nan, inf, p, q], dtype=np.int64)


# Input layouts ``lay``: (mantissa bits, exponent bias, exponent all-ones, exponent bits),
# from specs/formats.toml's [ieee.*] tables.
INPUT_LAYOUTS = {name: lay.kernel_layout for name, lay in IEEE_LAYOUTS.items()}
# Exponent of the smallest normal float32 (-126): ``flush_subnormals`` reads anything
# smaller as zero, whatever the input dtype.
FP32_EMIN = FLOAT32.emin
# The default block size, a compile-time constant so its loops unroll and vectorise.
BLOCK = DEFAULT_BLOCK_SIZE


@nb.njit(**_NB)
def _floor_log2_int(v):
    # exact for 0 < v < 2^53: frexp of an integer-valued float64 is exact
    _, e = math.frexp(np.float64(v))
    return e - 1


@nb.njit(**_NB)
def unpack_bits(bits, in_mbits, in_bias, in_emask, in_ebits, flush):
    """Split an IEEE pattern into (sign, kind, sig, e): value = sig * 2^(e - in_mbits).

    kind: 0 zero, 1 finite nonzero (sig normalised to [2^in_mbits, 2^(in_mbits+1))),
    2 infinity, 3 NaN. ``flush`` reads subnormals of the input dtype and every
    magnitude below 2^-126 (FP32-subnormal, e.g. a small float64) as signed zero.
    """
    ub = np.uint64(bits)
    sign = np.int64(ub >> np.uint64(in_mbits + in_ebits)) & 1
    E = np.int64((ub >> np.uint64(in_mbits)) & np.uint64(in_emask))
    M = np.int64(ub & np.uint64((1 << in_mbits) - 1))
    if E == in_emask:
        return sign, (3 if M != 0 else 2), np.int64(0), np.int64(0)
    if E == 0:
        if M == 0 or flush:
            return sign, 0, np.int64(0), np.int64(0)
        L = _floor_log2_int(M)  # M in [2^L, 2^(L+1))
        sh = in_mbits - L
        return sign, 1, M << sh, np.int64(1 - in_bias - sh)
    if flush and E - in_bias < FP32_EMIN:
        return sign, 0, np.int64(0), np.int64(0)
    return sign, 1, M | (np.int64(1) << in_mbits), E - in_bias


@nb.njit(**_NB)
def _round_shift(sig, shift, rounding):
    """sig / 2^shift rounded to an integer: rounding 0 = ties-to-even, 1 = ties-away."""
    if shift <= 0:
        return sig << (-shift)
    if shift > 62:
        return np.int64(0)
    q = sig >> shift
    rem = sig & ((np.int64(1) << shift) - 1)
    half = np.int64(1) << (shift - 1)
    if rem > half or (rem == half and (rounding == 1 or (q & 1) == 1)):
        q += 1
    return q


@nb.njit(**_NB)
def encode_finite(sign, sig, e, in_mbits, s, ep, pp):
    """Code of the finite nonzero value sig*2^(e-in_mbits) divided by 2^s."""
    is_int = ep[0]
    bits = ep[1]
    m = ep[2]
    emin = ep[3]
    emax = ep[4]
    maxmag = ep[5]
    e2 = e - s
    if e2 > emax + 1:
        mag = maxmag + 1  # certainly overflows
    else:
        sub = emin - e2
        if sub < 0:
            sub = 0
        q = _round_shift(sig, in_mbits - m + sub, pp[1])
        if e2 >= emin:
            mag = ((e2 - emin) << m) + q
        else:
            mag = q
    if is_int:
        lim = maxmag
        if sign == 1 and pp[4] == 1:
            lim = maxmag + 1  # -128 allowed by the asymmetric profile
        if mag > lim:
            mag = lim
        if sign == 1:
            return ((1 << bits) - mag) & ((1 << bits) - 1)
        return mag
    if mag > maxmag:
        if pp[2] == 1 and bits == 8:  # OFP8 OVF mode
            mag = ep[7] if ep[7] >= 0 else ep[6]
        else:
            mag = maxmag
    return (sign << (bits - 1)) | mag


@nb.njit(**_NB)
def encode_nonfinite(sign, kind, ep, pp):
    """Element code for Inf (kind 2) / NaN (kind 3) in element-only conversion."""
    bits = ep[1]
    if kind == 3:
        if ep[6] >= 0:
            return (sign << (bits - 1)) | ep[6]
        return 0  # no NaN encoding: +0 (inside MX blocks the scale is NaN anyway)
    if ep[0] == 1:  # INT8 saturates
        if sign == 1:
            lim = ep[5] + 1 if pp[4] == 1 else ep[5]
            return ((1 << bits) - lim) & ((1 << bits) - 1)
        return ep[5]
    if pp[2] == 1 and bits == 8:
        mag = ep[7] if ep[7] >= 0 else ep[6]
    else:
        mag = ep[5]
    return (sign << (bits - 1)) | mag


@nb.njit(parallel=True, **_NB)
def encode_elements_kernel(raw, out, s, lay, ep, pp):
    """Element-only conversion at scale 2^s (no block logic)."""
    for i in nb.prange(raw.size):
        sign, kind, sig, e = unpack_bits(raw[i], lay[0], lay[1], lay[2], lay[3], pp[3])
        if kind == 0:
            c = 0 if ep[0] == 1 else (sign << (ep[1] - 1))
        elif kind == 1:
            c = encode_finite(sign, sig, e, lay[0], s, ep, pp)
        else:
            c = encode_nonfinite(sign, kind, ep, pp)
        out[i] = c


@nb.njit(**_NB)
def flush_threshold(lay):
    """Smallest |bits| kept by ``flush_subnormals``: 2^-126 (or the input's min normal)."""
    subtop = np.uint64(1) << np.uint64(lay[0])
    e = FP32_EMIN + lay[1]  # biased exponent of 2^-126 in the input layout
    if e >= 1 and (np.uint64(e) << np.uint64(lay[0])) > subtop:
        return np.uint64(e) << np.uint64(lay[0])
    return subtop


@nb.njit(**_NB)
def block_scale_exp(raw, lo, hi, lay, ep, pp):
    """Scale code of raw[lo:hi] (E8M0, biased). NaN/Inf anywhere -> NaN code."""
    absmask = (np.uint64(1) << np.uint64(lay[0] + lay[3])) - np.uint64(1)
    keep = flush_threshold(lay)
    amax = np.uint64(0)
    for i in range(lo, hi):
        a = np.uint64(raw[i]) & absmask
        if pp[3] == 1 and a < keep:
            a = np.uint64(0)
        if a > amax:
            amax = a
    return scale_from_amax(amax, lay, ep, pp)


@nb.njit(**_NB)
def scale_from_amax(amax, lay, ep, pp):
    """Scale code from the block's largest |bits| (NaN/Inf -> NaN code, 0 -> 0x00)."""
    in_mbits = lay[0]
    infbits = np.uint64(lay[2]) << np.uint64(lay[0])
    if amax >= infbits:
        return SCALE_NAN
    if amax == 0:
        return SCALE_MIN + SCALE_BIAS  # all-zero block: 0x00
    _, _, sig, e = unpack_bits(amax, lay[0], lay[1], lay[2], lay[3], 0)
    if pp[0] == 0:
        k = e - ep[4]  # floor(log2 amax) - emax_elem, exact
    else:
        # rceil: smallest k with amax <= P * 2^(Q + k)
        P = ep[8]
        Q = ep[9]
        k = e - ep[4] - 1
        while True:
            t = e - in_mbits - Q - k
            if t >= 0:
                ok = (sig << t) <= P if t < 40 else False
            else:
                ok = sig <= (P << (-t)) if -t < 55 else True
            if ok:
                break
            k += 1
    if k < SCALE_MIN:
        k = SCALE_MIN
    if k > SCALE_MAX:
        k = SCALE_MAX
    return k + SCALE_BIAS


@nb.njit(parallel=True, **_NB)
def quantize_kernel(raw, codes, scales, block, lay, ep, pp):
    """raw (N, K) bits -> codes (N, K) uint8, scales (N, ceil(K/block)) uint8."""
    N, K = raw.shape
    nbk = scales.shape[1]
    for t in nb.prange(N * nbk):
        r = t // nbk
        b = t - r * nbk
        lo = b * block
        hi = min(lo + block, K)
        row = raw[r]
        sc = block_scale_exp(row, lo, hi, lay, ep, pp)
        scales[r, b] = sc
        if sc == SCALE_NAN:
            for i in range(lo, hi):
                codes[r, i] = 0
            continue
        s = sc - SCALE_BIAS
        for i in range(lo, hi):
            sign, kind, sig, e = unpack_bits(row[i], lay[0], lay[1], lay[2], lay[3], pp[3])
            if kind == 1:
                c = encode_finite(sign, sig, e, lay[0], s, ep, pp)
            else:
                c = 0 if ep[0] == 1 else (sign << (ep[1] - 1))
            codes[r, i] = c


@nb.njit(inline="always")
def _dequantize_row(codes_row, scales_row, block, lut, scale_tab, out_row):
    K = codes_row.size
    nfull = K // block
    for b in range(nfull):
        sv = scale_tab[scales_row[b]]
        lo = b * block
        for i in range(block):
            out_row[lo + i] = lut[codes_row[lo + i]] * sv
    if K % block:
        sv = scale_tab[scales_row[nfull]]
        for i in range(nfull * block, K):
            out_row[i] = lut[codes_row[i]] * sv


@nb.njit(parallel=True, **_NB)
def dequantize_kernel(codes, scales, block, lut, scale_tab, out):
    """out[r, i] = lut[codes[r, i]] * scale_tab[scales[r, i // block]].

    ``lut`` and ``scale_tab`` have out's dtype. The product is exact in float32 too:
    element values have at most 8 significant bits and are multiples of 2^-16, scales
    are powers of two >= 2^-127, so every product is a float32 (normal or subnormal)
    unless it exceeds the float32 range, where both roundings give Inf. The default
    block size 32 is passed as a constant so the inner loop unrolls and vectorises.
    """
    for r in nb.prange(codes.shape[0]):
        if block == BLOCK:
            _dequantize_row(codes[r], scales[r], BLOCK, lut, scale_tab, out[r])
        else:
            _dequantize_row(codes[r], scales[r], block, lut, scale_tab, out[r])


@nb.njit(parallel=True, **_NB)
def decode_kernel(codes, lut, out):
    for i in nb.prange(codes.size):
        out[i] = lut[codes[i]]
