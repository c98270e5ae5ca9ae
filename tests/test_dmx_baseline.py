"""dmx.search.baseline: uniform and KL-selection baselines; the budget is met, never exceeded."""
from __future__ import annotations

import os
import pytest

from pathlib import Path

from cli_helpers import fails
from dmx import data, outdir
from dmx.cli import main
from dmx.errors import DMXError
from dmx.nn.bits import average_bits_of
from dmx.quant.ladders import get_ladder
from dmx.search import baseline
from tiny_models import tiny_model_dir, tiny_root

pytestmark = pytest.mark.usefixtures("single_threaded")  # tests/conftest.py

STORIES = Path(__file__).parent / "data" / "stories260K-hf"  # real Llama, 172-wide down_proj


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
    """Default (as dmx search): every linear is its own unit; --tie-fused (or a vLLM
    export target): q/k/v and gate/up of a block are scored and promoted as one."""
    src = tiny_model_dir(tiny_root(tmp_path_factory), "llama")
    calib = _calib(tmp_path)
    runs = {}
    for name, kw in (("untied", {}), ("tied", {"tie_fused": True})):
        # export target none: the tiny model is 48 and 80 wide, not whole MX blocks
        res = baseline.kl_baseline(src, 5.5, tmp_path / name, calib=[calib], samples=2,
                                   seqlen=32, progress=False, export_target="none", **kw)
        m = outdir.read_manifest(tmp_path / name)
        runs[name] = m
        assert m["method"] == "kl" and m["target_bits"] == 5.5 and m["ladder"] == "fp8-fp4"
        assert (m["avg_bits"]["simple"] <= 5.5
                and m["avg_bits"] == {**m["avg_bits"], **res["avg_bits"]})
        sens = m["baseline"]["sensitivity"]
        # KL is non-negative; a layer that hardly matters (q/k of this random tiny
        # model) can score ~-1e-8, float32 rounding of the search's own KL
        assert all(v >= -1e-6 for v in sens.values()), sens
        assert max(sens.values()) > 0
        fmts = {n: e["format"] for n, e in m["layers"].items()}
        assert set(fmts.values()) == {"fp4_e2m1", "fp8_e4m3"}  # 5.5 fits some but not all high
        for e in m["layers"].values():
            assert e["act_format"] == e["format"]
        # the highest-sensitivity unit got the high rung
        top = max(sens, key=sens.get).split("+")
        assert all(fmts[n] == "fp8_e4m3" for n in top)
    # 2 blocks of 7 linears: 14 units untied, 8 tied (q+k+v, o, gate+up, down per block)
    assert len(runs["untied"]["baseline"]["sensitivity"]) == 14
    assert not any("+" in u for u in runs["untied"]["baseline"]["sensitivity"])
    assert runs["untied"]["baseline"]["tie_fused"] is False
    m = runs["tied"]
    assert m["baseline"]["tie_fused"] is True and len(m["baseline"]["sensitivity"]) == 8
    for unit in m["baseline"]["sensitivity"]:
        assert len({m["layers"][n]["format"] for n in unit.split("+")}) == 1


def test_tie_rule_is_the_searchs():
    """One rule for search and KL baseline: as told, else tied for the vLLM targets."""
    from dmx.search.recipe import SearchConfig, tie_fused_for
    for target in ("any", "gguf", "none", "compressed-tensors", "quark"):
        vllm = target in ("compressed-tensors", "quark")
        assert tie_fused_for(target, None) is vllm
        assert SearchConfig.from_recipe("default", target_bits=5,
                                        export_target=target).tie_fused is vllm
        for told in (True, False):
            assert tie_fused_for(target, told) is told
            assert SearchConfig.from_recipe("default", target_bits=5, export_target=target,
                                            tie_fused=told).tie_fused is told


def test_baseline_export_target_leaves_ragged_layers_out_and_says_so(tmp_path, capsys):
    """stories260K's down_proj is 172 wide: no export target holds it. The default
    (any) leaves it in full precision and says so; none quantizes it too."""
    for method in ("uniform", "kl"):
        for target in ("any", "none"):
            out = tmp_path / f"{method}-{target}"
            argv = ["baseline", "--model", str(STORIES), "--method", method,
                    "--export-target", target, "-o", str(out), "--no-progress"]
            argv += (["--format", "fp4_e2m1"] if method == "uniform" else
                     ["--target-bits", "5", "--samples", "2", "--seqlen", "32",
                      "--calib", str(_calib(tmp_path))])
            assert main(argv) == 0
            err = capsys.readouterr().err
            layers = outdir.read_manifest(out)["layers"]
            down = [n for n in layers if n.endswith("down_proj")]
            if target == "any":
                assert not down and "down_proj" in err and "full precision" in err
            else:
                assert down and "full precision" not in err


@pytest.mark.parametrize("argv, message", [
    (["--method", "uniform", "--format", "fp6_e2m3", "--export-target", "compressed-tensors"],
     "--format fp6_e2m3: compressed-tensors cannot store fp6_e2m3; use --export-target quark"),
    (["--method", "kl", "--target-bits", "5", "--ladder", "fp8-fp6-fp4",
      "--export-target", "any"], "ladder fp8-fp6-fp4: compressed-tensors cannot store"),
    (["--method", "uniform", "--format", "fp4_e2m1", "--tie-fused"],
     "--tie-fused goes with --method kl"),
])
def test_baseline_refuses_what_the_export_target_cannot_hold(argv, message, tmp_path, capsys):
    fails(capsys, ["baseline", "--model", str(STORIES), *argv, "-o", str(tmp_path / "out")],
          message, parent=tmp_path)


def _calib(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(data.default_calibration_file().read_text()[:30_000])
    return calib


def test_kl_sensitivities_reused_across_budgets(tmp_path, capsys):
    """--sensitivities-from: a second budget from the first one's sensitivities gives the
    assignment a fresh run gives, and is refused when any setting they depend on differs."""
    calib = _calib(tmp_path)
    common = ["baseline", "--model", str(STORIES), "--method", "kl", "--samples", "2",
              "--seqlen", "32", "--calib", str(calib), "--no-progress"]
    # the reusing run names the same calibration file by a relative path
    relative = [*common[:-2], os.path.relpath(calib), "--no-progress"]
    for name, extra in (("kl5", ["--target-bits", "5"]), ("kl6", ["--target-bits", "6"]),
                        ("kl6r", ["--target-bits", "6", "--sensitivities-from",
                                  str(tmp_path / "kl5")])):
        argv = relative if name == "kl6r" else common
        assert main([*argv, *extra, "-o", str(tmp_path / name)]) == 0
    assert "sensitivities reused from" in capsys.readouterr().err
    m5, m6, m6r = (outdir.read_manifest(tmp_path / n) for n in ("kl5", "kl6", "kl6r"))
    assert m6r["baseline"]["sensitivity"] == m5["baseline"]["sensitivity"]
    assert m6r["baseline"]["sensitivities_from"] == str(tmp_path / "kl5")
    assert "sensitivities_from" not in m6["baseline"]
    assert ({n: e["format"] for n, e in m6r["layers"].items()}
            == {n: e["format"] for n, e in m6["layers"].items()})
    assert m6r["avg_bits"] == m6["avg_bits"] != m5["avg_bits"]
    assert main(["baseline", "--model", str(STORIES), "--method", "uniform", "--format",
                 "fp4_e2m1", "-o", str(tmp_path / "u4")]) == 0
    capsys.readouterr()
    reuse = [*common, "--target-bits", "6", "-o", str(tmp_path / "bad")]
    for more, message in (
            (["--seed", "1"], "measured with seed 0, this run has 1"),
            (["--samples", "3"], "measured with samples 2, this run has 3"),
            (["--export-target", "none"], "measured with export_target 'any'"),
            (["--weights-only"], "measured with weights_only False"),
            (["--rotate", "hadamard"], "its model was rotated otherwise"),
            (["--include", "mlp"], "it scored other units")):
        fails(capsys, [*reuse, *more, "--sensitivities-from", str(tmp_path / "kl5")], message,
              parent=tmp_path)
    fails(capsys, [*reuse, "--sensitivities-from", str(tmp_path / "u4")],
          "a uniform OUT has no sensitivities", parent=tmp_path)
    fails(capsys, [*reuse, "--sensitivities-from", str(tmp_path)], "no dmx_manifest.json",
          parent=tmp_path)
    fails(capsys, ["baseline", "--model", str(STORIES), "--method", "uniform", "--format",
                   "fp4_e2m1", "--sensitivities-from", str(tmp_path / "kl5"), "-o",
                   str(tmp_path / "bad")], "--sensitivities-from goes with --method kl",
          parent=tmp_path)


@pytest.mark.parametrize("which", ["embedded-qwen3", "stories260K-llama"])
def test_kl_sensitivities_replayed_blocks_are_bit_exact(which):
    """A unit's pass starting at its own block (the blocks before it replaying the reference
    pass) gives every sensitivity bit for bit as a full pass does, per layer and per
    fused unit (q/k/v: the earliest block), and really skips blocks."""
    import numpy as np

    model_dir = data.embedded_model_dir() if which.startswith("embedded") else STORIES
    model = baseline._load(model_dir, "cpu")[0]
    windows = data.calibration_windows(data.load_tokenizer(model_dir),
                                       [str(data.default_calibration_file())], 48, 3, 0)
    names = baseline.quantizable_layers(model)
    units = [(n,) for n in names] + baseline.fused_units(names)[:3]
    calls = []
    hook = model.get_submodule("model.layers.0").register_forward_hook(
        lambda *a: calls.append(1))
    got = baseline.kl_sensitivities(model, units, windows, "fp4_e2m1", batch_size=2,
                                    progress=False)
    replayed_calls = len(calls)
    calls.clear()
    want = baseline.kl_sensitivities(model, units, windows, "fp4_e2m1", batch_size=2,
                                     progress=False, replay_blocks=False)
    hook.remove()
    assert list(got) == list(want)
    bits = lambda d: np.array(list(d.values()), dtype=np.float64).view(np.uint64)  # noqa: E731
    assert np.array_equal(bits(got), bits(want))
    assert len(set(got.values())) > len(units) // 2  # real, differing sensitivities
    # block 0 runs in the reference pass and for block 0's units only, not for every unit
    block0 = sum(1 for u in units if all(".layers.0." in n for n in u))
    assert replayed_calls == 2 * (1 + block0) and len(calls) == 2 * (1 + len(units))
    # and the model is left as it was: its own blocks, no hooks of ours
    blocks = model.get_submodule("model.layers")
    assert all(type(b).__name__ != "_StandIn" and not b._forward_hooks for b in blocks)


def test_kl_sensitivities_fall_back_to_full_passes_when_blocks_share_state(capsys):
    """A model whose last block reads state the earlier blocks leave (here: how many of
    them ran) cannot be replayed: the check says so, KL runs full passes, and the
    sensitivities are the full passes' bit for bit."""
    import numpy as np

    model = baseline._load(data.embedded_model_dir(), "cpu")[0]
    blocks = model.get_submodule("model.layers")
    ran = []
    pre = [b.register_forward_pre_hook(lambda *a: ran.append(1)) for b in blocks[:-1]]

    def shared_state(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out = out + 1e-3 * len(ran)
        ran.clear()
        return (out, *output[1:]) if isinstance(output, tuple) else out
    post = blocks[-1].register_forward_hook(shared_state)
    windows = data.calibration_windows(data.load_tokenizer(data.embedded_model_dir()),
                                       [str(data.default_calibration_file())], 32, 2, 0)
    units = [(n,) for n in baseline.quantizable_layers(model)][-8:]
    got = baseline.kl_sensitivities(model, units, windows, "fp4_e2m1", progress=False)
    assert "do not replay exactly; KL runs full passes" in capsys.readouterr().err
    want = baseline.kl_sensitivities(model, units, windows, "fp4_e2m1", progress=False,
                                     replay_blocks=False)
    for h in (*pre, post):
        h.remove()
    bits = lambda d: np.array(list(d.values()), dtype=np.float64).view(np.uint64)  # noqa: E731
    assert np.array_equal(bits(got), bits(want))


def test_block_replay_finds_the_blocks_or_stays_off():
    """Units in the decoder blocks get their first block (a fused unit: its earliest); a
    unit outside them (lm_head) or a switched-off replay means full passes for all."""
    from dmx.search.replay import BlockReplay

    model = baseline._load(data.embedded_model_dir(), "cpu")[0]
    q3 = ("model.layers.3.self_attn.q_proj",)
    mixed = ("model.layers.2.mlp.down_proj", "model.layers.1.mlp.up_proj")
    on = BlockReplay(model, [q3, mixed])
    assert on.blocks is model.get_submodule("model.layers")
    assert on.block_of == {q3: 3, mixed: 1}
    for off in (BlockReplay(model, [q3, ("lm_head",)]), BlockReplay(model, [q3], enabled=False)):
        assert off.blocks is None and set(off.block_of.values()) == {0}
