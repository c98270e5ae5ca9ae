"""Public Hypothesis strategies for testing OCP MX implementations.

Inputs are drawn as *bit patterns*, so that every NaN payload, signed zero, subnormal
and exponent edge is reachable (Hypothesis' own ``floats`` strategy reaches few NaN
payloads and no bfloat16). Blocks are shaped to stress the MX scale rule: block
maxima next to powers of two, exact rounding ties at the block scale, saturating
maxima, underflow, NaN/Inf positions, all-zero blocks and scales at 2^-127 / 2^127.

Only numpy, hypothesis and mxref are imported (never torch). Example::

    from hypothesis import given
    import mxref
from mxref.formats import IEEE_LAYOUTS, IEEELayout
    from verification.strategies import mx_blocks

    @given(mx_blocks("fp4_e2m1"))
    def test_dequantized_block_is_finite_or_nan(block):
        out = mxref.quantize_dequantize(block, "fp4_e2m1")
        assert out.shape == block.shape
"""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mxref
from mxref.formats import IEEE_LAYOUTS, IEEELayout

__all__ = ["DTYPES", "float_bits", "floats_array", "element_codes", "element_formats",
           "mx_blocks", "mx_tensors", "profiles"]


# The IEEE input types (float32, bfloat16, float16, float64) as specs/formats.toml
# describes them: widths, bias, masks and ``pack(sign, efield, mfield)``.
DTYPES = dict(IEEE_LAYOUTS)


def _layout(dtype) -> IEEELayout:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not one of {', '.join(DTYPES)}")
    return DTYPES[name]


# --------------------------------------------------------------------------- scalars
def _mantissas(lay: IEEELayout, nonzero: bool = False) -> st.SearchStrategy[int]:
    m = lay.man_bits
    top = (1 << m) - 1
    edges = [1, top, 1 << (m - 1), (1 << (m - 1)) + 1, top - 1, (1 << (m - 1)) - 1]
    if not nonzero:
        edges.append(0)
    lo = 1 if nonzero else 0
    return st.one_of(st.sampled_from(edges), st.integers(lo, top))


def float_bits(dtype="float32", allow_nan=True, allow_inf=True, allow_subnormal=True,
               allow_zero=True) -> st.SearchStrategy[int]:
    """Bit patterns (Python ints) of ``dtype`` values, biased towards edge cases.

    Draws a kind (zero, subnormal, normal, Inf, NaN) and then a sign, an exponent field
    (favouring 1, 2, the bias, all-ones minus one/two) and a mantissa (favouring 0, 1,
    all-ones, the top bit alone -- the quiet bit of a NaN -- and its neighbours), so
    every NaN payload, both zeros and both ends of the exponent range turn up.

    >>> from verification.strategies import float_bits
    >>> float_bits("bfloat16", allow_nan=False).example() < 2 ** 16
    True
    """
    lay = _layout(dtype)
    sign = st.integers(0, 1)
    ones = lay.exp_all_ones
    normal_exp = st.one_of(
        st.sampled_from(sorted({1, 2, lay.bias - 1, lay.bias, lay.bias + 1, ones - 2,
                                ones - 1})),
        st.integers(1, ones - 1))
    kinds = [st.builds(lay.pack, sign, normal_exp, _mantissas(lay))]
    if allow_zero:
        kinds.append(st.builds(lay.pack, sign, st.just(0), st.just(0)))
    if allow_subnormal:
        kinds.append(st.builds(lay.pack, sign, st.just(0), _mantissas(lay, nonzero=True)))
    if allow_inf:
        kinds.append(st.builds(lay.pack, sign, st.just(ones), st.just(0)))
    if allow_nan:
        kinds.append(st.builds(lay.pack, sign, st.just(ones), _mantissas(lay, nonzero=True)))
    return st.one_of(*kinds)


def floats_array(dtype="float32", shape=8, allow_nan=True, allow_inf=True,
                 allow_subnormal=True, elements=None) -> st.SearchStrategy[np.ndarray]:
    """numpy arrays of ``dtype`` whose elements come from :func:`float_bits`.

    ``shape`` is an int, a tuple or a strategy of either. ``elements`` overrides the
    bit-pattern strategy (it must produce ints that fit the dtype's width).

    >>> from verification.strategies import floats_array
    >>> floats_array("float16", (2, 3)).example().shape
    (2, 3)
    """
    lay = _layout(dtype)
    bits = elements if elements is not None else float_bits(
        dtype, allow_nan=allow_nan, allow_inf=allow_inf, allow_subnormal=allow_subnormal)
    return hnp.arrays(lay.uint, shape, elements=bits).map(lambda a: a.view(lay.dtype))


# --------------------------------------------------------------------------- formats
def element_formats() -> st.SearchStrategy[str]:
    """Any element format key (``fp4_e2m1`` ... ``int8``)."""
    return st.sampled_from(sorted(mxref.FORMATS))


def element_codes(fmt, allow_nan=True) -> st.SearchStrategy[int]:
    """Codes (ints) of element format ``fmt``, favouring zeros, max and special codes.

    ``allow_nan=False`` leaves out NaN and Inf codes.

    >>> from verification.strategies import element_codes
    >>> 0 <= element_codes("fp4_e2m1").example() < 16
    True
    """
    f = mxref.get_format(fmt)
    special = {c | s for c in (*f.nan_codes, *f.inf_codes) for s in (0, f.sign_bit)}
    edges = [0, f.sign_bit, f.max_code, f.max_code | f.sign_bit, 1, f.sign_bit | 1]
    edges += sorted(special) if allow_nan else []
    codes = st.one_of(st.sampled_from(edges), st.integers(0, f.n_codes - 1))
    if not allow_nan:
        codes = codes.filter(lambda c: c not in special)
    return codes


def profiles() -> st.SearchStrategy["mxref.Profile"]:
    """Any preset :class:`mxref.Profile` (``ocp``, ``rceil``, ``microxcaling``, ...)."""
    return st.sampled_from(list(mxref.PRESETS.values()))


# --------------------------------------------------------------------------- blocks
def _finite_bits_near(lay: IEEELayout, efield: int, spread: int) -> st.SearchStrategy[int]:
    """Finite patterns with exponent field in [efield - spread, efield]; fields that
    fall at or below 0 become subnormals or zeros (underflow in the block)."""
    def build(sign, drop, mant):
        e = efield - drop
        if e >= 1:
            return lay.pack(sign, min(e, lay.exp_all_ones - 1), mant)
        shift = 1 - e  # value below the normal range: shift the full significand
        sig = ((1 << lay.man_bits) | mant) >> shift
        return lay.pack(sign, 0, sig)
    return st.builds(build, st.integers(0, 1), st.integers(0, spread), _mantissas(lay))


def _exp_fields(lay: IEEELayout, f) -> st.SearchStrategy[int]:
    """Exponent fields for a block maximum: anywhere, or where the scale clamps.

    The floor rule clamps the scale to 2^-127 when amax < 2^(emax - 127) and, for
    float64 input, to 2^127 when amax >= 2^(127 + emax)."""
    ones = lay.exp_all_ones
    low_clamp = lay.bias + f.emax + mxref.E8M0.min_exp   # amax exponent giving scale 2^-127
    high_clamp = lay.bias + f.emax + mxref.E8M0.max_exp  # amax exponent giving scale 2^127
    edges = {1, 2, ones - 1, ones - 2, lay.bias, lay.bias + f.emax, lay.bias + f.emax + 1}
    edges |= {e for e in (low_clamp - 1, low_clamp, low_clamp + 1, high_clamp - 1,
                          high_clamp, high_clamp + 1) if 1 <= e <= ones - 1}
    return st.one_of(st.sampled_from(sorted(edges)), st.integers(1, ones - 1))


def _grid_midpoints(f) -> np.ndarray:
    """Exact midpoints between neighbouring non-negative values of format f (float64)."""
    t = np.asarray(f.decode_table, dtype=np.float64)
    pos = np.unique(t[np.isfinite(t) & (t >= 0)])
    return (pos[:-1] + pos[1:]) / 2


@st.composite
def mx_blocks(draw, fmt, block_size=mxref.DEFAULT_BLOCK_SIZE, dtype="float32", allow_nan=True, allow_inf=True):
    """One MX block (a 1-d ``dtype`` array of ``block_size`` values) built to stress
    the scale rule of element format ``fmt``.

    Scenarios (drawn at random, then mixed with NaN/Inf when allowed):

    * ``spread``: a maximum at an edge exponent (including where the scale clamps to
      2^-127 or, for float64, 2^127) and the rest up to ~40 binades below it, so
      some elements underflow to zero or to the input dtype's subnormals;
    * ``near_pow2``: a maximum a few ulps below, at, or above a power of two
      (7.9999995 for FP4 in float32 is the floor(log2) trap);
    * ``ties``: elements exactly at midpoints between element values at the scale the
      floor rule gives (ties must round to even), when the dtype can hold them;
    * ``rceil_edge``: a maximum at, or a few ulps from, max_normal * 2^k (the
      boundary of the rceil rule);
    * ``saturate``: a maximum whose significand is above max_normal / 2^emax, so the
      block maximum clamps, with neighbours near it;
    * ``zeros``: signed zeros, optionally with dtype-subnormals;
    * ``subnormal``: only dtype-subnormal values (amax below FP32 normal: clamped
      scale; flushed to zero under ``ocp_ftz``).

    >>> from verification.strategies import mx_blocks
    >>> mx_blocks("fp4_e2m1", block_size=8).example().shape
    (8,)
    """
    f = mxref.get_format(fmt)
    lay = _layout(dtype)
    n = block_size
    scenario = draw(st.sampled_from(["spread", "near_pow2", "ties", "saturate", "zeros",
                                     "subnormal", "rceil_edge"]))
    bits: list[int]
    if scenario == "spread":
        e = draw(_exp_fields(lay, f))
        spread = draw(st.sampled_from([0, 2, 8, 40]))
        bits = draw(st.lists(_finite_bits_near(lay, e, spread), min_size=n, max_size=n))
    elif scenario == "near_pow2":
        e = draw(_exp_fields(lay, f))
        below = draw(st.integers(-3, 3))  # ulps below 2^(e - bias); negative = above
        top = lay.pack(0, e, 0) - below
        top = min(max(top, 1), lay.pack(0, lay.exp_all_ones, 0) - 1)
        rest = draw(st.lists(_finite_bits_near(lay, e, 6), min_size=n - 1, max_size=n - 1))
        bits = [top | (draw(st.integers(0, 1)) << lay.sign_shift)] + rest
    elif scenario == "ties":
        # amax = 2^k * 1.0 fixes the floor-rule scale at X = 2^(k - emax); midpoints
        # of the element grid times X are exact ties (if the dtype can hold them).
        k = draw(st.integers(-8, 8))
        x_exp = k - f.emax
        mids = _grid_midpoints(f)
        chosen = draw(st.lists(st.sampled_from(list(mids)), min_size=n - 1, max_size=n - 1))
        signs = draw(st.lists(st.sampled_from([1.0, -1.0]), min_size=n - 1, max_size=n - 1))
        # every midpoint times X is below 2^(k+1), so floor(log2 amax) stays k
        vals = np.array([2.0 ** k] + [s * np.ldexp(m, x_exp) for s, m in zip(signs, chosen)])
        arr = vals.astype(lay.dtype)
        bits = arr.view(lay.uint).astype(np.uint64).tolist()
    elif scenario == "saturate":
        e = draw(st.integers(lay.bias - 4, lay.bias + 4))
        # mantissa fields whose significand exceeds max_normal / 2^emax
        lo = f.max_normal_fraction(lay.man_bits)     # e.g. 1.5 for FP4: the top bit
        mant = st.integers(min(lo, (1 << lay.man_bits) - 1), (1 << lay.man_bits) - 1)
        top = st.builds(lay.pack, st.integers(0, 1), st.just(e), mant)
        bits = draw(st.lists(st.one_of(top, _finite_bits_near(lay, e, 3)),
                             min_size=n, max_size=n))
        bits[draw(st.integers(0, n - 1))] = draw(top)
    elif scenario == "rceil_edge":
        # amax = max_normal * 2^k exactly (or a few ulps off): the boundary of the
        # rceil rule, where X = 2^k must not become 2^(k+1)
        with np.errstate(over="ignore"):
            edges = np.ldexp(f.max_normal, np.arange(-20, 21)).astype(lay.dtype)
        edge_bits = edges.view(lay.uint).astype(np.uint64)
        fields = (edge_bits >> np.uint64(lay.man_bits)) & np.uint64(lay.exp_all_ones)
        usable = edge_bits[(fields >= 1) & (fields <= lay.exp_all_ones - 1)].tolist()
        top = draw(st.sampled_from(usable)) + draw(st.sampled_from([0, 0, 0, 1, -1, 2, -2]))
        top = min(top, lay.pack(0, lay.exp_all_ones, 0) - 1)  # stay finite
        rest = draw(st.lists(_finite_bits_near(lay, top >> lay.man_bits, 6),
                             min_size=n - 1, max_size=n - 1))
        bits = [top | (draw(st.integers(0, 1)) << lay.sign_shift)] + rest
    elif scenario == "zeros":
        sub = draw(st.booleans())
        z = st.builds(lay.pack, st.integers(0, 1), st.just(0), st.just(0))
        el = st.one_of(z, st.builds(lay.pack, st.integers(0, 1), st.just(0),
                                    _mantissas(lay, nonzero=True))) if sub else z
        bits = draw(st.lists(el, min_size=n, max_size=n))
    else:  # subnormal
        bits = draw(st.lists(st.builds(lay.pack, st.integers(0, 1), st.just(0),
                                       _mantissas(lay, nonzero=True)),
                             min_size=n, max_size=n))
    specials = []
    if allow_nan:
        specials.append(st.builds(lay.pack, st.integers(0, 1), st.just(lay.exp_all_ones),
                                  _mantissas(lay, nonzero=True)))
    if allow_inf:
        specials.append(st.builds(lay.pack, st.integers(0, 1), st.just(lay.exp_all_ones),
                                  st.just(0)))
    if specials and draw(st.integers(0, 4)) == 0:  # ~1 block in 5 holds NaN/Inf
        for _ in range(draw(st.integers(1, 2))):
            bits[draw(st.integers(0, n - 1))] = draw(st.one_of(*specials))
    return np.array(bits, dtype=np.uint64).astype(lay.uint).view(lay.dtype)


@st.composite
def mx_tensors(draw, fmt, max_dims=3, dtype="float32", max_side=12, max_block_side=70,
               block_sizes=None, allow_nan=True, allow_inf=True):
    """``(array, axis, block_size)``: an array of ``dtype`` with 1..max_dims dims,
    a blocked axis (non-negative or negative index), and a block size (1..64 by
    default) that often does not divide that axis (ragged last blocks).

    Values are mostly finite and moderate (so most blocks have a real scale) with
    edge-case bit patterns from :func:`float_bits` mixed in.

    >>> from verification.strategies import mx_tensors
    >>> x, axis, bs = mx_tensors("fp8_e4m3").example()
    >>> -x.ndim <= axis < x.ndim and bs >= 1
    True
    """
    lay = _layout(dtype)
    ndim = draw(st.integers(1, max_dims))
    axis = draw(st.integers(-ndim, ndim - 1))
    shape = [draw(st.integers(1, max_side)) for _ in range(ndim)]
    shape[axis] = draw(st.integers(1, max_block_side))
    bs = draw(block_sizes if block_sizes is not None
              else st.one_of(st.sampled_from([1, 2, 7, 16, 32, 64]), st.integers(1, 64)))
    moderate = _finite_bits_near(lay, lay.bias + draw(st.integers(-6, 6)), 12)
    edgy = float_bits(dtype, allow_nan=allow_nan, allow_inf=allow_inf)
    el = st.one_of(moderate, moderate, moderate, edgy)
    arr = draw(floats_array(dtype, tuple(shape), elements=el))
    return arr, axis, bs
