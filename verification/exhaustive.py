"""All 2^32 float32 inputs through element conversion at unit scale, checked against a
second model that shares no code with mxref's kernels (the slowfloat pattern).

The second model is plain vectorised numpy on float64: for |x| it takes the binade
from ``np.frexp``, clamps it to the element's subnormal binade, forms the two
candidate grid points below and above (exact: power-of-two scaling of a float32
value), compares the distances, breaks ties by the profile's rule (even code, or
away from zero), then applies overflow, signed zero, NaN and Inf rules. Only the
format's bit-layout constants come from :mod:`mxref.formats`.
"""
from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

import mxref
from mxref.errors import MXError
from mxref.formats import FLOAT32


def second_model_encode(x32: np.ndarray, fmt, profile) -> np.ndarray:
    """Element codes of float32 ``x32`` at unit scale, by candidate distances in float64."""
    f, p = mxref.get_format(fmt), mxref.get_profile(profile)
    bits = x32.view(np.uint32)
    neg = (bits >> np.uint32(FLOAT32.sign_shift)).astype(bool)
    with np.errstate(invalid="ignore"):
        a = np.abs(x32.astype(np.float64))
    is_nan, is_inf = np.isnan(a), np.isinf(a)
    if p.flush_subnormals:
        a = np.where(a < 2.0 ** FLOAT32.emin, 0.0, a)
    a = np.where(is_nan | is_inf, 0.0, a)
    # anything from 2^(emax+2) up saturates; capping keeps the step count inside int64
    a = np.minimum(a, 2.0 ** (f.emax + 2))
    m = f.step_bits
    if f.is_int:
        e = np.zeros(a.shape, np.int64)               # fixed point: one "binade", step 2^-m
        quantum_exp = -m * np.ones_like(e)
    else:
        _, e = np.frexp(a)                             # a = mant * 2^e, mant in [0.5, 1)
        e = np.maximum(e.astype(np.int64) - 1, f.emin)  # binade exponent, clamped to subnormals
        e = np.where(a == 0, f.emin, e)                 # frexp(0) has exponent 0, not -inf
        e = np.minimum(e, f.emax + 1)                  # far beyond max: saturates anyway
        quantum_exp = e - m
    q = np.ldexp(a, -quantum_exp)                      # exact: a / 2^quantum_exp
    lo = np.floor(q)
    d_lo, d_hi = q - lo, (lo + 1) - q
    if p.rounding == "rne":
        tie_up = (lo % 2) == 1
    else:
        tie_up = np.ones(lo.shape, bool)
    up = (d_hi < d_lo) | ((d_hi == d_lo) & tie_up)
    n = (lo + up).astype(np.int64)                     # grid steps above the binade start
    if f.is_int:
        mag = n
        lim = np.where(neg & (p.int8_range == "asymmetric"), f.max_code + 1, f.max_code)
        mag = np.minimum(mag, lim)
        mag = np.where(is_inf, lim, mag)
        mag = np.where(is_nan, 0, mag)
        code = np.where(neg & (mag > 0), (f.n_codes - mag) % f.n_codes, mag)
        return code.astype(np.uint8)
    # code magnitude: (binade index << m) + steps; a carry into the next binade works out
    # code magnitude = (binade index << m) + steps; a carry into the next binade works out
    mag = ((e - f.emin) << m) + n
    maxmag = f.max_code & (f.sign_bit - 1)
    over = mag > maxmag
    ovf = p.fp8_overflow == "ovf" and f.bits == 8
    special = (f.inf_codes[0] if f.inf_codes else f.nan_codes[0]) if ovf else maxmag
    mag = np.where(over, special, mag)
    mag = np.where(is_inf, special, mag)
    sign = neg.astype(np.int64) << (f.bits - 1)
    code = sign | mag
    if f.nan_codes:
        code = np.where(is_nan, sign | f.nan_codes[0], code)
    else:
        code = np.where(is_nan, 0, code)
    return code.astype(np.uint8)


def run(fmt, profile="ocp", limit: int | None = None, start: int = 0,
        chunk: int = 1 << 22, progress: bool = True) -> dict:
    """Compare mxref.encode with the second model over float32 patterns [start, start+limit)."""
    f, p = mxref.get_format(fmt), mxref.get_profile(profile)
    total = (1 << 32) - start if limit is None else int(limit)
    if start < 0 or total <= 0 or start + total > (1 << 32):
        raise MXError(f"--start {start} --limit {limit}: the range must lie inside [0, 2^32)")
    if chunk <= 0:
        raise MXError("--chunk must be positive")
    mismatches, first = 0, []
    t0 = time.perf_counter()
    with tqdm(total=total, unit="val", unit_scale=True, disable=not progress,
              desc=f"{f.key} {p.name}") as bar:
        pos = start
        while pos < start + total:
            n = min(chunk, start + total - pos)
            x = np.arange(pos, pos + n, dtype=np.uint64).astype(np.uint32).view(np.float32)
            got = mxref.encode(x, f, p)
            ref = second_model_encode(x, f, p)
            bad = np.nonzero(got != ref)[0]
            mismatches += len(bad)
            for i in bad[:max(0, 10 - len(first))].tolist():
                first.append({"input": "%08X" % (pos + i), "mxref": "%02X" % got[i],
                              "second_model": "%02X" % ref[i]})
            pos += n
            bar.update(n)
    secs = time.perf_counter() - t0
    return {"format": f.key, "profile": p.to_dict(), "start": start, "count": total,
            "mismatches": mismatches, "first_mismatches": first, "seconds": round(secs, 3),
            "throughput_per_s": total / secs if secs else None,
            "full_2_32": start == 0 and total == 1 << 32}


def format_result(r: dict) -> str:
    lines = [f"  {m['input']}: mxref {m['mxref']} second model {m['second_model']}"
             for m in r["first_mismatches"]]
    verdict = "no mismatches" if r["mismatches"] == 0 else f"{r['mismatches']} MISMATCHES"
    lines.append(f"{r['format']} profile {r['profile']['name']}: {r['count']} float32 inputs "
                 f"from {r['start']:#x}: {verdict} ({r['seconds']:.1f} s, "
                 f"{r['throughput_per_s'] / 1e6:.1f} M inputs/s)")
    return "\n".join(lines)
