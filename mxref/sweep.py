"""Exhaustive sweep of element encode: every float32 bit pattern, checked three ways.

All 2^32 float32 patterns go through :func:`mxref.encode` at unit scale (element-only
conversion) in VALUE order (-Inf ... -0, +0 ... +Inf, then the NaNs) and the codes are
decoded again. Checks (see specs/semantics.md §4):

* ``monotonic``: decoded values never decrease as the input increases (an overflow
  to NaN in the OFP8 OVF mode counts as +-Inf with the input's sign);
* ``nearest``: every result is a representable value nearest to the input: it is no
  further than half the gap to its neighbours, a tie goes where the profile's rounding
  says (RNE: the even code; away: the larger magnitude), beyond max normal it
  saturates (or overflows in OVF mode), the sign of zero is kept, FP32 subnormals
  count as zero under ``flush_subnormals``, and no code the profile forbids appears
  (-128 in symmetric INT8);
* ``nan``: NaN inputs give the format's NaN code (sign kept) or +0 when it has none;
* ``round_trip``: ``encode(decode(c)) == c`` for every code the sweep produced (a NaN
  code only has to come back as a NaN code: decoding drops its sign).

The checks use value tables built from ``FormatInfo.decode_table`` only, so they are
independent of the integer rounding in mxref.kernels.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numba as nb
import numpy as np
from tqdm import tqdm

from mxref.core import decode, encode
from mxref.errors import MXError
from mxref.formats import FLOAT32, FormatInfo, get_format
from mxref.profiles import Profile, get_profile

CHECKS = ("monotonic", "nearest", "nan", "round_trip")
MAX_CHUNK = 1 << 28   # patterns per step: ~4 GiB of buffers
_POS_ZERO, _POS_INF = 0, FLOAT32.inf_bits          # float32 patterns
_NEG_INF = FLOAT32.sign_mask | _POS_INF
_SIGN_SHIFT = FLOAT32.sign_shift
_NB = dict(nogil=True, cache=True)


@dataclass
class SweepResult:
    fmt: str
    profile: str
    n_inputs: int = 0
    seconds: float = 0.0
    codes_hit: list = field(default_factory=list)
    violations: dict = field(default_factory=lambda: {c: 0 for c in CHECKS})
    first_violation: dict = field(default_factory=dict)  # check -> (input bits, code)

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())

    @property
    def rate(self) -> float:
        return self.n_inputs / self.seconds if self.seconds else math.inf

    def summary(self) -> str:
        lines = [f"{self.fmt} / profile {self.profile}: {self.n_inputs:,} float32 inputs, "
                 f"{len(self.codes_hit)} distinct codes"]
        for c in CHECKS:
            bad = self.violations[c]
            extra = ""
            if bad:
                bits, code = self.first_violation[c]
                extra = f"  first: input 0x{bits:08x} -> code 0x{code:02x}"
            lines.append(f"  {c:<11} {'FAIL' if bad else 'ok':<4} {bad:>12,} violations{extra}")
        lines.append(f"throughput: {self.rate / 1e6:,.1f} M elements/s "
                     f"({self.n_inputs:,} in {self.seconds:.1f} s)")
        return "\n".join(lines)


# --------------------------------------------------------------------------- tables
def check_tables(fmt: FormatInfo, profile: Profile) -> dict:
    """Per-code arrays the kernel checks against (all from the decode table).

    For each allowed finite code: the magnitudes of its neighbours on its own sign's
    grid (``prev_mag`` -1 below zero; ``next_mag`` of the largest code = the overflow
    point, the value the grid would hold next if the exponent range grew) and ``top``.
    """
    val = fmt.decode_table.copy()
    n = fmt.n_codes
    finite = np.isfinite(val)
    negative = (val < 0) if fmt.is_int else np.signbit(val)
    allowed = finite | (profile.fp8_overflow == "ovf")
    if fmt.is_int and profile.int8_range == "symmetric":
        allowed &= val != fmt.min_value
    prev_mag, next_mag = np.full(n, -1.0), np.full(n, np.inf)
    top = np.zeros(n, dtype=np.bool_)
    overflow_point = 0.0
    for side in (False, True):
        members = np.nonzero(allowed & finite & (negative == side))[0]
        grid = np.unique(np.append(np.abs(val[members]), 0.0))
        over = grid[-1] + (grid[-1] - grid[-2])
        if not side:
            overflow_point = over
        ext = np.append(grid, over)
        for c in members:
            i = int(np.searchsorted(grid, abs(val[c])))
            prev_mag[c] = grid[i - 1] if i > 0 else -1.0
            next_mag[c] = ext[i + 1]
            top[c] = i == grid.size - 1
    max_mag = float(np.abs(val[finite]).max())
    maxmag_code = fmt.max_code & (fmt.sign_bit - 1)
    return dict(val=val, prev_mag=prev_mag, next_mag=next_mag, top=top,
                even=(np.arange(n) % 2 == 0), allowed=allowed,
                # a tie between max normal and the overflow point goes to the even code
                overflow_even=((maxmag_code + 1) % 2 == 0),
                overflow_half=max_mag + (overflow_point - max_mag) / 2)


# --------------------------------------------------------------------------- kernels
@nb.njit(parallel=True, **_NB)
def _fill(out, start, step):
    for i in nb.prange(out.size):
        out[i] = np.uint32(np.int64(start) + np.int64(i) * step)


@nb.njit(**_NB)
def _nearest_ok(x, c, c_negative, val, prev_mag, next_mag, top, even, allowed,
                overflow_even, overflow_half, overflow_to_inf, is_int, away, saturate):
    """Is code ``c`` a correct conversion of x? (see the module docstring)."""
    if not allowed[c]:
        return False
    v = val[c]
    a = abs(x)
    if not np.isfinite(v):  # OVF mode: only inputs beyond the rounding boundary overflow
        if c_negative != (x < 0) or (overflow_to_inf and not np.isinf(v)):
            return False
        return a > overflow_half or (a == overflow_half and (away or overflow_even))
    if is_int:
        if v != 0 and (v < 0) != (x < 0):
            return False
    elif np.signbit(v) != np.signbit(x):
        return False
    m = abs(v)
    if a > m:
        if top[c] and saturate:
            return True
        d = a - m
        h = (next_mag[c] - m) * 0.5
        tie_here = (not away) and (not overflow_even if top[c] else even[c])
        return d < h or (d == h and tie_here)
    if a < m:
        d = m - a
        h = (m - prev_mag[c]) * 0.5
        return d < h or (d == h and (away or even[c]))
    return True


@nb.njit(**_NB)
def _mono_value(v, x):
    # an OVF overflow to NaN counts as Inf with the input's sign
    if np.isnan(v):
        return -np.inf if x < 0 else np.inf
    return v


@nb.njit(parallel=True, **_NB)
def check_chunk(bits, codes, carry, val, prev_mag, next_mag, top, even, allowed,
                overflow_even, overflow_half, overflow_to_inf, sign_shift, is_int, away,
                saturate, flush, flags):
    """flags[i]: bit 0 = monotonic violation, bit 1 = nearest violation."""
    fb = bits.view(np.float32)
    for i in nb.prange(bits.size):
        x = np.float64(fb[i])
        if flush and (bits[i] & _POS_INF) == 0:
            x = -0.0 if (bits[i] >> _SIGN_SHIFT) == 1 else 0.0
        c = codes[i]
        prev = carry if i == 0 else _mono_value(val[codes[i - 1]], fb[i - 1])
        f = 0
        if _mono_value(val[c], x) < prev:
            f |= 1
        c_negative = ((c >> sign_shift) & 1) == 1
        if not _nearest_ok(x, c, c_negative, val, prev_mag, next_mag, top, even, allowed,
                           overflow_even, overflow_half, overflow_to_inf, is_int, away,
                           saturate):
            f |= 2
        flags[i] = f


# --------------------------------------------------------------------------- driver
def _ranges(stride: int):
    """(start, step, count, is_nan) runs covering all patterns in value order, NaNs last."""
    n_side = (_POS_INF - _POS_ZERO) // stride + 1
    n_nan = (FLOAT32.abs_mask - (_POS_INF + 1)) // stride + 1
    return [(_NEG_INF, -stride, n_side, False), (_POS_ZERO, stride, n_side, False),
            (_POS_INF + 1, stride, n_nan, True), (_NEG_INF + 1, stride, n_nan, True)]


def sweep_format(fmt, profile=None, chunk: int = 1 << 24, stride: int = 1,
                 progress: bool = True) -> SweepResult:
    """Sweep all float32 patterns (every ``stride``-th one in value order) through encode."""
    fmt, profile = get_format(fmt), get_profile(profile)
    if int(chunk) != chunk or chunk < 2:
        raise MXError(f"chunk must be an integer >= 2, got {chunk}")
    if int(stride) != stride or stride < 1:
        raise MXError(f"stride must be a positive integer, got {stride}")
    if chunk > MAX_CHUNK:
        # chunk only sets the memory of one step (~16 bytes a pattern), never the result;
        # 2^31 and more were OOM-killed (no message) while allocating their buffers
        raise MXError(f"chunk {chunk} is too large: at most 2^{MAX_CHUNK.bit_length() - 1} "
                      f"({MAX_CHUNK}) patterns, ~16 bytes each; the result does not "
                      f"depend on it")
    # every stride past 2^31 visits the same 4 patterns (the first of each run); one past
    # int64 was a numba typing traceback, so use 2^32 for all of them
    chunk, stride = int(chunk), min(int(stride), 1 << 32)
    t = check_tables(fmt, profile)
    saturate = not (profile.fp8_overflow == "ovf" and fmt.bits == 8 and not fmt.is_int)
    nan_code = (fmt.nan_codes[0] if fmt.nan_codes else None)
    res = SweepResult(fmt=fmt.key, profile=profile.name)
    hits = np.zeros(256, dtype=np.int64)
    runs = _ranges(stride)
    total = sum(r[2] for r in runs)
    carry = -np.inf
    bits = np.empty(min(chunk, max(r[2] for r in runs)), dtype=np.uint32)
    flags = np.empty(bits.size, dtype=np.uint8)
    t0 = time.perf_counter()
    with tqdm(total=total, unit="el", unit_scale=True, disable=not progress,
              desc=f"sweep {fmt.key}") as bar:
        for start, step, count, is_nan in runs:
            for off in range(0, count, chunk):
                n = min(chunk, count - off)
                b = bits[:n]
                _fill(b, start + off * step, step)
                codes = encode(b.view(np.float32), fmt, profile)
                hits += np.bincount(codes, minlength=256)
                if is_nan:
                    sign = (b >> 31).astype(np.uint8)
                    expect = (sign << (fmt.bits - 1)) | nan_code if nan_code is not None \
                        else np.zeros(n, np.uint8)
                    _record(res, "nan", codes != expect, b, codes)
                else:
                    f = flags[:n]
                    check_chunk(b, codes, carry, t["val"], t["prev_mag"], t["next_mag"],
                                t["top"], t["even"], t["allowed"], t["overflow_even"],
                                t["overflow_half"], bool(fmt.inf_codes), fmt.bits - 1,
                                fmt.is_int,
                                profile.rounding == "away", saturate,
                                profile.flush_subnormals, f)
                    _record(res, "monotonic", (f & 1) != 0, b, codes)
                    _record(res, "nearest", (f & 2) != 0, b, codes)
                    last = t["val"][codes[-1]]
                    carry = last if not np.isnan(last) else math.copysign(
                        math.inf, float(b[-1:].view(np.float32)[0]))
                res.n_inputs += n
                bar.update(n)
    res.codes_hit = [int(c) for c in np.nonzero(hits)[0]]
    _round_trip(res, fmt, profile)
    res.seconds = time.perf_counter() - t0
    return res


def _record(res: SweepResult, check: str, bad: np.ndarray, bits, codes) -> None:
    n = int(np.count_nonzero(bad))
    if n:
        if check not in res.first_violation:
            i = int(np.argmax(bad))
            res.first_violation[check] = (int(bits[i]), int(codes[i]))
        res.violations[check] += n


def _round_trip(res: SweepResult, fmt: FormatInfo, profile: Profile) -> None:
    hit = np.array(res.codes_hit, dtype=np.uint8)
    back = encode(decode(hit, fmt), fmt, profile)
    # decoded NaN carries no sign (or payload): a NaN code only has to come back as NaN
    is_nan = np.isnan(fmt.decode_table[hit])
    bad = np.where(is_nan, ~np.isnan(fmt.decode_table[back]), back != hit)
    if bad.any():
        i = int(np.argmax(bad))
        res.violations["round_trip"] = int(bad.sum())
        res.first_violation["round_trip"] = (int(hit[i]), int(back[i]))
