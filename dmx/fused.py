"""Autograd wrappers around the Triton kernels, with the torch code as the fallback.

* :func:`triton_fake_quantize_backend` -- registered with :func:`dmx.quant.register_backend`
  by :func:`install`: CUDA tensors go to the bit-exact Triton kernel, anything it does not
  handle (CPU, float64, an unsupported profile) falls through to dmx.quant's torch code.
* :func:`real_format_quantize` -- drop-in for :func:`dmx.realfmt.real_format_quantize`
  (same arguments): one forward kernel, one backward kernel (+ a one-program finalize)
  on CUDA; the torch implementation elsewhere.
* :func:`dmx_linear` -- quantize input and weight in the real format, then F.linear,
  saving only the *unquantized* input for backward (the quantized copies are recomputed),
  so a quantized layer keeps the activation memory of a plain nn.Linear.
* :func:`fused_forward` / :func:`patch_dmx_linear` -- DMXLinear.forward through
  :func:`dmx_linear` in soft mode (opt-in; hard mode keeps the bit-exact fake_quantize).

Gradients of the real format (what dmx.realfmt's autograd computes, written out; u = x /
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

import os

import torch
import torch.nn.functional as F

from dmx import triton_kernels as tk

__all__ = ["install", "triton_fake_quantize_backend", "real_format_quantize", "dmx_linear",
           "fused_forward", "patch_dmx_linear", "use_triton"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def use_triton(x: torch.Tensor) -> bool:
    """Triton path for this tensor: CUDA, a dtype the kernels take, Triton importable.

    DMX_TRITON_ON_CPU=1 together with TRITON_INTERPRET=1 sends CPU tensors through the
    interpreted kernels too (a debugging aid: slow, but it runs every code path here).
    """
    on_device = x.is_cuda or (x.device.type == "cpu"
                              and os.environ.get("DMX_TRITON_ON_CPU") == "1"
                              and os.environ.get("TRITON_INTERPRET") == "1")
    return on_device and x.dtype in _FLOATS and tk.available()


# ----------------------------------------------------------------------------- fixed format
def triton_fake_quantize_backend(x, fmt, axis, block_size, profile):
    """dmx.quant backend: the Triton kernel for CUDA inputs it supports, else None."""
    if not use_triton(x) or not tk.supports(x, fmt, axis, block_size, profile):
        return None
    return tk.mx_fake_quantize(x, fmt, axis, block_size, profile)


def install() -> None:
    """Register the Triton backend with dmx.quant (idempotent)."""
    from dmx.quant import register_backend
    register_backend(triton_fake_quantize_backend)


# ----------------------------------------------------------------------------- real format
def _real_params(x, exp_bits, man_bits, block_size, max_cap):
    """Validated (e, m, block_size, cap) as dmx.realfmt checks them."""
    from dmx import realfmt
    from dmx.quant import _check_block_size, _check_input
    _check_input(x)
    block_size = _check_block_size(block_size)
    e = realfmt._as_bits(exp_bits, torch.float32, x.device, "exp_bits", 1.0)
    m = realfmt._as_bits(man_bits, torch.float32, x.device, "man_bits", 0.0)
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


def _real_triton(x, e, m, axis=-1, block_size=32, cap=448.0):
    """The Triton real-format quantizer with autograd (any device Triton runs on)."""
    return _RealFormat.apply(x, e.detach().float() if not e.requires_grad else e.float(),
                             m.detach().float() if not m.requires_grad else m.float(),
                             axis, block_size, cap)


def real_format_quantize(x, exp_bits, man_bits, axis: int = -1, block_size: int = 32,
                         max_cap: float | None = None) -> torch.Tensor:
    """Same contract as :func:`dmx.realfmt.real_format_quantize`; Triton on CUDA."""
    from dmx import realfmt
    if not (isinstance(x, torch.Tensor) and use_triton(x)):
        return realfmt.real_format_quantize(x, exp_bits, man_bits, axis, block_size, max_cap)
    e, m, block_size, cap = _real_params(x, exp_bits, man_bits, block_size, max_cap)
    if block_size & (block_size - 1) or x.dim() == 0:
        return realfmt.real_format_quantize(x, exp_bits, man_bits, axis, block_size, max_cap)
    return _real_triton(x, e, m, axis, block_size, cap)


# ----------------------------------------------------------------------------- fused linear
class _DMXLinearFn(torch.autograd.Function):
    """F.linear(Q(x), Q(w), bias) saving x and w only: Q(x), Q(w) are recomputed in backward."""

    @staticmethod
    def forward(ctx, x, w, bias, e, m, block_size, cap, quantize_input):
        xq = tk.real_format_forward(x, e, m, -1, block_size, cap) if quantize_input else x
        wq = tk.real_format_forward(w, e, m, -1, block_size, cap)
        ctx.save_for_backward(x, w, e, m)
        ctx.cfg = (block_size, cap, quantize_input, bias is not None)
        return F.linear(xq, wq, bias)

    @staticmethod
    def backward(ctx, gy):
        x, w, e, m = ctx.saved_tensors
        block_size, cap, quantize_input, has_bias = ctx.cfg
        wq = tk.real_format_forward(w, e, m, -1, block_size, cap)
        gx_q = gy @ wq  # d/dQ(x)
        xq = tk.real_format_forward(x, e, m, -1, block_size, cap) if quantize_input else x
        gy2 = gy.reshape(-1, gy.shape[-1])
        gw_q = gy2.t() @ xq.reshape(-1, xq.shape[-1])
        del xq
        gb = gy2.sum(0).to(gy.dtype) if has_bias else None
        dw, de, dm = tk.real_format_backward(w, gw_q, e, m, -1, block_size, cap)
        if quantize_input:
            dx, de_x, dm_x = tk.real_format_backward(x, gx_q, e, m, -1, block_size, cap)
            de, dm = de + de_x, dm + dm_x
        else:
            dx = gx_q
        return dx, dw, gb, de, dm, None, None, None


def dmx_linear(x, weight, bias, exp_bits, man_bits, block_size: int = 32,
               max_cap: float | None = None, quantize_input: bool = True) -> torch.Tensor:
    """F.linear(Q(x), Q(weight), bias) in the real format E(exp_bits)M(man_bits).

    Triton with recomputation on CUDA; elsewhere the torch composition (same values).
    """
    if not (use_triton(x) and use_triton(weight)):
        from dmx.realfmt import real_format_quantize as rq
        wq = rq(weight, exp_bits, man_bits, -1, block_size, max_cap)
        xq = rq(x, exp_bits, man_bits, -1, block_size, max_cap) if quantize_input else x
        return F.linear(xq, wq, bias)
    e, m, block_size, cap = _real_params(x, exp_bits, man_bits, block_size, max_cap)
    return _DMXLinearFn.apply(x, weight, bias, e, m, block_size, cap, quantize_input)


def _dmx_linear_triton(x, weight, bias, e, m, block_size=32, cap=448.0, quantize_input=True):
    """The Triton fused linear on any device Triton runs on (tests use the interpreter)."""
    return _DMXLinearFn.apply(x, weight, bias, e, m, block_size, cap, quantize_input)


# ----------------------------------------------------------------------------- DMXLinear
def fused_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """DMXLinear.forward with the soft (training) branch through :func:`dmx_linear`."""
    if layer.hard_mode or not use_triton(x):
        return _ORIGINAL_FORWARD[0](layer, x)
    b = layer.position()
    e, m = layer.ladder.exp_bits(b), layer.ladder.man_bits(b)
    return dmx_linear(x, layer.linear.weight, layer.linear.bias, e, m, layer.block_size,
                      layer.ladder.max_cap, layer.quantize_input)


_ORIGINAL_FORWARD: list = []


def patch_dmx_linear(enable: bool = True) -> None:
    """Route DMXLinear.forward through :func:`fused_forward` (enable=False undoes it)."""
    from dmx.layers import DMXLinear
    if not _ORIGINAL_FORWARD:
        _ORIGINAL_FORWARD.append(DMXLinear.forward)
    DMXLinear.forward = fused_forward if enable else _ORIGINAL_FORWARD[0]
