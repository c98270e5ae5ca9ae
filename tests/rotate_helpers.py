"""Tiny models and float64 helpers shared by the rotation tests (test_dmx_rotate*.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from dmx.data import embedded_model_dir

STORIES = Path(__file__).parent / "data" / "stories260K-hf"


def _load(d, dtype=torch.float64):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _random_model(arch: str, **sizes):
    """Random tiny models with widths that are not powers of two; norm scales randomised
    (HF initialises them to ones, which would hide a wrong fold)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    torch.manual_seed(0)
    common = dict(vocab_size=128, num_hidden_layers=2, max_position_embeddings=64,
                  tie_word_embeddings=True, rms_norm_eps=1e-5)
    if arch == "llama192":  # R1 = Paley12 x Sylvester16, R2 (head_dim 48) = Paley12 x 4
        cfg = LlamaConfig(hidden_size=192, intermediate_size=320, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=48, **common)
    else:  # qwen2 with q/k/v biases, hidden 96 = Paley12 x 8, head_dim 24 = Paley24
        cfg = Qwen2Config(hidden_size=96, intermediate_size=160, num_attention_heads=4,
                          num_key_value_heads=2, **common)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


MODELS = {"tiny-qwen3": lambda: _load(embedded_model_dir()),
          "stories260K": lambda: _load(STORIES),
          "llama192": lambda: _random_model("llama192"),
          "qwen2-96-bias": lambda: _random_model("qwen2")}


def _float64_norms(model) -> None:
    """Every RMSNorm (incl. Qwen3's q_norm/k_norm) computed in the input's dtype (patch
    after any deepcopy: the copied forward would still read the original's scale)."""
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))

            def forward(x, m=m, eps=eps):
                return m.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

            m.forward = forward


def _ids(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, 19), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits
