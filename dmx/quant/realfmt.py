"""The real-valued MX float format: a differentiable quantizer for fractional (e, m).

For exponent bits e and mantissa bits m (real tensors; paper.md section 2.3, read
from Brevitas' FloatQuant path):

    bias(e)   = 2^(e-1) - 1
    maxval    = min((2 - 2^-m) * 2^(2^e - 1 - bias(e)), cap)
    emax      = floor(log2 maxval)
    scale     = 2^(floor(log2 amax_block) - emax), clamped to E8M0's [-127, 127]
    element   u = x / scale;  step = 2^(max(floor(log2|u|), 1 - bias(e)) - m)
              q = clamp(step * round(u / step), -maxval, maxval);  y = q * scale

Gradients (round and floor are straight-through): d q / d m = ln2 (|u| - q) inside the
range, +-d maxval in saturation, through bias(e) in the subnormal range, and through
the scale as if it were amax / maxval (d log2 scale = -d log2 maxval). The block amax
is treated as a constant, so d y / d x is 1 inside the range and 0 where it saturates.

Exactness: at integer (e, m) every power of two is built from its bit pattern and
every product is exact, so at the OCP points E2M1, E2M3, E3M2 and E4M3 (cap 448, its
real max normal) the output equals :func:`dmx.quant.fakequant.fake_quantize` bit for bit
(profile ``ocp``); E5M2 matches too with ``max_cap=57344``.

Memory (issue 11): written as plain torch ops, autograd keeps about ten tensors of the
input's size per call (u, |u|, the step, the rounded value, masks...), for the weight and
for the input of every layer, until backward: a CPU search of SmolLM2-135M at batch 4 x 256
held 16 GB. :func:`real_format_quantize` and :func:`real_format_linear` (DMXLinear's soft
mode: Q(x), Q(w) and the matmul) are therefore autograd Functions that keep only x (and
the 0-d bits; the weight is the layer's own) and, in backward, run the reference
formulation (:func:`_real_format_quantize_torch`, kept as the definition) once more for
that one call and let autograd differentiate it: the gradients are the reference graph's
bit for bit (tests/test_dmx_realfmt_recompute.py), at the cost of one more forward of the
quantizers per step. The forward values come from :func:`_quantize_values` (the same ops,
in place) in pieces of 64K elements, so no activation-sized temporaries are left for the
allocator to strand. Measured in benchmarks/bench_search_memory.py.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

import mxref
from mxref.formats import DEFAULT_BLOCK_SIZE, E8M0

from dmx.errors import DMXError
from dmx.quant.fakequant import (FLOAT_LAYOUT, check_block_size, check_input, compute_dtype,
                                 exponent_field, floor_log2, from_blocks, normalise_axis,
                                 pow2_int, to_blocks, write_nan)

__all__ = ["real_format_quantize", "real_format_linear", "format_max", "pow2", "as_bits",
           "DEFAULT_MAX_CAP"]

# Brevitas' max_available_float: the E4M3 max normal (its top code 1111.111 is NaN, so
# the closed form's 480 is not available). Read from formats.toml, not typed.
DEFAULT_MAX_CAP = mxref.get_format("fp8_e4m3").max_normal


def pow2(t: torch.Tensor) -> torch.Tensor:
    """2^t, differentiable, and exact wherever t is an integer.

    The integer part is built from bits; exp2 only sees the fraction, which is 0 at
    integer points (exp2(0) == 1 exactly), so no library rounding enters there.
    """
    n = torch.round(t).detach()
    return pow2_int(n, t.dtype) * torch.exp2(t - n)


def round_ste(v: torch.Tensor) -> torch.Tensor:
    # For v >= 0, round(v) - v is exact (Sterbenz), so the forward value is exactly round(v).
    return v + (torch.round(v) - v).detach()


def format_max(exp_bits: torch.Tensor, man_bits: torch.Tensor, cap: float) -> torch.Tensor:
    """maxval(e, m) = min((2 - 2^-m) * 2^(2^e - 1 - bias(e)), cap), differentiable."""
    bias = pow2(exp_bits - 1) - 1
    natural = (2 - pow2(-man_bits)) * pow2(pow2(exp_bits) - 1 - bias)
    return torch.where(natural > cap, torch.full_like(natural, cap), natural)


def as_bits(v, dtype, device, what: str, least: float) -> torch.Tensor:
    v = torch.as_tensor(v, device=device)
    if v.dim() != 0:
        raise DMXError(f"{what} must be a scalar (0-d) tensor, got shape {tuple(v.shape)}")
    # value checks read the scalar back: only where that is free (CPU, not compiling)
    if v.device.type == "cpu" and not torch.compiler.is_compiling():
        val = float(v.detach())
        if not val >= least or val == float("inf"):
            raise DMXError(f"{what} must be finite and >= {least:g}, got {val}")
    return v.to(dtype)


def _checked(x, exp_bits, man_bits, axis, block_size, max_cap):
    """Validated (axis, block_size, e, m, cap): e, m as 0-d tensors in x's compute dtype."""
    check_input(x)
    block_size = check_block_size(block_size)
    axis = normalise_axis(axis, x.dim())
    cdt = compute_dtype(x.dtype)
    if exp_bits is None or man_bits is None:
        raise DMXError("exp_bits and man_bits are required")
    e = as_bits(exp_bits, cdt, x.device, "exp_bits", 1.0)
    m = as_bits(man_bits, cdt, x.device, "man_bits", 0.0)
    cap = DEFAULT_MAX_CAP if max_cap is None else float(max_cap)
    if not cap > 0:
        raise DMXError(f"max_cap must be positive, got {max_cap!r}")
    return axis, block_size, e, m, cap


def _blocks_and_scale(x: torch.Tensor, e, m, axis: int, block_size: int, cap: float):
    """x blocked in its compute dtype, |x| (detached) and the per-block scale.

    Returns (xb, k, absx, scale, finite, bias, maxval); differentiable in (e, m) when they
    are (the ops in the reference's order: the order its graph was recorded in)."""
    bias = pow2(e - 1) - 1
    maxval = format_max(e, m, cap)
    emax = floor_log2(maxval.detach())
    xb, k = to_blocks(x.to(e.dtype), axis, block_size)
    absx = xb.detach().abs()
    amax = absx.amax(dim=-1, keepdim=True)
    finite = torch.isfinite(amax)
    amax = torch.where(finite, amax, torch.zeros_like(amax))
    kexp = torch.where(amax == 0, E8M0.min_exp, floor_log2(amax) - emax)
    kexp = kexp.clamp(E8M0.min_exp, E8M0.max_exp)
    # power-of-two scale, straight-through: its gradient is that of amax / maxval
    z = -torch.log2(maxval)
    scale = pow2_int(kexp, xb.dtype) * torch.exp2(z - z.detach())
    return xb, k, absx, scale, finite, bias, maxval


def _binade(a: torch.Tensor) -> torch.Tensor:
    # binade from the exponent bits; zeros and FP32 subnormals read as the lowest binade,
    # below any format's subnormal floor, which the callers then apply
    return (exponent_field(a.detach()) - FLOAT_LAYOUT[a.dtype][2]).to(a.dtype)


def _real_format_quantize_torch(x: torch.Tensor, exp_bits, man_bits, axis: int = -1,
                                block_size: int = DEFAULT_BLOCK_SIZE, max_cap: float | None = None
                                ) -> torch.Tensor:
    """The reference formulation: every step a differentiable torch op, so autograd's graph
    of this function *defines* the gradients. Its graph saves about ten tensors of x's size
    per call; :func:`real_format_quantize` runs it only in backward, one call at a time."""
    axis, block_size, e, m, cap = _checked(x, exp_bits, man_bits, axis, block_size, max_cap)
    xb, k, _, scale, finite, bias, maxval = _blocks_and_scale(x, e, m, axis, block_size, cap)
    u = xb / scale  # exact (power-of-two divisor)
    a = u.abs()
    sub_exp = 1 - bias  # exponent of the smallest normal: the subnormal floor
    e_int = _binade(a)
    binade = torch.where(e_int >= sub_exp.detach(), e_int, sub_exp)
    step = pow2(binade - m)
    q = step * round_ste(a / step)
    q = torch.where(q > maxval, maxval, q)  # saturate (a tie stays on the grid branch)
    y = torch.where(torch.signbit(u), -q, q) * scale  # -q keeps signed zeros
    return from_blocks(write_nan(y.to(x.dtype), ~finite), k, axis)


def _quantize_values(x: torch.Tensor, e: torch.Tensor, m: torch.Tensor, axis: int,
                     block_size: int, cap: float) -> torch.Tensor:
    """The forward values of :func:`_real_format_quantize_torch` without autograd, bit for bit:
    the same float ops on the same shapes, written in place so that about three x-sized
    buffers exist at a time instead of ~25 fresh ones (every fresh buffer is a chance for
    the CPU allocator to strand memory between the tensors a training step keeps)."""
    with torch.no_grad():
        e, m = e.detach(), m.detach()
        xb, k, a, scale, finite, bias, maxval = _blocks_and_scale(x, e, m, axis, block_size, cap)
        a.div_(scale)  # |x / scale| (exact: a power-of-two divisor, symmetric rounding)
        t = _binade(a).clamp_(min=1 - bias).sub_(m)  # binade - m
        n = torch.round(t)
        step = pow2_int(n, t.dtype).mul_(t.sub_(n).exp2_())  # pow2(t), as pow2 computes it
        del t, n
        # round_ste's forward value is exactly round(a / step) (see round_ste)
        q = a.div_(step).round_().mul_(step).clamp_(max=maxval)
        y = q.copysign_(xb).mul_(scale)  # q >= +0, so copysign is the graph's where(signbit)
    return from_blocks(write_nan(y.to(x.dtype), ~finite), k, axis)


# Rows of blocks quantized per piece by _quantize_rows: ~64K elements, so the forward's
# temporaries are a few hundred KiB (reused at once by the allocator) instead of a few
# activation-sized buffers per layer, which glibc strands between the tensors a step keeps.
_PIECE_ELEMENTS = 1 << 16
_WORKSPACE = threading.local()  # per thread: {(slot, dtype, device): flat buffer}


def _workspace(slot: str, like: torch.Tensor, n: int) -> torch.Tensor:
    """A reusable flat buffer of >= n elements (grow only) for a result that dies inside
    the forward pass (the quantized copies F.linear reads)."""
    bufs = _WORKSPACE.__dict__.setdefault("bufs", {})
    key = (slot, like.dtype, like.device)
    buf = bufs.get(key)
    if buf is None or buf.numel() < n:
        buf = bufs[key] = torch.empty(n, dtype=like.dtype, device=like.device)
    return buf[:n]


def _quantize_rows(x: torch.Tensor, e, m, block_size: int, cap: float, slot: str):
    """Q(x) along the last dim into the thread's workspace ``slot``, a piece of blocks at a
    time (values of :func:`_quantize_values` bit for bit: blocks are independent, and every
    piece is contiguous and a whole number of blocks, so each elementwise op sees the
    elements in the same layout). Valid until the next call with the same slot."""
    xb, k = to_blocks(x, -1, block_size)
    if not xb.is_contiguous():  # keep the reference's layout: one piece
        return _quantize_values(x, e, m, -1, block_size, cap)
    rows = xb.reshape(-1, block_size)
    out = _workspace(slot, x, rows.numel()).view(rows.shape)
    step = max(1, _PIECE_ELEMENTS // block_size)
    for i in range(0, rows.shape[0], step):
        out[i:i + step] = _quantize_values(rows[i:i + step], e, m, -1, block_size, cap)
    return from_blocks(out.view(xb.shape), k, -1)


def _needs(ctx, tensors):
    """(leaves for the recomputed graph, the subset autograd wants gradients for)."""
    leaves, wanted = [], []
    for t, need in zip(tensors, ctx.needs_input_grad):
        leaf = t if t is None else t.detach().requires_grad_(need)
        leaves.append(leaf)
        if need:
            wanted.append(leaf)
    return leaves, wanted


def _replay_grads(ctx, fn, tensors, args, grad_out):
    """Gradients of ``fn(*tensors, *args)`` w.r.t. the tensors autograd asked for, by running
    the reference graph once more (this layer only) and letting autograd walk it: the same
    ops in the same order as a graph recorded in the forward pass, so the same bits."""
    leaves, wanted = _needs(ctx, tensors)
    with torch.enable_grad():
        out = fn(*leaves, *args)
    grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
    return tuple(next(grads) if need else None
                 for need in ctx.needs_input_grad[:len(tensors)])


class _RealFormat(torch.autograd.Function):
    """Q(x) in the real format; saves x and the 0-d (e, m), recomputes the rest in backward."""

    @staticmethod
    def forward(ctx, x, e, m, axis, block_size, cap):
        ctx.save_for_backward(x, e, m)
        ctx.cfg = (axis, block_size, cap)
        return _quantize_values(x, e, m, axis, block_size, cap)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        grads = _replay_grads(ctx, _real_format_quantize_torch, ctx.saved_tensors, ctx.cfg, g)
        return grads + (None, None, None)


def real_format_quantize(x: torch.Tensor, exp_bits, man_bits, axis: int = -1,
                         block_size: int = DEFAULT_BLOCK_SIZE, max_cap: float | None = None) -> torch.Tensor:
    """MX fake quantization in the format E(exp_bits) M(man_bits) with real-valued bits.

    ``x``: float32/bfloat16/float16/float64 (computed in float32, or float64 for float64
    inputs; returned in x.dtype). ``exp_bits``/``man_bits``: 0-d tensors (gradients reach
    them). ``max_cap``: the largest value allowed (default: E4M3's 448). A block holding
    NaN or Inf comes out all NaN, as in the OCP quantizer.

    Memory: only x and the 0-d bits are kept for backward, which recomputes the rest; the
    gradients are those of the reference graph (:func:`_real_format_quantize_torch`) bit
    for bit. Not twice differentiable.
    """
    if torch.compiler.is_compiling():  # the compiler plans what to save (and recompute) itself
        return _real_format_quantize_torch(x, exp_bits, man_bits, axis, block_size, max_cap)
    axis, block_size, e, m, cap = _checked(x, exp_bits, man_bits, axis, block_size, max_cap)
    return _RealFormat.apply(x, e, m, axis, block_size, cap)


def _signed_error(v, vq, error_sign: float):
    """``v + error_sign * (vq - v)``: the quantization error of ``v`` applied with a sign
    (``vq`` itself for +1, the mirror image ``2 v - vq`` for -1; DMXLinear.error_sign)."""
    return vq if error_sign == 1.0 else v + error_sign * (vq - v)


def _real_format_linear_torch(x, weight, bias, e, m, block_size, cap, quantize_input,
                              error_sign=1.0):
    """The reference graph of DMXLinear's soft mode: F.linear(Q(x), Q(weight), bias)
    (each quantization error times ``error_sign``)."""
    wq = _signed_error(weight, _real_format_quantize_torch(weight, e, m, -1, block_size, cap),
                       error_sign)
    if quantize_input:
        x = _signed_error(x, _real_format_quantize_torch(x, e, m, -1, block_size, cap),
                          error_sign)
    return F.linear(x, wq, bias)


class _RealFormatLinear(torch.autograd.Function):
    """F.linear(Q(x), Q(w), bias) keeping only x, w, bias and the 0-d (e, m): neither the
    quantized copies nor the quantizers' intermediates outlive the forward pass."""

    @staticmethod
    def forward(ctx, x, weight, bias, e, m, block_size, cap, quantize_input, error_sign):
        ctx.save_for_backward(x, weight, bias, e, m)
        ctx.cfg = (block_size, cap, quantize_input, error_sign)
        with torch.no_grad():
            wq = _signed_error(weight, _quantize_rows(weight, e, m, block_size, cap, "weight"),
                               error_sign)
            xq = (_signed_error(x, _quantize_rows(x, e, m, block_size, cap, "input"),
                                error_sign) if quantize_input else x)
            return F.linear(xq, wq, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        grads = _replay_grads(ctx, _real_format_linear_torch, ctx.saved_tensors, ctx.cfg, gy)
        return grads + (None, None, None, None)


def real_format_linear(x: torch.Tensor, weight: torch.Tensor, bias, exp_bits, man_bits,
                       block_size: int = DEFAULT_BLOCK_SIZE, max_cap: float | None = None,
                       quantize_input: bool = True, error_sign: float = 1.0) -> torch.Tensor:
    """F.linear(Q(x), Q(weight), bias), Q = :func:`real_format_quantize` (the weight blocked
    along its input dim, x along its last dim); x unquantized if not ``quantize_input``.
    ``error_sign`` -1 applies each quantization error mirrored, ``v - (Q(v) - v)``
    (``--error-signs random``, dmx.search.train).

    What DMXLinear's soft mode computes. Backward keeps only x (the weight is the layer's
    own) and recomputes both quantizations and their graph one layer at a time, so a
    quantized layer holds the activation memory of a plain nn.Linear whose input needs a
    gradient; the gradients equal the reference graph's bit for bit. Not twice
    differentiable.
    """
    if torch.compiler.is_compiling():  # the compiler plans what to save (and recompute) itself
        return _real_format_linear_torch(x, weight, bias, exp_bits, man_bits, block_size,
                                         max_cap, quantize_input, float(error_sign))
    check_input(weight, "weight")
    _, block_size, e, m, cap = _checked(x, exp_bits, man_bits, -1, block_size, max_cap)
    return _RealFormatLinear.apply(x, weight, bias, e, m, block_size, cap, bool(quantize_input),
                                   float(error_sign))
