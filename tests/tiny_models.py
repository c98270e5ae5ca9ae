"""Tiny random causal LMs saved to disk, shared by the io / eval / baseline / CLI tests.

``tiny_model_dir`` saves a random tiny Llama or Qwen3 with layer widths that are not
multiples of 32 (ragged blocks, odd FP4 rows, padded FP6 rows), with the embedded
tiny-qwen3 tokenizer."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from dmx.data import embedded_model_dir


def tiny_config(arch: str, hidden=48, intermediate=80, layers=2):
    from transformers import LlamaConfig, Qwen3Config
    common = dict(vocab_size=4096, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=hidden // 4, max_position_embeddings=128, rms_norm_eps=1e-5)
    if arch == "llama":  # untied lm_head
        return LlamaConfig(tie_word_embeddings=False, **common)
    return Qwen3Config(tie_word_embeddings=True, **common)


def tiny_model_dir(root: Path, arch="qwen3", seed=0, **sizes) -> Path:
    """A saved random tiny causal LM (+ tokenizer) under ``root``; returns its directory
    (built once per root: the eval/baseline/CLI tests reuse the session's copies)."""
    from transformers import AutoModelForCausalLM
    d = root / f"src-{arch}-{seed}-{'-'.join(f'{k}{v}' for k, v in sorted(sizes.items()))}"
    if (d / "tokenizer.json").is_file():
        return d
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **sizes)).eval()
    model.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_model_dir() / f, d / f)
    return d


def tiny_root(tmp_path_factory) -> Path:
    """One directory per test session for the tiny source models."""
    root = tmp_path_factory.getbasetemp() / "dmx-tiny-models"
    root.mkdir(exist_ok=True)
    return root
