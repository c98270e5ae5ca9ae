"""Triton kernels for MX fake quantization (one pass over the data each).

* :func:`mx_fake_quantize` -- fixed OCP MX format (FP4/FP6/FP8/INT8 elements), bit-exact
  with :func:`dmx.quant.fakequant.fake_quantize` / mxref: floor (or rceil) scale from the exponent
  bits, RNE (or ties-away), saturation, NaN/Inf block -> NaN, all-zero block, ragged tail.
* :func:`real_format_forward` / :func:`real_format_backward` -- the real-valued single
  format E(e)M(m) of :mod:`dmx.quant.realfmt`: forward, and backward with the gradient to the
  input and the two scalar bit counts (e, m) (per-program partial sums, then one tiny
  finalize kernel: deterministic, no atomics).

Triton is imported lazily (``import dmx.quant.triton_kernels`` never needs it); callers check
:func:`available` first. Every kernel works under ``TRITON_INTERPRET=1`` on CPU tensors,
which is how the CPU tests check them.

Why bit tricks instead of float log2/exp2: the block scale exponent is read from the
exponent field of the block's largest magnitude (an integer max over the bit patterns,
which also spots NaN/Inf), powers of two are built from bits, and RNE onto the element
grid is the exact "add and subtract 2^(step+23)" trick, so no library function with
its own rounding (or flush-to-zero, which Triton's libdevice uses) touches a value.
"""
from __future__ import annotations

import functools
import math

__all__ = ["available", "mx_fake_quantize", "supports", "real_format_forward",
           "real_format_backward"]

_LN2 = math.log(2.0)

# Launch shape: MX blocks per program = elems_per_prog / block_size. Tuned by
# benchmarks/bench_gpu.py's sweep (it writes the best back here for the run).
CONFIG = {"elems_per_prog": 4096, "num_warps": 4}
# No multiply-add contraction: each float op rounds on its own, as torch's separate
# eager kernels do (the fixed-format kernel is exact either way; the real-format
# kernels then round like dmx.quant.realfmt step by step).
_OPTS = {"enable_fp_fusion": False}


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when Triton imports (a GPU is still needed unless TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


@functools.lru_cache(maxsize=1)
def _kernels():
    """Define the @triton.jit kernels on first use (so importing this module is free)."""
    import triton
    import triton.language as tl

    @triton.jit
    def pow2_bits(n):
        # 2^n as float32 for integer n in [-149, 127], from its bit pattern
        normal = (n + 127) << 23
        sub = 1 << tl.minimum(tl.maximum(n + 149, 0), 22)
        return tl.where(n >= -126, normal, sub).to(tl.float32, bitcast=True)

    @triton.jit
    def floor_log2(a):
        # floor(log2 a) for finite a >= 0, exact for subnormals; a == 0 gives -1 (frexp's
        # exponent 0 minus 1, as dmx.quant.fakequant.floor_log2)
        b = a.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        ef = b >> 23
        mant = b & 0x7FFFFF
        # a subnormal's mantissa as a float32 is exact and normal: its exponent is the log
        sub = ((mant.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127) - 149
        r = tl.where(ef > 0, ef - 127, sub)
        return tl.where(b == 0, -1, r)

    @triton.jit
    def fneg(v):
        # -v by flipping the sign bit: Triton 3.6 lowers unary minus on floats to 0 - v,
        # which turns +0 into +0 instead of -0 (torch's -q gives -0)
        return (v.to(tl.int32, bitcast=True) ^ -2147483648).to(tl.float32, bitcast=True)

    @triton.jit
    def rne_int(v):
        # round half to even for v >= 0 (exact: below 2^23 the sum has no fraction bits)
        big = 8388608.0
        return tl.where(v < big, (v + big) - big, v)

    @triton.jit
    def pow2_real(t):
        # 2^t like dmx.quant.realfmt.pow2: the integer part from bits, exp2 only on the fraction,
        # so the value is exact wherever t is an integer
        n = tl.where(t >= 0, rne_int(t), -rne_int(-t))
        f = t - n
        p = pow2_bits(tl.minimum(tl.maximum(n, -149.0), 127.0).to(tl.int32))
        return tl.where(f == 0.0, p, p * tl.exp2(f))

    @triton.jit
    def tile_offsets(pid, n_blocks, K, nbk, BS: tl.constexpr, BPP: tl.constexpr,
                     EVEN: tl.constexpr):
        # (base, offsets [BPP, BS], mask) of MX blocks pid*BPP ..; element i of the tile
        # is at base + offsets[i]; a ragged row end is masked
        blk0 = pid.to(tl.int64) * BPP
        b = tl.arange(0, BPP)
        j = tl.arange(0, BS)
        if EVEN:
            # contiguous blocks: 64-bit base once, 32-bit offsets per element
            base = blk0 * BS
            offs = b[:, None] * BS + j[None, :]
            # [BPP, 1]: constant along a block, so loads and stores stay vectorised
            mask = (blk0 + b)[:, None] < n_blocks
        else:
            blk = blk0 + b
            row = blk // nbk
            col = (blk - row * nbk)[:, None] * BS + j[None, :]
            base = blk0 * 0
            offs = row[:, None] * K + col
            mask = (blk[:, None] < n_blocks) & (col < K)
        return base, offs, mask

    @triton.jit
    def load_in(ptr, offs, mask, OUT_KIND: tl.constexpr):
        # bf16 arrives as int16 bits and is widened by a shift (what the hardware does;
        # the interpreter's own bf16 cast mangles subnormals)
        if OUT_KIND == 1:
            b = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32) << 16
            return b.to(tl.float32, bitcast=True)
        else:
            return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def store_out(y_ptr, offs, mask, y, nonfinite, OUT_KIND: tl.constexpr,
                  NAN_BITS: tl.constexpr, BF16_EXACT: tl.constexpr):
        # NaN blocks get NAN_BITS: the bits of torch's CPU cast of float('nan') to the
        # output dtype, which is what the reference (mxref's float32 NaN cast to x.dtype)
        # holds; other values are cast with RNE (exact here: MX values fit the dtype
        # except in its subnormal range, where RNE is the cast the reference does)
        if OUT_KIND == 0:
            yb = tl.where(nonfinite, NAN_BITS, y.to(tl.int32, bitcast=True))
            tl.store(y_ptr + offs, yb, mask=mask)
        elif OUT_KIND == 1:
            b = y.to(tl.int32, bitcast=True)
            if not BF16_EXACT:
                # float32 -> bf16 RNE on the bits (carries into the exponent, subnormals
                # included); the interpreter's own cast truncates, so it is not used
                b = b + (0x7FFF + ((b >> 16) & 1))
            # BF16_EXACT: an MX value of a bf16 input is a bf16 value (at most 8
            # significant bits, and a multiple of 2^-133 below 2^-126), so the high
            # half of its float32 bits is exact
            b = b >> 16
            yb = tl.where(nonfinite, NAN_BITS, b)
            tl.store(y_ptr + offs, yb.to(tl.int16), mask=mask)
        else:
            yb = tl.where(nonfinite, NAN_BITS,
                          y.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32))
            tl.store(y_ptr + offs, yb.to(tl.int16), mask=mask)

    @triton.jit
    def mx_fq_kernel(x_ptr, y_ptr, n_blocks, K, nbk,
                     BS: tl.constexpr, BPP: tl.constexpr, EVEN: tl.constexpr,
                     EMAX: tl.constexpr, EMIN: tl.constexpr, MBITS: tl.constexpr,
                     MAXNORM: tl.constexpr, IS_INT: tl.constexpr, RCEIL: tl.constexpr,
                     MN_FIELD: tl.constexpr, AWAY: tl.constexpr, OUT_KIND: tl.constexpr,
                     NAN_BITS: tl.constexpr):
        base, offs, mask = tile_offsets(tl.program_id(0), n_blocks, K, nbk, BS, BPP, EVEN)
        x = load_in(x_ptr + base, offs, mask, OUT_KIND)
        bits = x.to(tl.int32, bitcast=True)
        # integer max of |bits| orders finite magnitudes and puts NaN/Inf on top
        amax = tl.max(bits & 0x7FFFFFFF, axis=1)
        nonfinite = (amax >= 0x7F800000)[:, None]
        # floor(log2 amax) - emax; a zero/subnormal amax lands below -127 and is clamped
        k = (amax >> 23) - (127 + EMAX)
        if RCEIL:
            k += ((amax & 0x7FFFFF) > MN_FIELD).to(tl.int32)
        k = tl.minimum(tl.maximum(k, -127), 127)
        u = x * pow2_bits(-k)[:, None]  # exact power-of-two rescale
        ub = u.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        a = ub.to(tl.float32, bitcast=True)
        # exponent field of a's binade, floored at the element subnormal exponent; the
        # grid step there is 2^(binade - m), and c = 2^(binade - m + 23)
        eb = tl.maximum(ub & 0x7F800000, (EMIN + 127) << 23)
        c = (eb + ((23 - MBITS) << 23)).to(tl.float32, bitcast=True)
        r = (a + c) - c  # RNE onto the step grid (a < c, so the sum's ulp is the step)
        if AWAY:
            half = (eb - ((MBITS + 1) << 23)).to(tl.float32, bitcast=True)
            r = tl.where(a - r == half, r + 2 * half, r)  # a tie RNE took downwards
        r = tl.minimum(r, MAXNORM)  # saturate
        sign = bits & -2147483648  # the sign bit (of x, hence of u)
        if IS_INT:
            sign = tl.where(r != 0.0, sign, 0)  # two's complement has no -0
        rb = r.to(tl.int32, bitcast=True) | sign
        y = rb.to(tl.float32, bitcast=True) * pow2_bits(k)[:, None]
        store_out(y_ptr + base, offs, mask, y, nonfinite, OUT_KIND, NAN_BITS, True)

    @triton.jit
    def real_scalars(e_ptr, m_ptr, TD, CAP: tl.constexpr, FROM_OFF: tl.constexpr,
                     P0: tl.constexpr, W: tl.constexpr, E0: tl.constexpr, SE: tl.constexpr,
                     M0: tl.constexpr, SM: tl.constexpr):
        # dmx.quant.realfmt's format parameters from the real bit counts (e, m). FROM_OFF: e_ptr
        # holds the raw offset b_hat of a two-rung ladder instead, and (e, m) are computed
        # as dmx.nn.layers does it (clamp_ste, anneal_map at TD = 20 T, linear interpolation
        # between the rungs); fe, fm are d b_hat / d e-and-m chain factors for backward.
        if FROM_OFF:
            bh = tl.load(e_ptr).to(tl.float32)
            bc = tl.minimum(tl.maximum(bh, P0), P0 + W)  # clamp_ste: gradient passes
            sg = 1.0 / (1.0 + tl.exp(-(TD * ((bc - P0) / W - 0.5))))
            t = (P0 + W * sg) - P0
            tc = tl.minimum(tl.maximum(t, 0.0), W)
            e = E0 + SE * tc
            m = M0 + SM * tc
            chain = tl.where((t >= 0.0) & (t <= W), TD * sg * (1.0 - sg), 0.0)
            fe = SE * chain
            fm = SM * chain
        else:
            e = tl.load(e_ptr).to(tl.float32)
            m = tl.load(m_ptr).to(tl.float32)
            fe = 0.0
            fm = 0.0
        bias = pow2_real(e - 1.0) - 1.0
        big_b = pow2_real(pow2_real(e) - 1.0 - bias)
        nat_a = 2.0 - pow2_real(-m)
        natural = nat_a * big_b
        capped = natural > CAP
        maxval = tl.where(capped, CAP, natural)
        emax = floor_log2(maxval)
        return e, m, bias, maxval, emax, capped, nat_a, big_b, fe, fm

    @triton.jit
    def real_core(x, m, bias, maxval, emax):
        # the forward of dmx.quant.realfmt.real_format_quantize on one tile (values in float32)
        bits = x.to(tl.int32, bitcast=True)
        amax_b = tl.max(bits & 0x7FFFFFFF, axis=1)
        nonfinite = (amax_b >= 0x7F800000)[:, None]
        amax = tl.where(amax_b >= 0x7F800000, 0, amax_b).to(tl.float32, bitcast=True)
        k = tl.where(amax_b == 0, -127, floor_log2(amax) - emax)
        k = tl.minimum(tl.maximum(k, -127), 127)[:, None]
        u = x * pow2_bits(-k)  # == x / scale: both correctly rounded, scale a power of 2
        a = tl.abs(u)
        e_int = floor_log2(a).to(tl.float32)
        sub_exp = 1.0 - bias
        is_sub = e_int < sub_exp
        binade = tl.where(is_sub, sub_exp, e_int)
        step = pow2_real(binade - m)
        v = tl.math.div_rn(a, step)
        r = rne_int(v)
        q = step * r
        sat = q > maxval
        q = tl.where(sat, maxval, q)
        neg = bits < 0
        y = tl.where(neg, fneg(q), q) * pow2_bits(k)
        return y, nonfinite, k, a, v, r, step, q, sat, is_sub, neg

    @triton.jit
    def real_fwd_kernel(x_ptr, y_ptr, e_ptr, m_ptr, TD, n_blocks, K, nbk,
                        BS: tl.constexpr, BPP: tl.constexpr, EVEN: tl.constexpr,
                        OUT_KIND: tl.constexpr, NAN_BITS: tl.constexpr, CAP: tl.constexpr,
                        FROM_OFF: tl.constexpr, P0: tl.constexpr, W: tl.constexpr,
                        E0: tl.constexpr, SE: tl.constexpr, M0: tl.constexpr,
                        SM: tl.constexpr):
        e, m, bias, maxval, emax, capped, nat_a, big_b, fe, fm = real_scalars(
            e_ptr, m_ptr, TD, CAP, FROM_OFF, P0, W, E0, SE, M0, SM)
        base, offs, mask = tile_offsets(tl.program_id(0), n_blocks, K, nbk, BS, BPP, EVEN)
        x = load_in(x_ptr + base, offs, mask, OUT_KIND)
        y, nonfinite, k, a, v, r, step, q, sat, is_sub, neg = real_core(x, m, bias, maxval,
                                                                       emax)
        store_out(y_ptr + base, offs, mask, y, nonfinite, OUT_KIND, NAN_BITS, False)

    @triton.jit
    def real_bwd_kernel(x_ptr, g_ptr, dx_ptr, part_ptr, e_ptr, m_ptr, TD, n_blocks, K, nbk,
                        BS: tl.constexpr, BPP: tl.constexpr, EVEN: tl.constexpr,
                        OUT_KIND: tl.constexpr, NAN_BITS: tl.constexpr, CAP: tl.constexpr,
                        FROM_OFF: tl.constexpr, P0: tl.constexpr, W: tl.constexpr,
                        E0: tl.constexpr, SE: tl.constexpr, M0: tl.constexpr,
                        SM: tl.constexpr):
        # Autograd of dmx.quant.realfmt written out (see the derivation in dmx/quant/triton_ops.py):
        #   dx = g inside the range (0 where saturated, or u == 0: abs' gradient there),
        #   and four partial sums for the scalar gradients.
        e, m, bias, maxval, emax, capped, nat_a, big_b, fe, fm = real_scalars(
            e_ptr, m_ptr, TD, CAP, FROM_OFF, P0, W, E0, SE, M0, SM)
        pid = tl.program_id(0)
        base, offs, mask = tile_offsets(pid, n_blocks, K, nbk, BS, BPP, EVEN)
        x = load_in(x_ptr + base, offs, mask, OUT_KIND)
        g = load_in(g_ptr + base, offs, mask, OUT_KIND)
        y, nonfinite, k, a, v, r, step, q, sat, is_sub, neg = real_core(x, m, bias, maxval,
                                                                       emax)
        scale = pow2_bits(k)
        live = (~nonfinite) & mask  # a NaN/Inf block's output is a constant: no gradient
        gs = tl.where(neg, fneg(g), g)
        gsc = gs * scale  # dL/dq (before saturation)
        inside = live & (~sat)
        # zeros carry the sign torch's chain gives them (g s scale sgn(u) / scale)
        signed0 = tl.where(neg, -2147483648, 0).to(tl.float32, bitcast=True)  # -0 / +0
        zero = tl.where(sat, signed0, gs * 0.0)
        # g itself, computed in torch's order ((g s scale) step / step s / scale): with a
        # subnormal scale (k = -127) the products round, and the reference keeps that
        ga = tl.math.div_rn(gsc * step, step)  # through q = step * round(a / step)
        dxv = tl.where(inside & (a != 0.0), tl.where(neg, fneg(ga), ga) * pow2_bits(-k), zero)
        dt = tl.where(inside, gsc * (r - v) * step, 0.0)  # dL/d(binade - m) / ln2
        s_t = tl.sum(tl.sum(dt, axis=1), axis=0)
        s_sub = tl.sum(tl.sum(tl.where(is_sub, dt, 0.0), axis=1), axis=0)
        s_sat = tl.sum(tl.sum(tl.where(live & sat, gsc, 0.0), axis=1), axis=0)
        dscale = tl.where(live, gs * (q - tl.where(sat, 0.0, a)) * scale, 0.0)
        s_sc = tl.sum(tl.sum(dscale, axis=1), axis=0)
        store_out(dx_ptr + base, offs, mask, dxv, dxv != dxv, OUT_KIND, NAN_BITS, False)
        tl.store(part_ptr + pid * 4 + 0, s_t)
        tl.store(part_ptr + pid * 4 + 1, s_sub)
        tl.store(part_ptr + pid * 4 + 2, s_sat)
        tl.store(part_ptr + pid * 4 + 3, s_sc)

    @triton.jit
    def real_finalize_kernel(part_ptr, n_parts, de_ptr, dm_ptr, e_ptr, m_ptr, TD,
                             CH: tl.constexpr, LN2: tl.constexpr, CAP: tl.constexpr,
                             FROM_OFF: tl.constexpr, P0: tl.constexpr, W: tl.constexpr,
                             E0: tl.constexpr, SE: tl.constexpr, M0: tl.constexpr,
                             SM: tl.constexpr):
        # sums the partials and applies the chain rule through maxval(e, m), sub_exp(e)
        # (FROM_OFF: on to the offset, stored at de_ptr)
        e, m, bias, maxval, emax, capped, nat_a, big_b, fe, fm = real_scalars(
            e_ptr, m_ptr, TD, CAP, FROM_OFF, P0, W, E0, SE, M0, SM)
        acc = tl.zeros([CH, 4], dtype=tl.float32)
        cols = tl.arange(0, 4)
        for start in range(0, n_parts, CH):
            rows = start + tl.arange(0, CH)
            acc += tl.load(part_ptr + rows[:, None] * 4 + cols[None, :],
                           mask=(rows[:, None] < n_parts), other=0.0)
        tot = tl.sum(acc, axis=0)
        s_t = tl.sum(tl.where(cols == 0, tot, 0.0), axis=0)
        s_sub = tl.sum(tl.where(cols == 1, tot, 0.0), axis=0)
        s_sat = tl.sum(tl.where(cols == 2, tot, 0.0), axis=0)
        s_sc = tl.sum(tl.where(cols == 3, tot, 0.0), axis=0)
        # z = -log2(maxval) drives the scale's straight-through gradient
        d_maxval = s_sat - s_sc / maxval
        d_sub = LN2 * s_sub
        dmax_dm = tl.where(capped, 0.0, pow2_real(-m) * LN2 * big_b)
        dmax_de = tl.where(capped, 0.0, nat_a * big_b * LN2 * LN2 * pow2_real(e - 1.0))
        dm = -LN2 * s_t + d_maxval * dmax_dm
        de = d_sub * (-pow2_real(e - 1.0) * LN2) + d_maxval * dmax_de
        if FROM_OFF:
            tl.store(de_ptr, de * fe + dm * fm)
        else:
            tl.store(dm_ptr, dm)
            tl.store(de_ptr, de)

    # Triton resolves names a kernel calls through the module's globals (not closures)
    helpers = dict(triton=triton, tl=tl, pow2_bits=pow2_bits, floor_log2=floor_log2,
                   rne_int=rne_int, fneg=fneg, pow2_real=pow2_real, tile_offsets=tile_offsets,
                   store_out=store_out, load_in=load_in, real_scalars=real_scalars, real_core=real_core)
    globals().update(helpers)
    return dict(mx_fq=mx_fq_kernel, real_fwd=real_fwd_kernel, real_bwd=real_bwd_kernel,
                real_fin=real_finalize_kernel)


# ----------------------------------------------------------------------------- launchers
def _out_kind(dtype) -> int | None:
    import torch
    return {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}.get(dtype)


@functools.lru_cache(maxsize=None)
def _nan_bits(dtype) -> int:
    """Bits of torch's CPU cast of float32 NaN to ``dtype`` (int32/int16 value).

    The vectorised cast (any tensor of 16+ elements) is used: it is the one the
    reference tensors go through; torch's scalar bf16 cast gives 0x7FC0 where the
    vectorised one gives 0xFFFF, so a NaN payload is only comparable per path.
    """
    import torch
    iv = torch.int32 if dtype == torch.float32 else torch.int16
    nan = torch.full((64,), float("nan"), dtype=torch.float32).to(dtype).view(iv)
    return int(nan[0])


def _in_view(x):
    import torch
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


def _out_view(y):
    import torch
    # kernels store bit patterns (exact NaN payloads), so outputs are integer views
    return y.view(torch.int32) if y.dtype == torch.float32 else y.view(torch.int16)


def _geometry(x2, block_size: int):
    """(n_blocks, K, blocks per row, EVEN, blocks per program, grid) for a [R, K] view."""
    rows, K = x2.shape
    nbk = -(-K // block_size)
    n_blocks = rows * nbk
    bpp = max(1, CONFIG["elems_per_prog"] // block_size)
    grid = (max(1, -(-n_blocks // bpp)),)
    return n_blocks, K, nbk, K % block_size == 0, bpp, grid


def supports(x, fmt, axis: int, block_size: int, profile) -> bool:
    """Whether :func:`mx_fake_quantize` handles this input/format/profile exactly."""
    if _out_kind(x.dtype) is None or x.numel() == 0 or x.dim() == 0:
        return False
    if block_size < 1 or block_size & (block_size - 1) or block_size > 1024:
        return False  # tl.arange needs a power of two
    if profile.flush_subnormals or profile.fp8_overflow != "sat":
        return False
    if fmt.is_int and (profile.int8_range != "symmetric" or profile.scale_rule != "floor"):
        return False
    return True


def _last_axis_2d(x, axis: int):
    axis = axis % x.dim()
    xm = x.movedim(axis, -1) if axis != x.dim() - 1 else x
    return xm.contiguous().reshape(-1, xm.shape[-1]), xm.shape, axis


def mx_fake_quantize(x, fmt, axis: int = -1, block_size: int = 32, profile=None):
    """Fixed-format MX fake quantization (no autograd); ``fmt``: mxref FormatInfo,
    ``profile``: mxref Profile. Call :func:`supports` first."""
    import struct
    import torch
    import mxref
    profile = profile or mxref.get_profile("ocp")
    x2, mshape, axis = _last_axis_2d(x, axis)
    y2 = torch.empty_like(x2)
    n_blocks, K, nbk, even, bpp, grid = _geometry(x2, block_size)
    mn_field = struct.unpack("<I", struct.pack("<f", fmt.max_normal / 2.0 ** fmt.emax))[0]
    _kernels()["mx_fq"][grid](
        _in_view(x2), _out_view(y2), n_blocks, K, nbk, BS=block_size, BPP=bpp, EVEN=even,
        EMAX=fmt.emax, EMIN=fmt.emin, MBITS=fmt.step_bits, MAXNORM=float(fmt.max_normal),
        IS_INT=fmt.is_int, RCEIL=profile.scale_rule == "rceil", MN_FIELD=mn_field & 0x7FFFFF,
        AWAY=profile.rounding == "away", OUT_KIND=_out_kind(x.dtype), NAN_BITS=_nan_bits(x.dtype),
        num_warps=CONFIG["num_warps"], **_OPTS)
    y = y2.reshape(mshape)
    return y.movedim(-1, axis) if axis != x.dim() - 1 else y


def _real_consts(cap: float, lad) -> dict:
    """Constexprs of the real-format kernels; ``lad`` = (p0, width, e0, e_slope, m0, m_slope)
    of a two-rung ladder when the kernel starts from the raw offset, else None."""
    p0, w, e0, se, m0, sm = lad if lad is not None else (0.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    return dict(CAP=float(cap), FROM_OFF=lad is not None, P0=float(p0), W=float(w),
                E0=float(e0), SE=float(se), M0=float(m0), SM=float(sm))


def real_format_forward(x, e, m, axis: int = -1, block_size: int = 32, cap: float = 448.0,
                        lad=None, td: float = 0.0):
    """Forward of dmx.quant.realfmt.real_format_quantize; ``e``, ``m``: 0-d float32 tensors on
    x's device (read by the kernel: no host synchronisation). With ``lad`` (see
    :func:`_real_consts`) ``e`` is the raw offset instead, ``m`` is ignored and ``td`` is the
    anneal slope 20 T."""
    import torch
    x2, mshape, axis = _last_axis_2d(x, axis)
    y2 = torch.empty_like(x2)
    n_blocks, K, nbk, even, bpp, grid = _geometry(x2, block_size)
    _kernels()["real_fwd"][grid](
        _in_view(x2), _out_view(y2), e, m, float(td), n_blocks, K, nbk, BS=block_size,
        BPP=bpp, EVEN=even, OUT_KIND=_out_kind(x.dtype), NAN_BITS=_nan_bits(x.dtype),
        num_warps=CONFIG["num_warps"], **_real_consts(cap, lad), **_OPTS)
    y = y2.reshape(mshape)
    return y.movedim(-1, axis) if axis != x.dim() - 1 else y


def real_backward_programs(x, block_size: int = 32) -> int:
    """Rows of partial sums :func:`real_backward_partial` writes for ``x``."""
    n = x.numel() // x.shape[-1] if x.dim() else 1
    nbk = -(-x.shape[-1] // block_size)
    return max(1, -(-(n * nbk) // max(1, CONFIG["elems_per_prog"] // block_size)))


def real_backward_partial(x, g, e, m, parts, block_size: int = 32, cap: float = 448.0,
                          lad=None, td: float = 0.0):
    """dx of the last-axis real format, and its partial sums written to ``parts``
    ([real_backward_programs(x), 4] float32); :func:`real_finalize` turns any number of
    such blocks of rows (one buffer) into the scalar gradients."""
    import torch
    x2, mshape, _ = _last_axis_2d(x, -1)
    g2, _, _ = _last_axis_2d(g.to(x.dtype), -1)
    dx2 = torch.empty_like(x2)
    n_blocks, K, nbk, even, bpp, grid = _geometry(x2, block_size)
    assert parts.shape[0] == grid[0] and parts.is_contiguous()
    _kernels()["real_bwd"][grid](
        _in_view(x2), _in_view(g2), _out_view(dx2), parts, e, m, float(td), n_blocks, K, nbk,
        BS=block_size, BPP=bpp, EVEN=even, OUT_KIND=_out_kind(x.dtype),
        NAN_BITS=_nan_bits(x.dtype), num_warps=CONFIG["num_warps"], **_real_consts(cap, lad),
        **_OPTS)
    return dx2.reshape(mshape)


def real_finalize(parts, e, m, cap: float = 448.0, lad=None, td: float = 0.0):
    """(de, dm) from partial sums; with ``lad``: (d offset, None)."""
    import torch
    de = torch.empty((), dtype=torch.float32, device=parts.device)
    dm = torch.empty((), dtype=torch.float32, device=parts.device) if lad is None else de
    _kernels()["real_fin"][(1,)](parts, parts.shape[0], de, dm, e, m, float(td), CH=256,
                                 LN2=_LN2, num_warps=4, **_real_consts(cap, lad), **_OPTS)
    return (de, dm) if lad is None else (de, None)


def real_format_backward(x, g, e, m, axis: int = -1, block_size: int = 32,
                         cap: float = 448.0, lad=None, td: float = 0.0):
    """(dx, de, dm) of real_format_forward for the output gradient ``g`` (with ``lad``:
    (dx, d offset, None))."""
    import torch
    axis = axis % x.dim()
    last = axis == x.dim() - 1
    xm = x if last else x.movedim(axis, -1)
    gm = g if last else g.movedim(axis, -1)
    parts = torch.empty((real_backward_programs(xm, block_size), 4), dtype=torch.float32,
                        device=x.device)
    dx = real_backward_partial(xm, gm, e, m, parts, block_size, cap, lad, td)
    de, dm = real_finalize(parts, e, m, cap, lad, td)
    return (dx if last else dx.movedim(-1, axis)), de, dm
