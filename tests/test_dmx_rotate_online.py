"""Online R4 (dmx.rotate.online, issue 12): a Hadamard on down_proj's input, folded into
its weight and applied at run time, for fake-quant evaluation only.

Checked: R4 (alone and after R1/R2) reproduces the unrotated logits in float64 on
tiny-qwen3 (intermediate 768 = 24 x H32), stories260K (172: no Hadamard known, seeded
random) and a random Llama (320 = 10 x H32); the quantizer of down_proj sees the rotated
input, also after wrappers are swapped in and out (the KL baseline does that); `dmx
baseline` and `dmx search` with --rotate-online r4 record it in the manifest and their OUT
loads (dmx.load re-applies R4) with logits equal bit for bit to the in-memory fake-quant
model; every exporter refuses such an OUT (exit 2, nothing written); bad flags are
one-line errors.
"""
from __future__ import annotations

import json

import pytest
import torch

from dmx import outdir
from dmx.cli import main as dmx_main
from dmx.data import embedded_model_dir, load_model
from dmx.errors import DMXError
from dmx.nn.layers import apply_formats
from dmx.search.recipe import SearchConfig, config_from_dict
from dmx.rotate import is_orthogonal, rotate_model, rotate_online
from dmx.rotate.online import OnlineRotation, parse_online, r4_matrix
from dmx.search import search

from rotate_helpers import MODELS, _float64_norms, _ids, _logits

pytestmark = pytest.mark.usefixtures("single_threaded")  # tests/conftest.py

MODEL = embedded_model_dir()
FP4 = "fp4_e2m1"


def _down_inputs(model, ids) -> list:
    """What every down_proj's forward receives (after its pre-hooks: the rotated input)."""
    seen = []
    handles = [layer.mlp.down_proj.register_forward_hook(
        lambda m, args, out: seen.append(args[0].detach().clone()))
        for layer in model.model.layers]
    try:
        _logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    return seen


# ----------------------------------------------------------------------------- function
@pytest.mark.parametrize("name, r4", [("tiny-qwen3", "blockdiag24xsylvester32"),
                                      ("stories260K", "random172(seed=2)"),
                                      ("llama192", "blockdiag10xsylvester32")])
@pytest.mark.parametrize("with_r1r2", [False, True])
def test_r4_preserves_the_float64_logits(name, r4, with_r1r2):
    model = MODELS[name]()
    _float64_norms(model)
    ids = _ids(model)
    want = _logits(model, ids)
    before = [b.mlp.down_proj.weight.clone() for b in model.model.layers]
    info = rotate_model(model, "hadamard") if with_r1r2 else None
    _float64_norms(model)  # (after a fold the patched norms read the new unit scales)
    info = rotate_online(model, "r4", info)
    assert info.online == ["r4"] and info.r4 == r4 and info.needs_runtime_support
    assert info.mode == ("hadamard" if with_r1r2 else "none")
    got = _logits(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())
    # the weights did change: without its online half the model computes something else
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, before[0])
    for layer in model.model.layers:
        layer.mlp.down_proj._forward_pre_hooks.clear()
        layer.mlp._forward_pre_hooks.clear()
    assert (_logits(model, ids) - want).abs().max() > 1e-3 * want.abs().max()


def test_online_rotation_blockwise_equals_the_matrix():
    for n, kind, block in ((768, "auto", 32), (768, "kron", 768), (172, "auto", 172),
                           (172, "block", 4)):
        q, _ = r4_matrix(n, kind)
        rot = OnlineRotation(q)
        x = torch.randn(3, 5, n, dtype=torch.float64)
        assert rot.block == block and is_orthogonal(q)
        torch.testing.assert_close(rot(x), x @ q, rtol=1e-12, atol=1e-12)


def test_down_proj_quantizer_sees_the_rotated_input_through_swapped_wrappers():
    """The input that reaches down_proj's MX quantizer is x @ R4, whether down_proj is a
    plain Linear, an MXLinear put in by apply_formats, or the plain one again after the
    KL baseline's swap back."""
    model = load_model(MODEL, dtype=torch.float64)
    ids = _ids(model)
    plain = _down_inputs(model, ids)
    want = _logits(model, ids)
    rotate_online(model, ("r4",))
    q = r4_matrix(768)[0]
    originals = {f"model.layers.{i}.mlp.down_proj": b.mlp.down_proj
                 for i, b in enumerate(model.model.layers)}
    apply_formats(model, {n: FP4 for n in originals}, {n: FP4 for n in originals})
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "MXLinear"
    # block 0's down_proj input (later blocks read the quantized outputs of earlier ones)
    torch.testing.assert_close(_down_inputs(model, ids)[0], plain[0] @ q, rtol=1e-10,
                               atol=1e-10)
    for n, m in originals.items():  # what kl_sensitivities does after each unit
        model.set_submodule(n, m)
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-9, atol=1e-9)
    with pytest.raises(DMXError, match="already attached"):
        rotate_online(model, "r4")


def test_r4_lowers_the_mxfp4_error_of_down_proj_inputs():
    """The point of R4: tiny-qwen3's down_proj inputs have outliers (docs/rotations.md)."""
    from dmx.quant.fakequant import fake_quantize
    model = load_model(MODEL, dtype=torch.float32)
    xs = torch.cat(_down_inputs(model, _ids(model))).reshape(-1, 768)
    rel = {}
    for label, x in (("plain", xs), ("r4", OnlineRotation(r4_matrix(768)[0])(xs))):
        err = fake_quantize(x, FP4, -1, 32) - x
        rel[label] = float(err.pow(2).sum() / x.pow(2).sum())
    assert rel["r4"] < 0.8 * rel["plain"], rel


# ----------------------------------------------------------------------------- flags
def test_parse_online_and_config():
    assert parse_online(None) == () and parse_online(["R4"]) == ("r4",)
    assert parse_online("r4,r4") == ("r4",)
    with pytest.raises(DMXError, match="r3 is not built"):
        parse_online("r3,r4")
    with pytest.raises(DMXError, match="unknown online rotation"):
        parse_online("r5")
    cfg = SearchConfig.from_recipe("default", target_bits=5.0, rotate_online=["r4"],
                                   rotate_kind="kron")
    assert cfg.rotate_online == ("r4",) and cfg.to_dict()["rotate_online"] == ["r4"]
    assert config_from_dict(cfg.to_dict()) == cfg
    from dmx.search.command import _resume_command
    assert "--rotate-kind kron --rotate-online r4" in _resume_command(cfg, "m", "o", "c",
                                                                      False, {})


@pytest.mark.parametrize("argv, message", [
    (["search", "--target-bits", "5", "--rotate-online", "r3"], "r3 is not built"),
    (["baseline", "--method", "uniform", "--format", FP4, "--rotate-online", "r9"],
     "unknown online rotation"),
])
def test_bad_online_flags_fail_in_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code = dmx_main([argv[0], "--model", str(MODEL), *argv[1:], "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


# ----------------------------------------------------------------------------- OUT
@pytest.fixture(scope="module")
def baseline_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("online") / "u4-r4"
    assert dmx_main(["baseline", "--model", str(MODEL), "--method", "uniform", "--format",
                     FP4, "--rotate", "hadamard", "--rotate-online", "r4", "--no-progress",
                     "-o", str(out)]) == 0
    return out


def _bits(t):
    return t.view(torch.int32)


def test_baseline_r4_out_is_marked_and_loads_as_the_fake_quant_model(baseline_out):
    loaded, _, manifest = outdir.load(baseline_out)
    rot = manifest["rotation"]
    assert rot["online"] == ["r4"] and rot["needs_runtime_support"] is True
    assert (rot["r4"], rot["r4_kind"], rot["intermediate_size"]) == (
        "blockdiag24xsylvester32", "auto", 768)
    model = load_model(MODEL, dtype=torch.float32)
    rotate_online(model, "r4", rotate_model(model, "hadamard"))
    names = [n for n, _ in manifest["layers"].items()]
    apply_formats(model, {n: FP4 for n in names}, {n: FP4 for n in names})
    ids = _ids(model)
    assert torch.equal(_bits(_logits(loaded, ids)), _bits(_logits(model, ids)))
    # the re-applied R4 is what makes it right: without it the OUT computes another function
    for layer in loaded.model.layers:
        layer.mlp._forward_pre_hooks.clear()
        layer.mlp.down_proj._forward_pre_hooks.clear()
    assert not torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=1e-2)


@pytest.mark.parametrize("rotate", ["none", "learned"])
def test_search_r4_out_loads_bit_for_bit(tmp_path, calib, rotate):
    """R4 alone, and with learned R1/R2 (trained on top of the folded R4, whose record
    must survive their fold)."""
    out = tmp_path / "s"
    result = search(MODEL, 5.0, calib=[calib], out=out, rotate_online=("r4",), steps=2,
                    batch_size=2, seqlen=32, samples=4, progress=False, rotate=rotate)
    manifest = json.loads((out / "dmx_manifest.json").read_text())
    rot = manifest["rotation"]
    assert rot["mode"] == rotate and rot["online"] == ["r4"] and rot["needs_runtime_support"]
    assert rot["r4"] == "blockdiag24xsylvester32"
    assert manifest["search"]["config"]["rotate_online"] == ["r4"]
    loaded, _, _ = outdir.load(out)
    ids = _ids(loaded)
    assert torch.equal(_bits(_logits(loaded, ids)), _bits(_logits(result["model"], ids)))


@pytest.mark.parametrize("to", ["compressed-tensors", "quark", "gguf"])
def test_exports_refuse_an_out_with_online_rotations(baseline_out, tmp_path, capsys, to):
    dest = tmp_path / "x"
    code = dmx_main(["export", str(baseline_out), "--to", to, "-o", str(dest)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "--rotate-online r4" in err and to in err
    assert not dest.exists() and not list(tmp_path.glob(".x*"))


def test_manifest_r4_mismatch_is_refused_on_load(baseline_out, tmp_path):
    import shutil

    from dmx.outdir.integrity import reseal
    bad = tmp_path / "bad"
    shutil.copytree(baseline_out, bad)
    path = bad / "dmx_manifest.json"
    manifest = json.loads(path.read_text())
    manifest["rotation"]["r4_kind"] = "random"
    path.write_text(json.dumps(manifest))
    reseal(bad)
    with pytest.raises(DMXError, match="the manifest's R4 is 'blockdiag24xsylvester32'"):
        outdir.load(bad)


def test_kl_baseline_scores_the_r4_model(tmp_path, calib, capsys):
    """`dmx baseline --method kl --rotate-online r4` scores every unit on the R4 model
    (the KL loop swaps down_proj in and out): its sensitivities are those of the in-memory
    R4 model, and differ from the unrotated model's."""
    from dmx import data
    from dmx.search.baseline import fused_units, kl_sensitivities, quantizable_layers

    kl = tmp_path / "kl"
    assert dmx_main(["baseline", "--model", str(MODEL), "--method", "kl", "--target-bits",
                     "5", "--rotate-online", "r4", "--calib", str(calib), "--samples", "2",
                     "--seqlen", "32", "--tie-fused", "--no-progress", "-o", str(kl)]) == 0
    capsys.readouterr()
    manifest = json.loads((kl / "dmx_manifest.json").read_text())
    assert manifest["rotation"]["online"] == ["r4"]
    windows = data.calibration_windows(data.load_tokenizer(MODEL), [str(calib)], 32, 2, 0)
    sens = {}
    for online in ((), ("r4",)):
        model = load_model(MODEL, dtype=torch.float32)
        for p in model.parameters():
            p.requires_grad_(False)
        rotate_online(model, online)
        # each unit is scored alone against the unquantized model: down_proj's are enough
        units = [u for u in fused_units(quantizable_layers(model)) if "down_proj" in u[0]]
        sens[online] = {"+".join(u): s for u, s in
                        kl_sensitivities(model, units, windows, FP4, progress=False).items()}
    recorded = manifest["baseline"]["sensitivity"]
    assert len(recorded) == 4 * len(sens[()]) == 24  # 6 blocks: qkv, o, gate+up, down
    assert {u: recorded[u] for u in sens[()]} == pytest.approx(sens[("r4",)], rel=1e-6)
    assert all(sens[()][u] != pytest.approx(recorded[u], rel=1e-3) for u in sens[()])
