"""The public golden-model operations: element encode/decode, block quantize/dequantize.

Conventions (normative text in specs/semantics.md):
* ``quantize(x, fmt, axis=-1)`` blocks ``x`` along ``axis`` in runs of ``block_size``
  elements; the last block of a row may be shorter (ragged) and is scaled as if it
  were padded with zeros. Nothing is padded in the output.
* :class:`MXArray` holds ``codes`` with the blocked axis moved last (shape
  ``[..., K]``) and ``scales`` with shape ``[..., ceil(K / block_size)]``; ``shape``
  and ``axis`` record the original layout, so ``dequantize`` restores it exactly.
  :class:`PackedMXArray` is the same with the codes packed (:mod:`mxref.pack`).

Layering: this module imports :mod:`mxref.pack` and :mod:`mxref.codes`, never the reverse.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" dtype name, as mxref always has)
import numpy as np

from mxref import kernels as K
from mxref import kernels_f32 as F
from mxref.codes import check_codes
from mxref.errors import MXError
from mxref.formats import (DEFAULT_BLOCK_SIZE, E8M0, FLOAT32, IEEE_LAYOUTS, FormatInfo,
                           get_format, ieee_layout)
from mxref.pack import _checked_bits, pack_checked, packing_name, row_bytes, unpack_codes
from mxref.profiles import Profile, get_profile

__all__ = ["MXArray", "PackedMXArray", "check_codes", "decode", "dequantize", "encode",
           "quantize", "quantize_dequantize", "quantize_packed", "scale_values"]

def input_bits(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bit patterns of a float array (no copy when contiguous) and its layout."""
    x = np.asarray(x)
    lay = ieee_layout(x.dtype)
    if not x.dtype.isnative:
        # a big-endian array ('>f4', e.g. np.save on another machine or np.load of one)
        # has the same dtype name; viewed as native uints its bits come out byte-swapped,
        # so every value was silently quantized as a different number. Swap to native.
        x = x.astype(x.dtype.newbyteorder("="))
    x = np.ascontiguousarray(x)
    return x.view(lay.uint), np.array(lay.kernel_layout, dtype=np.int64)


def _profile_args(profile: Profile) -> np.ndarray:
    return np.array(profile.kernel_args(), dtype=np.int64)


def _element_args(fmt: FormatInfo) -> np.ndarray:
    return K.element_params(fmt)


# --------------------------------------------------------------------------- elements
def encode(x, fmt, profile=None, scale_exp: int = 0) -> np.ndarray:
    """Element codes (uint8) of ``x / 2^scale_exp`` in ``fmt``: element-only conversion.

    Rounding, overflow and FP32-subnormal handling follow the profile. Inf saturates
    (or overflows in FP8 OVF mode); NaN becomes the format's NaN code, or +0 for
    formats without one (FP4, FP6, INT8). Inside MX blocks NaN/Inf never reach
    here: the whole block gets the NaN scale instead.
    """
    fmt, profile = get_format(fmt), get_profile(profile)
    raw, lay = input_bits(x)
    out = np.empty(raw.shape, dtype=np.uint8)
    s = int(scale_exp)
    ep, pp = _element_args(fmt), _profile_args(profile)
    bits32 = as_float32_bits(raw, np.asarray(x).dtype.name, profile)
    if bits32 is not None and F.min_fast_scale(fmt, profile) <= s <= F.FAST_MAX_SCALE:
        F.encode_flat(bits32.reshape(-1), out.reshape(-1), s, fmt, profile)
    else:
        K.encode_elements_kernel(raw.reshape(-1), out.reshape(-1), s, lay, ep, pp)
    return out


def decode(codes, fmt, dtype=np.float32) -> np.ndarray:
    """Values of element codes (NaN codes -> NaN); exact in float32 for every format."""
    fmt = get_format(fmt)
    codes = check_codes(codes, fmt)
    out = np.empty(codes.shape, dtype=dtype)
    K.decode_kernel(codes.reshape(-1), fmt.decode_table.astype(dtype), out.reshape(-1))
    return out


def scale_values(codes, dtype=np.float32) -> np.ndarray:
    """Values of E8M0 scale codes: 2^(code-127), NaN for 0xFF (0x00 is the subnormal 2^-127)."""
    return _scale_table(dtype)[np.asarray(codes, dtype=np.uint8)]


@lru_cache(maxsize=None)
def _scale_table(dtype=np.float64) -> np.ndarray:
    t = np.ldexp(1.0, np.arange(E8M0.n_codes) - E8M0.bias).astype(np.float64)
    t[E8M0.nan_code] = np.nan
    with np.errstate(over="ignore"):   # only the NaN entry would overflow float32
        t = t.astype(dtype)
    t.flags.writeable = False
    return t


@lru_cache(maxsize=None)
def _decode_table(fmt: FormatInfo, dtype) -> np.ndarray:
    t = fmt.decode_table.astype(dtype)  # exact: every element value fits float32
    t.flags.writeable = False
    return t


# --------------------------------------------------------------------------- blocks
class _Blocked:
    """What :class:`MXArray` and :class:`PackedMXArray` share beyond their first field
    (``codes`` / ``packed``): the scales and the block layout, and equality on all of it."""

    _payload: str   # name of the first field

    @property
    def n_blocks(self) -> int:
        return int(self.scales.size)

    @property
    def row_length(self) -> int:
        """K: elements per row along the blocked axis."""
        return int(self.shape[self.axis])

    def block_layout(self) -> tuple:
        """(fmt, shape, axis, block_size, profile): how the array was made."""
        return (self.fmt, self.shape, self.axis, self.block_size, self.profile)

    def __eq__(self, other):
        return (type(other) is type(self) and self.block_layout() == other.block_layout()
                and np.array_equal(getattr(self, self._payload), getattr(other, self._payload))
                and np.array_equal(self.scales, other.scales))


@dataclass(frozen=True, eq=False)
class MXArray(_Blocked):
    """An MX-quantized tensor: element codes, E8M0 scale codes, and how they were made."""

    codes: np.ndarray      # uint8 [..., K]   blocked axis last
    scales: np.ndarray     # uint8 [..., ceil(K / block_size)]
    fmt: FormatInfo
    shape: tuple           # original shape
    axis: int              # blocked axis in the original shape (non-negative)
    block_size: int
    profile: Profile
    _payload = "codes"

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        return dequantize(self, dtype)


@dataclass(frozen=True, eq=False)
class PackedMXArray(_Blocked):
    """An MXArray whose codes are packed: what :func:`quantize_packed` returns."""

    packed: np.ndarray     # uint8 [..., packed_row_bytes(K)]  blocked axis last
    scales: np.ndarray     # uint8 [..., ceil(K / block_size)]
    fmt: FormatInfo
    shape: tuple           # original shape
    axis: int              # blocked axis in the original shape (non-negative)
    block_size: int
    profile: Profile
    _payload = "packed"

    @property
    def packing(self) -> str:
        return packing_name(self.fmt)

    def unpack(self) -> MXArray:
        """The equivalent :class:`MXArray` (codes unpacked)."""
        return MXArray(unpack_codes(self.packed, self.fmt, self.row_length), self.scales,
                       *self.block_layout())


def _normalise_axis(axis: int, ndim: int) -> int:
    if ndim == 0:
        raise MXError("cannot block-quantize a 0-d array; reshape it to at least 1-d")
    if not -ndim <= int(axis) < ndim:
        raise MXError(f"axis {axis} does not exist for an array with {ndim} dimensions")
    return int(axis) % ndim


_MAX_BLOCK_SIZE = 2 ** 63 - 1   # int64, as the kernels and the .npz store it


def _check_block_size(block_size) -> int:
    if int(block_size) != block_size or int(block_size) <= 0:
        raise MXError(f"block size must be a positive integer, got {block_size}")
    if int(block_size) > _MAX_BLOCK_SIZE:
        # the kernels and the .npz hold it as int64: a larger one was a numba typing
        # traceback (float32) or a wrong "code out of range" error (float64)
        raise MXError(f"block size {block_size} is larger than 2^63-1; to get one block "
                      f"per row, pass the row length")
    return int(block_size)


def as_float32_bits(raw: np.ndarray, dtype_name: str, profile: Profile):
    """float32 bit patterns with the same values and the same profile semantics, or None.

    bfloat16 widens exactly by a 16-bit shift (its subnormals are FP32 subnormals);
    float16 widens exactly too, but its subnormals are FP32-normal, so only when the
    profile does not flush input subnormals. float64 cannot be narrowed exactly.
    """
    if dtype_name == "float32":
        return raw
    if dtype_name == "bfloat16":
        # bfloat16 is float32's top half: same sign, exponent field and bias
        return raw.astype(FLOAT32.uint) << FLOAT32.uint(FLOAT32.bits - IEEE_LAYOUTS["bfloat16"].bits)
    if dtype_name == "float16" and not profile.flush_subnormals:
        return raw.view(np.float16).astype(np.float32).view(FLOAT32.uint)
    return None


def _blocked_rows(x, fmt, axis, block_size, profile):
    """Checked arguments and the input as (N, K) raw bits, blocked axis last."""
    fmt, profile = get_format(fmt), get_profile(profile)
    x = np.asarray(x)
    block_size = _check_block_size(block_size)
    axis = _normalise_axis(axis, x.ndim)
    moved = np.moveaxis(x, axis, -1)
    raw, lay = input_bits(moved)
    kdim = raw.shape[-1]
    raw2 = raw.reshape(-1, kdim) if kdim else raw.reshape(0, 0)
    bits32 = as_float32_bits(raw2, x.dtype.name, profile)
    return fmt, profile, x, axis, block_size, moved.shape, raw2, lay, bits32


def _split_rows(raw2, block_size, align=4):
    """Few long rows -> more, shorter rows of whole blocks, so every core gets work.

    Only when the row is a whole number of blocks and each block a whole number of
    packing groups (4 codes), so codes, scales and packed bytes are unchanged.
    """
    N, kdim = raw2.shape
    nbk = kdim // block_size if block_size else 0
    if N >= 64 or kdim % block_size or block_size % align or nbk < 2:
        return raw2, 1
    g = 1
    for cand in range(min(nbk, max(1, 64 // max(N, 1))), 1, -1):
        if nbk % cand == 0:
            g = cand
            break
    return raw2.reshape(N * g, kdim // g), g


def quantize(x, fmt, axis: int = -1, block_size: int = DEFAULT_BLOCK_SIZE,
             profile=None) -> MXArray:
    """MX-quantize ``x`` along ``axis`` (OCP MX v1.0 §6.3 with the profile's choices)."""
    return _quantize_rows(*_blocked_rows(x, fmt, axis, block_size, profile))


def _quantize_rows(fmt, profile, x, axis, block_size, mshape, raw2, lay, bits32) -> MXArray:
    """:func:`quantize` of checked arguments (what :func:`_blocked_rows` returns)."""
    nbk = -(-raw2.shape[1] // block_size)
    codes = np.empty(raw2.shape, dtype=np.uint8)
    scales = np.empty((raw2.shape[0], nbk), dtype=np.uint8)
    if raw2.size:
        ep, pp = _element_args(fmt), _profile_args(profile)
        if bits32 is not None:
            r, g = _split_rows(bits32, block_size)
            F.quantize_rows(r, codes.reshape(r.shape), scales.reshape(r.shape[0], -1),
                            block_size, fmt, profile, 8, ep, pp)
        else:
            K.quantize_kernel(raw2, codes, scales, block_size, lay, ep, pp)
    return MXArray(codes.reshape(mshape), scales.reshape(mshape[:-1] + (nbk,)),
                   fmt, tuple(x.shape), axis, block_size, profile)


def quantize_packed(x, fmt, axis: int = -1, block_size: int = DEFAULT_BLOCK_SIZE,
                    profile=None):
    """``quantize`` fused with ``pack_codes``: a :class:`PackedMXArray`.

    ``packed`` is ``pack_codes(quantize(x).codes)`` and ``scales`` equals
    ``quantize(x).scales`` bit for bit; float32 input never materialises the codes.
    """
    args = _blocked_rows(x, fmt, axis, block_size, profile)   # the format, resolved once
    fmt, profile, x, axis, block_size, mshape, raw2, lay, bits32 = args
    bits = _checked_bits(fmt)
    kdim = raw2.shape[1]
    nbk = -(-kdim // block_size)
    if bits32 is None or raw2.size == 0:
        mx = _quantize_rows(*args)
        return PackedMXArray(pack_checked(mx.codes, bits), mx.scales, *mx.block_layout())
    ep, pp = _element_args(fmt), _profile_args(profile)
    r, g = _split_rows(bits32, block_size)
    packed = np.empty((r.shape[0], row_bytes(r.shape[1], bits)), dtype=np.uint8)
    scales = np.empty((r.shape[0], nbk // g), dtype=np.uint8)
    F.quantize_rows(r, packed, scales, block_size, fmt, profile, fmt.bits, ep, pp)
    return PackedMXArray(packed.reshape(mshape[:-1] + (-1,)),
                         scales.reshape(mshape[:-1] + (nbk,)), fmt, tuple(x.shape), axis,
                         block_size, profile)


def dequantize(mx: MXArray, dtype=np.float32) -> np.ndarray:
    """Values of an :class:`MXArray` in the original shape: 2^(scale-127) * element.

    float32 output is exact except where |X * P| exceeds the float32 range (-> Inf,
    §5.1 leaves it implementation-defined); a NaN scale makes its whole block NaN.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise MXError(f"dequantize to float32 or float64, not {dtype}")
    codes = check_codes(mx.codes, mx.fmt)
    kdim = codes.shape[-1] if codes.ndim else 0
    nbk = -(-kdim // mx.block_size)
    if mx.scales.shape != codes.shape[:-1] + (nbk,):
        raise MXError(f"scales shape {mx.scales.shape} does not match codes {codes.shape} "
                      f"with block size {mx.block_size}")
    out = np.empty(codes.shape, dtype=dtype)
    if codes.size:
        K.dequantize_kernel(codes.reshape(-1, kdim),
                            np.ascontiguousarray(mx.scales, dtype=np.uint8).reshape(-1, nbk),
                            mx.block_size, _decode_table(mx.fmt, dtype), _scale_table(dtype),
                            out.reshape(-1, kdim))
    return np.moveaxis(out, -1, mx.axis)


def quantize_dequantize(x, fmt, axis=-1, block_size=DEFAULT_BLOCK_SIZE, profile=None,
                        dtype=np.float32) -> np.ndarray:
    """``dequantize(quantize(x))``: MX fake quantization."""
    return dequantize(quantize(x, fmt, axis, block_size, profile), dtype)
