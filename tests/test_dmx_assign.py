"""dmx.search.assign: the budget repair after a dMX search (fit, fill) and the --init target offset.

Hand-made layer sets with known answers: the exact units moved, never over the target,
tied groups (q/k/v, gate/up) moving together, the penalty's weighting; then the same on
wrapped DMXLinear layers and through `dmx search` on a tiny model.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dmx.quant.anneal import anneal_map
from dmx.search.assign import offset_for_bits, repair_assignment, repair_layers
from dmx.errors import DMXError
from dmx.nn.bits import average_bits_of
from dmx.quant.ladders import get_ladder
from dmx.nn.layers import fused_key, hard_assignment, wrap_model
from dmx.nn.bits import average_bits
BLOCK = "model.layers.0"
QKV = [f"{BLOCK}.self_attn.{p}_proj" for p in "qkv"]
O = f"{BLOCK}.self_attn.o_proj"
GATE_UP = [f"{BLOCK}.mlp.gate_proj", f"{BLOCK}.mlp.up_proj"]
DOWN = f"{BLOCK}.mlp.down_proj"
NAMES = QKV + [O] + GATE_UP + [DOWN]  # 7 layers: one promoted layer = 4/7 simple bits


def _block(offsets: dict, formats: dict | None = None, shapes=None):
    """{name: ...} maps for one block from per-unit values keyed qkv/o/gate_up/down."""
    unit_of = {**{n: "qkv" for n in QKV}, O: "o", **{n: "gate_up" for n in GATE_UP},
               DOWN: "down"}
    offs = {n: offsets[unit_of[n]] for n in NAMES}
    fmts = {n: (formats or {}).get(unit_of[n], "fp4_e2m1") for n in NAMES}
    shp = {n: (shapes or {}).get(unit_of[n], (64, 64)) for n in NAMES}
    return fmts, offs, shp


def _avg(formats, shapes, key="simple"):
    return average_bits_of(formats, formats, shapes)[key]


def test_fill_promotes_nearest_to_boundary_that_fit():
    # margins below the boundary (1.0): down 0.05, qkv 0.1, gate_up 0.2, o 0.5
    fmts, offs, shp = _block({"qkv": 0.9, "o": 0.5, "gate_up": 0.8, "down": 0.95})
    r = repair_assignment(fmts, offs, shp, "fp8-fp4", 5.2)
    # down (4.571) fits; qkv (+1.71) and gate_up (+1.14) would pass 5.2; o (5.143) fits
    assert [(m["unit"], m["step"], m["to"]) for m in r["moves"]] == [
        (DOWN, "fill", "fp8_e4m3"), (O, "fill", "fp8_e4m3")]
    assert {n for n, f in r["formats"].items() if f == "fp8_e4m3"} == {DOWN, O}
    assert r["bits_before"] == pytest.approx(4.0)
    assert r["bits_after"] == pytest.approx(4 + 2 * 4 / 7)
    assert r["bits_after"] == pytest.approx(_avg(r["formats"], shp))


def test_fill_is_off_with_no_fill():
    fmts, offs, shp = _block({"qkv": 0.9, "o": 0.5, "gate_up": 0.8, "down": 0.95})
    r = repair_assignment(fmts, offs, shp, "fp8-fp4", 5.2, fill=False)
    assert r["moves"] == [] and r["formats"] == fmts and r["bits_after"] == 4.0


def test_fit_demotes_nearest_to_lower_boundary_then_fills():
    # everything but o at fp8: 4 + 4 * 6/7 = 7.43 bits, over the 6.0 target
    fmts, offs, shp = _block({"qkv": 1.5, "o": 0.3, "gate_up": 1.2, "down": 1.1},
                             {"qkv": "fp8_e4m3", "gate_up": "fp8_e4m3", "down": "fp8_e4m3"})
    r = repair_assignment(fmts, offs, shp, "fp8-fp4", 6.0)
    # down (0.1 above the boundary) then gate_up (0.2): 5.71; o would give 6.29: stays
    assert [(m["unit"], m["step"]) for m in r["moves"]] == [
        (DOWN, "fit"), (f"{BLOCK}.mlp.gate_up", "fit")]
    assert r["moves"][1]["layers"] == GATE_UP and r["moves"][1]["offset"] == 1.2
    assert {n for n, f in r["formats"].items() if f == "fp8_e4m3"} == set(QKV)
    assert r["bits_after"] == pytest.approx(4 + 4 * 3 / 7) and r["bits_after"] <= 6.0


def test_unit_demoted_to_fit_is_not_promoted_again():
    # over by one layer; demoting qkv (lowest) frees 3 layers; fill may only use o/down
    fmts, offs, shp = _block({"qkv": 1.05, "o": 0.9, "gate_up": 1.9, "down": 0.2},
                             {"qkv": "fp8_e4m3", "gate_up": "fp8_e4m3"})
    r = repair_assignment(fmts, offs, shp, "fp8-fp4", 6.3)
    assert [(m["unit"], m["step"]) for m in r["moves"]] == [
        (f"{BLOCK}.self_attn.qkv", "fit"), (O, "fill"), (DOWN, "fill")]
    assert r["bits_after"] == pytest.approx(4 + 4 * 4 / 7)


def test_size_weighting_changes_the_selection():
    # the MLP layers are 4x larger: with size weighting down_proj costs more than o_proj
    shapes = {"qkv": (64, 64), "o": (64, 64), "gate_up": (256, 64), "down": (64, 256)}
    fmts, offs, shp = _block({"qkv": 0.1, "o": 0.5, "gate_up": 0.2, "down": 0.9}, None,
                             shapes)
    simple = repair_assignment(fmts, offs, shp, "fp8-fp4", 4.6, "simple")
    size = repair_assignment(fmts, offs, shp, "fp8-fp4", 4.6, "size")
    assert [m["unit"] for m in simple["moves"]] == [DOWN]
    assert [m["unit"] for m in size["moves"]] == [O]  # down alone would cost > 0.6 bits
    assert size["bits_after"] == pytest.approx(_avg(size["formats"], shp, "size_weighted"))
    assert size["bits_after"] <= 4.6


def test_three_rung_ladder_fills_rung_by_rung():
    fmts, offs, shp = _block({"qkv": 0.0, "o": 1.4, "gate_up": 0.0, "down": 0.0})
    r = repair_assignment(fmts, offs, shp, "fp8-fp6-fp4", 4 + 4 / 7)
    # o_proj: fp4 -> fp6 (+2/7), next pass fp6 -> fp8 (+2/7): exactly the target
    assert [(m["unit"], m["from"], m["to"]) for m in r["moves"]] == [
        (O, "fp4_e2m1", "fp6_e3m2"), (O, "fp6_e3m2", "fp8_e4m3")]
    assert r["bits_after"] == pytest.approx(4 + 4 / 7)


def test_never_over_target_tied_move_together_and_fill_is_maximal():
    rng = random.Random(0)
    lad = get_ladder("fp8-fp4")
    names = [f"model.layers.{b}.{n.split('.', 3)[3]}" for b in range(3) for n in NAMES]
    groups = {}
    for n in names:  # the units the search ties (dmx.nn.layers.fused_key)
        groups.setdefault(fused_key(n) or n, []).append(n)
    for trial in range(25):
        offs, shp, fmts = {}, {}, {}
        for members in groups.values():
            o = rng.uniform(-1.0, 3.0)
            shape = (rng.choice([32, 64, 96]), rng.choice([32, 64]))
            for n in members:
                offs[n], shp[n] = o, shape
                hard = anneal_map(torch.tensor(o), 1.0, lad, hard=True)  # the search's map
                fmts[n] = lad.rung_at(float(hard)).fmt
        target = rng.uniform(4.0, 8.0)
        weighting = rng.choice(["simple", "size"])
        key = "simple" if weighting == "simple" else "size_weighted"
        r = repair_assignment(fmts, offs, shp, lad, target, weighting)
        assert r["bits_after"] <= target + 1e-6
        assert r["bits_after"] == pytest.approx(_avg(r["formats"], shp, key))
        for members in groups.values():
            assert len({r["formats"][n] for n in members}) == 1
        demoted = {m["unit"] for m in r["moves"] if m["step"] == "fit"}
        for members in groups.values():  # fill left no promotable unit behind
            if r["formats"][members[0]] == "fp4_e2m1" and not any(
                    n in m["layers"] for m in r["moves"] if m["unit"] in demoted
                    for n in members):
                trial_fmts = {**r["formats"], **{n: "fp8_e4m3" for n in members}}
                assert _avg(trial_fmts, shp, key) > target + 1e-6


def test_bad_input_is_one_line_error():
    fmts, offs, shp = _block({"qkv": 0.9, "o": 0.5, "gate_up": 0.8, "down": 0.95})
    with pytest.raises(DMXError, match="different formats"):
        repair_assignment({**fmts, QKV[0]: "fp8_e4m3"}, offs, shp, "fp8-fp4", 5.0)
    with pytest.raises(DMXError, match="outside ladder"):
        repair_assignment(fmts, offs, shp, "fp8-fp4", 9.0)
    with pytest.raises(DMXError, match="not a rung"):
        repair_assignment({**fmts, O: "fp6_e2m3"}, offs, shp, "fp8-fp4", 5.0)
    with pytest.raises(DMXError, match="weighting"):
        repair_assignment(fmts, offs, shp, "fp8-fp4", 5.0, "macs")


@pytest.mark.parametrize("ladder", ["fp8-fp4", "fp6-fp4", "fp8-fp6-fp4"])
def test_offset_for_bits_hits_the_soft_target(ladder):
    lad = get_ladder(ladder)
    for bits in (4.5, 5.0, 5.5):
        b_hat = offset_for_bits(lad, bits, 0.4)
        got = float(lad.element_bits(anneal_map(torch.tensor(b_hat), 0.4, lad)))
        assert got == pytest.approx(bits, abs=1e-5)
    assert offset_for_bits(lad, lad.low.bits, 0.4) == lad.low.position
    assert offset_for_bits(lad, lad.high.bits, 0.4) == lad.high.position
    assert offset_for_bits("fp8-fp4", 5.0, 0.4) == pytest.approx(1 + 0.25 * -1.0986, abs=1e-3)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, p, nn.Linear(64, 64, bias=False))
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(64, 128, bias=False)
        self.mlp.up_proj = nn.Linear(64, 128, bias=False)
        self.mlp.down_proj = nn.Linear(128, 64, bias=False)


def test_repair_layers_moves_the_wrapped_offsets():
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([_Block(), _Block()])
    layers = wrap_model(model, "fp8-fp4")
    for name, value in (("model.layers.0.self_attn.q_proj", 1.3),  # qkv 0: fp8
                        ("model.layers.1.mlp.gate_proj", 1.1),    # gate_up 1: fp8
                        ("model.layers.1.mlp.down_proj", 0.9)):   # nearest to promote
        with torch.no_grad():
            layers[name].offset.fill_(value)
    for layer in layers.values():
        layer.hard = True
    assert float(average_bits(layers)) == pytest.approx(4 + 4 * 5 / 14)  # 5.43
    r = repair_layers(layers, "fp8-fp4", 5.2, "simple", fill=True)
    # over: gate_up 1 (0.1 above) goes down -> 4.86; fill: down 1 (+0.29) -> 5.14 fits
    assert [(m["unit"], m["step"]) for m in r["moves"]] == [
        ("model.layers.1.mlp.gate_up", "fit"), ("model.layers.1.mlp.down_proj", "fill")]
    formats = hard_assignment(model)
    high = {n for n, f in formats.items() if f == "fp8_e4m3"}
    assert high == {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"} | {
        "model.layers.1.mlp.down_proj"}
    assert float(average_bits(layers)) == pytest.approx(r["bits_after"])
    assert r["bits_after"] <= 5.2
    # the tied offset moved once for both projections
    up, gate = layers["model.layers.1.mlp.up_proj"], layers["model.layers.1.mlp.gate_proj"]
    assert up.offset is gate.offset and up.hard_format() == "fp4_e2m1"


# ----------------------------------------------------------------------------- dmx search
import transformers  # noqa: E402 (a hard dependency: a broken install fails, never skips)
EMBEDDED = Path(__file__).resolve().parents[1] / "dmx" / "data"  # shipped with the package
TOKENIZER_DIR = EMBEDDED / "tiny-qwen3"
WIKI = EMBEDDED / "wikitext-2-raw" / "wiki.valid.raw"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("assign")
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=48, intermediate_size=80,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, root / "m" / name)
    calib = root / "calib.txt"
    calib.write_text(WIKI.read_text(encoding="utf-8")[:8000], encoding="utf-8")
    return root / "m", calib


@pytest.mark.parametrize("fill", [True, False])
def test_search_lands_at_or_under_the_budget(tiny, tmp_path, fill):
    from dmx.search import read_search_log, search

    model_dir, calib = tiny
    out = tmp_path / "out"
    r = search(model_dir, 5.0, calib=[calib], seqlen=16, samples=4, steps=2, batch_size=2,
               init="target", fill_budget=fill, out=out, progress=False, checkpoint_every=0,
               export_target="none")
    # 14 layers: the largest average <= 5 is 4 + 4 * 3/14 = 4.857 (one layer short of 5.14)
    assert r["achieved_bits"]["simple"] <= 5.0 + 1e-6
    if fill:
        assert r["achieved_bits"]["simple"] == pytest.approx(4 + 4 * 3 / 14, abs=1e-5)
    manifest = json.loads((out / "dmx_manifest.json").read_text())
    rep = manifest["search"]["budget_repair"]
    assert rep["fill"] is fill and rep["bits_after"] == pytest.approx(
        r["achieved_bits"]["simple"], abs=1e-5)
    assert manifest["search"]["config"]["init"] == "target"
    log = read_search_log(out)
    assert log["budget_repair"]["moves"] == rep["moves"]
    assert {n: v["format"] for n, v in manifest["layers"].items()} == r["formats"]


def _cli(argv):
    from dmx.cli import main

    return main(["search", *argv])


def test_cli_init_and_fill_flags(tiny, tmp_path, capsys):
    model_dir, calib = tiny
    base = ["--model", str(model_dir), "--target-bits", "6", "--calib", str(calib),
            "--seqlen", "16", "--samples", "2", "--steps", "1", "--batch-size", "2",
            "--no-progress", "--checkpoint-every", "0", "--export-target", "none"]
    assert _cli([*base, "--init", "middle", "-o", str(tmp_path / "a")]) == 2
    assert "--init" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert _cli([*base, "--no-fill-budget", "-o", str(tmp_path / "b")]) == 0
    manifest = json.loads((tmp_path / "b" / "dmx_manifest.json").read_text())
    assert manifest["search"]["budget_repair"]["fill"] is False
    assert manifest["avg_bits"]["simple"] <= 6.0


def test_resume_command_names_recipe_and_what_differs_from_it():
    from dmx.search.recipe import SearchConfig
    from dmx.search.command import _resume_command

    cfg = SearchConfig.from_recipe("paper", target_bits=5.0, init="target", fill_budget=True,
                                   include=["mlp"])
    cmd = _resume_command(cfg, "m", "out", "out.partial", False, {"--threads": 1})
    assert "--recipe paper" in cmd and "--init target" in cmd and "--fill-budget" in cmd
    assert "--include mlp" in cmd and "--threads 1" in cmd and "--resume" in cmd
    plain = _resume_command(SearchConfig.from_recipe("paper", target_bits=5.0), "m", "out",
                            "out.partial", False, {})
    assert "--init" not in plain and "fill-budget" not in plain and "--lr" not in plain


def test_repair_moves_line_counts_every_move_and_shows_the_first_few():
    """`dmx search` prints the repair in one short line: per step and direction how many
    units moved, the first few by name, and where the rest are (it printed all 105 moves
    of a SmolLM2 search on one line)."""
    from dmx.search.command import repair_moves_line

    moves = ([{"unit": f"l{i}", "from": "fp8_e4m3", "to": "fp4_e2m1", "step": "fit"}
              for i in range(3)]
             + [{"unit": f"m{i}", "from": "fp4_e2m1", "to": "fp8_e4m3", "step": "fill"}
                for i in range(7)])
    line = repair_moves_line(moves)
    assert line.startswith("fit 3 x fp8_e4m3->fp4_e2m1, fill 7 x fp4_e2m1->fp8_e4m3: ")
    assert "l0 fp8_e4m3->fp4_e2m1, l1" in line and "m0 fp4" in line and "m1 fp4" not in line
    assert line.endswith("... (6 more in the manifest's search.budget_repair)")
    short = repair_moves_line(moves[:2])
    assert "more" not in short and short.count("->") == 3
