"""Public Hypothesis strategies for testing OCP MX implementations.

Inputs are drawn as *bit patterns*, so that every NaN payload, signed zero, subnormal
and exponent edge is reachable (Hypothesis' own ``floats`` strategy reaches few NaN
payloads and no bfloat16). Blocks are shaped to stress the MX scale rule: block
maxima next to powers of two, exact rounding ties at the block scale, saturating
maxima, underflow, NaN/Inf positions, all-zero blocks and scales at 2^-127 / 2^127.

Only numpy, hypothesis and mxref are imported (never torch). The block scenarios come
from :mod:`verification.scenarios`, the table the deterministic suites use too. Example::

    from hypothesis import given
    import mxref
from mxref.formats import IEEE_LAYOUTS, IEEELayout
from verification.scenarios import ANCHORS, SCENARIO_NAMES, element_grid
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
from verification.scenarios import ANCHORS, SCENARIO_NAMES, element_grid

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


def _cast_bits(lay: IEEELayout, values) -> list[int]:
    """Patterns of float64 ``values`` rounded into the input type (Inf/NaN allowed)."""
    with np.errstate(over="ignore"):
        arr = np.asarray(values, dtype=np.float64).astype(lay.dtype)
    return arr.view(lay.uint).astype(np.uint64).tolist()


def _finite_magnitude(lay: IEEELayout, bits: int) -> int:
    """bits with the sign dropped, kept inside [smallest subnormal, largest finite]."""
    return min(max(bits & lay.abs_mask, 1), lay.max_finite_bits)


def _signed(draw, lay: IEEELayout, mags: list[int]) -> list[int]:
    return [m | (draw(st.integers(0, 1)) << lay.sign_shift) for m in mags]


def _on_grid(draw, lay, f, n, values_of_grid, near: bool) -> list[int]:
    """A block whose maximum 2^k fixes the floor-rule scale at X = 2^(k - emax) and whose
    other elements are ``values_of_grid`` (element-grid points, times X; exact ties when
    they are midpoints), or one input ulp either side of them when ``near``."""
    k = draw(st.integers(-8, 8))
    x_exp = k - f.emax
    chosen = draw(st.lists(st.sampled_from(list(values_of_grid)), min_size=n - 1,
                           max_size=n - 1))
    # every grid value times X is below 2^(k+1), so floor(log2 amax) stays k
    mags = [m & lay.abs_mask for m in _cast_bits(lay, np.ldexp(chosen, x_exp))]
    if near:
        mags = [_finite_magnitude(lay, m + draw(st.sampled_from([-1, 1]))) if m else m
                for m in mags]
    top = _cast_bits(lay, [2.0 ** k])[0]
    bits = _signed(draw, lay, mags)
    bits.insert(draw(st.integers(0, n - 1)), top | (draw(st.integers(0, 1)) << lay.sign_shift))
    return bits


def _scenario_block(draw, scenario: str, f, lay: IEEELayout, n: int) -> list[int]:
    """One block of ``n`` patterns of the named scenario (verification.scenarios)."""
    ones = lay.exp_all_ones
    if scenario == "amax_position":
        anchor = draw(st.sampled_from(ANCHORS))
        e = draw(_exp_fields(lay, f))               # the block max's binade ...
        s = e - lay.bias - f.emax                   # ... and the scale the floor rule gives
        try:
            value = anchor.value(f, s)
        except OverflowError:   # float64 inputs: 2^1024 and up
            value = np.inf
        top = _cast_bits(lay, [value])[0]
        ulps = draw(st.sampled_from(sorted(set(anchor.ulps) | {-3, -2, -1, 0, 1, 2, 3})))
        top = _finite_magnitude(lay, top + ulps)
        rest = draw(st.lists(_finite_bits_near(lay, top >> lay.man_bits, 6),
                             min_size=n - 1, max_size=n - 1))
        rest.insert(draw(st.integers(0, n - 1)), _signed(draw, lay, [top])[0])
        return rest
    if scenario in ("tie", "near_tie"):
        return _on_grid(draw, lay, f, n, element_grid(f)[1], near=scenario == "near_tie")
    if scenario == "subnormal_result":
        k = np.arange(1, 2 * (1 << f.step_bits) + 1, dtype=np.float64)
        return _on_grid(draw, lay, f, n, k * f.min_subnormal / 2, near=False)
    if scenario == "underflow":
        half = f.min_subnormal / 2
        return _on_grid(draw, lay, f, n, [half, half / 2, half * 2.0 ** -29], near=draw(
            st.booleans()))
    if scenario == "saturate":
        e = draw(st.integers(lay.bias - 4, lay.bias + 4))
        # mantissa fields whose significand exceeds max_normal / 2^emax
        lo = f.max_normal_fraction(lay.man_bits)     # e.g. 1.5 for FP4: the top bit
        mant = st.integers(min(lo, lay.frac_mask), lay.frac_mask)
        top = st.builds(lay.pack, st.integers(0, 1), st.just(e), mant)
        bits = draw(st.lists(st.one_of(top, _finite_bits_near(lay, e, 3)),
                             min_size=n, max_size=n))
        bits[draw(st.integers(0, n - 1))] = draw(top)
        return bits
    if scenario == "nan_inf":
        bits = draw(st.lists(_finite_bits_near(lay, draw(_exp_fields(lay, f)), 8),
                             min_size=n, max_size=n))
        bits[draw(st.integers(0, n - 1))] = draw(st.builds(
            lay.pack, st.integers(0, 1), st.just(ones),
            st.one_of(st.just(0), _mantissas(lay, nonzero=True))))
        return bits
    if scenario == "all_zero":
        sub = draw(st.booleans())   # optionally with input subnormals among the zeros
        z = st.builds(lay.pack, st.integers(0, 1), st.just(0), st.just(0))
        el = st.one_of(z, st.builds(lay.pack, st.integers(0, 1), st.just(0),
                                    _mantissas(lay, nonzero=True))) if sub else z
        return draw(st.lists(el, min_size=n, max_size=n))
    if scenario in ("scale_min", "scale_max"):
        clamp = lay.bias + f.emax + (mxref.E8M0.min_exp if scenario == "scale_min"
                                     else mxref.E8M0.max_exp)
        ends = (1, 2) if scenario == "scale_min" else (ones - 1, ones - 2)
        fields = sorted({e for e in (clamp - 1, clamp, clamp + 1, *ends) if 1 <= e < ones})
        e = draw(st.sampled_from(fields))
        return draw(st.lists(_finite_bits_near(lay, e, draw(st.sampled_from([0, 2, 8]))),
                             min_size=n, max_size=n))
    if scenario == "fp32_subnormal":   # the input type's subnormals, maybe one normal
        bits = draw(st.lists(st.builds(lay.pack, st.integers(0, 1), st.just(0),
                                       _mantissas(lay, nonzero=True)),
                             min_size=n, max_size=n))
        if draw(st.booleans()):
            bits[draw(st.integers(0, n - 1))] = draw(_finite_bits_near(lay, 7, 6))
        return bits
    # random: a maximum at an edge exponent and the rest up to ~40 binades below it
    e = draw(_exp_fields(lay, f))
    spread = draw(st.sampled_from([0, 2, 8, 40]))
    return draw(st.lists(_finite_bits_near(lay, e, spread), min_size=n, max_size=n))


@st.composite
def mx_blocks(draw, fmt, block_size=mxref.DEFAULT_BLOCK_SIZE, dtype="float32",
              allow_nan=True, allow_inf=True):
    """One MX block (a 1-d ``dtype`` array of ``block_size`` values) built to stress
    the scale rule of element format ``fmt``.

    The scenario is drawn from :data:`verification.scenarios.SCENARIOS`, the table the
    deterministic suites (:mod:`verification.cases`) are built from too: block maxima at
    the scenario ANCHORS (a power of two and just below it -- 7.9999995 for FP4 in
    float32 is the floor(log2) trap --, max_normal * X for the rceil rule, the top of
    the binade) a few ulps either way, ties and near ties of the element grid at the
    block scale, element-subnormal results, saturation, underflow, NaN/Inf, signed
    zeros, the scale clamped at 2^-127 / 2^127, input subnormals and random spreads.
    Any block then gets a NaN or an Inf with probability ~1/5 when allowed.

    >>> from verification.strategies import mx_blocks
    >>> mx_blocks("fp4_e2m1", block_size=8).example().shape
    (8,)
    """
    f = mxref.get_format(fmt)
    lay = _layout(dtype)
    n = block_size
    names = [s for s in SCENARIO_NAMES if s != "nan_inf" or allow_nan or allow_inf]
    bits = _scenario_block(draw, draw(st.sampled_from(names)), f, lay, n)
    specials = []
    if allow_nan:
        specials.append(st.builds(lay.pack, st.integers(0, 1), st.just(lay.exp_all_ones),
                                  _mantissas(lay, nonzero=True)))
    if allow_inf:
        specials.append(st.builds(lay.pack, st.integers(0, 1), st.just(lay.exp_all_ones),
                                  st.just(0)))
    if specials:
        # the nan_inf scenario's special is whichever kind is allowed
        bits = [draw(st.one_of(*specials)) if (b & lay.abs_mask) >= lay.inf_bits else b
                for b in bits]
        if draw(st.integers(0, 4)) == 0:   # ~1 block in 5 holds NaN/Inf
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
