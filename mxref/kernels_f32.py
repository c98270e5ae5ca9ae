"""Fast float32 kernels: the integer rounding of mxref.kernels, specialised and vectorised.

Same arithmetic as :func:`mxref.kernels.encode_finite` (value = sig * 2^(e - 23),
divide by 2^s by subtracting s from the exponent, round the significand with an
integer shift), restricted so that LLVM can vectorise it with 32-bit lanes. Why each
restriction keeps the result bit-identical:

* every format/profile choice the element loop sees is a compile-time constant: one
  kernel per :class:`Spec` (see :func:`quantize_kernel`); choices that only enter
  per-block scalar work (scale rule, flushing, emin/emax) are runtime values;
* all element arithmetic is int32 (written with explicit ``np.int32`` truncations,
  because numba widens int32 operations to int64): E <= 255, sig < 2^24,
  sig + 2^24 < 2^25, and ``(e2 - emin) << m`` < 2^15 for every scale the fast path
  accepts (``min_fast`` <= s <= ``FAST_MAX_SCALE``);
* the shift is capped at 25: the significand is below 2^24, so any shift >= 25
  rounds to 0 exactly as the uncapped shift does;
* FP32-subnormal inputs (E = 0) are NOT decoded: the element loop reads every
  pattern as (2^23 | M) * 2^(E - 150), which for E = 0 is a value in [2^-127, 2^-126)
  instead of the true M * 2^-149, also below 2^-126. Divided by 2^s both are below
  2^(-126 - s), which is at most a quarter of the format's smallest subnormal
  2^(emin - m) -- so both round to magnitude 0 under either rounding, and the code is
  the signed zero that the general kernel gives (also when the profile flushes) --
  as long as ``s >= min_fast = -124 - emin + m``. Blocks with a smaller scale (only
  when the block's amax is below ~2^-100) go through the general kernel instead, and
  so does element-only conversion at such scales;
* NaN/Inf never reach the element loop of a block (the block gets the NaN scale);
  for element-only conversion they are handled with selects;
* the block's largest |bits| (max of ``bits & 0x7FFFFFFF`` = largest magnitude for
  non-NaN patterns, and >= 0x7F800000 exactly when the block holds a NaN or an Inf)
  is one 32-lane vector load and an LLVM ``vector.reduce.umax`` for the default block
  size (LLVM unrolls a 32-step scalar max loop but does not vectorise it; other sizes
  take 16 or 8 lanes at a time where they can). Flushing FP32 subnormals commutes
  with the max (it is monotone), so it is applied after it;
* the floor scale is the exponent field of amax; the rceil scale compares amax's
  23-bit fraction with max_normal's (every format's max_normal is a float32), with the
  general :func:`mxref.kernels.scale_from_amax` for an FP32-subnormal amax.

Rows go in passes (:func:`_rows32`, :func:`_rows_any` for other block sizes): block
maxima, scales, then the codes of every block, while the next row is prefetched; blocks
the fast arithmetic must not handle (NaN/Inf, zero, s < min_fast) and ragged tails are
done by :func:`_block_any`. Packed output goes through a row buffer (FP4: one uint16 of
two codes -> one byte; FP6: one uint32 of four codes -> three bytes). Inputs of
PARALLEL_MIN elements or more are split over numba.get_num_threads() threads.

Bit-identity with the general kernels is checked by the exhaustive ``mxref sweep``
(element-only conversion at scale 0 runs the same ``_mag``/``_code`` as the blocks)
and by tests comparing both paths on edge-case blocks for every format and profile.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import NamedTuple

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from mxref.formats import FLOAT32
from mxref.kernels import (BLOCK, SCALE_BIAS, SCALE_MAX, SCALE_MIN, SCALE_NAN, element_params,
                           encode_finite, scale_from_amax, unpack_bits)

_NB = dict(nogil=True, cache=True, fastmath=False)
F32_LAYOUT = np.array(FLOAT32.kernel_layout, dtype=np.int64)
# float32 fields as module globals: numba freezes them into compile-time constants.
F32_BITS = FLOAT32.bits                 # 32
F32_MAN = FLOAT32.man_bits              # 23
F32_BIAS = FLOAT32.bias                 # 127
F32_EXP_BITS = FLOAT32.exp_bits         # 8
F32_EXP_ONES = FLOAT32.exp_all_ones     # 0xFF
F32_FRAC = FLOAT32.frac_mask            # 0x7FFFFF
F32_HIDDEN = FLOAT32.hidden_bit         # 0x800000, also the smallest normal's pattern
F32_ABS = FLOAT32.abs_mask              # 0x7FFFFFFF
F32_INF = FLOAT32.inf_bits              # 0x7F800000
F32_SIGN_SHIFT = FLOAT32.sign_shift     # 31
# Rounding shifts are capped here: the significand is below 2^(F32_MAN + 1), so a
# shift of F32_MAN + 2 or more rounds it to 0 like any larger one.
SH_CAP = F32_MAN + 2                    # 25
HALF_CAP = 1 << (F32_MAN + 1)           # 2^(SH_CAP - 1)
FAST_MAX_SCALE = 1 << 20   # element-only scales above this take the general kernel
PARALLEL_MIN = 1 << 18     # fewer elements: one thread (a parallel launch is not worth it)
I32 = np.int32


class Spec(NamedTuple):
    """What the element loop specialises on (compile-time constants of a kernel)."""

    bits: int        # element width
    m: int           # mantissa / fraction bits
    maxmag: int      # largest finite magnitude code
    ovf_mag: int     # magnitude on overflow: maxmag, or the Inf/NaN code in OFP8 OVF mode
    nan_mag: int     # NaN magnitude code for element-only conversion (0: none -> +0)
    is_int: bool
    asym: bool       # INT8 may give -128
    away: bool       # ties away from zero (else to even)


# Per-block parameters, runtime (they only enter scalar per-block arithmetic):
# 0 emin  1 emax  2 rceil  3 mn_frac (23-bit fraction of max_normal as a float32)
# 4 flush  5 min_fast (smallest scale exponent the fast element arithmetic is exact for)
BP_EMIN, BP_EMAX, BP_RCEIL, BP_MNFRAC, BP_FLUSH, BP_MINFAST = range(6)


@lru_cache(maxsize=None)
def spec_of(fmt, profile) -> tuple[Spec, np.ndarray, np.ndarray]:
    """(:class:`Spec`, block params, the spec as an int64 array) of a format and profile.

    Choices that cannot matter for the format are normalised away (``ocp`` and
    ``ocp_ovf`` share FP4 kernels); the scale rule and flushing are block params."""
    ep = element_params(fmt)
    is_int, bits, m, emin, emax, maxmag, nan, inf = (int(v) for v in ep[:8])
    rule, rounding, fp8_ovf, flush, int8_range = profile.kernel_args()
    ovf_mag = maxmag
    if fp8_ovf == 1 and bits == 8 and not is_int:
        ovf_mag = inf if inf >= 0 else nan
    spec = Spec(bits, m, maxmag, ovf_mag, max(nan, 0), bool(is_int),
                bool(is_int and int8_range == 1), rounding == 1)
    # min_fast: below 2^(F32.emin - s) every input is at most a quarter of the smallest
    # element subnormal 2^(emin - m) when s >= F32.emin + 2 - emin + m (module docstring)
    bp = np.array([emin, emax, rule, fmt.max_normal_fraction(F32_MAN), flush,
                   FLOAT32.emin + 2 - emin + m], dtype=np.int64)
    sa = np.array(spec, dtype=np.int64)   # the spec as runtime values, for _block_any
    for a in (bp, sa):
        a.flags.writeable = False
    return spec, bp, sa


# --------------------------------------------------------------------------- pieces
@intrinsic(prefer_literal=True)
def _abs_max(typingctx, row, lo, n):
    """max(row[lo:lo+n] & 0x7FFFFFFF) for a C-contiguous int32/uint32 row and a
    compile-time n (no bounds check: the caller guarantees lo + n <= row.size); one
    <n x i32> load + llvm.vector.reduce.umax, which LLVM splits into vector registers."""
    if not (isinstance(row, types.Array) and row.ndim == 1 and row.layout == "C"
            and row.dtype in (types.int32, types.uint32) and isinstance(lo, types.Integer)
            and isinstance(n, types.IntegerLiteral) and n.literal_value >= 1):
        return None
    width = n.literal_value

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.intp)
        i32 = ir.IntType(32)
        vty = ir.VectorType(i32, width)
        ptr = builder.bitcast(builder.gep(ary.data, [idx]), vty.as_pointer())
        v = builder.and_(builder.load(ptr, align=4),
                         ir.Constant(vty, [F32_ABS] * width))
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [vty]),
                                            f"llvm.vector.reduce.umax.v{width}i32")
        return builder.call(fn, [v])

    return types.int32(row, lo, n), codegen


@intrinsic
def _prefetch(typingctx, row, lo):
    """Hint the cache line holding row[lo] into cache (llvm.prefetch: never faults)."""
    if not (isinstance(row, types.Array) and row.layout == "C"
            and isinstance(lo, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.intp)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
            "llvm.prefetch.p0i8")   # the typed-pointer name; newer LLVM upgrades it
        ptr = builder.bitcast(builder.gep(ary.data, [idx]), i8p)
        # read, locality 3 (keep in all levels), data cache
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.none(row, lo), codegen


@nb.njit(inline="always")
def _mag(xb, T, U, c0, m, away):
    """Unsaturated magnitude code of int32 pattern xb divided by 2^s.

    T = emin + F32_BIAS + s and U = c0 + T (c0 = F32_MAN - m) are per-block constants:
    e2 - emin = E - T and the rounding shift is c0 + max(emin - e2, 0) = max(U - E, c0).
    """
    E = I32(I32(xb >> F32_MAN) & F32_EXP_ONES)
    sig = I32(I32(xb & F32_FRAC) | F32_HIDDEN)
    sh = min(max(I32(U - E), I32(c0)), I32(SH_CAP))
    expo = max(I32(E - T), I32(0))
    if away:   # + 2^(sh-1), written as a right shift so it stays 32-bit
        q = I32(I32(sig + I32(I32(HALF_CAP) >> I32(I32(SH_CAP) - sh))) >> sh)
    else:      # + 2^(sh-1) - 1 + (lowest kept bit): ties to even
        q = I32(I32(I32(sig + I32(I32(HALF_CAP - 1) >> I32(I32(SH_CAP) - sh)))
                    + I32(I32(sig >> sh) & 1)) >> sh)
    return I32(I32(expo << m) + q)


@nb.njit(inline="always")
def _code(mag, xb, bits, maxmag, ovf_mag, is_int, asym, ovf):
    """Saturate (or overflow) the magnitude and attach the sign of xb."""
    if is_int:
        neg = I32(I32(xb >> F32_SIGN_SHIFT) & 1)
        if asym:
            mag = min(mag, I32(maxmag + neg))
        else:
            mag = min(mag, I32(maxmag))
        return I32(I32(-mag) & ((1 << bits) - 1)) if neg else mag   # two's complement
    if ovf:
        mag = I32(ovf_mag) if mag > maxmag else mag
    else:
        mag = min(mag, I32(maxmag))
    return I32(I32(I32(xb >> (F32_BITS - bits)) & (1 << (bits - 1))) | mag)


@nb.njit(**_NB)
def _general_element(xb, s, ep, pp):
    """One element through the general integer kernel (blocks with s < min_fast)."""
    sign, kind, sig, e = unpack_bits(np.uint32(xb), F32_MAN, F32_BIAS, F32_EXP_ONES,
                                     F32_EXP_BITS, pp[3])
    if kind == 1:
        return encode_finite(sign, sig, e, F32_MAN, s, ep, pp)
    return 0 if ep[0] == 1 else (sign << (ep[1] - 1))


@nb.njit(inline="always")
def _scale(amax, flush, emax, rceil, mn_frac):
    """E8M0 code from the block's largest |bits|; -1: ask the general scale_from_amax
    (rceil with an FP32-subnormal amax). Scalars and selects only, so that a loop over
    blocks vectorises (see _rows32)."""
    a = I32(0) if flush and amax < F32_HIDDEN else amax
    ea = a >> F32_MAN
    k = ea - F32_BIAS - emax
    if rceil:
        k += 1 if (a & F32_FRAC) > mn_frac else 0
    k = min(max(k, SCALE_MIN), SCALE_MAX) + SCALE_BIAS
    k = SCALE_MIN + SCALE_BIAS if a == 0 else k
    k = SCALE_NAN if a >= F32_INF else k
    if rceil:
        k = -1 if ea == 0 and a != 0 else k
    return k


@nb.njit(**_NB)
def _block_any(row, dst, lo, n, ep, pp, bp, sa):
    """Codes of row[lo:lo+n] into dst[lo:lo+n]; returns the scale code. Any n (ragged
    tails, the rare SLOW blocks the row kernels leave to it), with the spec as runtime
    values ``sa``: one compiled function for every spec (_rows32/_rows_any do the common
    case with the spec constant)."""
    bits, m, maxmag, ovf_mag = sa[0], sa[1], sa[2], sa[3]
    is_int, asym, away = sa[5] != 0, sa[6] != 0, sa[7] != 0
    amax = I32(0)
    for i in range(n):
        amax = max(amax, I32(row[lo + i] & F32_ABS))
    sc = _scale(amax, bp[BP_FLUSH], bp[BP_EMAX], bp[BP_RCEIL], bp[BP_MNFRAC])
    if sc < 0:
        sc = scale_from_amax(np.uint64(amax), F32_LAYOUT, ep, pp)
    s = sc - SCALE_BIAS
    if sc == SCALE_NAN:
        for i in range(n):
            dst[lo + i] = 0
    elif amax == 0 or (bp[BP_FLUSH] and amax < F32_HIDDEN):
        for i in range(n):   # zeros (or flushed subnormals): signed zero codes
            dst[lo + i] = 0 if is_int else ((row[lo + i] >> (F32_BITS - bits))
                                            & (1 << (bits - 1)))
    elif s >= bp[BP_MINFAST]:
        T = I32(bp[BP_EMIN] + F32_BIAS + s)
        U = I32(F32_MAN - m + T)
        for i in range(n):
            xb = row[lo + i]
            dst[lo + i] = _code(_mag(xb, T, U, F32_MAN - m, m, away), xb, bits, maxmag, ovf_mag,
                                is_int, asym, ovf_mag != maxmag)
    else:
        for i in range(n):
            dst[lo + i] = _general_element(row[lo + i], s, ep, pp)
    return sc


@intrinsic
def _pack6x16(typingctx, buf, lo, out, olo):
    """FP6-pack the 64 codes buf[lo:lo+64] into the 48 bytes out[olo:olo+48] (no bounds
    check): each uint32 of four codes becomes its 24-bit word as in _pack_row, then one
    byte shuffle drops every fourth byte (a vpermb on AVX-512 VBMI)."""
    u8 = types.Array(types.uint8, 1, "C")
    if not (buf == u8 and out == u8 and isinstance(lo, types.Integer)
            and isinstance(olo, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        src = context.make_array(signature.args[0])(context, builder, args[0])
        dst = context.make_array(signature.args[2])(context, builder, args[2])
        i = context.cast(builder, args[1], signature.args[1], types.intp)
        o = context.cast(builder, args[3], signature.args[3], types.intp)
        v32, v64, v48 = (ir.VectorType(ir.IntType(n), k) for n, k in ((32, 16), (8, 64), (8, 48)))
        w = builder.load(builder.bitcast(builder.gep(src.data, [i]), v32.as_pointer()), align=1)

        def splat(c):
            return ir.Constant(v32, [c] * 16)

        p = builder.and_(w, splat(0x3F))
        for sh, mask in ((2, 0xFC0), (4, 0x3F000), (6, 0xFC0000)):
            p = builder.or_(p, builder.and_(builder.lshr(w, splat(sh)), splat(mask)))
        b = builder.bitcast(p, v64)
        keep = ir.Constant(ir.VectorType(ir.IntType(32), 48),
                           [4 * j + t for j in range(16) for t in range(3)])
        packed = builder.shuffle_vector(b, ir.Constant(v64, None), keep)
        builder.store(packed, builder.bitcast(builder.gep(dst.data, [o]), v48.as_pointer()),
                      align=1)
        return context.get_dummy_value()

    return types.none(buf, lo, out, olo), codegen


@nb.njit(**_NB)
def _pack_row(buf, out, out_bits, K):
    """Pack the zero-padded codes buf[:K] into one row (layouts of mxref.pack).

    FP4: one uint16 (c0 | c1 << 8) -> byte c0 | c1 << 4; FP6: one uint32
    (c0 | c1 << 8 | c2 << 16 | c3 << 24) -> the 24-bit little-endian word."""
    if out_bits == 4:
        nbytes = (K + 1) // 2
        b16 = buf[:2 * nbytes].view(np.uint16)
        for j in range(nbytes):
            w = b16[j]
            out[j] = (w | (w >> 4)) & 0xFF
    else:
        ng = (K + 3) // 4
        for c in range(ng // 16):
            _pack6x16(buf, 64 * c, out, 48 * c)
        b32 = buf[:4 * ng].view(np.uint32)
        for j in range(ng // 16 * 16, ng):
            w = b32[j]
            p = (w & 0x3F) | ((w >> 2) & 0xFC0) | ((w >> 4) & 0x3F000) | ((w >> 6) & 0xFC0000)
            out[3 * j] = p & 0xFF
            out[3 * j + 1] = (p >> 8) & 0xFF
            out[3 * j + 2] = p >> 16


SLOW = -1024   # the T of blocks that _block_any redoes (any T is harmless in _mag)


@nb.njit(**_NB)
def _scale_pass(amaxs, srow, tb, nfull, bp):
    """Scales of a row's full blocks from their maxima, and each block's T = emin + F32_BIAS + s
    for the code pass (SLOW where _block_any must redo the block); returns how many are
    SLOW. A loop of selects over the blocks (it vectorises)."""
    flush, emin, emax = bp[BP_FLUSH], bp[BP_EMIN], bp[BP_EMAX]
    rceil, mn_frac, min_fast = bp[BP_RCEIL], bp[BP_MNFRAC], bp[BP_MINFAST]
    nslow = 0
    for b in range(nfull):
        sc = _scale(amaxs[b], flush, emax, rceil, mn_frac)
        fast = sc != SCALE_NAN and sc - SCALE_BIAS >= min_fast
        srow[b] = sc
        tb[b] = I32(emin + F32_BIAS + (sc - SCALE_BIAS)) if fast else I32(SLOW)
        nslow += 0 if fast else 1
    return nslow


@nb.njit(**_NB)
def _finish_row(row, dst, srow, tb, nfull, block, nslow, buf, orow, out_bits, ep, pp, bp,
                sa):
    """The SLOW blocks and the ragged tail of a row (_block_any), then its packing."""
    K = row.size
    if nslow:
        for b in range(nfull):
            if tb[b] == SLOW:
                srow[b] = _block_any(row, dst, b * block, np.int64(block), ep, pp, bp, sa)
    if K % block:
        srow[nfull] = _block_any(row, dst, nfull * block, np.int64(K % block), ep, pp, bp,
                                 sa)
    if out_bits != 8:
        _pack_row(buf, orow, out_bits, K)


@nb.njit(inline="always")
def _rows32(raw, out, scales, r0, r1, block, ep, pp, bp, sa, out_bits, bits, m, maxmag,
            ovf_mag, is_int, asym, away):
    """Rows r0..r1 of raw (N, K) int32 bits -> scales (N, nbk) and out: codes (N, K) when
    out_bits == 8, else packed rows (the codes go through a zero-padded row buffer).

    Full blocks of 32 go in passes over the row, each a straight loop that vectorises:
    block maxima (one vector load per half block), scales and per-block T (as in
    _scale_pass), the codes of every block with its T while the next row is prefetched;
    then the few SLOW blocks (NaN/Inf, zero, tiny scale, rceil of a subnormal amax) and
    the ragged tail are done by _block_any. (Other block sizes take _rows_any; the
    per-block fallback here only keeps this function correct for any ``block``.)
    Everything is written out here: numba reference-counts arrays passed to inlined
    functions, which costs more than a block, and per-row calls or a compile-time
    ``block`` both measured 5-20% slower than this form; the helpers inlined into the
    loops take scalars only.
    """
    K = raw.shape[1]
    nfull = K // block
    flush, emin, emax = bp[BP_FLUSH], bp[BP_EMIN], bp[BP_EMAX]
    rceil, mn_frac, min_fast = bp[BP_RCEIL], bp[BP_MNFRAC], bp[BP_MINFAST]
    buf = np.zeros((K + 3) // 4 * 4 if out_bits != 8 else 0, dtype=np.uint8)
    n32 = nfull if block == BLOCK else 0
    amaxs = np.empty(n32, dtype=np.int32)
    tb = np.empty(n32, dtype=np.int32)
    for r in range(r0, r1):
        row = raw[r]
        dst = out[r] if out_bits == 8 else buf
        srow = scales[r]
        if block == BLOCK:
            for b in range(n32):
                amaxs[b] = _abs_max(row, b * BLOCK, BLOCK)
            nslow = 0
            for b in range(n32):
                sc = _scale(amaxs[b], flush, emax, rceil, mn_frac)
                fast = sc != SCALE_NAN and sc - SCALE_BIAS >= min_fast
                srow[b] = sc
                tb[b] = I32(emin + F32_BIAS + (sc - SCALE_BIAS)) if fast else I32(SLOW)
                nslow += 0 if fast else 1
            nxt = raw[r + 1] if r + 1 < r1 else row
            for b in range(n32):
                T = tb[b]
                U = I32(F32_MAN - m + T)
                lo = b * BLOCK
                _prefetch(nxt, lo)        # the next row's block: its max pass then
                _prefetch(nxt, lo + 16)   # finds it in cache (two 64-byte lines of int32)
                for i in range(BLOCK):
                    xb = row[lo + i]
                    dst[lo + i] = _code(_mag(xb, T, U, F32_MAN - m, m, away), xb, bits, maxmag,
                                        ovf_mag, is_int, asym, ovf_mag != maxmag)
            if nslow:
                for b in range(n32):
                    if tb[b] == SLOW:
                        srow[b] = _block_any(row, dst, b * BLOCK, np.int64(BLOCK), ep, pp,
                                             bp, sa)
        else:
            for b in range(nfull):
                srow[b] = _block_any(row, dst, b * block, block, ep, pp, bp, sa)
        if K % block:
            srow[nfull] = _block_any(row, dst, nfull * block, K % block, ep, pp, bp, sa)
        if out_bits != 8:
            _pack_row(buf, out[r], out_bits, K)


@nb.njit(inline="always")
def _rows_any(raw, out, scales, r0, r1, block, ep, pp, bp, sa, out_bits, bits, m, maxmag,
              ovf_mag, is_int, asym, away):
    """_rows32 for any block size (a runtime value). Maxima go 16 or 8 lanes at a time
    when the block allows, and the code pass is one loop over the row with T spread to
    every element (per-block loops of unknown length vectorised badly, even for 64+)."""
    K = raw.shape[1]
    nfull = K // block
    buf = np.zeros((K + 3) // 4 * 4 if out_bits != 8 else 0, dtype=np.uint8)
    amaxs = np.empty(nfull, dtype=np.int32)
    tb = np.empty(nfull, dtype=np.int32)
    te = np.empty(nfull * block, dtype=np.int32)
    for r in range(r0, r1):
        row = raw[r]
        dst = out[r] if out_bits == 8 else buf
        for b in range(nfull):
            a = I32(0)
            if block % 16 == 0:
                for j in range(b * block, (b + 1) * block, 16):
                    a = max(a, _abs_max(row, j, 16))
            elif block % 8 == 0:
                for j in range(b * block, (b + 1) * block, 8):
                    a = max(a, _abs_max(row, j, 8))
            else:
                for i in range(b * block, (b + 1) * block):
                    a = max(a, I32(row[i] & F32_ABS))
            amaxs[b] = a
        nslow = _scale_pass(amaxs, scales[r], tb, nfull, bp)
        if r + 1 < r1:
            nxt = raw[r + 1]
            for i in range(0, K, 16):
                _prefetch(nxt, i)
        for b in range(nfull):   # T spread to every element, then one loop over the row
            T = tb[b]
            if block % 16 == 0:
                for j in range(b * block, (b + 1) * block, 16):
                    for i in range(16):
                        te[j + i] = T
            elif block % 8 == 0:
                for j in range(b * block, (b + 1) * block, 8):
                    for i in range(8):
                        te[j + i] = T
            else:
                for i in range(b * block, (b + 1) * block):
                    te[i] = T
        for i in range(nfull * block):
            xb = row[i]
            T = te[i]
            dst[i] = _code(_mag(xb, T, I32(F32_MAN - m + T), F32_MAN - m, m, away), xb, bits, maxmag,
                           ovf_mag, is_int, asym, ovf_mag != maxmag)
        _finish_row(row, dst, scales[r], tb, nfull, block, nslow, buf, out[r], out_bits, ep,
                    pp, bp, sa)


@nb.njit(inline="always")
def _encode_one(xb, T, U, bits, m, maxmag, ovf_mag, nan_mag, is_int, asym, away):
    """Element-only conversion of one pattern (Inf overflows, NaN -> NaN code or +0)."""
    mag = _mag(xb, T, U, F32_MAN - m, m, away)
    if (xb & F32_INF) == F32_INF:
        mag = I32(maxmag + 1)   # Inf overflows at every scale (NaN is replaced below)
    code = _code(mag, xb, bits, maxmag, ovf_mag, is_int, asym, ovf_mag != maxmag)
    if (xb & F32_ABS) > F32_INF:
        code = I32(I32(I32(xb >> (F32_BITS - bits)) & (1 << (bits - 1))) | nan_mag) \
            if nan_mag != 0 else I32(0)
    return code


# --------------------------------------------------------------------------- kernels
def _named(fn, tag: str):
    """fn compiled (nogil, disk cache) under its own ``__qualname__``, and with it its own
    cache index file: specialisations sharing one index (same function and signature,
    different closure constants) could be handed each other's machine code when two
    processes fill that index at once, as numba numbers the entries by what each saw."""
    fn.__qualname__ = f"{fn.__name__}_{tag}"
    return nb.njit(**_NB)(fn)


@lru_cache(maxsize=None)
def quantize_kernel(spec: Spec, any_block: bool):
    """(raw, out, scales, block, ep, pp, bp, sa, out_bits, r0, r1) -> None for one spec:
    the kernel for blocks of 32 (:func:`_rows32`; correct for any ``block``, but other
    sizes are slow there) or the one for any block size (:func:`_rows_any`). Threads:
    :func:`_run`.

    Closures over plain ints and bools only, so they are compile-time constants and each
    specialisation compiles once per machine (numba's disk cache, ~1-2.5 s), not once per
    process.
    """
    bits, m, maxmag, ovf_mag, nan_mag, is_int, asym, away = spec

    if any_block:
        def quantize_any(raw, out, scales, block, ep, pp, bp, sa, out_bits, r0, r1):
            _rows_any(raw, out, scales, r0, r1, block, ep, pp, bp, sa, out_bits, bits, m,
                      maxmag, ovf_mag, is_int, asym, away)
        fn = quantize_any
    else:
        def quantize32(raw, out, scales, block, ep, pp, bp, sa, out_bits, r0, r1):
            _rows32(raw, out, scales, r0, r1, block, ep, pp, bp, sa, out_bits, bits, m,
                    maxmag, ovf_mag, is_int, asym, away)
        fn = quantize32
    return _named(fn, "_".join(str(int(v)) for v in spec))


@lru_cache(maxsize=None)
def encode_kernel(spec: Spec):
    """(xb, out, emin + F32_BIAS + s, lo, hi) -> None: element-only conversion for one spec."""
    bits, m, maxmag, ovf_mag, nan_mag, is_int, asym, away = spec

    def encode(xb, out, t, lo, hi):
        T = I32(t)   # emin + F32_BIAS + s, as in _rows32
        U = I32(F32_MAN - m + T)
        for i in range(lo, hi):
            out[i] = _encode_one(xb[i], T, U, bits, m, maxmag, ovf_mag, nan_mag, is_int,
                                 asym, away)

    return _named(encode, "_".join(str(int(v)) for v in spec))


# --------------------------------------------------------------------------- threads
_pool_state: dict = {}
CHUNKS_PER_THREAD = 4      # dynamic chunks: a core busy with other work takes fewer


def _pool(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of n - 1 workers (the caller is the n-th); new after a fork."""
    key = (os.getpid(), n)
    if _pool_state.get("key") != key:
        old = _pool_state.get("pool")
        if old is not None and _pool_state["key"][0] == key[0]:
            old.shutdown(wait=False)   # thread count changed: let the old workers go
        _pool_state["pool"] = ThreadPoolExecutor(max_workers=n - 1,
                                                 thread_name_prefix="mxref")
        _pool_state["key"] = key
    return _pool_state["pool"]


def _run(fn, args: tuple, n_items: int, n_elements: int) -> None:
    """fn(*args, lo, hi) over [0, n_items), on numba.get_num_threads() threads.

    The kernels are nogil, so plain threads run them in parallel: one serial kernel per
    specialisation serves both cases (no second, parallel=True copy to compile), the
    chunks are handed out dynamically, and idle workers sleep instead of spinning.
    Small inputs run on the calling thread only (a hand-off costs ~30-50 us).
    """
    t = nb.get_num_threads()
    if t < 2 or n_elements < PARALLEL_MIN or n_items < 2:
        fn(*args, 0, n_items)
        return
    nch = min(n_items, t * CHUNKS_PER_THREAD)
    bounds = [c * n_items // nch for c in range(nch + 1)]
    chunks = iter(range(nch))   # shared: next() is atomic under the GIL

    def work():
        for c in chunks:
            fn(*args, bounds[c], bounds[c + 1])

    pool = _pool(t)
    futures = [pool.submit(work) for _ in range(t - 1)]
    work()
    for f in futures:
        f.result()


def quantize_rows(raw, out, scales, block, fmt, profile, out_bits, ep, pp) -> None:
    """raw (N, K) float32 bits (uint32 or int32, C-contiguous) -> scales (N, nbk) and out
    (codes (N, K) for out_bits 8, else packed rows)."""
    spec, bp, sa = spec_of(fmt, profile)
    raw = raw.view(np.int32)
    _run(quantize_kernel(spec, block != BLOCK), (raw, out, scales, block, ep, pp, bp, sa,
                                              out_bits), raw.shape[0], raw.size)


def encode_flat(xb, out, s, fmt, profile) -> None:
    """Element-only conversion of flat float32 bits at scale 2^s
    (``min_fast_scale <= s <= FAST_MAX_SCALE``)."""
    spec, bp, _ = spec_of(fmt, profile)
    _run(encode_kernel(spec), (xb.view(np.int32), out, np.int64(bp[BP_EMIN] + F32_BIAS + s)),
         xb.size, xb.size)


def min_fast_scale(fmt, profile) -> int:
    return int(spec_of(fmt, profile)[1][BP_MINFAST])
