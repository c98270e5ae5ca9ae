"""Bit packing of element codes into bytes (layouts in specs/layouts.md).

The MX spec prescribes no packing (spec §5.1; reference mx_spec.md §4.9), so this
module fixes the project's layouts, chosen to match what the ecosystem already reads:

* 8-bit formats (FP8, INT8): one code per byte (packing ``"byte"``).
* FP4: two codes per byte, element 2i in the LOW nibble (``"fp4-lo-first"``, as
  PyTorch ``float4_e2m1fn_x2``, torchao, gpt-oss, triton_kernels); an odd row gets a
  zero high nibble in its last byte.
* FP6: four codes per three bytes, little-endian 24-bit word
  ``a | b<<6 | c<<12 | d<<18`` (``"fp6-le24"``); rows are padded with zero codes to a
  multiple of 4.
* llama.cpp / GGUF MXFP4 blocks (GGML type 39): 17 bytes per 32 elements, the E8M0
  scale byte first, then byte j = element j (low nibble) | element j+16 (high nibble).

Packing works row-wise on the last axis (the blocked axis of an :class:`MXArray`), so
every row starts on a byte boundary. All functions are vectorised numpy. This module
sits below :mod:`mxref.core` (which packs in ``quantize_packed`` and holds
:class:`mxref.PackedMXArray`) and never imports it.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from mxref.codes import check_codes
from mxref.errors import MXError
from mxref.formats import FormatInfo, get_format

LLAMACPP_BLOCK = 32                    # QK_MXFP4 in ggml-common.h
LLAMACPP_BLOCK_BYTES = 1 + LLAMACPP_BLOCK // 2


def packing_name(fmt) -> str:
    """The layout's name as recorded in manifests: fp4-lo-first, fp6-le24 or byte."""
    fmt = get_format(fmt)
    return {4: "fp4-lo-first", 6: "fp6-le24", 8: "byte"}[_checked_bits(fmt)]


def _checked_bits(fmt: FormatInfo) -> int:
    if fmt.bits not in (4, 6, 8):
        raise MXError(f"no packing layout for {fmt.bits}-bit format {fmt.key}")
    return fmt.bits


def _check_k(K) -> int:
    if int(K) != K or int(K) < 0:
        raise MXError(f"row length K must be a non-negative integer, got {K}")
    return int(K)


def packed_row_bytes(K: int, fmt) -> int:
    """Bytes one packed row of ``K`` codes takes (rows are padded, never shared)."""
    return row_bytes(_check_k(K), _checked_bits(get_format(fmt)))


def row_bytes(K: int, bits: int) -> int:
    """:func:`packed_row_bytes` for a checked K and element width."""
    if bits == 4:
        return (K + 1) // 2
    if bits == 6:
        return 3 * ((K + 3) // 4)
    return K


def _as_codes(codes, fmt: FormatInfo) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim == 0:
        raise MXError("codes must have at least one dimension (rows are packed along the last)")
    return check_codes(codes, fmt)


@nb.njit(nogil=True, cache=True)
def pack_row(codes_row, out_row, bits):
    """Pack one row of codes into out_row (the layouts of the module docstring)."""
    K = codes_row.size
    if bits == 4:
        for j in range(K // 2):
            out_row[j] = codes_row[2 * j] | (codes_row[2 * j + 1] << 4)
        if K % 2 == 1:
            out_row[K // 2] = codes_row[K - 1]
    elif bits == 6:
        for j in range(K // 4):
            w = (np.uint32(codes_row[4 * j]) | (np.uint32(codes_row[4 * j + 1]) << 6)
                 | (np.uint32(codes_row[4 * j + 2]) << 12)
                 | (np.uint32(codes_row[4 * j + 3]) << 18))
            out_row[3 * j] = w & 0xFF
            out_row[3 * j + 1] = (w >> 8) & 0xFF
            out_row[3 * j + 2] = w >> 16
        rest = K % 4
        if rest:
            w = np.uint32(0)
            for t in range(rest):
                w |= np.uint32(codes_row[K - rest + t]) << (6 * t)
            j = K // 4
            out_row[3 * j] = w & 0xFF
            out_row[3 * j + 1] = (w >> 8) & 0xFF
            out_row[3 * j + 2] = w >> 16
    else:
        for j in range(K):
            out_row[j] = codes_row[j]


@nb.njit(parallel=True, nogil=True, cache=True)
def _pack_rows_kernel(codes, out, bits):
    for r in nb.prange(codes.shape[0]):
        pack_row(codes[r], out[r], bits)


def pack_codes(codes, fmt) -> np.ndarray:
    """uint8 ``[..., K]`` element codes -> uint8 ``[..., packed_row_bytes(K, fmt)]``."""
    fmt = get_format(fmt)
    return pack_checked(_as_codes(codes, fmt), _checked_bits(fmt))


def pack_checked(codes: np.ndarray, bits: int) -> np.ndarray:
    """:func:`pack_codes` of codes already checked (C-contiguous uint8, at least 1-d)."""
    if bits == 8:
        return codes.copy()
    K = codes.shape[-1]
    out = np.empty(codes.shape[:-1] + (row_bytes(K, bits),), dtype=np.uint8)
    if codes.size:
        _pack_rows_kernel(codes.reshape(-1, K), out.reshape(-1, out.shape[-1]), bits)
    return out


def _as_bytes(packed, what: str) -> np.ndarray:
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise MXError(f"{what} must be uint8, got {packed.dtype}")
    if packed.ndim == 0:
        raise MXError(f"{what} must have at least one dimension")
    return np.ascontiguousarray(packed)


def unpack_codes(packed, fmt, K: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 ``[..., packed_row_bytes(K)]`` -> codes ``[..., K]``.

    Padding (the high nibble after an odd FP4 row, zero codes after an FP6 row) is
    dropped without being checked.
    """
    fmt = get_format(fmt)
    K = _check_k(K)
    nbytes = packed_row_bytes(K, fmt)
    packed = _as_bytes(packed, "packed codes")
    if packed.shape[-1] != nbytes:
        raise MXError(f"packed rows have {packed.shape[-1]} bytes but {K} {fmt.key} codes "
                      f"pack into {nbytes}; pass the row length K the data was packed with")
    bits = fmt.bits
    if bits == 8:
        return packed.copy()
    lead = packed.shape[:-1]
    if bits == 4:
        out = np.empty(lead + (2 * nbytes,), dtype=np.uint8)
        out[..., 0::2] = packed & 0x0F
        out[..., 1::2] = packed >> 4
        return np.ascontiguousarray(out[..., :K])
    b = packed.reshape(lead + (nbytes // 3, 3)).astype(np.uint32)
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    out = np.empty(lead + (w.shape[-1], 4), dtype=np.uint8)
    for j in range(4):
        out[..., j] = (w >> (6 * j)) & 0x3F
    return np.ascontiguousarray(out.reshape(lead + (4 * w.shape[-1],))[..., :K])


# --------------------------------------------------------------------------- llama.cpp
def _check_llamacpp_k(K: int) -> int:
    K = _check_k(K)
    if K % LLAMACPP_BLOCK:
        raise MXError(f"llama.cpp MXFP4 needs rows that are a multiple of {LLAMACPP_BLOCK} "
                      f"elements, got K={K}; pad the row or use pack_codes")
    return K


def pack_llamacpp_mxfp4(codes, scales) -> np.ndarray:
    """FP4 codes ``[..., K]`` + E8M0 scales ``[..., K/32]`` -> ``[..., (K/32)*17]`` GGUF bytes.

    Each 17-byte block is ``block_mxfp4`` of ggml-common.h: the scale byte, then 16
    bytes where byte j holds element j (low nibble) and element j+16 (high nibble).
    """
    fmt = get_format("fp4_e2m1")
    codes = _as_codes(codes, fmt)
    K = _check_llamacpp_k(codes.shape[-1])
    nb = K // LLAMACPP_BLOCK
    scales = _as_bytes(scales, "scales")
    if scales.shape != codes.shape[:-1] + (nb,):
        raise MXError(f"scales shape {scales.shape} does not match codes {codes.shape}: "
                      f"expected {codes.shape[:-1] + (nb,)} (one scale per 32 elements)")
    lead = codes.shape[:-1]
    c = codes.reshape(lead + (nb, LLAMACPP_BLOCK))
    half = LLAMACPP_BLOCK // 2
    out = np.empty(lead + (nb, LLAMACPP_BLOCK_BYTES), dtype=np.uint8)
    out[..., 0] = scales
    out[..., 1:] = c[..., :half] | (c[..., half:] << 4)
    return out.reshape(lead + (nb * LLAMACPP_BLOCK_BYTES,))


def unpack_llamacpp_mxfp4(blocks, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_llamacpp_mxfp4`: -> (codes ``[..., K]``, scales ``[..., K/32]``)."""
    K = _check_llamacpp_k(K)
    nb = K // LLAMACPP_BLOCK
    blocks = _as_bytes(blocks, "llama.cpp MXFP4 blocks")
    if blocks.shape[-1] != nb * LLAMACPP_BLOCK_BYTES:
        raise MXError(f"llama.cpp MXFP4 rows have {blocks.shape[-1]} bytes but K={K} needs "
                      f"{nb * LLAMACPP_BLOCK_BYTES} ({nb} blocks of {LLAMACPP_BLOCK_BYTES})")
    lead = blocks.shape[:-1]
    b = blocks.reshape(lead + (nb, LLAMACPP_BLOCK_BYTES))
    half = LLAMACPP_BLOCK // 2
    codes = np.empty(lead + (nb, LLAMACPP_BLOCK), dtype=np.uint8)
    codes[..., :half] = b[..., 1:] & 0x0F
    codes[..., half:] = b[..., 1:] >> 4
    return codes.reshape(lead + (K,)), np.ascontiguousarray(b[..., 0])
