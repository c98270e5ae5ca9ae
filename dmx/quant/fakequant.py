"""MX fake quantization in pure torch, bit-identical to the golden model (mxref).

Three public operations:

* :func:`fake_quantize` -- quantize then dequantize, straight-through gradient.
* :func:`quantize_codes` -- element codes and E8M0 scale codes (mxref's MXArray layout).
* :func:`dequantize_codes` -- the values of codes and scales.

Why it is exact: every step is either an exact float operation (multiplying by a
power of two built from its bit pattern, rounding a value whose fraction is
exactly representable) or integer arithmetic. The block scale exponent and each
element's binade come from the exponent bit field (integer views), never from a
float ``log2``, which is wrong just below powers of two. Every format constant comes
from :class:`mxref.FormatInfo`.

Backends: ``backend=`` picks the implementation (:mod:`dmx.quant.backends`: torch, or
the Triton kernel for CUDA tensors under "auto"); :func:`register_backend` adds an
implementation tried first under "auto" (it returns ``None`` for inputs it declines).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

import mxref
from mxref.formats import DEFAULT_BLOCK_SIZE, E8M0, FormatInfo, ieee_layout
from mxref.profiles import Profile

from dmx.errors import DMXError
from dmx.quant import triton_kernels as tk
from dmx.quant.backends import Backend, as_backend, choose

__all__ = ["fake_quantize", "fake_quantize_torch", "quantize_codes", "dequantize_codes",
           "register_backend", "resolve", "check_input", "check_block_size", "normalise_axis",
           "FLOAT_LAYOUT"]

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_INT_VIEW = {16: torch.int16, 32: torch.int32, 64: torch.int64}


def _torch_layout(dtype: torch.dtype) -> tuple:
    """(integer view, mantissa bits, exponent bias, exponent field mask) of a float dtype,
    from mxref's IEEE layouts (specs/formats.toml [ieee.*])."""
    lay = ieee_layout(str(dtype).removeprefix("torch."))
    return _INT_VIEW[lay.bits], lay.man_bits, lay.bias, lay.exp_all_ones


# Bit layout of the dtypes we compute in (float32, float64).
FLOAT_LAYOUT = {d: _torch_layout(d) for d in (torch.float32, torch.float64)}


# ----------------------------------------------------------------------------- helpers
def pow2_int(n: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2**n exactly, for an integer tensor ``n``, built from its bit pattern.

    Covers the normal and subnormal range of ``dtype`` (float32 or float64); a
    float ``exp2``/``pow`` is not guaranteed exact on every device.
    """
    itype, mbits, bias, _ = FLOAT_LAYOUT[dtype]
    n = n.to(itype)
    normal = (n + bias).clamp(min=1) << mbits
    # subnormal 2^n = 2^(n + bias + mbits - 1) units of the smallest subnormal
    sub = torch.ones_like(n) << (n + (bias + mbits - 1)).clamp(0, mbits - 1)
    return torch.where(n >= 1 - bias, normal, sub).view(dtype)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for finite a > 0 (int32), exact for subnormals too.

    For a == 0 it returns -1 (frexp's exponent 0): callers mask zeros themselves.
    """
    return torch.frexp(a)[1] - 1


def resolve(fmt, profile) -> tuple[FormatInfo, Profile]:
    """mxref's FormatInfo and Profile for user-facing names (errors are MXError)."""
    return mxref.get_format(fmt), mxref.get_profile(profile)


def check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or int(block_size) != block_size or int(block_size) <= 0:
        raise DMXError(f"block size must be a positive integer, got {block_size!r}")
    return int(block_size)


def check_input(x, what: str = "input") -> None:
    if not isinstance(x, torch.Tensor):
        raise DMXError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise DMXError(f"unsupported {what} dtype {x.dtype}; use float32, bfloat16, float16 "
                       f"or float64")
    if x.dim() == 0:
        raise DMXError(f"cannot block-quantize a 0-d {what}; reshape it to at least 1-d")


def normalise_axis(axis: int, ndim: int) -> int:
    if not -ndim <= int(axis) < ndim:
        raise DMXError(f"axis {axis} does not exist for a tensor with {ndim} dimensions")
    return int(axis) % ndim


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 values are exact in float32, and every MX value is exact in float32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_blocks(x: torch.Tensor, axis: int, block_size: int) -> tuple[torch.Tensor, int]:
    """``x`` with ``axis`` moved last, zero-padded to whole blocks: [..., n_blocks, bs].

    Zero padding is how mxref scales a ragged last block (as if padded with zeros).
    """
    xm = x.movedim(axis, -1)
    k = xm.shape[-1]
    nbk = -(-k // block_size)
    pad = nbk * block_size - k
    if pad:
        xm = F.pad(xm, (0, pad))
    return xm.reshape(*xm.shape[:-1], nbk, block_size), k


def from_blocks(yb: torch.Tensor, k: int, axis: int) -> torch.Tensor:
    """Inverse of :func:`to_blocks`."""
    y = yb.reshape(*yb.shape[:-2], -1)[..., :k]
    return y.movedim(-1, axis)


def flush_input_subnormals(x: torch.Tensor) -> torch.Tensor:
    """Profile ``flush_subnormals``: subnormals of the input dtype and every magnitude
    below FP32's smallest normal (2^-126, e.g. in float64 input) read as signed zero,
    as in mxref (x * 0 keeps the sign)."""
    tiny = max(torch.finfo(x.dtype).tiny, torch.finfo(torch.float32).tiny)
    return torch.where(x.abs() < tiny, x * 0, x)


def exponent_field(a: torch.Tensor) -> torch.Tensor:
    """Biased exponent field of each element of a float32/float64 tensor (sign ignored)."""
    itype, mbits, _, emask = FLOAT_LAYOUT[a.dtype]
    return (a.view(itype) >> mbits) & emask


def block_scale_exponent(amax: torch.Tensor, fmt: FormatInfo, profile: Profile) -> torch.Tensor:
    """Unbiased E8M0 scale exponent per block (integer tensor, clamped), from finite amax >= 0.

    floor: floor(log2 amax) - emax_elem.  rceil: the smallest k with amax <= max_normal * 2^k,
    found by comparing significand bits: amax = Ma * 2^e, max_normal = Mn * 2^emax, Ma, Mn in
    [1, 2). Both read exponent and mantissa bits (no float log2). An all-zero block gets the
    smallest exponent (scale code 0x00).
    """
    itype, mbits, bias, _ = FLOAT_LAYOUT[amax.dtype]
    # a subnormal amax is rescaled by 2^(mbits+1) (exact) so its exponent field is its own
    shift = mbits + 1
    small = amax < math.ldexp(1.0, 1 - bias)
    a = torch.where(small, amax * math.ldexp(1.0, shift), amax)
    k = exponent_field(a) - bias - fmt.emax - small.to(itype) * shift
    if profile.scale_rule == "rceil":
        mn_field = fmt.max_normal_fraction(mbits)
        k = k + ((a.view(itype) & ((1 << mbits) - 1)) > mn_field).to(itype)
    k = torch.where(amax == 0, torch.full_like(k, E8M0.min_exp), k)
    return k.clamp(E8M0.min_exp, E8M0.max_exp)


def element_grid(u: torch.Tensor, fmt: FormatInfo, rounding: str):
    """Round scaled values ``u`` (signed) onto the element grid, before saturation.

    Returns (r, eb, inv): ``eb`` is the biased exponent field of u clamped to the
    format's smallest normal binade (so subnormals and zeros share the lowest step),
    ``inv`` = 2^(m - E) built from bits, and ``r`` = round(u * inv), an integer-valued
    float with u's sign (round(-0.3) is -0.0). The value is r / inv (exact); the
    magnitude code is ((E - emin) << m) + |r|. INT8 is the same grid with emin = 0 and
    m = fraction bits (fixed point).
    """
    itype, mbits, bias, _ = FLOAT_LAYOUT[u.dtype]
    m = fmt.step_bits
    eb = exponent_field(u).clamp_min(fmt.emin + bias)
    inv = (((2 * bias + m) - eb) << mbits).view(u.dtype)  # biased field of 2^(m - E)
    v = u * inv  # exact: a power-of-two rescale
    if rounding == "rne":
        r = torch.round(v)  # round half to even, sign-symmetric
    else:  # ties away from zero; v - trunc(v) is exact, and where() keeps trunc's -0.0
        t = torch.trunc(v)
        r = torch.where((v - t).abs() >= 0.5, t + torch.sign(v), t)
    return r, eb, inv


def _value_limits(fmt: FormatInfo, profile: Profile) -> tuple[float, float]:
    """(lowest, highest) value saturation allows; -2.0 only for asymmetric INT8."""
    if fmt.is_int and profile.int8_range == "asymmetric":
        return fmt.min_value, fmt.max_normal
    return -fmt.max_normal, fmt.max_normal


def _overflow_is_special(fmt: FormatInfo, profile: Profile) -> bool:
    # OFP8 OVF mode: FP8 overflow becomes Inf (E5M2) or NaN (E4M3) instead of saturating
    return profile.fp8_overflow == "ovf" and not fmt.is_int and fmt.bits == 8


def _prepare(x, fmt, axis, block_size, profile):
    """Checked arguments, u = x / 2^k per block ([..., n_blocks, bs]), k and finiteness."""
    check_input(x)
    fmt, profile = resolve(fmt, profile)
    block_size = check_block_size(block_size)
    axis = normalise_axis(axis, x.dim())
    if profile.flush_subnormals:
        x = flush_input_subnormals(x)
    xb, k = to_blocks(x.to(compute_dtype(x.dtype)), axis, block_size)
    amax = xb.abs().amax(dim=-1, keepdim=True)  # NaN propagates
    finite = torch.isfinite(amax)
    kexp = block_scale_exponent(torch.where(finite, amax, torch.zeros_like(amax)), fmt, profile)
    # exact (an underflow only hits values far below half the smallest element step)
    u = xb * pow2_int(-kexp, xb.dtype)
    return fmt, profile, axis, k, u, finite, kexp


def fake_quantize_torch(x: torch.Tensor, fmt, axis: int = -1, block_size: int = DEFAULT_BLOCK_SIZE,
                         profile="ocp") -> torch.Tensor:
    """The reference torch implementation of :func:`fake_quantize` (no autograd logic)."""
    fmt, profile, axis, k, u, finite, kexp = _prepare(x, fmt, axis, block_size, profile)
    r, _, inv = element_grid(u, fmt, profile.rounding)
    val = r / inv  # exact: a power-of-two divisor
    lo, hi = _value_limits(fmt, profile)
    is_nan = ~finite  # a block holding NaN/Inf is all NaN
    if _overflow_is_special(fmt, profile):
        over = val.abs() > hi
        if fmt.inf_codes:  # E5M2: signed Inf
            val = torch.where(over, val * float("inf"), val)
        else:  # E4M3: NaN
            is_nan = is_nan | over
    if not (_overflow_is_special(fmt, profile) and fmt.inf_codes):
        val = val.clamp(lo, hi)  # saturate; keeps -0.0
    if fmt.is_int:
        val = val + 0.0  # two's complement has no -0: -0.0 + 0.0 = +0.0
    y = (val * pow2_int(kexp, u.dtype)).to(x.dtype)
    return from_blocks(write_nan(y, is_nan), k, axis)


def write_nan(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """y with mxref's canonical quiet NaN (positive, zero payload) where ``mask``.

    Written as a bit pattern in y's own dtype: propagated NaNs differ by device (x86's
    inf * 0 has the sign bit set; CUDA's float -> bfloat16 cast gives 0x7FFF, the CPU 0x7FC0).
    """
    lay = ieee_layout(str(y.dtype).removeprefix("torch."))
    nan = torch.tensor(lay.qnan_bits, dtype=_INT_VIEW[lay.bits], device=y.device)
    nan = nan.view(y.dtype)  # 0 11..1 10..0
    return torch.where(mask, nan, y)


# Extra implementations tried first under Backend.AUTO:
# fn(x, fmt_info, axis, block_size, profile) -> Tensor | None
_REGISTERED: list[Callable] = []


def register_backend(fn: Callable) -> Callable:
    """Register an extra fake-quantize implementation, tried before the built-in ones
    under ``backend="auto"``.

    ``fn(x, fmt: FormatInfo, axis: int, block_size: int, profile: Profile)`` must return
    the same bits as :func:`fake_quantize_torch`, or ``None`` to decline the input.
    """
    if fn not in _REGISTERED:
        _REGISTERED.append(fn)
    return fn


def _dispatch(x, fmt, axis, block_size, profile, backend):
    check_input(x)
    backend = as_backend(backend)
    chosen = choose(x, backend)
    if backend is Backend.AUTO and _REGISTERED:
        fmt_info, prof = resolve(fmt, profile)
        for fn in _REGISTERED:
            y = fn(x, fmt_info, axis, block_size, prof)
            if y is not None:
                return y
    if chosen is Backend.TRITON:
        fmt_info, prof = resolve(fmt, profile)
        if tk.supports(x, fmt_info, axis, block_size, prof):
            return tk.mx_fake_quantize(x, fmt_info, axis, block_size, prof)
        if backend is Backend.TRITON:
            raise DMXError(f"backend 'triton' does not support {fmt_info.key} with profile "
                           f"{prof.name}, axis {axis} and block size {block_size}; use "
                           f"backend='torch'")
    return fake_quantize_torch(x, fmt, axis, block_size, profile)


class _StraightThrough(torch.autograd.Function):
    """Forward: the exact MX value. Backward: the identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, fmt, axis, block_size, profile, backend):
        return _dispatch(x, fmt, axis, block_size, profile, backend)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None


def fake_quantize(x: torch.Tensor, fmt: str, axis: int = -1, block_size: int = DEFAULT_BLOCK_SIZE,
                  profile="ocp", backend=Backend.AUTO) -> torch.Tensor:
    """MX quantize-dequantize ``x`` along ``axis``; same dtype, shape and device as ``x``.

    Bit-identical to ``mxref.dequantize(mxref.quantize(x.numpy(), fmt, axis, block_size,
    profile))`` cast to ``x.dtype`` (float64 inputs: dequantized in float64), including
    NaN/Inf blocks (all NaN), signed zeros, subnormals and a ragged last block. Every
    mxref profile choice is supported. The gradient w.r.t. ``x`` is the identity.
    ``backend``: "auto", "torch" or "triton" (:mod:`dmx.quant.backends`; same bits).
    """
    return _StraightThrough.apply(x, fmt, axis, block_size, profile, backend)


# ----------------------------------------------------------------------------- codes
def quantize_codes(x: torch.Tensor, fmt: str, axis: int = -1, block_size: int = DEFAULT_BLOCK_SIZE,
                   profile="ocp") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [..., K], scales uint8 [..., ceil(K/bs)]) with ``axis`` moved last.

    Bit-identical to mxref's ``MXArray.codes`` / ``MXArray.scales``.
    """
    with torch.no_grad():
        fmt, profile, axis, k, u, finite, kexp = _prepare(x, fmt, axis, block_size, profile)
        r, eb, _ = element_grid(u, fmt, profile.rounding)
        itype = eb.dtype
        mag = ((eb - (fmt.emin + FLOAT_LAYOUT[u.dtype][2])) << fmt.step_bits) + r.abs().to(itype)
        maxmag = fmt.max_code & (fmt.sign_bit - 1)
        negative = torch.signbit(u)
        if fmt.is_int:
            negative = negative & (mag != 0)  # two's complement has no -0
            if profile.int8_range == "asymmetric":
                maxmag = maxmag + negative.to(itype)  # -128 allowed
        if _overflow_is_special(fmt, profile):
            special = (fmt.inf_codes or fmt.nan_codes)[0]
            mag = torch.where(mag > maxmag, torch.full_like(mag, special), mag)
        else:
            mag = torch.minimum(mag, torch.as_tensor(maxmag, dtype=itype, device=mag.device))
        if fmt.is_int:
            codes = torch.where(negative, (fmt.n_codes - mag) & (fmt.n_codes - 1), mag)
        else:
            codes = (negative.to(itype) << (fmt.bits - 1)) | mag
        codes = torch.where(finite, codes, torch.zeros_like(codes))
        scales = torch.where(finite, kexp + E8M0.bias, torch.full_like(kexp, E8M0.nan_code))
        codes = codes.to(torch.uint8).reshape(*codes.shape[:-2], -1)[..., :k]
        return codes, scales.squeeze(-1).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, fmt: str, block_size: int = DEFAULT_BLOCK_SIZE,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values [..., K] of element codes and E8M0 scale codes (blocked axis last).

    Exactly mxref's dequantize (float64 product, stored in float32) cast to ``dtype``;
    a NaN scale (0xFF) or a NaN element code gives NaN.
    """
    fmt = mxref.get_format(fmt)
    block_size = check_block_size(block_size)
    if not isinstance(codes, torch.Tensor) or not isinstance(scales, torch.Tensor):
        raise DMXError("codes and scales must be torch tensors")
    if codes.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise DMXError(f"codes and scales must be uint8, got {codes.dtype} and {scales.dtype}")
    if codes.dim() == 0:
        raise DMXError("codes must be at least 1-d (blocked axis last)")
    kdim = codes.shape[-1]
    nbk = -(-kdim // block_size)
    if tuple(scales.shape) != tuple(codes.shape[:-1]) + (nbk,):
        raise DMXError(f"scales shape {tuple(scales.shape)} does not match codes "
                       f"{tuple(codes.shape)} with block size {block_size}")
    if fmt.bits < 8 and codes.numel() and int(codes.max()) >= fmt.n_codes:
        raise DMXError(f"element code {int(codes.max()):#x} out of range for {fmt.key}: valid "
                       f"codes are 0..{fmt.n_codes - 1:#x}")
    dev = codes.device
    table = torch.tensor(fmt.decode_table, dtype=torch.float64, device=dev)
    elem = table[codes.long()]
    sexp = scales.to(torch.int64) - E8M0.bias
    sval = pow2_int(sexp, torch.float64)
    sval = torch.where(scales == E8M0.nan_code, torch.full_like(sval, float("nan")), sval)
    sval = sval.repeat_interleave(block_size, dim=-1)[..., :kdim]
    # float64 product is exact; storing it in float32 first is what mxref does
    out = (elem * sval).to(torch.float32).to(dtype)
    return write_nan(out, torch.isnan(out))
