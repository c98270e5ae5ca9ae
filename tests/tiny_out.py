"""A tiny OUT directory (docs/CONTRACT.md) for the export and integrity tests.

``build_out`` makes a random tiny Llama / Qwen3 from a transformers config (or loads a
real checkpoint) and writes OUT with ``dmx.outdir.write.write_out``, the project's one OUT writer.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
# a real pretrained Llama (tests/data, MIT) and the embedded Qwen3 (package data)
TOKENIZERS = {"llama": ROOT / "tests" / "data" / "stories260K-hf",
              "qwen3": ROOT / "dmx" / "data" / "tiny-qwen3"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj$")

# block 0: q/k/v MXFP8, o MXFP4; gate/up MXFP4, down MXFP8 (the rest of the blocks alike)
MIXED = {"q_proj": "fp8_e4m3", "k_proj": "fp8_e4m3", "v_proj": "fp8_e4m3",
         "o_proj": "fp4_e2m1", "gate_proj": "fp4_e2m1", "up_proj": "fp4_e2m1",
         "down_proj": "fp8_e4m3"}
# both MXFP6 formats (Quark only) with MXFP4, no MXFP8 weights (Quark refuses those)
WITH_FP6 = dict(MIXED, q_proj="fp4_e2m1", k_proj="fp4_e2m1", v_proj="fp4_e2m1",
                o_proj="fp6_e2m3", down_proj="fp6_e3m2")


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
    linear in full precision; ``act_formats`` maps projection names to input formats.
    ``model_dir``: a real checkpoint instead of a random model."""
    import torch
    from transformers import AutoModelForCausalLM

    from dmx.outdir.write import write_out

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if model_dir is None:
        model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
        model_dir = root / f"src-{arch}"          # the "source model" OUT copies files from
        model.save_pretrained(model_dir)
        for f in TOKENIZER_FILES:
            if (TOKENIZERS[arch] / f).exists():
                shutil.copy(TOKENIZERS[arch] / f, model_dir / f)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chosen = {}
    for name in linear_names(model.state_dict()):
        fmt = formats[name] if name in formats else formats[name.rsplit(".", 1)[1]]
        if fmt is not None:
            chosen[name] = fmt
    acts = {n: (act_formats or {}).get(n.rsplit(".", 1)[1]) for n in chosen}
    return write_out(root / f"out-{arch}", model, chosen, acts, model_dir,
                     {"method": "uniform", "seed": seed})
