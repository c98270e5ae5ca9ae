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
real max normal) the output equals :func:`dmx.quant.fake_quantize` bit for bit
(profile ``ocp``); E5M2 matches too with ``max_cap=57344``.
"""
from __future__ import annotations

import torch

import mxref
from mxref.formats import E8M0

from dmx.errors import DMXError
from dmx.quant import (_LAYOUT, _check_block_size, _check_input, _normalise_axis, compute_dtype,
                       exponent_field, floor_log2, from_blocks, pow2_int, to_blocks,
                       write_nan)

__all__ = ["real_format_quantize", "format_max", "pow2", "DEFAULT_MAX_CAP"]

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


def _as_bits(v, dtype, device, what: str, least: float) -> torch.Tensor:
    v = torch.as_tensor(v, device=device)
    if v.dim() != 0:
        raise DMXError(f"{what} must be a scalar (0-d) tensor, got shape {tuple(v.shape)}")
    # value checks read the scalar back: only where that is free (CPU, not compiling)
    if v.device.type == "cpu" and not torch.compiler.is_compiling():
        val = float(v.detach())
        if not val >= least or val == float("inf"):
            raise DMXError(f"{what} must be finite and >= {least:g}, got {val}")
    return v.to(dtype)


def real_format_quantize(x: torch.Tensor, exp_bits, man_bits, axis: int = -1,
                         block_size: int = 32, max_cap: float | None = None) -> torch.Tensor:
    """MX fake quantization in the format E(exp_bits) M(man_bits) with real-valued bits.

    ``x``: float32/bfloat16/float16/float64 (computed in float32, or float64 for float64
    inputs; returned in x.dtype). ``exp_bits``/``man_bits``: 0-d tensors (gradients reach
    them). ``max_cap``: the largest value allowed (default: E4M3's 448). A block holding
    NaN or Inf comes out all NaN, as in the OCP quantizer.
    """
    _check_input(x)
    block_size = _check_block_size(block_size)
    axis = _normalise_axis(axis, x.dim())
    cdt = compute_dtype(x.dtype)
    if exp_bits is None or man_bits is None:
        raise DMXError("exp_bits and man_bits are required")
    e = _as_bits(exp_bits, cdt, x.device, "exp_bits", 1.0)
    m = _as_bits(man_bits, cdt, x.device, "man_bits", 0.0)
    cap = DEFAULT_MAX_CAP if max_cap is None else float(max_cap)
    if not cap > 0:
        raise DMXError(f"max_cap must be positive, got {max_cap!r}")

    bias = pow2(e - 1) - 1
    maxval = format_max(e, m, cap)
    emax = floor_log2(maxval.detach())

    xb, k = to_blocks(x.to(cdt), axis, block_size)
    amax = xb.detach().abs().amax(dim=-1, keepdim=True)
    finite = torch.isfinite(amax)
    amax = torch.where(finite, amax, torch.zeros_like(amax))
    kexp = torch.where(amax == 0, E8M0.min_exp, floor_log2(amax) - emax)
    kexp = kexp.clamp(E8M0.min_exp, E8M0.max_exp)
    # power-of-two scale, straight-through: its gradient is that of amax / maxval
    z = -torch.log2(maxval)
    scale = pow2_int(kexp, cdt) * torch.exp2(z - z.detach())

    u = xb / scale  # exact (power-of-two divisor)
    a = u.abs()
    sub_exp = 1 - bias  # exponent of the smallest normal: the subnormal floor
    # binade from the exponent bits; zeros and FP32 subnormals read as the lowest binade,
    # below any format's subnormal floor, which the where() below then applies
    e_int = (exponent_field(a.detach()) - _LAYOUT[cdt][2]).to(cdt)
    binade = torch.where(e_int >= sub_exp.detach(), e_int, sub_exp)
    step = pow2(binade - m)
    q = step * round_ste(a / step)
    q = torch.where(q > maxval, maxval, q)  # saturate (a tie stays on the grid branch)
    y = torch.where(torch.signbit(u), -q, q) * scale  # -q keeps signed zeros
    return from_blocks(write_nan(y.to(x.dtype), ~finite), k, axis)
