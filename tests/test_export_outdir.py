"""A tiny OUT directory (docs/CONTRACT.md) for the export tests, and checks of its reader.

``build_out`` follows the contract with mxref directly (random tiny Llama / Qwen3 from a
transformers config, weights MX-quantized along the input dim, manifest with sha256).
TODO: build it with dmx.io.write_out once that lands, so OUT has a single writer.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import mxref

DATA = Path("/work/shared/data")
TOKENIZERS = {"llama": DATA / "stories260K-hf", "qwen3": DATA / "tiny-qwen3"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj$")

# block 0: q/k/v MXFP8, o MXFP4; gate/up MXFP4, down MXFP8 (the rest of the blocks alike)
MIXED = {"q_proj": "fp8_e4m3", "k_proj": "fp8_e4m3", "v_proj": "fp8_e4m3",
         "o_proj": "fp4_e2m1", "gate_proj": "fp4_e2m1", "up_proj": "fp4_e2m1",
         "down_proj": "fp8_e4m3"}
# adds both MXFP6 formats (Quark only)
WITH_FP6 = dict(MIXED, o_proj="fp6_e2m3", down_proj="fp6_e3m2")


def tiny_config(arch: str):
    from transformers import LlamaConfig, Qwen3Config

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=128, rms_norm_eps=1e-5)
    if arch == "llama":   # untied: exercises output.weight
        return LlamaConfig(vocab_size=512, tie_word_embeddings=False, bos_token_id=1,
                           eos_token_id=2, **common)
    return Qwen3Config(vocab_size=4096, tie_word_embeddings=True, bos_token_id=0,
                       eos_token_id=0, **common)


def linear_names(state_dict) -> list[str]:
    return sorted(k[:-len(".weight")] for k in state_dict
                  if k.endswith(".weight") and LINEAR.match(k[:-len(".weight")]))


def build_out(root: Path, arch: str, formats=MIXED, act_formats=None, seed: int = 0,
              model_dir: Path | None = None) -> Path:
    """Write OUT for a random tiny ``arch`` model; ``formats`` maps a projection name
    (q_proj, ...) or a full module name to an mxref format key, or to None to leave that
    linear in full precision. ``model_dir``: a real checkpoint instead of a random model."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if model_dir is None:
        config = tiny_config(arch)
        model = AutoModelForCausalLM.from_config(config).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        config = model.config
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)   # stored once, as HF does
    out = root / f"out-{arch}"
    out.mkdir(parents=True)
    tensors, layers = {}, {}
    for name in linear_names(sd):
        fmt = formats[name] if name in formats else formats[name.rsplit(".", 1)[1]]
        if fmt is None:
            continue
        act = (act_formats or {}).get(name.rsplit(".", 1)[1])
        w = sd.pop(name + ".weight").float().numpy()
        mx = mxref.quantize(w, fmt, axis=1, block_size=32)
        packed = mxref.pack_codes(mx.codes, fmt)
        tensors[name + ".weight_packed"] = torch.from_numpy(packed)
        tensors[name + ".weight_scale"] = torch.from_numpy(mx.scales)
        info = mxref.get_format(fmt)
        layers[name] = {
            "format": info.key, "bits": info.bits, "storage_bits": info.bits + 0.25,
            "shape": list(w.shape), "block_size": 32, "axis": 1,
            "packing": mxref.packing_name(info), "act_format": act,
            "profile_hash": mxref.get_profile("ocp").hash,
            "sha256": hashlib.sha256(packed.tobytes() + mx.scales.tobytes()).hexdigest(),
            "fused_group": None}
    tensors.update(sd)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(config.to_json_string())
    tok_dir = Path(model_dir) if model_dir is not None else TOKENIZERS[arch]
    for f in TOKENIZER_FILES:
        if (tok_dir / f).exists():
            shutil.copy(tok_dir / f, out / f)
    bits = [layers[n]["bits"] for n in layers]
    manifest = {"format_version": 1, "producer": "dmx test", "method": "uniform",
                "source_model": f"tiny-{arch}", "model_type": arch, "ladder": None,
                "target_bits": None, "seed": seed,
                "profile": mxref.get_profile("ocp").to_dict(), "block_size": 32,
                "avg_bits": {"simple": float(np.mean(bits)), "size_weighted": float(np.mean(bits)),
                             "storage_bits_per_weight": float(np.mean(bits)) + 0.25},
                "layers": layers, "created": "2026-11-26T00:00:00Z",
                "software": {"dmx": "test", "torch": torch.__version__,
                             "transformers": "test", "numpy": np.__version__}}
    (out / "dmx_manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


@pytest.fixture(scope="module")
def qwen_out(tmp_path_factory):
    return build_out(tmp_path_factory.mktemp("src"), "qwen3")


def test_reader_decodes_exactly_what_was_packed(qwen_out):
    from dmx.export.source import load_out

    src = load_out(qwen_out)
    assert len(src.layers) == 14 and "model.embed_tokens.weight" in src.tensors
    name = "model.layers.1.mlp.down_proj"
    layer = src.layers[name]
    assert layer.fmt == "fp8_e4m3" and layer.shape == (64, 128)
    from safetensors.numpy import load_file
    raw = load_file(str(qwen_out / "model.safetensors"))
    assert np.array_equal(mxref.pack_codes(layer.codes, layer.fmt), raw[name + ".weight_packed"])


def test_reader_rejects_changed_bytes(tmp_path, qwen_out):
    from safetensors.numpy import load_file, save_file
    from dmx.errors import DMXError
    from dmx.export.source import load_out

    bad = tmp_path / "bad"
    shutil.copytree(qwen_out, bad)
    t = load_file(str(bad / "model.safetensors"))
    t["model.layers.0.mlp.up_proj.weight_scale"][0, 0] ^= 1
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(DMXError, match="sha256"):
        load_out(bad)
