"""An exact, slow, independent oracle for OCP MX v1.0 quantization.

Everything here is exact rational arithmetic in :class:`fractions.Fraction`. It shares
no code with ``mxref``'s kernels: from ``mxref`` it reads only the *format parameters*
(bits, exp_bits, man_bits, bias, frac_bits, emax, max_code, nan/inf codes) that come
from ``specs/formats.toml``; every value, rounding decision and scale is worked out
again here from first principles:

* an input float's bit pattern -> (sign, kind, exact magnitude) from the IEEE layout;
* every element code -> its exact value from the sign/exponent/mantissa layout
  (INT8: two's complement / 2^frac_bits);
* rounding = find the two neighbouring representable magnitudes by bisection over the
  sorted grid, compare with their exact midpoint, break ties to the even code (RNE) or
  away from zero; overflow is decided after rounding on the *unbounded* grid;
* the block scale by exact comparison with powers of two (floor rule, §6.3) or by the
  smallest k with amax <= max_normal * 2^k (rceil).

Profiles are read duck-typed (``scale_rule``, ``rounding``, ``fp8_overflow``,
``flush_subnormals``, ``int8_range`` attributes), so a plain namespace works too.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

# IEEE binary layouts (exponent bits, mantissa bits). Typed here on purpose: the
# oracle must not borrow mxref's own input-layout table.
FLOAT_LAYOUTS = {
    "float64": (11, 52),
    "float32": (8, 23),
    "float16": (5, 10),
    "bfloat16": (8, 7),
}

# E8M0: 2^(code - 127), codes 0..254, 255 = NaN (OCP MX §5.4.1 Table 7).
SCALE_BIAS = 127
SCALE_MIN_EXP = -127
SCALE_MAX_EXP = 127
SCALE_NAN_CODE = 0xFF

FP32_MIN_NORMAL = Fraction(1, 2 ** 126)


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Decoded:
    """An input float: sign bit, kind ("zero", "finite", "inf", "nan"), exact magnitude."""

    sign: int
    kind: str
    magnitude: Fraction = Fraction(0)
    subnormal: bool = False  # subnormal in its own dtype

    @property
    def value(self) -> Fraction:
        return -self.magnitude if self.sign else self.magnitude


def decode_float_bits(bits: int, dtype: str) -> Decoded:
    """Exact meaning of one IEEE bit pattern of ``dtype`` (float64/32/16, bfloat16)."""
    ebits, mbits = FLOAT_LAYOUTS[dtype]
    bias = (1 << (ebits - 1)) - 1
    bits = int(bits)
    sign = (bits >> (ebits + mbits)) & 1
    efield = (bits >> mbits) & ((1 << ebits) - 1)
    mfield = bits & ((1 << mbits) - 1)
    if efield == (1 << ebits) - 1:
        return Decoded(sign, "nan" if mfield else "inf")
    if efield == 0:
        if mfield == 0:
            return Decoded(sign, "zero")
        # subnormal: 0.m * 2^(1 - bias)
        return Decoded(sign, "finite", Fraction(mfield) * pow2(1 - bias - mbits), True)
    return Decoded(sign, "finite", Fraction((1 << mbits) | mfield) * pow2(efield - bias - mbits))


def apply_flush(d: Decoded, flush: bool) -> Decoded:
    """The ``ocp_ftz`` reading: FP32-subnormal magnitudes and subnormals of the input
    dtype are read as a zero of the same sign."""
    if flush and d.kind == "finite" and (d.subnormal or d.magnitude < FP32_MIN_NORMAL):
        return Decoded(d.sign, "zero")
    return d


@lru_cache(maxsize=None)
def pow2(k: int) -> Fraction:
    return Fraction(2) ** k


# --------------------------------------------------------------------------- formats
class ElementGrid:
    """Every representable magnitude of an element format, derived from its bit layout.

    ``magnitudes[i]`` is the value of positive code magnitude ``i`` as if the format
    had no special codes and an unbounded exponent; indices 0..max_mag are the real
    finite values, indices max_mag+1 and max_mag+2 lie *beyond* the format: rounding
    happens on this unbounded grid first (so the tie just above max normal breaks to
    the even code) and a result above max_mag is an overflow.
    """

    def __init__(self, fmt):
        self.key = fmt.key
        self.is_int = fmt.kind == "int"
        self.bits = fmt.bits
        self.sign_bit = 1 << (fmt.bits - 1)
        self.max_mag = fmt.max_code & (self.sign_bit - 1)
        self.nan_mag = fmt.nan_codes[0] if fmt.nan_codes else None
        self.inf_mag = fmt.inf_codes[0] if fmt.inf_codes else None
        if self.is_int:
            self.frac_bits = fmt.frac_bits
            mags = [Fraction(i, 1 << fmt.frac_bits) for i in range(self.max_mag + 3)]
        else:
            self.man_bits, self.exp_bits, self.bias = fmt.man_bits, fmt.exp_bits, fmt.bias
            mags = [self._float_magnitude(i) for i in range(self.max_mag + 3)]
        assert all(a < b for a, b in zip(mags, mags[1:])), "code order must follow value"
        self.magnitudes = mags
        # midpoints[i] lies between magnitudes[i] and magnitudes[i+1]
        self.midpoints = [(a + b) / 2 for a, b in zip(mags, mags[1:])]

    def _float_magnitude(self, mag: int) -> Fraction:
        m = self.man_bits
        e = mag >> m
        frac = mag & ((1 << m) - 1)
        if e == 0:  # subnormal: 0.frac * 2^(1 - bias)
            return Fraction(frac) * pow2(1 - self.bias - m)
        return Fraction((1 << m) + frac) * pow2(e - self.bias - m)

    @property
    def max_normal(self) -> Fraction:
        return self.magnitudes[self.max_mag]

    def code_value(self, code: int):
        """Exact value of a code: a Fraction, or the strings "nan" / "+inf" / "-inf".

        Negative zero is returned as the string "-0" so that callers see the sign."""
        code = int(code)
        assert 0 <= code < (1 << self.bits)
        if self.is_int:
            q = code - (1 << self.bits) if code & self.sign_bit else code
            return Fraction(q, 1 << self.frac_bits)
        sign = bool(code & self.sign_bit)
        mag = code & (self.sign_bit - 1)
        if mag == self.nan_mag or (self.nan_mag is not None and self.inf_mag is not None
                                   and mag > self.inf_mag):
            return "nan"
        if mag == self.inf_mag:
            return "-inf" if sign else "+inf"
        if mag == 0 and sign:
            return "-0"
        v = self.magnitudes[mag]
        return -v if sign else v

    # ---- rounding --------------------------------------------------------------
    def round_magnitude(self, r: Fraction, rounding: str) -> int:
        """Code magnitude nearest to r >= 0 on the unbounded grid (may exceed max_mag;
        anything at or past the first value beyond the format returns max_mag + 1)."""
        mags = self.magnitudes
        if r >= mags[-1]:  # two steps past max normal: overflow whatever the rounding
            return len(mags) - 1
        i = bisect.bisect_right(mags, r) - 1  # mags[i] <= r < mags[i+1]
        if mags[i] == r:
            return i
        mid = self.midpoints[i]
        if r < mid:
            return i
        if r > mid:
            return i + 1
        if rounding == "away":
            return i + 1
        return i if i % 2 == 0 else i + 1  # even code = even last mantissa bit

    def encode_magnitude(self, sign: int, r: Fraction, profile) -> int:
        """Code of the finite value (-1)^sign * r (r >= 0) under ``profile``."""
        mag = self.round_magnitude(r, profile.rounding)
        return self._finish(sign, mag, profile)

    def _finish(self, sign: int, mag: int, profile) -> int:
        if self.is_int:
            limit = self.max_mag
            if sign and profile.int8_range == "asymmetric":
                limit = self.max_mag + 1  # -128 / 64 = -2.0 allowed
            mag = min(mag, limit)
            if sign:
                return ((1 << self.bits) - mag) % (1 << self.bits)  # two's complement; -0 -> 0
            return mag
        if mag > self.max_mag:
            if profile.fp8_overflow == "ovf" and self.bits == 8:
                mag = self.inf_mag if self.inf_mag is not None else self.nan_mag
            else:
                mag = self.max_mag
        return (self.sign_bit if sign else 0) | mag

    def zero_code(self, sign: int) -> int:
        return 0 if self.is_int else (self.sign_bit if sign else 0)

    def encode(self, d: Decoded, profile, scale_exp: int = 0) -> int:
        """Element-only conversion of a decoded input at scale 2^scale_exp."""
        d = apply_flush(d, profile.flush_subnormals)
        if d.kind == "zero":
            return self.zero_code(d.sign)
        if d.kind == "nan":
            if self.nan_mag is not None:
                return (self.sign_bit if d.sign else 0) | self.nan_mag
            return 0
        if d.kind == "inf":
            return self._finish(d.sign, self.max_mag + 1, profile)  # behaves as overflow
        return self.encode_magnitude(d.sign, d.magnitude / pow2(scale_exp), profile)


@lru_cache(maxsize=None)
def grid_for(fmt) -> ElementGrid:
    return ElementGrid(fmt)


# --------------------------------------------------------------------------- scale
def floor_log2(x: Fraction) -> int:
    """Exact floor(log2 x) for x > 0, by comparison with powers of two."""
    assert x > 0
    # start from the bit lengths (an estimate within 1), then correct exactly
    k = x.numerator.bit_length() - x.denominator.bit_length()
    while pow2(k) > x:
        k -= 1
    while pow2(k + 1) <= x:
        k += 1
    return k


def ceil_log2(x: Fraction) -> int:
    """Exact ceil(log2 x) for x > 0."""
    k = floor_log2(x)
    return k if pow2(k) == x else k + 1


def clamp_scale(k: int) -> int:
    return max(SCALE_MIN_EXP, min(SCALE_MAX_EXP, k))


def block_scale_exp(amax: Fraction, fmt, scale_rule: str) -> int:
    """Unbiased scale exponent for a block with maximum magnitude amax > 0."""
    if scale_rule == "floor":
        return clamp_scale(floor_log2(amax) - fmt.emax)
    if scale_rule == "rceil":
        return clamp_scale(ceil_log2(amax / grid_for(fmt).max_normal))
    raise ValueError(scale_rule)


def quantize_block(values: list[Decoded], fmt, profile) -> tuple[int, list[int]]:
    """(E8M0 scale code, element codes) of one MX block of decoded inputs."""
    grid = grid_for(fmt)
    values = [apply_flush(d, profile.flush_subnormals) for d in values]
    if any(d.kind in ("nan", "inf") for d in values):
        return SCALE_NAN_CODE, [0] * len(values)
    amax = max((d.magnitude for d in values if d.kind == "finite"), default=Fraction(0))
    if amax == 0:
        return SCALE_MIN_EXP + SCALE_BIAS, [grid.zero_code(d.sign) for d in values]
    k = block_scale_exp(amax, fmt, profile.scale_rule)
    codes = [grid.zero_code(d.sign) if d.kind == "zero"
             else grid.encode_magnitude(d.sign, d.magnitude / pow2(k), profile)
             for d in values]
    return k + SCALE_BIAS, codes


def quantize_row(bits_row, dtype: str, fmt, profile, block_size: int):
    """Oracle MX quantization of one row of raw bit patterns (ragged last block)."""
    decoded = [decode_float_bits(b, dtype) for b in bits_row]
    scales, codes = [], []
    for lo in range(0, len(decoded), block_size):
        s, c = quantize_block(decoded[lo:lo + block_size], fmt, profile)
        scales.append(s)
        codes.extend(c)
    return scales, codes


# --------------------------------------------------------------------------- bulk
class MagnitudeIndex:
    """The distinct finite magnitudes of many decoded inputs, sorted (as Fractions).

    Built once per input set; :func:`encode_many` then rounds every input with a few
    hundred exact bisections instead of one Fraction bisection per input.
    """

    def __init__(self, decoded: list[Decoded]):
        self.decoded = decoded
        self.values = sorted({d.magnitude for d in decoded if d.kind == "finite"})
        where = {v: i for i, v in enumerate(self.values)}
        self.position = [where[d.magnitude] if d.kind == "finite" else -1 for d in decoded]


def encode_many(index: MagnitudeIndex, fmt, profile, scale_exp: int = 0) -> list[int]:
    """Element-only codes of every input in ``index`` at scale 2^scale_exp.

    Same rule as :meth:`ElementGrid.encode`, organised as a sweep: the nearest grid
    magnitude of r is ``magnitudes[j]`` with j = the number of midpoints strictly
    below r; r equal to midpoint j is a tie between codes j and j+1.
    """
    import numpy as np  # only for the counting; every comparison is on Fractions

    grid = grid_for(fmt)
    scale = pow2(scale_exp)
    vals = index.values
    mids = [m * scale for m in grid.midpoints]
    n_le = np.array([bisect.bisect_right(vals, m) for m in mids])  # values <= mid_j
    n_lt = np.array([bisect.bisect_left(vals, m) for m in mids])   # values <  mid_j
    u = np.arange(len(vals))
    below = np.searchsorted(n_le, u, side="right")  # midpoints strictly below value u
    mag = below.copy()
    for j in np.flatnonzero(n_le > n_lt):  # exact ties: value n_lt[j] equals mid_j
        t = n_lt[j]
        mag[t] = j + 1 if (profile.rounding == "away" or j % 2 == 1) else j
    mag = mag.tolist()

    codes = []
    for d, p in zip(index.decoded, index.position):
        d2 = apply_flush(d, profile.flush_subnormals)
        if d2.kind == "finite":
            codes.append(grid._finish(d2.sign, mag[p], profile))
        else:
            codes.append(grid.encode(d2, profile, scale_exp))
    return codes
