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

from mxref.formats import E8M0, FLOAT32

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
# The E8M0 scale exponent range, from mxref's description of E8M0 (specs/formats.toml).
_SCALE_RANGE = {"SC_MIN": E8M0.min_exp, "SC_MAX": E8M0.max_exp}


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when Triton imports (a GPU is still needed unless TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def _kernels():
    """The @triton.jit kernels (dmx.quant.triton_jit), imported on first use so that
    importing this module never needs Triton."""
    from dmx.quant import triton_jit as jit
    return dict(mx_fq=jit.mx_fq_kernel, real_fwd=jit.real_fwd_kernel,
                real_bwd=jit.real_bwd_kernel, real_fin=jit.real_finalize_kernel)


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


def mx_fake_quantize(x, fmt, axis: int, block_size: int, profile):
    """Fixed-format MX fake quantization (no autograd); ``fmt``: mxref FormatInfo,
    ``profile``: mxref Profile. Call :func:`supports` first."""
    import torch
    x2, mshape, axis = _last_axis_2d(x, axis)
    y2 = torch.empty_like(x2)
    n_blocks, K, nbk, even, bpp, grid = _geometry(x2, block_size)
    mn_field = fmt.max_normal_fraction(FLOAT32.man_bits)   # the kernels compute in float32
    _kernels()["mx_fq"][grid](
        _in_view(x2), _out_view(y2), n_blocks, K, nbk, BS=block_size, BPP=bpp, EVEN=even,
        EMAX=fmt.emax, EMIN=fmt.emin, MBITS=fmt.step_bits, MAXNORM=float(fmt.max_normal),
        IS_INT=fmt.is_int, RCEIL=profile.scale_rule == "rceil", MN_FIELD=mn_field,
        AWAY=profile.rounding == "away", OUT_KIND=_out_kind(x.dtype), NAN_BITS=_nan_bits(x.dtype),
        **_SCALE_RANGE, num_warps=CONFIG["num_warps"], **_OPTS)
    y = y2.reshape(mshape)
    return y.movedim(-1, axis) if axis != x.dim() - 1 else y


def _real_consts(cap: float, lad) -> dict:
    """Constexprs of the real-format kernels; ``lad`` = (p0, width, e0, e_slope, m0, m_slope)
    of a two-rung ladder when the kernel starts from the raw offset, else None."""
    p0, w, e0, se, m0, sm = lad if lad is not None else (0.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    return dict(CAP=float(cap), FROM_OFF=lad is not None, P0=float(p0), W=float(w),
                E0=float(e0), SE=float(se), M0=float(m0), SM=float(sm))


def real_format_forward(x, e, m, axis: int, block_size: int, cap: float,
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
        **_SCALE_RANGE, num_warps=CONFIG["num_warps"], **_real_consts(cap, lad), **_OPTS)
    y = y2.reshape(mshape)
    return y.movedim(-1, axis) if axis != x.dim() - 1 else y


def real_backward_programs(x, block_size: int) -> int:
    """Rows of partial sums :func:`real_backward_partial` writes for ``x``."""
    n = x.numel() // x.shape[-1] if x.dim() else 1
    nbk = -(-x.shape[-1] // block_size)
    return max(1, -(-(n * nbk) // max(1, CONFIG["elems_per_prog"] // block_size)))


def real_backward_partial(x, g, e, m, parts, block_size: int, cap: float,
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
        NAN_BITS=_nan_bits(x.dtype), **_SCALE_RANGE, num_warps=CONFIG["num_warps"],
        **_real_consts(cap, lad), **_OPTS)
    return dx2.reshape(mshape)


def real_finalize(parts, e, m, cap: float, lad=None, td: float = 0.0):
    """(de, dm) from partial sums; with ``lad``: (d offset, None)."""
    import torch
    de = torch.empty((), dtype=torch.float32, device=parts.device)
    dm = torch.empty((), dtype=torch.float32, device=parts.device) if lad is None else de
    _kernels()["real_fin"][(1,)](parts, parts.shape[0], de, dm, e, m, float(td), CH=256,
                                 LN2=_LN2, num_warps=4, **_real_consts(cap, lad), **_OPTS)
    return (de, dm) if lad is None else (de, None)


def real_format_backward(x, g, e, m, axis: int, block_size: int, cap: float, lad=None,
                         td: float = 0.0):
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
