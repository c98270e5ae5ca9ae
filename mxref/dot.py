"""MX dot products (OCP MX v1.0 §6.1 Dot, §6.2 DotGeneral) with exact block sums.

Each block's sum of element products is computed EXACTLY in integers: every element
value is an integer multiple of its format's smallest subnormal 2^-f (f = 1 for FP4,
3 for FP6 E2M3, 4 for E3M2, 9 for E4M3, 16 for E5M2, 6 for INT8), so with
``q = value * 2^f``

    Dot(A_j, B_j) = X_A * X_B * 2^-(f_A + f_B) * sum_i q_A,i * q_B,i      (exact integer sum)

To stay inside int64 even for E5M2 x E5M2 (|q| < 2^32), q_A is split as
``hi * 2^16 + lo`` and two int64 sums are kept (no overflow for blocks up to 2^14
elements of E5M2 x E5M2; larger blocks of smaller formats). The block value is then rounded ONCE to the accumulation precision
(round-to-odd in float64 first, which makes the later rounding to float32 correct),
and the blocks are summed in that precision in the chosen order (§6.2 leaves
precision and order implementation-defined):

* ``accum``: ``"float32"`` (the spec's "should" result type), ``"float64"``, or
  ``"exact"`` (exact rational sum, rounded once to float64 at the end).
* ``order``: ``"sequential"`` (block 0, 1, 2, ... into one accumulator) or
  ``"pairwise"`` (an adder tree: adjacent pairs summed level by level, an odd last
  value carried up unchanged).

Special values: a NaN scale (0xFF) makes its block NaN (§5.1); FP8 NaN elements make
their block NaN; FP8 Inf elements give an infinite block (Inf * 0 and +Inf + -Inf give
NaN, as in IEEE arithmetic). Profiles play no part: only decoded values matter.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numba as nb
import numpy as np

from mxref.codes import check_codes
from mxref.core import MXArray
from mxref.errors import MXError
from mxref.formats import E8M0, FormatInfo

ACCUMS = ("float32", "float64", "exact")
ORDERS = ("sequential", "pairwise")
_SPLIT = 16                       # q_A = hi * 2^16 + lo keeps each partial sum < 2^53
_FINITE, _POS_INF, _NEG_INF, _NAN = 0, 1, 2, 3
_NB = dict(nogil=True, cache=True)
E8M0_NAN = E8M0.nan_code
E8M0_BIAS = E8M0.bias


def quantum_bits(fmt: FormatInfo) -> int:
    """f such that every element value of ``fmt`` is an integer multiple of 2^-f."""
    m, e = math.frexp(fmt.min_subnormal)
    assert m == 0.5, "the smallest subnormal of every MX element type is a power of two"
    return 1 - e


def integer_tables(fmt: FormatInfo) -> tuple[np.ndarray, np.ndarray]:
    """(q, kind) per code: q = value * 2^f as int64 for finite codes, kind as _FINITE.../_NAN."""
    t = fmt.decode_table
    kind = np.full(t.shape, _FINITE, dtype=np.int8)
    kind[np.isnan(t)] = _NAN
    kind[t == np.inf] = _POS_INF
    kind[t == -np.inf] = _NEG_INF
    finite = np.where(np.isfinite(t), t, 0.0)
    q = np.ldexp(finite, quantum_bits(fmt))
    assert np.all(q == np.round(q)), "decode table must be integer multiples of 2^-f"
    qt = np.zeros(256, dtype=np.int64)
    kt = np.zeros(256, dtype=np.int8)
    qt[:t.size] = q.astype(np.int64)
    kt[:t.size] = kind
    return qt, kt


# --------------------------------------------------------------------------- kernels
@nb.njit(**_NB)
def _block_sum(ca, cb, lo, hi, qa, ka, qb, kb):
    """Exact sum of products over [lo, hi): (S_hi, S_lo, special) with S = S_hi*2^16 + S_lo."""
    s_hi = np.int64(0)
    s_lo = np.int64(0)
    pos_inf = False
    neg_inf = False
    nan = False
    for i in range(lo, hi):
        a = ca[i]
        b = cb[i]
        kA = ka[a]
        kB = kb[b]
        if kA == _FINITE and kB == _FINITE:
            x = qa[a]
            y = qb[b]
            s_hi += (x >> _SPLIT) * y
            s_lo += (x & ((1 << _SPLIT) - 1)) * y
            continue
        if kA == _NAN or kB == _NAN:
            nan = True
            continue
        # at least one infinity: sign of the product, NaN for Inf * 0
        sa = 0 if kA == _FINITE else (1 if kA == _POS_INF else -1)
        sb = 0 if kB == _FINITE else (1 if kB == _POS_INF else -1)
        if sa == 0:
            sa = 0 if qa[a] == 0 else (1 if qa[a] > 0 else -1)
        if sb == 0:
            sb = 0 if qb[b] == 0 else (1 if qb[b] > 0 else -1)
        if sa * sb > 0:
            pos_inf = True
        elif sa * sb < 0:
            neg_inf = True
        else:
            nan = True
    if nan or (pos_inf and neg_inf):
        return s_hi, s_lo, _NAN
    if pos_inf:
        return s_hi, s_lo, _POS_INF
    if neg_inf:
        return s_hi, s_lo, _NEG_INF
    return s_hi, s_lo, _FINITE


@nb.njit(**_NB)
def _to_float64(s_hi, s_lo, odd):
    """S = s_hi*2^16 + s_lo rounded to float64: to nearest-even, or to odd when ``odd``.

    Round-to-odd to 53 bits followed by round-to-nearest to 24 bits equals direct
    round-to-nearest of S (53 >= 24 + 2), which is how float32 block values are made.
    """
    s_hi = s_hi + (s_lo >> _SPLIT)          # now 0 <= s_lo < 2^16, |s_hi| < 2^62
    s_lo = s_lo & ((1 << _SPLIT) - 1)
    v = np.float64(s_hi)                     # nearest float64 of s_hi
    r = s_hi - np.int64(v)                   # exact remainder, |r| <= 2^9
    a = v * 65536.0                          # exact
    b = np.float64(r * 65536 + s_lo)         # exact: |.| < 2^26
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)          # TwoSum: a + b == s + err exactly
    if odd and err != 0.0:
        m, _ = math.frexp(s)
        if np.int64(m * 9007199254740992.0) & 1 == 0:  # even last bit: step toward err
            s = np.nextafter(s, np.inf if err > 0 else -np.inf)
    return s


@nb.njit(**_NB)
def _block_value(s_hi, s_lo, special, sa, sb, f_sum, odd):
    if sa == E8M0_NAN or sb == E8M0_NAN or special == _NAN:
        return np.nan
    if special == _POS_INF:
        return np.inf
    if special == _NEG_INF:
        return -np.inf
    e = (sa - E8M0_BIAS) + (sb - E8M0_BIAS) - f_sum  # within float64's normal range
    return math.ldexp(_to_float64(s_hi, s_lo, odd), e)


@nb.njit(**_NB)
def _reduce(buf, pairwise):
    n = buf.size  # >= 1: callers handle K = 0
    if not pairwise:
        acc = buf[0]
        for j in range(1, n):
            acc = acc + buf[j]
        return acc
    while n > 1:
        h = n // 2
        for j in range(h):
            buf[j] = buf[2 * j] + buf[2 * j + 1]
        if n % 2 == 1:
            buf[h] = buf[n - 1]
        n = n - h
    return buf[0]


@nb.njit(parallel=True, **_NB)
def matmul_kernel(ca, cb, sa, sb, qa, ka, qb, kb, block, f_sum, pairwise, odd, out):
    """out[m, n] = DotGeneral(a[m], b[n]); out's dtype is the accumulation precision.

    ``odd`` must be True for float32 output: blocks are rounded to odd in float64 first.
    """
    M, K = ca.shape
    N = cb.shape[0]
    nbk = sa.shape[1]
    for t in nb.prange(M * N):
        m = t // N
        n = t - m * N
        buf = np.empty(nbk, dtype=out.dtype)
        for j in range(nbk):
            lo = j * block
            hi = min(lo + block, K)
            s_hi, s_lo, sp = _block_sum(ca[m], cb[n], lo, hi, qa, ka, qb, kb)
            buf[j] = _block_value(s_hi, s_lo, sp, sa[m, j], sb[n, j], f_sum, odd)
        if nbk == 0:
            out[m, n] = 0.0
        else:
            out[m, n] = _reduce(buf, pairwise)


@nb.njit(parallel=True, **_NB)
def block_sums_kernel(ca, cb, qa, ka, qb, kb, block, s_hi, s_lo, special):
    """Exact per-block integer sums for every (m, n, block) -- the 'exact' mode."""
    M, K = ca.shape
    N = cb.shape[0]
    nbk = s_hi.shape[2]
    for t in nb.prange(M * N):
        m = t // N
        n = t - m * N
        for j in range(nbk):
            lo = j * block
            hi = min(lo + block, K)
            h, l, sp = _block_sum(ca[m], cb[n], lo, hi, qa, ka, qb, kb)
            s_hi[m, n, j] = h
            s_lo[m, n, j] = l
            special[m, n, j] = sp


# --------------------------------------------------------------------------- public API
def _check_choice(value, allowed, what):
    if value not in allowed:
        raise MXError(f"{what} {value!r} is not one of {', '.join(allowed)}")


def _operand(mx, name: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(mx, MXArray):
        raise MXError(f"{name} must be an mxref.MXArray (from mxref.quantize), got "
                      f"{type(mx).__name__}")
    codes = check_codes(mx.codes, mx.fmt)
    scales = np.ascontiguousarray(mx.scales, dtype=np.uint8)
    nbk = -(-codes.shape[-1] // mx.block_size) if codes.ndim else 0
    if scales.shape != codes.shape[:-1] + (nbk,):
        raise MXError(f"{name}: scales shape {scales.shape} does not match codes "
                      f"{codes.shape} with block size {mx.block_size}")
    return codes, scales


def _check_pair(a: MXArray, b: MXArray, ka: int, kb: int) -> None:
    if a.block_size != b.block_size:
        raise MXError(f"block sizes differ ({a.block_size} vs {b.block_size}); quantize both "
                      f"operands with the same block size")
    if ka != kb:
        raise MXError(f"reduction lengths differ ({ka} vs {kb}); the blocked axes must match")
    # both partial sums (hi * q_B and lo * q_B) must stay below 2^62 in int64
    qa_hi = (int(np.abs(integer_tables(a.fmt)[0]).max()) >> _SPLIT) + 1
    qb_max = int(np.abs(integer_tables(b.fmt)[0]).max())
    if a.block_size * max(qa_hi, 1 << _SPLIT) * qb_max >= 2 ** 62:
        raise MXError(f"block size {a.block_size} is too large for exact int64 block sums of "
                      f"{a.fmt.key} x {b.fmt.key}; use a smaller block size")


def _exact_sum(s_hi, s_lo, special, sa, sb, f_sum):
    """Exact rational DotGeneral of one (row, column) pair, or NaN / +-Inf."""
    if np.any(sa == E8M0_NAN) or np.any(sb == E8M0_NAN) or np.any(special == _NAN):
        return math.nan
    pos, neg = bool(np.any(special == _POS_INF)), bool(np.any(special == _NEG_INF))
    if pos and neg:
        return math.nan
    if pos or neg:
        return math.inf if pos else -math.inf
    total = Fraction(0)
    for h, l, x, y in zip(s_hi.tolist(), s_lo.tolist(), sa.tolist(), sb.tolist()):
        e = (x - E8M0_BIAS) + (y - E8M0_BIAS) - f_sum
        s = h * (1 << _SPLIT) + l
        total += s * (Fraction(2) ** e)
    return total


def _matmul_codes(a, b, ca, sa, cb, sb, accum, order, exact_as_fraction=False):
    qa, ka = integer_tables(a.fmt)
    qb, kb = integer_tables(b.fmt)
    f_sum = quantum_bits(a.fmt) + quantum_bits(b.fmt)
    M, N = ca.shape[0], cb.shape[0]
    if accum != "exact":
        out = np.empty((M, N), dtype=np.dtype(accum))
        if out.size:
            matmul_kernel(ca, cb, sa, sb, qa, ka, qb, kb, a.block_size, f_sum,
                          order == "pairwise", accum == "float32", out)
        return out
    nbk = sa.shape[1]
    s_hi = np.empty((M, N, nbk), dtype=np.int64)
    s_lo = np.empty((M, N, nbk), dtype=np.int64)
    special = np.empty((M, N, nbk), dtype=np.int8)
    if s_hi.size:
        block_sums_kernel(ca, cb, qa, ka, qb, kb, a.block_size, s_hi, s_lo, special)
    vals = [[_exact_sum(s_hi[m, n], s_lo[m, n], special[m, n], sa[m], sb[n], f_sum)
             for n in range(N)] for m in range(M)]
    if exact_as_fraction:
        return vals
    return np.array([[float(v) for v in row] for row in vals], dtype=np.float64).reshape(M, N)


def mx_dot(a: MXArray, b: MXArray, accum: str = "float32", order: str = "sequential") -> float:
    """DotGeneral (§6.2) of two 1-D MX vectors blocked the same way.

    Exact per-block sums; the cross-block sum in ``accum`` precision and ``order``.
    Returns a Python float (a float32 value when ``accum="float32"``). ``a`` and ``b``
    may use different element formats (the spec's "mixed types").
    """
    _check_choice(accum, ACCUMS, "accum")
    _check_choice(order, ORDERS, "order")
    ca, sa = _operand(a, "a")
    cb, sb = _operand(b, "b")
    if ca.ndim != 1 or cb.ndim != 1:
        raise MXError(f"mx_dot takes 1-D MX vectors (got shapes {a.shape} and {b.shape}); "
                      f"use mx_matmul for matrices")
    _check_pair(a, b, ca.shape[0], cb.shape[0])
    out = _matmul_codes(a, b, ca[None], sa[None], cb[None], sb[None], accum, order)
    return float(out[0, 0])


def mx_dot_exact(a: MXArray, b: MXArray):
    """The exact value of the dot product as a :class:`fractions.Fraction` (or NaN/±Inf)."""
    ca, sa = _operand(a, "a")
    cb, sb = _operand(b, "b")
    if ca.ndim != 1 or cb.ndim != 1:
        raise MXError("mx_dot_exact takes 1-D MX vectors")
    _check_pair(a, b, ca.shape[0], cb.shape[0])
    return _matmul_codes(a, b, ca[None], sa[None], cb[None], sb[None], "exact", "sequential",
                         exact_as_fraction=True)[0][0]


def mx_matmul(a: MXArray, b: MXArray, accum: str = "float32",
              order: str = "sequential") -> np.ndarray:
    """[M, N] matrix of MX dot products, with every entry computed as :func:`mx_dot`.

    ``a``: an [M, K] array quantized along K (axis 1 / -1).
    ``b``: either an [N, K] array quantized along K (the nn.Linear weight layout; the
    result is ``a @ b.T``) or a [K, N] array quantized along K = axis 0 (the result is
    ``a @ b``). Either way ``b.codes`` is [N, K] because MXArray keeps the blocked axis
    last. Output dtype = ``accum`` (float64 for ``"exact"``: the exact sum rounded once).
    """
    _check_choice(accum, ACCUMS, "accum")
    _check_choice(order, ORDERS, "order")
    ca, sa = _operand(a, "a")
    cb, sb = _operand(b, "b")
    if len(a.shape) != 2 or a.axis != 1:
        raise MXError(f"a must be a 2-D [M, K] array quantized along axis 1 (got shape "
                      f"{a.shape}, axis {a.axis})")
    if len(b.shape) != 2:
        raise MXError(f"b must be 2-D ([N, K] blocked along axis 1 or [K, N] along axis 0), "
                      f"got shape {b.shape}")
    _check_pair(a, b, ca.shape[1], cb.shape[1])
    return _matmul_codes(a, b, ca, sa, cb, sb, accum, order)
