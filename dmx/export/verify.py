"""Round-trip checks: what a target's own reader decodes vs mxref's decode of OUT.

Bit-exact means equal float32 bit patterns. The one documented exception is the
sign of zero for GGUF: ggml's MXFP4 code table has no -0 (``kvalues_mxfp4`` maps
code 8 to +0), so those elements are counted separately, never hidden.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LayerCheck:
    name: str
    stored_as: str          # what the target file holds, e.g. "MXFP4", "Q8_0", "mxfp8-quantized"
    exact: bool             # float32 bit patterns equal (modulo zero sign where allowed)
    mismatches: int         # elements whose bits differ (after the allowed zero-sign rule)
    neg_zero_as_pos: int    # -0 read back as +0 (GGUF only)
    max_abs_err: float      # max |read back - mxref| (0 when exact)
    bytes_equal: bool | None = None   # element codes and scale bytes in the file == OUT's


def compare(name: str, stored_as: str, ref: np.ndarray, got: np.ndarray,
            zero_sign_free: bool = False, bytes_equal: bool | None = None) -> LayerCheck:
    """Compare decoded weights bit for bit (NaN == NaN only if both have the same bits)."""
    ref = np.ascontiguousarray(ref, dtype=np.float32)
    got = np.ascontiguousarray(got, dtype=np.float32)
    if ref.shape != got.shape:
        return LayerCheck(name, stored_as, False, ref.size, 0, float("inf"), bytes_equal)
    differ = ref.view(np.uint32) != got.view(np.uint32)
    neg_zero = differ & (ref == 0) & (got == 0) & np.signbit(ref) & ~np.signbit(got)
    if zero_sign_free:
        differ &= ~neg_zero
    with np.errstate(invalid="ignore"):
        err = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    max_err = float(np.nanmax(err)) if err.size and not np.all(np.isnan(err)) else 0.0
    n = int(differ.sum())
    return LayerCheck(name, stored_as, n == 0, n, int(neg_zero.sum()) if zero_sign_free else 0,
                      max_err, bytes_equal)


def summary_table(target: str, checks: list[LayerCheck]) -> str:
    """Per-target summary: one row per stored kind, then the worst error, as plain text."""
    rows = {}
    for c in checks:
        r = rows.setdefault(c.stored_as, {"layers": 0, "exact": 0, "bytes": None, "err": 0.0,
                                         "nz": 0})
        r["layers"] += 1
        r["exact"] += c.exact
        if c.bytes_equal is not None:   # None: re-quantized (Q8_0), no OUT bytes to compare
            r["bytes"] = (r["bytes"] or 0) + c.bytes_equal
        r["err"] = max(r["err"], c.max_abs_err)
        r["nz"] += c.neg_zero_as_pos
    lines = [f"export check ({target}): {len(checks)} quantized layers read back with the "
             f"target's reader",
             f"  {'stored as':<22} {'layers':>6} {'bit-exact':>9} {'bytes==OUT':>10} "
             f"{'max |err|':>11} {'-0 read as +0':>13}"]
    for kind, r in sorted(rows.items()):
        nbytes = "-" if r["bytes"] is None else r["bytes"]
        lines.append(f"  {kind:<22} {r['layers']:>6} {r['exact']:>9} {nbytes:>10} "
                     f"{r['err']:>11.3g} {r['nz']:>13}")
    return "\n".join(lines)


def failures(checks: list[LayerCheck], lossy_kinds=()) -> list[LayerCheck]:
    """Layers that should be exact but are not (lossy kinds such as Q8_0 report an error instead)."""
    return [c for c in checks if c.stored_as not in lossy_kinds
            and (not c.exact or c.bytes_equal is False)]
