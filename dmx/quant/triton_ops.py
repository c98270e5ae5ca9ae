"""Autograd wrappers around the Triton real-format kernels (the Triton backend of
:mod:`dmx.quant.realfmt` and of DMXLinear's soft mode), with the torch code as the fallback.

* :func:`real_format_quantize` -- drop-in for :func:`dmx.quant.realfmt.real_format_quantize`
  (same arguments, plus ``backend``): one forward kernel, one backward kernel (+ a
  one-program finalize) on CUDA; the torch implementation elsewhere.
* :func:`dmx_linear` -- quantize input and weight in the real format, then F.linear,
  saving only the *unquantized* input for backward (the quantized copies are recomputed),
  so a quantized layer keeps the activation memory of a plain nn.Linear.
* :func:`dmx_offset_linear` -- the same for DMXLinear's soft mode on a two-rung ladder,
  with the format (clamp_ste, anneal map, rung interpolation) computed inside the kernels
  from the raw offset: a layer is then ~6 kernel launches + 3 matmuls per step instead of
  ~70 small torch ops, which is what made the step launch-bound (H200: 473 -> 255 ms).
* :func:`soft_forward` -- DMXLinear's soft (training) mode on the Triton backend
  (DMXLinear.forward calls it when :func:`dmx.quant.backends.choose` says TRITON).

The fixed-format Triton kernel needs no autograd wrapper: :func:`dmx.quant.fake_quantize`
calls :func:`dmx.quant.triton_kernels.mx_fake_quantize` itself.

Gradients of the real format (what dmx.quant.realfmt's autograd computes, written out; u = x /
scale, a = |u|, q the rounded magnitude, step = 2^(binade - m)):
  dx = g where the element is inside the range and u != 0 (abs' gradient is 0 at 0), else 0;
  dL/dt = sum g s scale (r - v) step ln2 over unsaturated elements, t = binade - m;
  dL/dmaxval = sum_sat g s scale - sum g s (q - a [unsat]) scale / maxval (the scale's
  straight-through gradient through z = -log2 maxval); the chain rule through
  maxval(e, m) and sub_exp(e) = 1 - bias(e) is done in the finalize kernel.
A block holding NaN/Inf has a constant (NaN) output: it contributes no gradient here
(torch's autograd would propagate NaN into the offset gradient).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mxref.formats import DEFAULT_BLOCK_SIZE

from dmx.quant import realfmt
from dmx.quant import triton_kernels as tk
from dmx.quant.anneal import T_DOC_PER_T_CODE
from dmx.quant.backends import Backend, choose
from dmx.quant.fakequant import check_block_size, check_input

__all__ = ["real_format_quantize", "dmx_linear", "dmx_offset_linear", "soft_forward",
           "ladder_constants"]


def _triton(backend, *tensors) -> bool:
    """Every tensor goes to Triton under ``backend`` (an explicit "triton" that cannot
    run one of them is a DMXError from :func:`dmx.quant.backends.choose`)."""
    return all(choose(t, backend) is Backend.TRITON for t in tensors)


# ----------------------------------------------------------------------------- real format
def _real_params(x, exp_bits, man_bits, block_size, max_cap):
    """Validated (e, m, block_size, cap) as dmx.quant.realfmt checks them."""
    check_input(x)
    block_size = check_block_size(block_size)
    e = realfmt.as_bits(exp_bits, torch.float32, x.device, "exp_bits", 1.0)
    m = realfmt.as_bits(man_bits, torch.float32, x.device, "man_bits", 0.0)
    cap = realfmt.DEFAULT_MAX_CAP if max_cap is None else float(max_cap)
    return e, m, block_size, cap


class _RealFormat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, e, m, axis, block_size, cap):
        ctx.save_for_backward(x, e, m)
        ctx.cfg = (axis, block_size, cap)
        return tk.real_format_forward(x, e, m, axis, block_size, cap)

    @staticmethod
    def backward(ctx, g):
        x, e, m = ctx.saved_tensors
        dx, de, dm = tk.real_format_backward(x, g, e, m, *ctx.cfg)
        return dx, de, dm, None, None, None


def real_format_quantize(x, exp_bits, man_bits, axis: int = -1,
                         block_size: int = DEFAULT_BLOCK_SIZE, max_cap: float | None = None, backend=Backend.AUTO) -> torch.Tensor:
    """Same contract as :func:`dmx.quant.realfmt.real_format_quantize`; Triton on CUDA
    (``backend``: see :mod:`dmx.quant.backends`)."""
    if not (isinstance(x, torch.Tensor) and x.dim() and _triton(backend, x)):
        return realfmt.real_format_quantize(x, exp_bits, man_bits, axis, block_size, max_cap)
    e, m, block_size, cap = _real_params(x, exp_bits, man_bits, block_size, max_cap)
    if block_size & (block_size - 1):  # tl.arange needs a power of two
        return realfmt.real_format_quantize(x, exp_bits, man_bits, axis, block_size, max_cap)
    return _RealFormat.apply(x, e, m, axis, block_size, cap)


# ----------------------------------------------------------------------------- fused linear
def _linear_backward(ctx, gy, e, m, lad, td):
    """Shared backward of the fused linears: dW, dx, db and the scalar gradients, with the
    quantized input recomputed and one finalize launch for both partial-sum blocks."""
    x, w, wq = ctx.saved_tensors[:3]
    block_size, cap, quantize_input, has_bias = ctx.cfg
    gx_q = gy @ wq  # d/dQ(x)
    xq = tk.real_format_forward(x, e, m, -1, block_size, cap, lad, td) if quantize_input else x
    gy2 = gy.reshape(-1, gy.shape[-1])
    gw_q = gy2.t() @ xq.reshape(-1, xq.shape[-1])
    del xq
    gb = gy2.sum(0).to(gy.dtype) if has_bias else None
    n_w = tk.real_backward_programs(w, block_size)
    n_x = tk.real_backward_programs(x, block_size) if quantize_input else 0
    parts = torch.empty((n_w + n_x, 4), dtype=torch.float32, device=w.device)
    dw = tk.real_backward_partial(w, gw_q, e, m, parts[:n_w], block_size, cap, lad, td)
    dx = (tk.real_backward_partial(x, gx_q, e, m, parts[n_w:], block_size, cap, lad, td)
          if quantize_input else gx_q)
    de, dm = tk.real_finalize(parts, e, m, cap, lad, td)
    return dx, dw, gb, de, dm


class _DMXLinearFn(torch.autograd.Function):
    """F.linear(Q(x), Q(w), bias), (e, m) given as tensors. Saves x, w and Q(w) (weight
    sized); Q(x) is recomputed in backward, so activation memory is that of nn.Linear."""

    @staticmethod
    def forward(ctx, x, w, bias, e, m, block_size, cap, quantize_input):
        xq = tk.real_format_forward(x, e, m, -1, block_size, cap) if quantize_input else x
        wq = tk.real_format_forward(w, e, m, -1, block_size, cap)
        ctx.save_for_backward(x, w, wq, e, m)
        ctx.cfg = (block_size, cap, quantize_input, bias is not None)
        return F.linear(xq, wq, bias)

    @staticmethod
    def backward(ctx, gy):
        e, m = ctx.saved_tensors[3:]
        dx, dw, gb, de, dm = _linear_backward(ctx, gy, e, m, None, 0.0)
        return dx, dw, gb, de, dm, None, None, None


class _DMXOffsetLinearFn(torch.autograd.Function):
    """As _DMXLinearFn, but the format comes from the raw offset of a two-rung ladder: the
    kernels compute (e, m) themselves (clamp, anneal map, interpolation), so a layer costs
    a handful of launches instead of dozens of scalar torch ops (the step is launch-bound)."""

    @staticmethod
    def forward(ctx, x, w, bias, offset, td, lad, block_size, cap, quantize_input):
        fw = tk.real_format_forward
        xq = fw(x, offset, offset, -1, block_size, cap, lad, td) if quantize_input else x
        wq = fw(w, offset, offset, -1, block_size, cap, lad, td)
        ctx.save_for_backward(x, w, wq, offset)
        ctx.cfg = (block_size, cap, quantize_input, bias is not None)
        ctx.lad, ctx.td = lad, td
        return F.linear(xq, wq, bias)

    @staticmethod
    def backward(ctx, gy):
        offset = ctx.saved_tensors[3]
        dx, dw, gb, doff, _ = _linear_backward(ctx, gy, offset, offset, ctx.lad, ctx.td)
        return dx, dw, gb, doff, None, None, None, None, None


def dmx_linear(x, weight, bias, exp_bits, man_bits, block_size: int = DEFAULT_BLOCK_SIZE,
               max_cap: float | None = None, quantize_input: bool = True,
               backend=Backend.AUTO) -> torch.Tensor:
    """F.linear(Q(x), Q(weight), bias) in the real format E(exp_bits)M(man_bits).

    Triton with recomputation on CUDA; elsewhere the torch composition (same values).
    """
    if not _triton(backend, x, weight):
        return realfmt.real_format_linear(x, weight, bias, exp_bits, man_bits, block_size,
                                          max_cap, quantize_input)
    e, m, block_size, cap = _real_params(x, exp_bits, man_bits, block_size, max_cap)
    return _DMXLinearFn.apply(x, weight, bias, e, m, block_size, cap, quantize_input)


def ladder_constants(ladder):
    """(p0, width, e0, e_slope, m0, m_slope) of a two-rung ladder, else None."""
    if len(ladder.rungs) != 2:
        return None
    lo, hi = ladder.rungs
    w = hi.position - lo.position
    return (lo.position, w, lo.exp_bits, (hi.exp_bits - lo.exp_bits) / w, lo.man_bits,
            (hi.man_bits - lo.man_bits) / w)


def dmx_offset_linear(x, weight, bias, offset, ladder, temperature, block_size=DEFAULT_BLOCK_SIZE,
                      quantize_input=True):
    """F.linear(Q(x), Q(w), bias) with the format of DMXLinear's soft mode computed from the
    raw offset inside the kernels (two-rung ladders; Triton)."""
    lad = ladder_constants(ladder)
    if lad is None:
        raise ValueError(f"ladder {ladder.name!r} has more than two rungs")
    return _DMXOffsetLinearFn.apply(x, weight, bias, offset, T_DOC_PER_T_CODE * temperature,
                                    lad, block_size, ladder.max_cap, quantize_input)


# ----------------------------------------------------------------------------- DMXLinear
def soft_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """DMXLinear's soft (training) mode on the Triton backend (the caller chose it)."""
    if ladder_constants(layer.ladder) is not None:
        return dmx_offset_linear(x, layer.linear.weight, layer.linear.bias, layer.raw_offset(),
                                 layer.ladder, layer.temperature, layer.block_size,
                                 layer.quantize_input)
    b = layer.position()
    e, m = layer.ladder.exp_bits(b), layer.ladder.man_bits(b)
    e, m, block_size, cap = _real_params(x, e, m, layer.block_size, layer.ladder.max_cap)
    return _DMXLinearFn.apply(x, layer.linear.weight, layer.linear.bias, e, m, block_size, cap,
                              layer.quantize_input)
