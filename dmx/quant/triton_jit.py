"""The Triton kernels themselves (``@triton.jit``), one named function each. This module
imports Triton, so only :mod:`dmx.quant.triton_kernels` imports it, lazily, after checking
that Triton is available; the launchers, the launch configuration and the notes on
exactness are there.

Constants: the float32 bit layout (exponent bias 127, 23 mantissa bits) is the compute
dtype's; every MX constant (E8M0 exponent range, element emax/emin/bits, max normal, cap)
arrives as a ``tl.constexpr`` from mxref's format descriptions.
"""
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
                 NAN_BITS: tl.constexpr, SC_MIN: tl.constexpr, SC_MAX: tl.constexpr):
    base, offs, mask = tile_offsets(tl.program_id(0), n_blocks, K, nbk, BS, BPP, EVEN)
    x = load_in(x_ptr + base, offs, mask, OUT_KIND)
    bits = x.to(tl.int32, bitcast=True)
    # integer max of |bits| orders finite magnitudes and puts NaN/Inf on top
    amax = tl.max(bits & 0x7FFFFFFF, axis=1)
    nonfinite = (amax >= 0x7F800000)[:, None]
    # floor(log2 amax) - emax; a zero/subnormal amax lands below the smallest E8M0
    # exponent and is clamped
    k = (amax >> 23) - (127 + EMAX)
    if RCEIL:
        k += ((amax & 0x7FFFFF) > MN_FIELD).to(tl.int32)
    k = tl.minimum(tl.maximum(k, SC_MIN), SC_MAX)
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
def real_core(x, m, bias, maxval, emax, SC_MIN: tl.constexpr, SC_MAX: tl.constexpr):
    # the forward of dmx.quant.realfmt.real_format_quantize on one tile (values in float32)
    bits = x.to(tl.int32, bitcast=True)
    amax_b = tl.max(bits & 0x7FFFFFFF, axis=1)
    nonfinite = (amax_b >= 0x7F800000)[:, None]
    amax = tl.where(amax_b >= 0x7F800000, 0, amax_b).to(tl.float32, bitcast=True)
    k = tl.where(amax_b == 0, SC_MIN, floor_log2(amax) - emax)
    k = tl.minimum(tl.maximum(k, SC_MIN), SC_MAX)[:, None]
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
                    SM: tl.constexpr, SC_MIN: tl.constexpr, SC_MAX: tl.constexpr):
    e, m, bias, maxval, emax, capped, nat_a, big_b, fe, fm = real_scalars(
        e_ptr, m_ptr, TD, CAP, FROM_OFF, P0, W, E0, SE, M0, SM)
    base, offs, mask = tile_offsets(tl.program_id(0), n_blocks, K, nbk, BS, BPP, EVEN)
    x = load_in(x_ptr + base, offs, mask, OUT_KIND)
    y, nonfinite, k, a, v, r, step, q, sat, is_sub, neg = real_core(
        x, m, bias, maxval, emax, SC_MIN, SC_MAX)
    store_out(y_ptr + base, offs, mask, y, nonfinite, OUT_KIND, NAN_BITS, False)


@triton.jit
def real_bwd_kernel(x_ptr, g_ptr, dx_ptr, part_ptr, e_ptr, m_ptr, TD, n_blocks, K, nbk,
                    BS: tl.constexpr, BPP: tl.constexpr, EVEN: tl.constexpr,
                    OUT_KIND: tl.constexpr, NAN_BITS: tl.constexpr, CAP: tl.constexpr,
                    FROM_OFF: tl.constexpr, P0: tl.constexpr, W: tl.constexpr,
                    E0: tl.constexpr, SE: tl.constexpr, M0: tl.constexpr,
                    SM: tl.constexpr, SC_MIN: tl.constexpr, SC_MAX: tl.constexpr):
    # Autograd of dmx.quant.realfmt written out (see the derivation in dmx/quant/triton_ops.py):
    #   dx = g inside the range (0 where saturated, or u == 0: abs' gradient there),
    #   and four partial sums for the scalar gradients.
    e, m, bias, maxval, emax, capped, nat_a, big_b, fe, fm = real_scalars(
        e_ptr, m_ptr, TD, CAP, FROM_OFF, P0, W, E0, SE, M0, SM)
    pid = tl.program_id(0)
    base, offs, mask = tile_offsets(pid, n_blocks, K, nbk, BS, BPP, EVEN)
    x = load_in(x_ptr + base, offs, mask, OUT_KIND)
    g = load_in(g_ptr + base, offs, mask, OUT_KIND)
    y, nonfinite, k, a, v, r, step, q, sat, is_sub, neg = real_core(
        x, m, bias, maxval, emax, SC_MIN, SC_MAX)
    scale = pow2_bits(k)
    live = (~nonfinite) & mask  # a NaN/Inf block's output is a constant: no gradient
    gs = tl.where(neg, fneg(g), g)
    gsc = gs * scale  # dL/dq (before saturation)
    inside = live & (~sat)
    # zeros carry the sign torch's chain gives them (g s scale sgn(u) / scale)
    signed0 = tl.where(neg, -2147483648, 0).to(tl.float32, bitcast=True)  # -0 / +0
    zero = tl.where(sat, signed0, gs * 0.0)
    # g itself, computed in torch's order ((g s scale) step / step s / scale): with a
    # subnormal scale (k = SC_MIN) the products round, and the reference keeps that
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
