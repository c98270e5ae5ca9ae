"""dmx.search.baseline: uniform and KL-selection baselines; the budget is met, never exceeded."""
from __future__ import annotations

import pytest

from dmx import data, outdir
from dmx.errors import DMXError
from dmx.nn.bits import average_bits_of
from dmx.quant.ladders import get_ladder
from dmx.search import baseline
from tiny_models import tiny_model_dir, tiny_root

pytestmark = pytest.mark.usefixtures("single_threaded")  # tests/conftest.py


def _units_and_shapes():
    """Two blocks of a Llama-like model with unequal layer sizes."""
    names, shapes = [], {}
    for b in range(2):
        for proj, shape in (("self_attn.q_proj", (48, 48)), ("self_attn.k_proj", (24, 48)),
                            ("self_attn.v_proj", (24, 48)), ("self_attn.o_proj", (48, 48)),
                            ("mlp.gate_proj", (80, 48)), ("mlp.up_proj", (80, 48)),
                            ("mlp.down_proj", (48, 80))):
            n = f"model.layers.{b}.{proj}"
            names.append(n)
            shapes[n] = shape
    return baseline.fused_units(names), shapes


def test_fused_units_tie_qkv_and_gate_up():
    units, _ = _units_and_shapes()
    assert len(units) == 8
    assert ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj") in units
    assert ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj") in units


@pytest.mark.parametrize("weighting", ["simple", "size"])
@pytest.mark.parametrize("target", [4.0, 4.9, 5.5, 6.0, 7.3, 8.0])
def test_greedy_promote_meets_budget(weighting, target):
    units, shapes = _units_and_shapes()
    sens = {u: float(i * 7 % 5) + i / 100 for i, u in enumerate(units)}
    lad = get_ladder("fp8-fp4")
    formats = baseline.greedy_promote(units, sens, shapes, lad, target, weighting)
    key = "simple" if weighting == "simple" else "size_weighted"
    acts = dict(formats)

    def avg(f):
        return average_bits_of(f, dict(f), shapes)[key]

    assert avg(formats) <= target + 1e-9
    for u in units:  # fused units share one format
        assert len({formats[n] for n in u}) == 1
    low = [u for u in units if formats[u[0]] == lad.low.fmt]
    for u in low:  # nothing left could be promoted without exceeding the budget
        trial = {**acts, **{n: lad.high.fmt for n in u}}
        assert avg(trial) > target + 1e-9
    ranked = sorted(units, key=lambda u: -sens[u])
    alone = {**{n: lad.low.fmt for n in formats}, **{n: lad.high.fmt for n in ranked[0]}}
    if avg(alone) <= target:  # the most sensitive unit is promoted whenever it fits
        assert formats[ranked[0][0]] == lad.high.fmt


def test_three_rung_ladder_fills_with_the_middle_rung():
    units, shapes = _units_and_shapes()
    sens = {u: float(i) for i, u in enumerate(units)}
    lad = get_ladder("fp8-fp6-fp4")
    formats = baseline.greedy_promote(units, sens, shapes, lad, 5.0, "simple")
    used = set(formats.values())
    assert average_bits_of(formats, dict(formats), shapes)["simple"] <= 5.0
    assert "fp8_e4m3" in used and len(used) >= 2


@pytest.mark.parametrize("target", [3.9, 8.5, float("nan")])
def test_impossible_targets(target):
    with pytest.raises(DMXError, match="impossible with ladder fp8-fp4"):
        baseline.check_target_bits(target, get_ladder("fp8-fp4"))


def test_kl_baseline_end_to_end(tmp_path_factory, tmp_path):
    src = tiny_model_dir(tiny_root(tmp_path_factory), "llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(data.default_calibration_file().read_text()[:30_000])
    res = baseline.kl_baseline(src, 5.5, tmp_path / "out", calib=[calib], samples=2, seqlen=32,
                               progress=False)
    m = outdir.read_manifest(tmp_path / "out")
    assert m["method"] == "kl" and m["target_bits"] == 5.5 and m["ladder"] == "fp8-fp4"
    assert m["avg_bits"]["simple"] <= 5.5 and m["avg_bits"] == {**m["avg_bits"], **res["avg_bits"]}
    sens = m["baseline"]["sensitivity"]
    assert len(sens) == 8 and all(v >= 0 for v in sens.values())  # KL is non-negative
    assert max(sens.values()) > 0
    fmts = {n: e["format"] for n, e in m["layers"].items()}
    assert set(fmts.values()) == {"fp4_e2m1", "fp8_e4m3"}  # 5.5 fits some but not all high
    for e in m["layers"].values():
        assert e["act_format"] == e["format"]
    # the highest-sensitivity unit got the high rung
    top = max(sens, key=sens.get).split("+")
    assert all(fmts[n] == "fp8_e4m3" for n in top)


def test_uniform_baseline(tmp_path_factory, tmp_path):
    src = tiny_model_dir(tiny_root(tmp_path_factory), "qwen3")
    res = baseline.uniform_baseline(src, "fp4_e2m1", tmp_path / "u4", weights_only=True)
    m = outdir.read_manifest(tmp_path / "u4")
    assert m["method"] == "uniform" and len(m["layers"]) == 14
    assert all(e["format"] == "fp4_e2m1" and e["act_format"] is None
               for e in m["layers"].values())
    assert res["avg_bits"]["simple"] == m["avg_bits"]["simple"] == 4.0
    assert "lm_head" not in " ".join(m["layers"])
