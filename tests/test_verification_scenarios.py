"""One scenario table (verification.scenarios) for both input generators: the
deterministic suites (verification.cases) and the Hypothesis strategies
(verification.strategies.mx_blocks) build every scenario in it."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mxref
import oracle
from verification import cases
from verification.scenarios import ANCHORS, SCENARIO_NAMES, SCENARIOS
from verification.strategies import DTYPES, _scenario_block, element_formats, profiles


def test_table_names_are_unique_and_explained():
    assert len(set(SCENARIO_NAMES)) == len(SCENARIOS)
    assert all(s.what.strip() for s in SCENARIOS) and all(a.why.strip() for a in ANCHORS)


@pytest.mark.parametrize("fmt", sorted(mxref.FORMATS))
def test_quantize_suites_are_the_table_in_order(fmt):
    assert set(cases.QUANTIZE_BUILDERS) == set(SCENARIO_NAMES)
    cs = cases.generate("quantize", fmt, "1")
    assert [c for c, _, _ in cs.runs] == list(SCENARIO_NAMES)


@pytest.mark.parametrize("fmt", sorted(mxref.FORMATS))
def test_every_anchor_is_probed_at_each_scale(fmt):
    f = mxref.get_format(fmt)
    names = [n for n, _ in cases.anchor_bits(f, 0)]
    assert len(names) == sum(len(a.ulps) for a in ANCHORS)
    # anchors are block maxima of the binade that gives scale 2^s
    for _, bits in cases.anchor_bits(f, -5):
        v = float(np.array([bits], np.uint32).view(np.float32)[0])
        assert 2.0 ** (f.emax - 5 - 1) <= v < 2.0 ** (f.emax - 5 + 2)


@pytest.mark.parametrize("scenario", SCENARIO_NAMES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
@settings(max_examples=15)
@given(data=st.data())
def test_strategies_build_every_scenario_and_mxref_matches_the_oracle(scenario, dtype, data):
    """Each scenario's Hypothesis block has the block size, is of the input type, and
    mxref quantizes it as the Fraction oracle does."""
    fmt = mxref.get_format(data.draw(element_formats(), label="fmt"))
    profile = data.draw(profiles(), label="profile")
    lay = DTYPES[dtype]
    bits = _scenario_block(data.draw, scenario, fmt, lay, 16)
    assert len(bits) == 16 and all(0 <= b < 1 << lay.bits for b in bits)
    x = np.array(bits, np.uint64).astype(lay.uint).view(lay.dtype)
    mx = mxref.quantize(x, fmt, block_size=16, profile=profile)
    scales, codes = oracle.quantize_row(bits, dtype, fmt, profile, 16)
    assert mx.scales.tolist() == list(scales) and mx.codes.tolist() == list(codes), \
        (scenario, dtype, fmt.key, profile.name, [hex(b) for b in bits])
