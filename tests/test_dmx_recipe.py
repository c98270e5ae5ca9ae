"""Search recipes (dmx.search.recipe.SearchConfig): the default recipe's stability on real models,
`--recipe paper` against the reference's formulas computed by hand, the manifest's
round trip of the config, the export-target plan and the --seqlen cap."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from dmx import data
from dmx.errors import DMXError
from dmx.export.plan import plan_for_target
from dmx.nn.layers import dmx_parameters, wrap_model
from dmx.search.recipe import RECIPES, SearchConfig, config_from_dict
from dmx.search import read_search_log, search
from dmx.search.train import batch_indices, train_offsets

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT / "tests" / "data" / "stories260K-hf"
WIKI = ROOT / "dmx" / "data" / "wikitext-2-raw" / "wiki.valid.raw"


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(WIKI.read_text(encoding="utf-8")[:40000], encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- config
def test_paper_recipe_is_the_reference_release():
    cfg = SearchConfig.from_recipe("paper", target_bits=6.0)
    assert (cfg.budget, cfg.lam, cfg.parameterization, cfg.tie_fused, cfg.init) == \
        ("hinge", 5.0, "abs", False, "low")
    assert (cfg.lr, cfg.momentum, cfg.nesterov, cfg.grad_norm, cfg.max_grad_norm) == \
        (1.0, 0.99, True, "clip", 1.0)
    assert (cfg.t_start, cfg.t_end, cfg.delay, cfg.fill_budget) == (0.4, 20.0, 0.6, False)
    assert cfg.average_last == 0.0   # the final offsets, as the reference deploys them
    assert set(RECIPES) == {"default", "paper", "project", "target-start"}
    # the default recipe: the paper's offsets, start, optimizer and anneal, the hinge
    # replaced by the bounded budget with a ramp, plus distillation and the fill
    default = SearchConfig.from_recipe("default", target_bits=6.0)
    same = ("parameterization", "init", "lr", "momentum", "nesterov", "grad_norm",
            "max_grad_norm", "delay", "t_start", "t_end")
    assert [getattr(default, k) for k in same] == [getattr(cfg, k) for k in same]
    assert (default.budget, default.ramp, default.offset_margin, default.distill,
            default.fill_budget, default.average_last) == ("bound", 0.5, 0.5, True, True, 0.5)
    # a config written before --average-last existed deployed its final offsets
    old = default.to_dict()
    del old["average_last"]
    assert config_from_dict(old).average_last == 0.0
    # the earlier defaults, kept for comparison
    project = SearchConfig.from_recipe("project", target_bits=6.0)
    assert (project.budget, project.parameterization, project.lr, project.grad_norm,
            project.distill) == ("project", "clamp", 0.02, "normalize", False)


def test_flags_override_the_recipe_and_bad_values_are_refused():
    cfg = SearchConfig.from_recipe("paper", target_bits=5, lam=0.5, include="mlp")
    assert cfg.lam == 0.5 and cfg.include == ("mlp",) and cfg.recipe == "paper"
    for bad in (dict(recipe="fast"), dict(budget="soft"), dict(lr=-1.0), dict(steps=0),
                dict(momentum=1.0), dict(target_bits=9.0),
                dict(budget="project", parameterization="abs")):
        recipe = bad.pop("recipe", "default")
        with pytest.raises(DMXError):
            SearchConfig.from_recipe(recipe, **{"target_bits": 5.0, **bad})


def test_a_vllm_export_target_ties_the_fused_groups_unless_told_not_to():
    """vLLM serves q/k/v and gate/up as one matmul in one format: --export-target
    compressed-tensors or quark ties them; any/gguf leave the (untied) default; an explicit
    --tie-fused / --no-tie-fused wins either way."""
    def tied(**kw):
        return SearchConfig.from_recipe("default", target_bits=5.0, **kw).tie_fused

    assert tied() is False and tied(export_target="gguf") is False
    assert tied(export_target="compressed-tensors") is True and tied(export_target="quark")
    assert tied(export_target="quark", tie_fused=False) is False
    assert tied(export_target="gguf", tie_fused=True) is True


def test_config_round_trips_through_json():
    cfg = SearchConfig.from_recipe("default", target_bits=5.5, include=["mlp", "attn"],
                                   calib=["/a.txt"], samples=7)
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ----------------------------------------------------------------------------- export plan
def test_export_plan_excludes_ragged_layers_and_refuses_unstorable_rungs():
    shapes = {"a": (64, 64), "b": (64, 172), "c": (32, 96)}
    kept, excluded = plan_for_target(shapes, "fp8-fp4", "any")
    assert kept == ["a", "c"] and list(excluded) == ["b"] and "172" in excluded["b"]
    assert plan_for_target(shapes, "fp8-fp4", "none") == (["a", "b", "c"], {})
    # MXFP6: only Quark holds it; the message names the target that works
    with pytest.raises(DMXError, match="compressed-tensors cannot store fp6_e2m3; use "
                                       "--export-target quark"):
        plan_for_target(shapes, "fp6-fp4", "compressed-tensors")
    # MXFP6 and MXFP8 weights together: no target holds both
    with pytest.raises(DMXError, match="cannot store fp6_e3m2; use another --ladder"):
        plan_for_target(shapes, "fp8-fp6-fp4", "compressed-tensors")
    with pytest.raises(DMXError, match="cannot store"):
        plan_for_target(shapes, "fp8-fp6-fp4", "any")
    assert plan_for_target(shapes, "fp6-fp4", "quark")[0] == ["a", "c"]
    # Quark holds no MXFP8 weights (amd-quark cannot run them); "any" leaves Quark out
    with pytest.raises(DMXError, match="quark cannot store fp8_e4m3"):
        plan_for_target(shapes, "fp8-fp6-fp4", "quark")
    assert plan_for_target(shapes, "fp8-fp4", "any")[0] == ["a", "c"]
    with pytest.raises(DMXError, match="no layer can be exported"):
        plan_for_target({"b": (64, 172)}, "fp8-fp4", "gguf")


# ----------------------------------------------------------------------------- default recipe
@pytest.mark.parametrize("model_dir, target", [(data.embedded_model_dir(), 5.0),
                                               (STORIES, 6.0)])
def test_default_recipe_does_not_collapse(model_dir, target, calib, tmp_path):
    """The failure the default recipe fixes: under the paper's hinge + momentum 0.99 the
    offsets left the ladder by tens of units and froze there. Here (the paper's optimizer,
    the budget bounded instead) every step's effective offsets stay within the ladder +-
    offset_margin, the soft average the forward pass used never leaves [floor, target],
    and the raw hard assignment (no fill) ends within a few units of the target. (The
    anneal finishes at T 20: the soft and hard model then agree too.)"""
    cfg = SearchConfig.from_recipe("default", target_bits=target, steps=16, batch_size=2,
                                   seqlen=32, samples=16, fill_budget=False,
                                   export_target="none", calib=[str(calib)])
    r = search(model_dir, cfg, out=tmp_path / "out", progress=False, checkpoint_every=0)
    log = read_search_log(tmp_path / "out")
    lo, hi = 0.0 - cfg.offset_margin, 2.0 + cfg.offset_margin
    for rec in log["steps"]:
        assert lo - 1e-6 <= rec["offset_min"] and rec["offset_max"] <= hi + 1e-6, rec["step"]
        # never over the budget, never under the ramp's floor (then at the target)
        floor = cfg.budget_floor(rec["step"])
        assert floor - 2e-3 <= rec["avg_bits"] <= target + 2e-3, rec["step"]
    spread = log["steps"][-1]["offset_max"] - log["steps"][-1]["offset_min"]
    assert spread > 0.3, "the offsets never separated: the test would be vacuous"
    n_units = len(log["units"])
    unit_bits = 4.0 / n_units  # one unit moving MXFP4 <-> MXFP8 (tied units count more)
    assert abs(r["raw_bits"]["simple"] - target) <= 3 * unit_bits, (r["raw_bits"], unit_bits)
    assert r["budget_repair"]["moves"] == [] or all(
        m["step"] == "fit" for m in r["budget_repair"]["moves"])
    # the dynamics are in the log and the manifest holds the whole config
    assert {"loss", "penalty", "avg_bits", "hard_bits", "T", "offsets"} <= set(log["steps"][0])
    manifest = json.loads((tmp_path / "out" / "dmx_manifest.json").read_text())
    assert config_from_dict(manifest["search"]["config"]) == r["config"]
    end = manifest["search"]["end_ppl"]
    assert all(math.isfinite(end[k]) for k in ("soft", "hard_raw", "hard_repaired"))


def test_average_last_assigns_from_the_mean_of_the_last_steps_offsets(calib, tmp_path):
    """--average-last F: the same steps as without it (the log is identical), then every
    unit goes to the rung nearest the mean of its clamped b_hat over the last ceil(F x
    steps) steps, and the budget repair ranks by that mean. The search log keeps both the
    offsets the assignment came from and the final ones."""
    from dmx.quant.anneal import hard_rung
    from dmx.quant.ladders import get_ladder

    common = dict(target_bits=6.0, steps=8, batch_size=2, seqlen=32, samples=16,
                  fill_budget=False, export_target="none", calib=[str(calib)])
    plain = search(STORIES, SearchConfig.from_recipe("default", average_last=0.0, **common),
                   out=tmp_path / "plain", progress=False, checkpoint_every=0)
    avg = search(STORIES, SearchConfig.from_recipe("default", average_last=0.3, **common),
                 out=tmp_path / "avg", progress=False, checkpoint_every=0)
    a, b = read_search_log(tmp_path / "plain"), read_search_log(tmp_path / "avg")
    assert [r["offsets"] for r in a["steps"]] == [r["offsets"] for r in b["steps"]]
    assert b["final_offsets"] == a["offsets"] and "final_offsets" not in a
    lad = get_ladder("fp8-fp4")
    last = [r["offsets"] for r in b["steps"][-3:]]   # ceil(0.3 x 8) = 3
    mean = {u: sum(min(2.0, max(0.0, o[i])) for o in last) / 3
            for i, u in enumerate(b["units"])}
    assert b["offsets"] == pytest.approx(mean, abs=1e-6)
    assert b["offsets"] != pytest.approx(a["offsets"], abs=1e-3), "vacuous: nothing moved"
    raw = {u: hard_rung(mean[u], lad).fmt for u in b["units"]}
    assert avg["raw_formats"] == raw
    moved = {m["unit"] for m in avg["budget_repair"]["moves"]}
    assert {u: f for u, f in avg["formats"].items() if u not in moved} == \
        {u: f for u, f in raw.items() if u not in moved}
    assert avg["config"].average_last == 0.3 and plain["config"].average_last == 0.0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(DMXError, match="--average-last"):
            SearchConfig.from_recipe("default", average_last=bad, **common)


def test_seqlen_is_capped_at_the_models_positions(calib, tmp_path, capsys):
    r = search(data.embedded_model_dir(), 5.0, calib=[calib], seqlen=4096, samples=1,
               steps=1, batch_size=1, out=tmp_path / "o", progress=False, checkpoint_every=0)
    assert r["config"].seqlen == 512  # tiny-qwen3's max_position_embeddings
    assert "longer than the model's 512 positions" in capsys.readouterr().err


# ----------------------------------------------------------------------------- paper recipe
def _frozen_embedded_model(ladder: str, include=None):
    """A fresh tiny-qwen3 with frozen weights in eval mode, its ``include`` linears wrapped
    untied with abs() offsets (None: left plain); returns (model, tokenizer, layers)."""
    model, tok = data.load_model_and_tokenizer(data.embedded_model_dir())
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    layers = None if include is None else wrap_model(model, ladder, tie_fused=False,
                                                     parameterization="abs", include=include)
    return model, tok, layers


def _set_offsets(model, values) -> list:
    """Every offset Parameter of ``model`` (model order) set to ``values``; returns them."""
    params = dmx_parameters(model)
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.fill_(float(v))
    return params


def _train_from(model, layers, windows, cfg, start):
    """train_offsets from the offsets ``start``: (the per-step log, the learned offsets)."""
    params = _set_offsets(model, start)
    log = train_offsets(model, layers, windows, cfg, progress=False, checkpoint_every=0)
    return log, torch.stack([p.detach() for p in params])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_paper_recipe_steps_equal_the_reference_formulas(calib):
    """Two SGD steps of --recipe paper against the reference written out by hand:
    b = |o| (sign gradient, +1 at 0), F(b) = 2 sigmoid(20 T (b/2 - 0.5)), bits = 4 + 2F
    per layer (untied), R = lam max(0, mean bits - target), total gradient clipped at
    L2 norm 1, SGD lr 1 with Nesterov momentum 0.99. Only the cross-entropy part of the
    gradient comes from autograd (recomputed on a fresh copy of the model)."""
    cfg = SearchConfig.from_recipe("paper", target_bits=4.5, steps=2, batch_size=2,
                                   seqlen=32, samples=4, delay=1.0)

    def fresh():
        return _frozen_embedded_model(cfg.ladder, ["layers.0.", "layers.1."])

    model, tok, layers = fresh()
    windows = data.calibration_windows(tok, [str(calib)], cfg.seqlen, cfg.samples, cfg.seed)
    # start inside the ladder, above the target: the hinge is active, so is the clip
    start = torch.linspace(0.9, 1.6, len(layers))
    got, learned = _train_from(model, layers, windows, cfg, start)
    learned = learned.double()

    # the reference, by hand
    ref_model, _, ref_layers = fresh()
    params = dmx_parameters(ref_model)
    o = start.double().clone()
    buf = None
    T = cfg.t_start
    n = len(ref_layers)
    for step in range(cfg.steps):
        for layer in ref_layers.values():
            layer.train()
            layer.temperature = T
        for p, v in zip(params, o):
            p.data.fill_(float(v))
            p.grad = None
        ids = windows[batch_indices(cfg.seed, step, windows.shape[0], cfg.batch_size)]
        logits = ref_model(input_ids=ids, use_cache=False).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                               ids[:, 1:].flatten())
        ce.backward()
        g_ce = torch.stack([p.grad for p in params]).double()
        b = o.abs().clamp(0.0, 2.0)  # clamp_ste: forward clamped, gradient passed
        s = torch.tensor([_sigmoid(20 * T * (float(x) / 2 - 0.5)) for x in b],
                         dtype=torch.float64)
        bits = 4 + 2 * (2 * s)
        dbits_do = 2 * (2 * 20 * T / 2 * s * (1 - s)) * torch.where(o >= 0, 1.0, -1.0)
        avg = float(bits.mean())
        assert avg > cfg.target_bits  # the hinge is on in both steps (non-vacuous)
        g = g_ce + cfg.lam * dbits_do / n
        norm = float(g.norm())
        assert norm > cfg.max_grad_norm  # the clip acts
        g = g * (cfg.max_grad_norm / norm)
        buf = g.clone() if buf is None else cfg.momentum * buf + g
        o = o - cfg.lr * (g + cfg.momentum * buf)
        assert got[step]["avg_bits"] == pytest.approx(avg, abs=1e-5)
        assert got[step]["penalty"] == pytest.approx(cfg.lam * (avg - cfg.target_bits),
                                                     abs=5e-5)
    # float32 (the code) vs float64 (here), through a quantizer that is not smooth in the
    # offset: ~1e-5 after two steps; a wrong formula (no Nesterov, no clip) moves 0.1+
    torch.testing.assert_close(learned, o, rtol=0, atol=1e-4)


def _perturbed_offsets(init: float, noise, seed: int, parameterization: str = "clamp"):
    """tiny-qwen3 wrapped at offset ``init``, T 0.9, each offset moved by ``noise()``."""
    model, _ = data.load_model_and_tokenizer(data.embedded_model_dir())
    layers = wrap_model(model, "fp8-fp4", init=init, parameterization=parameterization)
    for layer in layers.values():
        layer.train()
        layer.temperature = 0.9
    params = dmx_parameters(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(noise())
    return layers, params


def test_projection_meets_the_budget_with_the_penalty_definition():
    """project_to_budget's vectorized average equals dmx.nn.bits.average_bits of the
    layers afterwards (the one definition), for both weightings and tied layers."""
    from dmx.search.assign import project_to_budget
    from dmx.nn.bits import average_bits

    layers, params = _perturbed_offsets(0.7, lambda: torch.randn(()) * 0.8, seed=0)
    for weighting, target in (("simple", 5.3), ("size", 6.1)):
        before = [float(p.detach()) for p in params]
        shift = project_to_budget(layers, params, target, weighting, 0.9, margin=0.5)
        assert float(average_bits(layers, weighting).detach()) == pytest.approx(target, abs=1e-5)
        inside = [b + shift for b in before if -0.5 < b + shift < 2.5]
        assert inside and all(float(p.detach()) == pytest.approx(b + shift, abs=1e-6)
                              for p, b in zip(params, before) if -0.5 < b + shift < 2.5)
        assert all(-0.5 - 1e-6 <= float(p.detach()) <= 2.5 + 1e-6 for p in params)


def test_projection_with_a_floor_acts_only_outside_the_band():
    """--budget project with a floor (the default recipe's ramp): inside [floor, target]
    the offsets are only boxed (the cross-entropy raises them); under the floor they are
    raised to it, over the target lowered to it, by one common shift."""
    from dmx.search.assign import project_to_budget
    from dmx.nn.bits import average_bits

    # some offsets below the box (-0.5)
    layers, params = _perturbed_offsets(0.0, lambda: torch.rand(()) * 0.3 - 0.9, seed=1)
    before = [float(p.detach()) for p in params]
    assert float(average_bits(layers, "simple").detach()) < 5.0
    assert project_to_budget(layers, params, 5.0, "simple", 0.9, margin=0.5,
                             floor=3.9) == 0.0
    assert [float(p.detach()) for p in params] == pytest.approx(
        [max(b, -0.5) for b in before], abs=1e-6)
    shift = project_to_budget(layers, params, 5.0, "simple", 0.9, margin=0.5, floor=4.5)
    assert shift > 0 and float(average_bits(layers, "simple").detach()) == pytest.approx(4.5, abs=1e-5)
    with torch.no_grad():  # now over the budget: the target binds
        for p in params:
            p.add_(2.0)
    shift = project_to_budget(layers, params, 5.0, "simple", 0.9, margin=0.5, floor=4.5)
    assert shift < 0
    assert float(average_bits(layers, "simple").detach()) == pytest.approx(5.0, abs=1e-5)
    cfg = SearchConfig.from_recipe("default", target_bits=5.0, steps=20)
    assert [cfg.budget_floor(s) for s in (0, 5, 10, 20)] == pytest.approx([4.0, 4.5, 5, 5])
    assert SearchConfig.from_recipe("target-start", target_bits=5.0).budget_floor(0) is None


def test_bound_shrinks_over_the_target_and_keeps_the_bottom_at_the_bottom():
    """--budget bound over the target: every effective offset |raw| moves down by one
    common amount times the number of layers sharing it (tied q/k/v: 3, gate/up: 2, the
    others 1: its weight in the simple average), those that would pass the low rung stop
    there (a soft threshold), the raw signs are kept (abs()'s gradient keeps its
    direction), and the soft average is the target by dmx.nn.bits' definition."""
    from dmx.search.assign import bound_to_budget
    from dmx.nn.bits import average_bits

    layers, params = _perturbed_offsets(0.0, lambda: torch.randn(()) * 1.2, seed=2,
                                        parameterization="abs")
    sharing = {id(p): sum(layer.offset is p for layer in layers.values()) for p in params}
    assert sorted(set(sharing.values())) == [1, 2, 3]  # tied: the weights are exercised
    raw = [float(p.detach()) for p in params]
    assert float(average_bits(layers, "simple").detach()) > 5.0
    held = bound_to_budget(layers, params, [p.detach().clone() for p in params], 5.0,
                           "simple", 0.9, margin=0.5, parameterization="abs", floor=4.0)
    s = held["shift"]
    assert s < 0 and held["stretch"] == 1.0
    assert float(average_bits(layers, "simple").detach()) == pytest.approx(5.0, abs=1e-5)
    for p, r in zip(params, raw):
        e = min(abs(r), 2.5)
        assert abs(float(p.detach())) == pytest.approx(max(0.0, e + s * sharing[id(p)]),
                                                       abs=1e-6)
        assert float(p.detach()) == 0.0 or math.copysign(1, float(p.detach())) == math.copysign(1, r)
    assert any(float(p.detach()) == 0.0 for p in params), "no offset reached the bottom"


def test_bound_under_the_floor_stretches_only_the_layers_that_moved():
    """--budget bound under the ramp's floor: this step's move is stretched by one factor,
    so a layer the gradient did not move stays where it is (the projection's uniform
    shift would lift it); inside [floor, target] nothing changes but the box."""
    from dmx.search.assign import bound_to_budget
    from dmx.nn.bits import average_bits

    layers, params = _perturbed_offsets(0.0, lambda: torch.zeros(()), seed=3)
    before = [p.detach().clone() for p in params]
    with torch.no_grad():  # one step: a third of the layers moved up a little
        for i, p in enumerate(params):
            if i % 3 == 0:
                p.add_(0.2)
    moved = [float(p.detach()) for p in params]
    now = float(average_bits(layers, "simple").detach())
    held = bound_to_budget(layers, params, before, 6.0, "simple", 0.9, margin=0.5,
                           floor=now - 0.01)
    assert held == {"shift": 0.0, "stretch": 1.0}
    assert [float(p.detach()) for p in params] == pytest.approx(moved, abs=1e-7)
    held = bound_to_budget(layers, params, before, 6.0, "simple", 0.9, margin=0.5,
                           floor=now + 0.2)
    assert held["shift"] == 0.0 and held["stretch"] > 1.0
    assert float(average_bits(layers, "simple").detach()) == pytest.approx(now + 0.2, abs=1e-5)
    for i, p in enumerate(params):
        want = 0.2 * held["stretch"] if i % 3 == 0 else 0.0
        assert float(p.detach()) == pytest.approx(want, abs=1e-6)
    # a floor the longest stretch cannot reach: the rest is one common shift
    held = bound_to_budget(layers, params, before, 8.0, "simple", 0.9, margin=0.5,
                           floor=7.0, max_stretch=2.0)
    assert held["stretch"] == 2.0 and held["shift"] > 0
    assert float(average_bits(layers, "simple").detach()) == pytest.approx(7.0, abs=1e-5)


def test_bound_on_the_hard_average_holds_the_deployed_rungs_at_the_target():
    """--budget-average hard: over the target, the shrink is the least that brings the
    *hard* average (each layer's deploying rung, the search log's hard_bits) to <= the
    target; the soft average may stay above it. Under the target nothing moves, even with
    the soft average over it (the soft ceiling would shrink)."""
    from dmx.search.assign import bound_to_budget
    from dmx.search.train import hard_bits
    from dmx.nn.bits import average_bits

    def hard_avg():
        return hard_bits(layers, "simple")

    layers, params = _perturbed_offsets(0.0, lambda: torch.rand(()) * 1.9, seed=4,
                                        parameterization="abs")
    raw = [float(p.detach()) for p in params]
    assert hard_avg() > 5.0
    held = bound_to_budget(layers, params, [p.detach().clone() for p in params], 5.0,
                           "simple", 0.4, margin=0.5, parameterization="abs", held_on="hard")
    s = held["shift"]
    assert s < 0 and hard_avg() <= 5.0 + 1e-9
    sharing = {id(p): sum(layer.offset is p for layer in layers.values()) for p in params}
    for p, r in zip(params, raw):  # the same soft threshold as the soft ceiling's
        assert abs(float(p.detach())) == pytest.approx(max(0.0, r + s * sharing[id(p)]),
                                                       abs=1e-6)
    # the least shrink: 1e-3 less and a layer crosses back over its threshold
    with torch.no_grad():
        for p, r in zip(params, raw):
            p.fill_(max(0.0, r + (s + 1e-3) * sharing[id(p)]))
    assert hard_avg() > 5.0
    # soft over the target, hard under it: the soft ceiling shrinks, the hard one does not
    layers, params = _perturbed_offsets(0.0, lambda: torch.rand(()) * 0.2 + 0.75, seed=5,
                                        parameterization="abs")
    for layer in layers.values():
        layer.temperature = 0.4  # the temperature the bound is told
    assert float(average_bits(layers, "simple").detach()) > 5.0 and hard_avg() == 4.0
    before = [p.detach().clone() for p in params]
    assert bound_to_budget(layers, params, before, 5.0, "simple", 0.4, margin=0.5,
                           parameterization="abs", held_on="hard")["shift"] == 0.0
    assert bound_to_budget(layers, params, before, 5.0, "simple", 0.4, margin=0.5,
                           parameterization="abs")["shift"] < 0


def test_no_ce_steps_on_the_distillation_kl_alone(calib):
    """--no-ce --distill: the loss is KL(unquantized || quantized) alone. One plain SGD step
    (no momentum, no clip, no budget) equals -lr * d KL / d offsets computed by hand from a
    separate unquantized copy of the model; the logged loss is the logged KL (the CE is
    still logged), and a config with neither loss is refused."""
    cfg = SearchConfig.from_recipe("paper", target_bits=8.0, steps=1, batch_size=2, seqlen=32,
                                   samples=2, delay=1.0, distill=True, ce=False, lam=0.0,
                                   momentum=0.0, grad_norm="none", lr=0.5)

    def fresh(wrap=True):
        return _frozen_embedded_model(cfg.ladder, ["layers.0."] if wrap else None)

    model, tok, layers = fresh()
    windows = data.calibration_windows(tok, [str(calib)], cfg.seqlen, cfg.samples, cfg.seed)
    start = torch.linspace(0.3, 1.5, len(layers))
    got, learned = _train_from(model, layers, windows, cfg, start)

    ids = windows[batch_indices(cfg.seed, 0, windows.shape[0], cfg.batch_size)]
    plain, _, _ = fresh(wrap=False)
    with torch.no_grad():
        ref = plain(input_ids=ids, use_cache=False).logits
    quant, _, qlayers = fresh()
    params = _set_offsets(quant, start)
    for layer in qlayers.values():
        layer.train()
        layer.temperature = cfg.t_start
    logits = quant(input_ids=ids, use_cache=False).logits
    log_q = torch.log_softmax(logits.float(), -1)
    log_p = torch.log_softmax(ref.float(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    kl.backward()
    want = start - cfg.lr * torch.stack([p.grad for p in params])
    assert got[0]["loss"] == pytest.approx(float(kl.detach()), rel=1e-5)
    assert got[0]["loss"] == pytest.approx(got[0]["kl"], rel=1e-6)
    assert got[0]["ce"] > got[0]["kl"]  # logged, not in the loss
    assert float((want - start).abs().max()) > 1e-4  # the step is not vacuous
    torch.testing.assert_close(learned, want, rtol=0, atol=1e-6)
    with pytest.raises(DMXError, match="no loss"):
        SearchConfig.from_recipe("default", target_bits=5.0, ce=False, distill=False)


def test_slope_preconditioning_steps_along_the_gradient_of_the_position():
    """--precondition slope: each offset's gradient becomes dL/d(position) times the anneal
    map's slope at the low rung, wherever the offset sits (abs() signs kept), so two layers
    with the same dL/d(position) get the same step; the plain gradient gives the one higher
    on the sigmoid's tail a larger one (the lock-in the option was meant to remove; it
    measured worse at 4.5 bits, BENCHMARKS.md)."""
    from dmx.quant.anneal import anneal_map
    from dmx.search.train import _precondition_by_slope

    layers, params = _perturbed_offsets(0.0, lambda: torch.zeros(()), seed=4,
                                        parameterization="abs")
    lad, T = next(iter(layers.values())).ladder, 0.4
    with torch.no_grad():
        for i, p in enumerate(params):
            p.fill_((-1) ** i * 0.15 * (i % 12))  # 0 .. 1.65, both signs
    for layer in layers.values():
        layer.temperature = T
    pos = [layer.position() for layer in layers.values()]
    dl_dpos = torch.linspace(-1.0, 1.0, len(pos))  # any per-layer sensitivity
    sum(g * b for g, b in zip(dl_dpos, pos)).backward()
    plain = [float(p.grad) for p in params]
    _precondition_by_slope(params, layers, T)
    e0 = torch.zeros((), dtype=torch.float64, requires_grad=True)
    slope0, = torch.autograd.grad(anneal_map(e0, T, lad), e0)
    index = {id(p): i for i, p in enumerate(params)}
    want = [0.0] * len(params)
    for layer, g in zip(layers.values(), dl_dpos):  # tied layers add up
        want[index[id(layer.offset)]] += float(g)
    for p, w, g0 in zip(params, want, plain):
        sign = 1.0 if float(p.detach()) >= 0 else -1.0
        assert float(p.grad) == pytest.approx(sign * w * float(slope0), rel=1e-4, abs=1e-7)
        assert abs(float(p.grad)) <= abs(g0) + 1e-7
    mid = min(range(len(params)), key=lambda i: abs(abs(float(params[i].detach())) - 1.05))
    assert abs(plain[mid]) > 10 * abs(float(params[mid].grad))  # mid-ladder vs the tail


def test_an_untied_search_says_which_fused_groups_vllm_could_not_load():
    """The default search is untied: its note names the q/k/v or gate/up groups that mix
    formats (what `dmx export --to compressed-tensors` would refuse), and none when tied."""
    from dmx.search.command import _mixed_fused_groups

    block = "model.layers.3"
    formats = {f"{block}.self_attn.{p}_proj": "fp4_e2m1" for p in "qkvo"}
    formats.update({f"{block}.mlp.{p}_proj": "fp8_e4m3" for p in ("gate", "up", "down")})
    assert _mixed_fused_groups(formats) == []
    formats[f"{block}.self_attn.v_proj"] = "fp8_e4m3"
    formats[f"{block}.self_attn.o_proj"] = "fp8_e4m3"  # not fused: never named
    assert _mixed_fused_groups(formats) == [f"{block}.self_attn.qkv"]


def test_tangent_precondition_removes_the_budgets_common_push():
    """--precondition tangent: the gradient loses its component along the bound's shrink
    (weights x the abs() sign), keeps the rest, and only with --budget bound."""
    from dmx.search.recipe import SearchConfig
    from dmx.search.train import _project_to_budget_tangent

    layers, params = _perturbed_offsets(1.0, lambda: torch.rand(()) * 0.6 - 0.3, seed=3)
    params[0].data.neg_()  # abs(): a negative raw offset moves the other way
    torch.manual_seed(4)
    grads = [torch.rand(()) - 0.8 for _ in params]  # mostly negative: every layer wants bits
    for p, g in zip(params, grads):
        p.grad = g.clone().reshape(p.shape)
    cfg = SearchConfig.from_recipe("default", target_bits=5.0)
    _project_to_budget_tangent(params, layers, cfg)
    # the shrink's direction: each offset by how many layers share it (tiny-qwen3 wraps
    # q/k/v and gate/up tied: 3 and 2), times the sign of its raw value
    shares = torch.tensor([sum(layer.offset is p for layer in layers.values())
                           for p in params], dtype=torch.float64)
    assert set(shares.tolist()) == {1.0, 2.0, 3.0}
    sign = torch.tensor([-1.0] + [1.0] * (len(params) - 1), dtype=torch.float64)
    n = shares * sign
    new = torch.stack([p.grad.double().reshape(()) for p in params])
    old = torch.stack([g.double() for g in grads])
    assert abs(float(new @ n)) < 1e-5 < abs(float(old @ n))
    # what was removed is a multiple of the shrink direction
    removed = (old - new) / n
    assert torch.allclose(removed, removed[0].expand_as(removed), atol=1e-6)
    with pytest.raises(DMXError, match="--precondition tangent"):
        SearchConfig.from_recipe("default", target_bits=5.0, budget="hinge",
                                 precondition="tangent")


def test_random_error_signs_step_equals_the_mirrored_models_gradient(calib):
    """--error-signs random: one SGD step equals the gradient of the cross-entropy of the
    model whose layers apply their quantization errors with the signs error_signs() draws
    for (seed, step) (recomputed on a fresh copy), and every layer is back to +1 after."""
    from dmx.search.losses import next_token_ce
    from dmx.search.train import error_signs

    cfg = SearchConfig.from_recipe("paper", target_bits=8.0, steps=1, batch_size=2, seqlen=32,
                                   samples=2, delay=1.0, lam=0.0, momentum=0.0,
                                   grad_norm="none", lr=0.5, error_signs="random")
    model, tok, layers = _frozen_embedded_model(cfg.ladder, ["layers.0.", "layers.1."])
    windows = data.calibration_windows(tok, [str(calib)], cfg.seqlen, cfg.samples, cfg.seed)
    start = torch.linspace(0.3, 1.5, len(layers))
    _, learned = _train_from(model, layers, windows, cfg, start)
    assert all(layer.error_sign == 1.0 for layer in layers.values())

    quant, _, qlayers = _frozen_embedded_model(cfg.ladder, ["layers.0.", "layers.1."])
    params = _set_offsets(quant, start)
    signs = error_signs(qlayers, cfg.seed, 0)
    assert set(signs.values()) == {1.0, -1.0}  # 14 layers: both signs drawn
    for layer in qlayers.values():
        layer.train()
        layer.temperature = cfg.t_start
    ids = windows[batch_indices(cfg.seed, 0, windows.shape[0], cfg.batch_size)]
    next_token_ce(quant(input_ids=ids, use_cache=False).logits, ids).backward()
    want = start - cfg.lr * torch.stack([p.grad for p in params])
    assert float((want - start).abs().max()) > 1e-4
    torch.testing.assert_close(learned, want, rtol=0, atol=1e-6)
    # all signs +1 gives another step: the signs are used
    fixed, _, flayers = _frozen_embedded_model(cfg.ladder, ["layers.0.", "layers.1."])
    _, plain = _train_from(fixed, flayers, windows, cfg.replace(error_signs="fixed"), start)
    assert float((plain - learned).abs().max()) > 1e-5


def test_error_signs_are_a_function_of_seed_and_step_shared_by_tied_layers():
    from dmx.search.train import error_signs

    model = data.load_model(data.embedded_model_dir())
    layers = wrap_model(model, "fp8-fp4", tie_fused=True)
    a, b = error_signs(layers, 3, 5), error_signs(layers, 3, 5)
    assert a == b and set(a.values()) <= {1.0, -1.0}
    assert error_signs(layers, 3, 6) != a and error_signs(layers, 4, 5) != a
    other, by_offset = error_signs(layers, 4, 5), {}
    for name, layer in layers.items():
        assert layer.error_sign == other[name]  # the last draw is what the layers apply
        by_offset.setdefault(id(layer.offset), set()).add(a[name])
    assert all(len(s) == 1 for s in by_offset.values())  # q/k/v, gate/up: one sign each
    many = [s for step in range(200) for s in error_signs(layers, 0, step).values()]
    assert 0.4 < many.count(1.0) / len(many) < 0.6


def test_error_signs_until_signs_the_first_share_of_the_steps_only(monkeypatch):
    """--error-signs-until 0.5 of 4 steps: steps 0 and 1 apply the drawn signs, 2 and 3
    apply Q(v) (every sign +1), and the layers are back at +1 after every step."""
    from dmx.search import train

    model = data.load_model(data.embedded_model_dir())
    layers = wrap_model(model, "fp8-fp4")
    cfg = SearchConfig.from_recipe("default", target_bits=6.0, steps=4, error_signs="random",
                                   error_signs_until=0.5)
    seen = {}
    # _step(model, layers, windows, cfg, optimizer, schedule, step, ...): record the signs
    monkeypatch.setattr(train, "_step", lambda *a, **k: seen.setdefault(
        a[6], {n: l.error_sign for n, l in layers.items()}))
    for step in range(4):
        train._train_step(model, layers, None, cfg, None, _Schedule(), step)
        assert all(layer.error_sign == 1.0 for layer in layers.values())
    for step in (0, 1):
        assert seen[step] == train.error_signs(layers, cfg.seed, step)
        assert -1.0 in seen[step].values()
    for step in (2, 3):
        assert set(seen[step].values()) == {1.0}
    assert [train.signed_step(cfg, s) for s in range(4)] == [True, True, False, False]
    assert not train.signed_step(cfg.replace(error_signs="fixed", error_signs_until=1.0), 0)


def test_explore_step_equals_the_gradient_at_the_drawn_positions(calib):
    """--explore: one SGD step equals -lr times the cross-entropy's gradient with respect to
    each layer's ladder position, taken on a fresh copy whose layers sit at the positions
    explore_positions() draws for (seed, step) (the anneal map bypassed), and afterwards
    every layer is back on the anneal map."""
    from dmx.search.losses import next_token_ce
    from dmx.search.train import explore_positions

    cfg = SearchConfig.from_recipe("default", target_bits=8.0, steps=1, batch_size=2,
                                   seqlen=32, samples=2, delay=1.0, momentum=0.0, ce=True,
                                   distill=False, grad_norm="none", lr=0.5, explore=1.0,
                                   ramp=0.0, average_last=0.0)
    model, tok, layers = _frozen_embedded_model(cfg.ladder, ["layers.0.", "layers.1."])
    windows = data.calibration_windows(tok, [str(calib)], cfg.seqlen, cfg.samples, cfg.seed)
    start = torch.linspace(0.3, 1.5, len(layers))
    _, learned = _train_from(model, layers, windows, cfg, start)
    assert all(layer.explore_position is None for layer in layers.values())

    quant, _, qlayers = _frozen_embedded_model(cfg.ladder, ["layers.0.", "layers.1."])
    _set_offsets(quant, start)
    drawn = explore_positions(qlayers, cfg.seed, 0)
    assert len(set(drawn.values())) == len(drawn) and all(0 <= p <= 2 for p in drawn.values())
    positions = {}
    for name, layer in qlayers.items():  # the drawn position as a leaf, the map bypassed
        layer.train()
        layer.temperature = cfg.t_start
        positions[name] = torch.tensor(drawn[name], requires_grad=True)
        layer.position = (lambda q: (lambda: q))(positions[name])
    ids = windows[batch_indices(cfg.seed, 0, windows.shape[0], cfg.batch_size)]
    next_token_ce(quant(input_ids=ids, use_cache=False).logits, ids).backward()
    want = start - cfg.lr * torch.stack([positions[n].grad for n in qlayers])
    assert float((want - start).abs().max()) > 1e-4
    torch.testing.assert_close(learned, want, rtol=0, atol=1e-6)
    # without --explore the step is another one: the positions are used
    plain_model, _, players = _frozen_embedded_model(cfg.ladder, ["layers.0.", "layers.1."])
    _, plain = _train_from(plain_model, players, windows, cfg.replace(explore=0.0), start)
    assert float((plain - learned).abs().max()) > 1e-5


def test_explore_positions_are_a_function_of_seed_and_step_shared_by_tied_layers(monkeypatch):
    """explore_positions: the same for the same (seed, step), shared by a tied group,
    uniform over the ladder; --explore 0.5 of 4 steps draws in steps 0 and 1 only."""
    from dmx.search import train

    model = data.load_model(data.embedded_model_dir())
    layers = wrap_model(model, "fp8-fp4", tie_fused=True)
    a = train.explore_positions(layers, 3, 5)
    assert a == train.explore_positions(layers, 3, 5)
    assert train.explore_positions(layers, 3, 6) != a != train.explore_positions(layers, 4, 5)
    by_offset = {}
    for name, layer in layers.items():
        by_offset.setdefault(id(layer.offset), set()).add(a[name])
    assert all(len(s) == 1 for s in by_offset.values())
    many = [p for step in range(100) for p in train.explore_positions(layers, 0, step).values()]
    assert min(many) >= 0.0 and max(many) <= 2.0 and 0.9 < sum(many) / len(many) < 1.1
    cfg = SearchConfig.from_recipe("default", target_bits=6.0, steps=4, explore=0.5)
    seen = {}
    monkeypatch.setattr(train, "_step", lambda *a, **k: seen.setdefault(
        a[6], {n: l.explore_position for n, l in layers.items()}))
    for step in range(4):
        train._train_step(model, layers, None, cfg, None, _Schedule(), step)
        assert all(layer.explore_position is None for layer in layers.values())
    for step in (0, 1):
        want = train.explore_positions(layers, cfg.seed, step)
        assert {n: float(p) for n, p in seen[step].items()} == pytest.approx(want)
    assert all(p is None for step in (2, 3) for p in seen[step].values())
    for layer in layers.values():
        layer.explore_position = None
    with pytest.raises(DMXError, match="--explore must be a fraction"):
        SearchConfig.from_recipe("default", target_bits=6.0, explore=1.5)
    with pytest.raises(DMXError, match="--explore needs a budget held on the offsets"):
        SearchConfig.from_recipe("paper", target_bits=6.0, explore=0.5)


class _Schedule:
    """The temperature at every step (what _train_step asks of a schedule)."""

    def at(self, step):
        return 0.4


@pytest.mark.parametrize("settings, message", [
    (dict(error_signs_until=0.5), "add --error-signs random"),
    (dict(error_signs="random", error_signs_until=0.0), "fraction in (0, 1]"),
    (dict(error_signs="random", error_signs_until=1.5), "fraction in (0, 1]"),
])
def test_error_signs_until_refuses_what_would_do_nothing(settings, message):
    with pytest.raises(DMXError, match=re.escape(message)):
        SearchConfig.from_recipe("default", target_bits=6.0, **settings)


def test_attention_kl_is_the_rowwise_kl_averaged_over_layers():
    """attention_kl: KL(p || q) of each query's row, mean over batch, heads and queries,
    then over the layers; 0 for equal inputs; masked keys (0 in both) add nothing, and a
    q that underflowed to 0 where p is not gives a large finite value, not inf or nan."""
    from dmx.search.losses import attention_kl

    g = torch.Generator().manual_seed(0)
    mask = torch.full((5, 5), float("-inf")).triu(1)  # causal: key j > query i hidden
    p = [torch.softmax(torch.randn(2, 3, 5, 5, generator=g) + mask, -1) for _ in range(2)]
    q = [torch.softmax(torch.randn(2, 3, 5, 5, generator=g) + mask, -1) for _ in range(2)]
    by_hand = []
    for pl, ql in zip(p, q):
        rows = []
        for b in range(2):
            for h in range(3):
                for i in range(5):
                    rows.append(sum(float(pl[b, h, i, j]) * math.log(float(pl[b, h, i, j])
                                                                      / float(ql[b, h, i, j]))
                                    for j in range(i + 1)))
        by_hand.append(sum(rows) / len(rows))
    assert float(attention_kl(q, p)) == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    assert float(attention_kl(p, p)) == pytest.approx(0.0, abs=1e-6)
    broken = [t.clone() for t in q]
    broken[0][0, 0, 4] = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    assert math.isfinite(float(attention_kl(broken, p))) and attention_kl(broken, p) > 1.0
    with pytest.raises(ValueError, match="same, non-zero number of layers"):
        attention_kl(q[:1], p)


def test_attn_distill_steps_on_ce_plus_the_weighted_attention_kl(calib):
    """--attn-distill W (here with --no-distill): one plain SGD step equals -lr * d(CE +
    W * attention KL)/d offsets, the attention KL computed by hand from the probabilities
    a separate unquantized copy and a quantized copy return; the search runs eager
    attention and gives the model its own implementation back afterwards."""
    cfg = SearchConfig.from_recipe("paper", target_bits=8.0, steps=1, batch_size=2, seqlen=32,
                                   samples=2, delay=1.0, distill=False, attn_distill=2.0,
                                   lam=0.0, momentum=0.0, grad_norm="none", lr=0.5)

    def fresh(wrap=True):
        return _frozen_embedded_model(cfg.ladder, ["layers.0."] if wrap else None)

    model, tok, layers = fresh()
    before = model.config._attn_implementation
    assert before != "eager"  # else the test would not see the switch
    windows = data.calibration_windows(tok, [str(calib)], cfg.seqlen, cfg.samples, cfg.seed)
    start = torch.linspace(0.3, 1.5, len(layers))
    got, learned = _train_from(model, layers, windows, cfg, start)
    assert model.config._attn_implementation == before

    ids = windows[batch_indices(cfg.seed, 0, windows.shape[0], cfg.batch_size)]
    plain, _, _ = fresh(wrap=False)
    plain.set_attn_implementation("eager")
    with torch.no_grad():
        ref = plain(input_ids=ids, use_cache=False, output_attentions=True).attentions
    quant, _, qlayers = fresh()
    quant.set_attn_implementation("eager")
    params = _set_offsets(quant, start)
    for layer in qlayers.values():
        layer.train()
        layer.temperature = cfg.t_start
    out = quant(input_ids=ids, use_cache=False, output_attentions=True)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(),
                                           ids[:, 1:].flatten())
    per_layer = []
    for p, q in zip(ref, out.attentions):
        keep = p > 0  # the keys the causal mask leaves
        terms = torch.where(keep, p * (torch.log(p.where(keep, 1.0))
                                       - torch.log(q.where(keep, 1.0))), 0.0)
        per_layer.append(terms.sum(-1).mean())
    attn = torch.stack(per_layer).mean()
    (ce + 2.0 * attn).backward()
    want = start - cfg.lr * torch.stack([p.grad for p in params])
    assert got[0]["attn_kl"] == pytest.approx(float(attn.detach()), rel=1e-5)
    assert got[0]["kl"] is None
    assert got[0]["loss"] == pytest.approx(float((ce + 2.0 * attn).detach()), rel=1e-5)
    assert float((want - start).abs().max()) > 1e-4
    torch.testing.assert_close(learned, want, rtol=0, atol=1e-6)
    # the attention term moved the step: without it the same step differs
    other, _, other_layers = fresh()
    _, plain_step = _train_from(other, other_layers, windows, cfg.replace(attn_distill=0.0),
                                start)
    assert float((plain_step - learned).abs().max()) > 1e-6


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_attn_distill_refuses_a_weight_that_is_not_finite_and_non_negative(weight):
    with pytest.raises(DMXError, match=re.escape("--attn-distill must be a weight >= 0")):
        SearchConfig.from_recipe("default", target_bits=6.0, attn_distill=weight)
