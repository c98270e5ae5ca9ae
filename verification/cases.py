"""TestFloat-style case generation for MX blocks, element conversion, dequantize and dot.

Every case is an *input* only (float32 bit patterns, or scale and element codes);
expected outputs always come from mxref (:mod:`verification.vectors`). Cases are
grouped by category, in a fixed order, so a suite is ``(category, first, count)``
runs and every vector's category is known without storing it per line.

Deterministic part: every block scenario of :data:`verification.scenarios.SCENARIOS`
(the table the Hypothesis strategies draw from too), in table order: the cross product
of "where is the block maximum" x "its bit pattern" (the scenarios' ANCHORS) and
families of the other elements (exact ties at the block scale, near ties,
element-subnormal results, saturation, underflow, NaN/Inf at each position, all-zero
blocks, scales at and beyond 2^-127 and the largest reachable).
Random part: drawn from :class:`verification.prng.Xoshiro256` so the same seed gives
the same vectors everywhere. Level 1 is small (seconds), level 2 broad; exhaustive
exists where the input space is small (see :data:`EXHAUSTIVE`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import mxref
from mxref.errors import MXError
from mxref.formats import DEFAULT_BLOCK_SIZE, FLOAT32
from verification.prng import Xoshiro256
from verification.scenarios import ANCHORS, SCENARIOS, element_grid

OPS = ("quantize", "dequantize", "dot", "convert")
LEVELS = ("1", "2", "exhaustive")
# float32 patterns, derived from specs/formats.toml's [ieee.float32]
F32_MAN = FLOAT32.man_bits
F32_BIAS = FLOAT32.bias
F32_SIGN = FLOAT32.sign_mask
F32_ABS = FLOAT32.abs_mask                      # also the NaN with every payload bit set
F32_QNAN = FLOAT32.qnan_bits
F32_SNAN = FLOAT32.inf_bits | 1                 # the smallest signalling NaN payload
F32_INF = FLOAT32.inf_bits
F32_MAX = FLOAT32.max_finite_bits
F32_MAX_SUB = FLOAT32.frac_mask                 # the largest subnormal
F32_MIN_SUB_VALUE = 2.0 ** (FLOAT32.emin - FLOAT32.man_bits)
# NaNs (quiet, smallest signalling payload, every payload bit) and Infs, both signs
F32_SPECIALS = (F32_QNAN, F32_QNAN | F32_SIGN, F32_SNAN, F32_ABS, F32_INF, F32_INF | F32_SIGN)


@dataclass
class CaseSet:
    """Inputs of one suite: ``fields`` maps an input field name to a [N, count] array."""

    op: str
    fields: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)   # [(category, first, count)]

    def add(self, category: str, **arrays) -> None:
        n = None
        for name, a in arrays.items():
            a = np.asarray(a)
            a = a.reshape(a.shape[0], -1)
            n = a.shape[0] if n is None else n
            if a.shape[0] != n:
                raise AssertionError("fields of one category must have equal row counts")
            old = self.fields.get(name)
            self.fields[name] = a if old is None else np.concatenate([old, a])
        if not n:
            return
        first = self.n - n
        if self.runs and self.runs[-1][0] == category:
            c, f0, k = self.runs[-1]
            self.runs[-1] = (c, f0, k + n)
        else:
            self.runs.append((category, first, n))

    @property
    def n(self) -> int:
        return next(iter(self.fields.values())).shape[0] if self.fields else 0

    def category_of(self) -> np.ndarray:
        """Per-vector category names (object array)."""
        out = np.empty(self.n, dtype=object)
        for c, f0, k in self.runs:
            out[f0:f0 + k] = c
        return out


# --------------------------------------------------------------------------- float helpers
def f32_bits(values) -> np.ndarray:
    """uint32 patterns of values that must be exactly representable in float32."""
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore"):
        f = v.astype(np.float32)
    finite = np.isfinite(v)
    if not np.array_equal(f[finite].astype(np.float64), v[finite]):
        raise AssertionError("case value not exact in float32")
    return f.view(np.uint32)


def next_up(bits: np.ndarray) -> np.ndarray:
    """The float32 one ulp further from zero (same sign)."""
    return (np.asarray(bits, np.uint32) + np.uint32(1)).astype(np.uint32)


def next_down(bits: np.ndarray) -> np.ndarray:
    """The float32 one ulp closer to zero (bits of +-0 stay)."""
    b = np.asarray(bits, np.uint32)
    mag = b & np.uint32(F32_ABS)
    return np.where(mag == 0, b, b - np.uint32(1)).astype(np.uint32)


class Builder:
    """Shared state for one generation run: format, PRNG and the level's sizes."""

    def __init__(self, fmt, level: str, seed: int, block_size: int):
        self.f = mxref.get_format(fmt)
        self.level = level
        self.rng = Xoshiro256(seed)
        self.bs = block_size
        self.wide = level != "1"
        self.grid, self.mids = element_grid(self.f)   # non-negative values, midpoints

    # positions of the block maximum: all of them at level 2, the edges at level 1
    def positions(self) -> list[int]:
        bs = self.bs
        if self.wide:
            return list(range(bs))
        return sorted({0, 1, bs // 2 - 1, bs // 2, bs - 1} & set(range(bs)))

    def scale_exps(self) -> list[int]:
        """Block scale exponents X = 2^s for the structured families."""
        return [0, -3, 7, -40, 60] if self.wide else [0, -5]

    def signs(self, n: int) -> np.ndarray:
        return np.array([self.rng.below(2) for _ in range(n)], dtype=np.uint32) << 31

    def background(self, n: int, top_exp: int) -> np.ndarray:
        """n random float32 magnitudes at most 2^top_exp (exclusive), random signs."""
        out = np.empty(n, dtype=np.uint32)
        for i in range(n):
            e = top_exp - 1 - self.rng.below(12)
            e = max(e, FLOAT32.emin)
            efield = min(max(e + F32_BIAS, 1), FLOAT32.exp_all_ones - 1)
            out[i] = (efield << F32_MAN) | (self.rng.u32() >> 9)
        return out | self.signs(n)

    def randint(self, lo: int, hi: int) -> int:
        return lo + self.rng.below(hi - lo + 1)


# --------------------------------------------------------------------------- quantize
def anchor_bits(f, s: int) -> list[tuple[str, int]]:
    """(name, float32 bits) of block maxima that probe the scale rule at X = 2^s: every
    anchor of the scenario table at each of its ulp offsets."""
    out = []
    for a in ANCHORS:
        bits = int(f32_bits([a.value(f, s)])[0])
        for u in a.ulps:
            out.append((a.name if u == 0 else f"{a.name}{u:+d}ulp", bits + u))
    return out


def _grid_rows(b: Builder, values: np.ndarray, anchor_bits: int, anchor_pos: int) -> np.ndarray:
    """Blocks holding ``values`` (float32 bits) with the anchor (block max) at anchor_pos."""
    per = b.bs - 1
    rows = []
    for i in range(0, len(values), per):
        chunk = values[i:i + per]
        if len(chunk) < per:   # pad with zeros of random sign (zeros never change amax)
            chunk = np.concatenate([chunk, b.signs(per - len(chunk))])
        row = np.insert(chunk, anchor_pos, anchor_bits)
        rows.append(row)
    return np.array(rows, dtype=np.uint32).reshape(-1, b.bs)


def _q_amax_position(b: Builder) -> np.ndarray:
    f, bs = b.f, b.bs
    rows = []
    for s in b.scale_exps():
        for _, amax in anchor_bits(f, s):
            for p in b.positions():
                for sign in (0, F32_SIGN):
                    row = b.background(bs, f.emax + s - 1)
                    row[p] = amax | sign
                    rows.append(row)
    return np.array(rows, np.uint32)


def _q_ties(b: Builder, shift: int) -> np.ndarray:
    f, pos = b.f, b.positions()
    rows = []
    for s in b.scale_exps():
        anchor = int(f32_bits([2.0 ** (f.emax + s)])[0])
        mids = f32_bits(np.ldexp(b.mids, s))
        if shift:
            mids = np.concatenate([next_up(mids), next_down(mids)])
        vals = np.concatenate([mids, mids | np.uint32(F32_SIGN)])
        for p in pos[:2] if not b.wide else pos[::8]:
            rows.append(_grid_rows(b, vals, anchor, p))
    return np.concatenate(rows)


def _q_subnormal_result(b: Builder) -> np.ndarray:
    """Multiples of half the element's smallest subnormal: on and between subnormals."""
    f = b.f
    rows = []
    for s in b.scale_exps():
        anchor = int(f32_bits([2.0 ** (f.emax + s)])[0])
        k = np.arange(1, 2 * (1 << f.step_bits) + 1, dtype=np.float64)
        vals = f32_bits(np.ldexp(k * f.min_subnormal / 2, s))
        vals = np.concatenate([vals, vals | np.uint32(F32_SIGN)])
        rows.append(_grid_rows(b, vals, anchor, b.positions()[-1]))
    return np.concatenate(rows)


def _q_saturate(b: Builder) -> np.ndarray:
    f, bs = b.f, b.bs
    rows = []
    for s in b.scale_exps():
        lo = int(f32_bits([f.max_normal * 2.0 ** s])[0])
        hi = int(next_down(f32_bits([2.0 ** (f.emax + 1 + s)]))[0])
        for p in b.positions():
            row = b.background(bs, f.emax + s)
            for j in range(0, bs, 4):
                row[j] = (lo + b.rng.below(hi - lo + 1)) | (b.rng.below(2) << 31)
            row[p] = hi | (b.rng.below(2) << 31)
            rows.append(row)
    return np.array(rows, np.uint32)


def _q_underflow(b: Builder) -> np.ndarray:
    f = b.f
    rows = []
    for s in b.scale_exps():
        anchor = int(f32_bits([2.0 ** (f.emax + s)])[0])
        half = f32_bits([f.min_subnormal * 2.0 ** (s - 1)])
        vals = np.concatenate([half, next_up(half), next_down(half),
                               f32_bits([f.min_subnormal * 2.0 ** (s - 2),
                                         f.min_subnormal * 2.0 ** (s - 30)])])
        vals = np.concatenate([vals, vals | np.uint32(F32_SIGN)])
        rows.append(_grid_rows(b, vals, anchor, b.positions()[0]))
    return np.concatenate(rows)


def _q_nan_inf(b: Builder) -> np.ndarray:
    rows = []
    for p in b.positions():
        for sp in F32_SPECIALS:
            row = b.background(b.bs, b.f.emax)
            row[p] = sp
            rows.append(row)
    return np.array(rows, np.uint32)


def _q_all_zero(b: Builder) -> np.ndarray:
    bs = b.bs
    return np.array([np.zeros(bs, np.uint32), np.full(bs, F32_SIGN, np.uint32), b.signs(bs)],
                    np.uint32)


def _q_scale_min(b: Builder) -> np.ndarray:
    """Maxima at and beyond the E8M0 minimum 2^-127, and blocks of subnormals only."""
    f, bs, pos = b.f, b.bs, b.positions()
    rows = []
    emin_scale = mxref.E8M0.min_exp
    for k in (0, -1, -2, -10):
        v = 2.0 ** (emin_scale + f.emax + k)
        if v >= F32_MIN_SUB_VALUE:
            row = b.background(bs, emin_scale + f.emax + k)
            row[pos[b.rng.below(len(pos))]] = f32_bits([v])[0]
            rows.append(row)
    rows.append(np.array([1] * bs, np.uint32))                       # all min subnormal
    rows.append(np.array([F32_MAX_SUB] + [1] * (bs - 1), np.uint32))  # max subnormal
    return np.array(rows, np.uint32)


def _q_scale_max(b: Builder) -> np.ndarray:
    """The largest scale float32 inputs reach (2^127 needs amax >= 2^(127+emax), which
    float32 holds only for INT8: there max_normal * 2^127 is the exact top scale)."""
    f, bs, pos = b.f, b.bs, b.positions()
    smax = mxref.E8M0.max_exp
    top_scale = (int(f32_bits([f.max_normal * 2.0 ** smax])[0]) if f.emax == 0
                 else F32_MAX - 1)
    rows = []
    for top in (F32_MAX, int(f32_bits([2.0 ** smax])[0]), top_scale):
        row = b.background(bs, FLOAT32.emax + 1)
        row[pos[b.rng.below(len(pos))]] = top | (b.rng.below(2) << 31)
        rows.append(row)
    return np.array(rows, np.uint32)


def _q_fp32_subnormal(b: Builder) -> np.ndarray:
    rows = []
    for p in b.positions():
        row = np.array([b.rng.u32() & (F32_SIGN | F32_MAX_SUB) for _ in range(b.bs)],
                       np.uint32)
        row[p] = f32_bits([2.0 ** (FLOAT32.emin + 6)])[0]   # a normal a few binades up
        rows.append(row)
    return np.array(rows, np.uint32)


def _q_random(b: Builder) -> np.ndarray:
    """Weighted random blocks: clustered exponents, wide spread, raw bit patterns."""
    bs = b.bs
    n_rand = 64 if not b.wide else 2048
    rows = []
    for i in range(n_rand):
        kind = i % 4
        if kind < 2:
            e = b.randint(-30, 30)
            rows.append(b.background(bs, e if kind == 0 else e + 12))
        elif kind == 2:
            # the top exponent bit cleared: finite, any sign
            rows.append(np.array([b.rng.u32() & (F32_SIGN | F32_ABS >> 1) for _ in range(bs)],
                                 np.uint32))
        else:
            rows.append(np.array(b.rng.u32_list(bs), np.uint32))
    return np.array(rows, np.uint32)


# One builder per scenario of the table (verification.scenarios.SCENARIOS).
QUANTIZE_BUILDERS = {
    "amax_position": _q_amax_position,
    "tie": lambda b: _q_ties(b, 0),
    "near_tie": lambda b: _q_ties(b, 1),
    "subnormal_result": _q_subnormal_result,
    "saturate": _q_saturate,
    "underflow": _q_underflow,
    "nan_inf": _q_nan_inf,
    "all_zero": _q_all_zero,
    "scale_min": _q_scale_min,
    "scale_max": _q_scale_max,
    "fp32_subnormal": _q_fp32_subnormal,
    "random": _q_random,
}


def quantize_cases(b: Builder) -> CaseSet:
    """Every scenario of the table, in table order (the PRNG draws in that order)."""
    cs = CaseSet("quantize")
    for sc in SCENARIOS:
        cs.add(sc.name, x=QUANTIZE_BUILDERS[sc.name](b))
    return cs


def quantize_exhaustive(b: Builder) -> CaseSet:
    """Every bfloat16 and float16 bit pattern, as blocks of consecutive patterns."""
    import ml_dtypes   # here, not at module load: `mxverify --help` reads OPS and LEVELS
    cs = CaseSet("quantize")
    for cat, dt in (("exhaustive_bf16", ml_dtypes.bfloat16), ("exhaustive_fp16", np.float16)):
        v = np.arange(1 << 16, dtype=np.uint16).view(dt).astype(np.float32)
        cs.add(cat, x=v.view(np.uint32).reshape(-1, b.bs))
    return cs


# --------------------------------------------------------------------------- convert
def convert_cases(b: Builder) -> CaseSet:
    """Element conversion at unit scale: TestFloat's exponent x significand tables."""
    cs = CaseSet("convert")
    f = b.f
    m = F32_MAN
    p1 = [0, 1, (1 << m) - 1, (1 << m) - 2]
    p2 = sorted(set(p1 + [1 << i for i in range(m)] + [((1 << m) - 1) ^ ((1 << i) - 1)
                                                      for i in range(m)]))
    exps = list(range(f.emin - f.step_bits - 3, f.emax + 3)) + [FLOAT32.emin, -100, 100,
                                                                 FLOAT32.emax]
    sig = p2 if b.wide else p1
    vals = [((e + F32_BIAS) << m) | s for e in exps for s in sig]
    vals += [0, 1, F32_MAX_SUB]   # zero and float32 subnormals
    v = np.array(vals, np.uint32)
    cs.add("table", x=np.concatenate([v, v | np.uint32(F32_SIGN)]))
    mids = f32_bits(b.mids)
    mids = np.concatenate([mids, mids | np.uint32(F32_SIGN)])
    cs.add("tie", x=mids)
    cs.add("near_tie", x=np.concatenate([next_up(mids), next_down(mids)]))
    top = int(f32_bits([2.0 ** (f.emax + 1)])[0])
    lo = int(f32_bits([f.max_normal])[0])
    sat = np.array([lo + 1, top - 1, top, top + 12345, F32_MAX], np.uint32)
    cs.add("saturate", x=np.concatenate([sat, sat | np.uint32(F32_SIGN)]))
    half = f32_bits([f.min_subnormal / 2])
    und = np.concatenate([half, next_up(half), next_down(half), f32_bits([f.min_subnormal / 4])])
    cs.add("underflow", x=np.concatenate([und, und | np.uint32(F32_SIGN)]))
    cs.add("nan_inf", x=np.array([F32_QNAN, F32_QNAN | F32_SIGN, F32_SNAN, F32_SIGN | F32_ABS,
                                  F32_INF, F32_INF | F32_SIGN], np.uint32))
    n_rand = 256 if not b.wide else 16384
    cs.add("random", x=np.array(b.rng.u32_list(n_rand), np.uint32))
    return cs


def convert_exhaustive(b: Builder) -> CaseSet:
    import ml_dtypes
    cs = CaseSet("convert")
    for cat, dt in (("exhaustive_bf16", ml_dtypes.bfloat16), ("exhaustive_fp16", np.float16)):
        v = np.arange(1 << 16, dtype=np.uint16).view(dt).astype(np.float32)
        cs.add(cat, x=v.view(np.uint32))
    return cs


# --------------------------------------------------------------------------- dequantize
def _all_codes_rows(b: Builder) -> np.ndarray:
    """Blocks that together hold every element code (consecutive codes)."""
    n = b.f.n_codes
    reps = -(-n // b.bs) * b.bs
    return (np.arange(reps) % n).astype(np.uint8).reshape(-1, b.bs)


def dequantize_cases(b: Builder) -> CaseSet:
    cs = CaseSet("dequantize")
    codes = _all_codes_rows(b)
    E = mxref.E8M0
    for cat, scales in (("all_codes", [E.bias, E.bias + 1, E.bias - 3]),
                        ("scale_extremes", [E.min_code, E.min_code + 1, E.min_code + 2,
                                            E.max_code - 1, E.max_code]),
                        ("nan_scale", [E.nan_code])):
        for sc in scales:
            cs.add(cat, scale=np.full((len(codes), 1), sc, np.uint8), codes=codes)
    n_rand = 64 if not b.wide else 4096
    sc = np.array([b.rng.below(mxref.E8M0.n_codes) for _ in range(n_rand)], np.uint8)
    cd = np.array([b.rng.below(b.f.n_codes) for _ in range(n_rand * b.bs)], np.uint8)
    cs.add("random", scale=sc.reshape(-1, 1), codes=cd.reshape(-1, b.bs))
    return cs


def dequantize_exhaustive(b: Builder) -> CaseSet:
    """Every (scale code, element code) pair: 256 scales x all codes."""
    cs = CaseSet("dequantize")
    codes = _all_codes_rows(b)
    for sc in range(mxref.E8M0.n_codes):
        cs.add("exhaustive", scale=np.full((len(codes), 1), sc, np.uint8), codes=codes)
    return cs


# --------------------------------------------------------------------------- dot
DOT_BLOCKS = 2   # blocks per dot vector: the cross-block accumulation is exercised


def dot_cases(b: Builder) -> CaseSet:
    """Pairs of MX vectors (scales + codes) of DOT_BLOCKS blocks each."""
    cs = CaseSet("dot")
    f, bs, nb = b.f, b.bs, DOT_BLOCKS
    K = bs * nb
    E = mxref.E8M0
    n_rand = 32 if not b.wide else 2048
    ncodes = f.n_codes

    def rand_codes(n):
        return np.array([b.rng.below(ncodes) for _ in range(n * K)], np.uint8).reshape(n, K)

    def rand_scales(n, lo=E.bias - 20, hi=E.bias + 20):
        return np.array([b.randint(lo, hi) for _ in range(n * nb)], np.uint8).reshape(n, nb)

    def add(cat, sa, ca, sb, cb):
        cs.add(cat, scale_a=sa, codes_a=ca, scale_b=sb, codes_b=cb)

    # operands that come from quantizing float blocks (the realistic path)
    qb = quantize_cases(b).fields["x"]
    qb = qb[:(len(qb) // nb) * nb].reshape(-1, K)
    qb = qb[:max(8, n_rand)]
    fin = np.isfinite(qb.view(np.float32)).all(axis=1)
    qb = qb[fin]
    mx = mxref.quantize(qb.view(np.float32), f, block_size=bs)
    perm = np.roll(np.arange(len(qb)), 1)
    add("quantized", mx.scales, mx.codes, mx.scales[perm], mx.codes[perm])
    # scales at the E8M0 edges: products underflow to float32 subnormals/zero or overflow
    n = 8 if not b.wide else 64
    for cat, lo, hi in (("scale_min", E.min_code, E.min_code + 2),
                        ("scale_max", E.max_code - 2, E.max_code)):
        add(cat, rand_scales(n, lo, hi), rand_codes(n), rand_scales(n, lo, hi), rand_codes(n))
    # a NaN scale in one block of one operand
    sa = rand_scales(n)
    sa[np.arange(n), np.arange(n) % nb] = E.nan_code
    add("nan_scale", sa, rand_codes(n), rand_scales(n), rand_codes(n))
    # cancellation: B = A with one sign flipped per pair -> sums near zero
    ca = rand_codes(n)
    cb = ca ^ np.uint8(f.sign_bit) if not f.is_int else (-ca.astype(np.int16)).astype(np.uint8)
    cb[:, ::7] = ca[:, ::7]
    s = rand_scales(n)
    add("cancellation", s, ca, s, cb)
    # all maximum codes: the largest block sums
    mc = np.full((n, K), f.max_code, np.uint8)
    add("max_magnitude", rand_scales(n, E.bias, E.bias + 100), mc,
        rand_scales(n, E.bias, E.bias + 100), mc)
    add("random", rand_scales(n_rand), rand_codes(n_rand), rand_scales(n_rand),
        rand_codes(n_rand))
    return cs


# --------------------------------------------------------------------------- entry point
EXHAUSTIVE = {"quantize": quantize_exhaustive, "convert": convert_exhaustive,
              "dequantize": dequantize_exhaustive}
STRUCTURED = {"quantize": quantize_cases, "convert": convert_cases,
              "dequantize": dequantize_cases, "dot": dot_cases}


def generate(op: str, fmt, level: str = "1", seed: int = 1,
             block_size: int = DEFAULT_BLOCK_SIZE) -> CaseSet:
    """The input cases of one suite (deterministic in all arguments)."""
    level = str(level)
    if op not in OPS:
        raise MXError(f"unknown op {op!r}; choose one of: {', '.join(OPS)}")
    if level not in LEVELS:
        raise MXError(f"unknown level {level!r}; choose one of: {', '.join(LEVELS)}")
    if block_size < 2 or block_size > 1024:
        raise MXError(f"block size {block_size} out of range; use 2..1024 "
                      f"({DEFAULT_BLOCK_SIZE} is OCP MX)")
    b = Builder(fmt, level, seed, block_size)
    if level == "exhaustive":
        if op not in EXHAUSTIVE:
            raise MXError(f"no exhaustive input space for op {op!r} (two blocks of codes); "
                          f"use --level 2")
        if op == "quantize" and (1 << 16) % block_size:
            raise MXError("exhaustive quantize needs a block size that divides 65536")
        return EXHAUSTIVE[op](b)
    return STRUCTURED[op](b)
