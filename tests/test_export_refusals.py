"""What each target refuses, and that a refusal or a failed check leaves nothing behind."""
from __future__ import annotations

import json
import shutil

import pytest

from dmx.errors import DMXError
from dmx.outdir.integrity import reseal
from tiny_out import MIXED, WITH_FP6, build_out

UNFUSED = dict(MIXED, k_proj="fp4_e2m1")          # q/v MXFP8, k MXFP4 in every block
UNFUSED_FP6 = dict(WITH_FP6, k_proj="fp6_e2m3")   # for Quark (no MXFP8 weights): q/v FP4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("refuse")


@pytest.fixture(scope="module")
def unfused(root):
    return build_out(root / "unfused", "qwen3", UNFUSED)


@pytest.fixture(scope="module")
def unfused_fp6(root):
    return build_out(root / "unfused6", "qwen3", UNFUSED_FP6)


@pytest.fixture(scope="module")
def fp6(root):
    return build_out(root / "fp6", "qwen3", WITH_FP6)


def _export(*a, **kw):
    from dmx.export import export
    return export(*a, log=lambda *_: None, **kw)


def _nothing_at(dest):
    return not dest.exists() and not list(dest.parent.glob(f".{dest.name}.*"))


@pytest.mark.parametrize("to", ["compressed-tensors", "quark"])
def test_unfused_qkv_refused_for_vllm(unfused, unfused_fp6, tmp_path, to):
    src, k_fmt = (unfused, "fp4_e2m1") if to == "compressed-tensors" else (unfused_fp6, "fp6_e2m3")
    with pytest.raises(DMXError, match=rf"self_attn\.qkv: fused shards .*k_proj={k_fmt}.*--allow-unfused"):
        _export(src, to, tmp_path / "x")
    assert _nothing_at(tmp_path / "x")
    checks = _export(src, to, tmp_path / "x", allow_unfused=True)
    assert all(c.exact for c in checks)


def test_unfused_is_fine_for_gguf(unfused, tmp_path):
    """llama.cpp stores each tensor with its own type: no fused rule."""
    checks = _export(unfused, "gguf", tmp_path / "g")
    assert sum(c.stored_as == "MXFP4" for c in checks) == 8


def test_mxfp8_weights_refused_by_quark_with_alternative(unfused, tmp_path):
    """amd-quark cannot dequantize per-group FP8 weights: such a checkpoint would load in
    transformers and fail in generate (tests/integration runs the accepted ones)."""
    with pytest.raises(DMXError, match=r"^6 layer\(s\) with MXFP8 weights .*Unsupported "
                                       r"QuantSchema.*--to compressed-tensors"):
        _export(unfused, "quark", tmp_path / "x", allow_unfused=True)
    assert _nothing_at(tmp_path / "x")


def test_mxfp6_refused_by_compressed_tensors_with_alternative(fp6, tmp_path):
    with pytest.raises(DMXError, match=r"(o|down)_proj: weight format fp6_e(2m3|3m2) .*--to quark"):
        _export(fp6, "compressed-tensors", tmp_path / "x")
    assert _nothing_at(tmp_path / "x")


def test_mxfp6_refused_by_gguf_with_alternative(fp6, tmp_path):
    with pytest.raises(DMXError, match=r"fp6_e(2m3|3m2) cannot be stored in gguf.*--to quark"):
        _export(fp6, "gguf", tmp_path / "x")


def test_fp8_e5m2_refused_by_compressed_tensors(root, tmp_path):
    src = build_out(root / "e5m2", "qwen3", dict(MIXED, down_proj="fp8_e5m2"))
    with pytest.raises(DMXError, match=r"down_proj: weight format fp8_e5m2"):
        _export(src, "compressed-tensors", tmp_path / "x")
    with pytest.raises(DMXError, match=r"fp8_e5m2 cannot be stored in quark"):
        _export(src, "quark", tmp_path / "x")
    # GGUF keeps every 8-bit layer as Q8_0 (lossy, reported)
    checks = _export(src, "gguf", tmp_path / "g")
    assert sum(c.stored_as == "Q8_0" for c in checks) == 8


def test_activation_format_the_target_cannot_hold(unfused, unfused_fp6, tmp_path):
    """dmx ties a layer's input format to its weight format, but a manifest may say
    otherwise: an input format compressed-tensors cannot hold is refused by name."""
    for name, out in (("ct", unfused), ("quark", unfused_fp6)):
        src = tmp_path / f"act6-{name}"
        shutil.copytree(out, src)
        m = json.loads((src / "dmx_manifest.json").read_text())
        for layer, e in m["layers"].items():
            e["act_format"] = "fp6_e2m3" if layer.endswith("gate_proj") else None
        (src / "dmx_manifest.json").write_text(json.dumps(m))
        reseal(src)   # a deliberate edit: re-record the hashes, or OUT is refused as modified
    with pytest.raises(DMXError, match=r"gate_proj: activation format fp6_e2m3 cannot be "
                                       r"stored in compressed-tensors"):
        _export(tmp_path / "act6-ct", "compressed-tensors", tmp_path / "x", allow_unfused=True)
    assert all(c.exact for c in _export(tmp_path / "act6-quark", "quark", tmp_path / "q",
                                        allow_unfused=True))


def test_unknown_architecture_for_gguf(fp6, tmp_path):
    src = tmp_path / "mistral"
    shutil.copytree(fp6, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (src / "config.json").write_text(json.dumps(cfg))
    reseal(src)
    with pytest.raises(DMXError, match=r"GGUF export supports model_type llama and qwen3, "
                                       r"not 'mistral'; use --to compressed-tensors"):
        _export(src, "gguf", tmp_path / "x")


def test_k_not_multiple_of_32(tmp_path, monkeypatch):
    import tiny_out as t
    from transformers import Qwen3Config

    def odd(arch):   # MLP width 80: down_proj has in_features 80
        return Qwen3Config(vocab_size=4096, hidden_size=64, intermediate_size=80,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, max_position_embeddings=64, tie_word_embeddings=True)
    monkeypatch.setattr(t, "tiny_config", odd)
    src = t.build_out(tmp_path, "qwen3", dict(MIXED, down_proj="fp4_e2m1"))
    for to in ("gguf", "compressed-tensors", "quark"):
        with pytest.raises(DMXError, match=r"down_proj: in_features 80 is not a multiple of 32"):
            _export(src, to, tmp_path / "x")


def test_failed_read_back_leaves_nothing(fp6, tmp_path, monkeypatch):
    """A writer bug (one flipped scale byte) must be caught by the read-back, not shipped."""
    from dmx.export import quark

    real = quark.layer_tensors

    def corrupt(layer):
        out = real(layer)
        if layer.name.endswith("layers.0.mlp.up_proj"):
            out["weight_scale"] = out["weight_scale"].clone()
            out["weight_scale"][0, 0] += 1
        return out
    monkeypatch.setattr(quark, "layer_tensors", corrupt)
    with pytest.raises(DMXError, match=r"read-back differs from OUT for 1 layer.*up_proj"):
        _export(fp6, "quark", tmp_path / "x")
    assert _nothing_at(tmp_path / "x")


def test_nan_blocks_refused(tmp_path, monkeypatch):
    """A weight with NaN becomes an MX NaN block (scale 0xFF), which no engine decodes."""
    import tiny_out as t
    import torch
    from transformers import AutoModelForCausalLM

    real_from_config = AutoModelForCausalLM.from_config

    def with_nan(config):
        model = real_from_config(config)
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
        return model
    monkeypatch.setattr(AutoModelForCausalLM, "from_config", with_nan)
    src = t.build_out(tmp_path, "qwen3")
    monkeypatch.undo()
    for to in ("compressed-tensors", "quark", "gguf"):
        with pytest.raises(DMXError, match=r"layers\.0\.mlp\.up_proj: has NaN MX blocks"):
            _export(src, to, tmp_path / "x")
        assert _nothing_at(tmp_path / "x")


def test_reader_rejecting_the_file_is_one_line_and_leaves_nothing(fp6, tmp_path, monkeypatch):
    """If the target's own reader cannot parse what was written, the user gets one line."""
    from dmx.export import quark

    monkeypatch.setattr(quark, "quantization_config",
                        lambda layers, exclude=(): {"quant_method": "quark"})   # no export key
    with pytest.raises(DMXError, match=r"quark read-back failed \(ValueError: config.json has "
                                       r"no Quark quantization_config"):
        _export(fp6, "quark", tmp_path / "x")
    assert _nothing_at(tmp_path / "x")
