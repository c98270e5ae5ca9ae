"""Saving and loading an :class:`MXArray` as ``.npz`` (layout in specs/layouts.md §5).

Keys: ``codes`` uint8 [..., K] (blocked axis last), ``scales`` uint8 [..., ceil(K/bs)],
``shape`` int64 [ndim] (original shape), ``axis`` int64 (blocked axis of the original
shape), ``block_size`` int64, ``format`` str (format key), ``profile`` str (JSON of
``Profile.to_dict()``, hash included), ``mxref_version`` str.

Writes go through :func:`mxref.outputs.atomic_write` (temporary file, rename that never
replaces another process's file; ``force`` replaces only an mxref .npz).
"""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from mxref.core import MXArray
from mxref.errors import MXError
from mxref.formats import get_format
from mxref.profiles import Profile

REQUIRED_KEYS = ("codes", "scales", "shape", "axis", "block_size", "format", "profile")


def npz_arrays(mx: MXArray) -> dict:
    """The arrays of the .npz layout of ``mx`` (for ``numpy.savez``)."""
    from mxref.version import __version__
    return dict(codes=np.ascontiguousarray(mx.codes, np.uint8),
                scales=np.ascontiguousarray(mx.scales, np.uint8),
                shape=np.array(mx.shape, dtype=np.int64).reshape(-1),
                axis=np.int64(mx.axis), block_size=np.int64(mx.block_size),
                format=np.str_(mx.fmt.key),
                profile=np.str_(json.dumps(mx.profile.to_dict(), sort_keys=True)),
                mxref_version=np.str_(__version__))


def save_npz(path: str, mx: MXArray, force: bool = False) -> None:
    """Write ``mx`` to ``path`` atomically; ``force`` replaces only an mxref .npz."""
    from mxref.outputs import atomic_write, is_mxref_npz
    arrays = npz_arrays(mx)
    atomic_write(path, lambda f: np.savez(f, **arrays), force=force, marker=is_mxref_npz,
                 what="path", tool="mxref")


def _scalar_int(z, key: str) -> int:
    v = z[key]
    if v.shape != () or not np.issubdtype(v.dtype, np.integer):
        raise MXError(f"npz key {key!r} must be an integer scalar, got {v.dtype} {v.shape}")
    return int(v)


def _scalar_str(z, key: str) -> str:
    v = z[key]
    if v.shape != () or v.dtype.kind != "U":
        raise MXError(f"npz key {key!r} must be a string, got {v.dtype} {v.shape}")
    return str(v)


def numpy_source(path: str):
    """What ``np.load`` can read from ``path``: the path itself for a regular file, the
    bytes read now for a pipe or a device (``... | mxref dequantize /dev/stdin``), since
    numpy seeks in what it loads."""
    import io
    import stat
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return path   # np.load words the OSError
    if regular:
        return path
    with open(path, "rb") as f:
        return io.BytesIO(f.read())


def read_npz(path: str, what: str = ".npz file") -> dict:
    """Every array of an .npz, read now (numpy reads lazily: a corrupted member would fail
    later with a zipfile/zlib traceback); any damage is one MXError naming the file."""
    import zlib
    if not os.path.exists(path):
        raise MXError(f"{path} does not exist")
    try:
        z = np.load(numpy_source(path), allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise MXError(f"{path} holds a single array, not an {what}")
        with z:
            return {k: z[k] for k in z.files}
    except MXError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise MXError(f"{path} is not a readable {what} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120] if str(e) else 'damaged'}); the file "
                      f"is truncated or corrupted, write it again") from None


def load_npz(path: str) -> MXArray:
    """Read and validate an MXArray ``.npz``; every problem is a one-line MXError."""
    z = read_npz(path, "mxref .npz")
    missing = [k for k in REQUIRED_KEYS if k not in z]
    if missing:
        raise MXError(f"{path} lacks key(s) {', '.join(missing)}; make it with "
                      f"`mxref quantize`")
    codes, scales, shape = z["codes"], z["scales"], z["shape"]
    for key, arr in (("codes", codes), ("scales", scales)):
        if arr.dtype != np.uint8:
            raise MXError(f"npz key {key!r} must be uint8, got {arr.dtype}")
    if shape.ndim != 1 or not np.issubdtype(shape.dtype, np.integer):
        raise MXError(f"npz key 'shape' must be a 1-D integer array, got {shape.dtype} "
                      f"{shape.shape}")
    axis, block = _scalar_int(z, "axis"), _scalar_int(z, "block_size")
    fmt = get_format(_scalar_str(z, "format"))
    try:
        profile_dict = json.loads(_scalar_str(z, "profile"))
    except json.JSONDecodeError as e:
        raise MXError(f"npz key 'profile' is not valid JSON ({e})") from None
    if not isinstance(profile_dict, dict):
        raise MXError("npz key 'profile' must be a JSON object")
    profile = Profile.from_dict(profile_dict)   # checks the recorded hash
    shape = tuple(int(s) for s in shape)
    if block <= 0:
        raise MXError(f"block_size must be positive, got {block}")
    if not 0 <= axis < max(len(shape), 1) or len(shape) == 0:
        raise MXError(f"axis {axis} does not exist in shape {shape}")
    expect_codes = shape[:axis] + shape[axis + 1:] + (shape[axis],)
    if codes.shape != expect_codes:
        raise MXError(f"codes shape {codes.shape} does not match shape {shape} blocked along "
                      f"axis {axis} (expected {expect_codes})")
    nbk = -(-shape[axis] // block)
    if scales.shape != expect_codes[:-1] + (nbk,):
        raise MXError(f"scales shape {scales.shape} does not match codes {codes.shape} with "
                      f"block size {block} (expected {expect_codes[:-1] + (nbk,)})")
    if fmt.bits < 8 and codes.size and int(codes.max()) >= fmt.n_codes:
        raise MXError(f"codes hold {int(codes.max()):#x}, out of range for {fmt.key}")
    return MXArray(codes, scales, fmt, shape, axis, block, profile)
