"""Checking arrays of element codes against their format (the floor under core and pack)."""
from __future__ import annotations

import numpy as np

from mxref.errors import MXError
from mxref.formats import FormatInfo


def check_codes(codes, fmt: FormatInfo, what: str = "element code") -> np.ndarray:
    """``codes`` as a C-contiguous uint8 array, or MXError if any is not a code of ``fmt``."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        if not np.issubdtype(codes.dtype, np.integer):
            raise MXError(f"{what}s must be integers, got {codes.dtype}")
        if codes.size and (codes.min() < 0 or codes.max() >= fmt.n_codes):
            raise MXError(f"{what} out of range for {fmt.key}: valid codes are "
                          f"0..{fmt.n_codes - 1:#x}")
        codes = codes.astype(np.uint8)
    elif fmt.bits < 8 and codes.size and codes.max() >= fmt.n_codes:
        bad = int(codes.max())
        raise MXError(f"{what} {bad:#x} out of range for {fmt.key}: valid codes are "
                      f"0..{fmt.n_codes - 1:#x}")
    return np.ascontiguousarray(codes)
