"""The MX block scenarios of the verification kit, in one table (TestFloat style).

Both input generators draw from it:

* :mod:`verification.cases` (the deterministic suites) builds every scenario of
  :data:`SCENARIOS`, in table order, as the categories of a quantize suite;
* :func:`verification.strategies.mx_blocks` (Hypothesis) samples a scenario from the
  same table and builds one random block of it.

A scenario added here without a builder in both fails tests/test_verification_scenarios.py.
Block maxima sit at :data:`ANCHORS`, values defined relative to the block scale
X = 2^s where the scale rule or the element grid changes, each with the input ulps
around it worth probing. Everything else comes from the format (specs/formats.toml).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mxref.formats import FormatInfo


@dataclass(frozen=True)
class Scenario:
    name: str   # the category name in generated suites
    what: str   # what it stresses


SCENARIOS = (
    Scenario("amax_position", "the block maximum at each anchor (ANCHORS), at the probed "
                              "positions, both signs, over a random background"),
    Scenario("tie", "elements exactly at midpoints of the element grid at the block scale "
                    "(ties round to even, or away under microxcaling)"),
    Scenario("near_tie", "elements one input ulp either side of those midpoints"),
    Scenario("subnormal_result", "elements on and between the element format's subnormals"),
    Scenario("saturate", "several elements between max_normal * X and 2^(emax+1) * X"),
    Scenario("underflow", "elements at, one ulp around, and below half the smallest element "
                          "subnormal"),
    Scenario("nan_inf", "a NaN (several payloads) or an Inf of either sign: the block's "
                        "scale becomes NaN"),
    Scenario("all_zero", "signed zeros only: the smallest scale, signed zero codes"),
    Scenario("scale_min", "maxima at and below 2^(emax + E8M0 min_exp): the scale clamps "
                          "at its minimum"),
    Scenario("scale_max", "the largest maxima the input type holds: the largest scale "
                          "it reaches"),
    Scenario("fp32_subnormal", "input subnormals (flushed by ocp_ftz) next to normal values"),
    Scenario("random", "random blocks: clustered exponents, a wide spread, raw bit patterns"),
)
SCENARIO_NAMES = tuple(s.name for s in SCENARIOS)


@dataclass(frozen=True)
class Anchor:
    """A block maximum relative to the scale X = 2^s the floor rule gives it."""

    name: str
    value: Callable[[FormatInfo, int], float]   # exact value for format f at scale 2^s
    ulps: tuple[int, ...]   # input ulps from the value to probe (-1: one ulp toward zero)
    why: str


ANCHORS = (
    Anchor("pow2", lambda f, s: 2.0 ** (f.emax + s), (0, -1),
           "2^emax * X exactly, and one ulp below, where floor(log2 amax) drops a binade "
           "(7.9999995 for FP4 in float32 is the trap of a float log2)"),
    Anchor("max_normal", lambda f, s: f.max_normal * 2.0 ** s, (0,),
           "max_normal * X: the boundary of the rceil rule (X must not double)"),
    Anchor("next_binade", lambda f, s: 2.0 ** (f.emax + 1 + s), (-1,),
           "one ulp below 2^(emax+1) * X: the largest amax of the binade, saturates"),
    Anchor("mid_max_next", lambda f, s: (f.max_normal + 2.0 ** (f.emax - f.step_bits) / 2)
           * 2.0 ** s, (0,),
           "half an element ulp above max_normal * X: rounds past the largest code"),
)


def element_grid(f: FormatInfo) -> tuple[np.ndarray, np.ndarray]:
    """(non-negative finite element values, ascending; the midpoints between neighbours),
    float64 and exact: the tie and near-tie scenarios place elements on the midpoints."""
    t = np.asarray(f.decode_table, dtype=np.float64)
    grid = np.unique(t[np.isfinite(t) & (t >= 0)])
    return grid, (grid[:-1] + grid[1:]) / 2
