"""Function-preserving weight surgery on HF Llama-family causal LMs: norm folding, R1, R2.

Conventions (rows are tokens): the residual stream h becomes h @ R1; a linear reading it
(weight W [out, in]) becomes W @ R1, a linear writing it becomes R1^T @ W (bias b -> b @ R1).
R2 acts inside each attention head between v_proj and o_proj: v_h -> v_h @ R2, so the rows
of each v head become R2^T @ W_h and the columns of each o head W_o[:, h] @ R2. Softmax
weights act on tokens, not on head dims, so they commute with R2; grouped-query attention
shares each v head among several query heads, and every head uses the same R2, so that
holds too. q/k are never rotated: q_norm/k_norm (Qwen3) and RoPE act on them per head.

RMSNorm(h @ R1) = RMSNorm(h) @ R1 only when the norm's scale is a scalar, so the scales are
folded into the linears they feed first (input_layernorm -> q/k/v, post_attention_layernorm
-> gate/up, final norm -> lm_head) and the norms left with unit scales.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from dmx.errors import DMXError

__all__ = ["SUPPORTED_MODEL_TYPES", "check_model_type", "Block", "Arch", "arch_of",
           "plain_linear",
           "fold_norms",
           "Target", "rotation_plan", "rotated", "apply_plan",
           "rotate_in", "rotate_out", "rotate_heads_out", "rotate_heads_in"]

# HF model types whose blocks are pre-norm RMSNorm (weight * x) -> attention(q,k,v,o) ->
# RMSNorm -> SwiGLU(gate, up, down); Gemma's (1 + weight) norms and OLMo2's post-norms differ
SUPPORTED_MODEL_TYPES = ("llama", "qwen3", "qwen2", "mistral")


def check_model_type(model_type) -> None:
    """DMXError unless rotations support this HF ``model_type`` (checkable from
    config.json alone, before the weights load)."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise DMXError(f"rotations support model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
                       f"this model is {model_type!r}: run without --rotate")


def plain_linear(module: nn.Module) -> nn.Linear:
    """The nn.Linear of a plain or wrapped (MXLinear/DMXLinear: ``.linear``) layer."""
    linear = getattr(module, "linear", module)
    if not isinstance(linear, nn.Linear):
        raise DMXError(f"rotations expected a linear layer, found {type(module).__name__}")
    return linear


@dataclass
class Block:
    input_norm: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    post_norm: nn.Module
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


@dataclass
class Arch:
    model: nn.Module
    embed: nn.Embedding
    blocks: list
    norm: nn.Module
    lm_head: nn.Linear
    hidden: int
    head_dim: int
    num_heads: int
    num_kv_heads: int

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.embed.weight


def arch_of(model: nn.Module) -> Arch:
    """The modules rotations touch, checked; DMXError naming what is unsupported."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    check_model_type(model_type)
    base = getattr(model, "model", None)
    try:
        blocks = [Block(b.input_layernorm, plain_linear(b.self_attn.q_proj),
                        plain_linear(b.self_attn.k_proj), plain_linear(b.self_attn.v_proj),
                        plain_linear(b.self_attn.o_proj), b.post_attention_layernorm,
                        plain_linear(b.mlp.gate_proj), plain_linear(b.mlp.up_proj),
                        plain_linear(b.mlp.down_proj)) for b in base.layers]
        embed, norm, lm_head = base.embed_tokens, base.norm, plain_linear(model.lm_head)
    except AttributeError as err:
        raise DMXError(f"rotations: the {model_type} model lacks an expected module "
                       f"({err}); is it a plain Hugging Face causal LM?") from None
    hidden = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    for norm_mod in [norm] + [m for b in blocks for m in (b.input_norm, b.post_norm)]:
        if getattr(norm_mod, "bias", None) is not None or norm_mod.weight.shape != (hidden,):
            raise DMXError(f"rotations need RMSNorms with a [{hidden}] scale and no bias; "
                           f"found {type(norm_mod).__name__}")
    return Arch(model, embed, blocks, norm, lm_head, hidden, head_dim, heads, kv_heads)


def _set(t: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        t.copy_(value.to(t.dtype))


def _fold_scale(norm: nn.Module, linears) -> None:
    g = norm.weight.detach().double()
    for lin in linears:
        _set(lin.weight, lin.weight.detach().double() * g.to(lin.weight.device))
    _set(norm.weight, torch.ones_like(g))


def _untie(arch: Arch) -> None:
    arch.lm_head.weight = nn.Parameter(arch.embed.weight.detach().clone(),
                                       requires_grad=arch.embed.weight.requires_grad)
    arch.model.config.tie_word_embeddings = False
    text_cfg = getattr(arch.model.config, "get_text_config", None)
    if text_cfg is not None:
        text_cfg().tie_word_embeddings = False


def fold_norms(arch: Arch, untie: bool = True) -> bool:
    """Fold every RMSNorm scale into the linears it feeds; returns whether lm_head was untied.

    A tied lm_head needs untying only when the final norm's scale is not one value repeated
    (a scalar scale commutes with rotations, so that norm is left as it is). ``untie=False``
    refuses instead of untying."""
    for b in arch.blocks:
        _fold_scale(b.input_norm, (b.q, b.k, b.v))
        _fold_scale(b.post_norm, (b.gate, b.up))
    g = arch.norm.weight.detach()
    untied = False
    if arch.tied:
        if bool((g == g.flatten()[0]).all()):
            return False
        if not untie:
            raise DMXError("rotating this model needs its lm_head untied from the embeddings "
                           "(the final norm's scale is not a scalar)")
        _untie(arch)
        untied = True
    _fold_scale(arch.norm, (arch.lm_head,))
    return untied


def rotate_in(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """[out, in] weight of a layer whose input is rotated: W @ R."""
    return w @ r.to(w)


def rotate_out(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """[out, ...] weight (or [out] bias) of a layer whose output is rotated: R^T @ W."""
    return r.to(w).T @ w


def rotate_heads_out(w: torch.Tensor, r: torch.Tensor, heads: int) -> torch.Tensor:
    """v_proj [heads*hd, in] weight (or [heads*hd] bias): every head's rows R^T @ W_h."""
    shape = w.shape
    w = w.reshape(heads, r.shape[0], -1)
    return torch.einsum("ij,nik->njk", r.to(w), w).reshape(shape)


def rotate_heads_in(w: torch.Tensor, r: torch.Tensor, heads: int) -> torch.Tensor:
    """o_proj [out, heads*hd] weight: every head's columns W[:, h] @ R."""
    out = w.shape[0]
    return (w.reshape(out, heads, r.shape[0]) @ r.to(w)).reshape(out, -1)


# ----------------------------------------------------------------------------- the plan
# role of each rotated tensor: how R1 (residual) and R2 (per head, per block) act on it
ROLES = ("in", "out", "v", "o", "v_bias")


@dataclass(frozen=True)
class Target:
    module: nn.Module
    attr: str          # "weight" or "bias"
    role: str          # one of ROLES
    block: int | None  # index of the block whose R2 applies (v/o only)


def rotation_plan(arch: Arch, r1: bool = True, r2: bool = True) -> list[Target]:
    """Every tensor R1/R2 change, once each (a tied lm_head shares the embedding's tensor,
    and its rotation, E @ R1, is the same: it is listed under both modules, so a
    parametrization sees it through either, and :func:`apply_plan` rotates it once)."""
    plan: list[Target] = []

    def add(module, attr, role, block=None):
        if getattr(module, attr, None) is not None:
            plan.append(Target(module, attr, role, block))

    if r1:
        add(arch.embed, "weight", "in")
        add(arch.lm_head, "weight", "in")
    for i, b in enumerate(arch.blocks):
        if r1:
            for lin in (b.q, b.k, b.gate, b.up):
                add(lin, "weight", "in")
            add(b.down, "weight", "out")
            add(b.down, "bias", "out")
            add(b.o, "bias", "out")
        if r1 or r2:
            add(b.v, "weight", "v", i)
            add(b.o, "weight", "o", i)
        if r2:
            add(b.v, "bias", "v_bias", i)
    return plan


def rotated(t: torch.Tensor, target: Target, arch: Arch, r1, r2s) -> torch.Tensor:
    """``t`` (the target's unrotated tensor) rotated as its role says; ``r1`` None = no R1,
    ``r2s`` None = no R2, else one R2 per block."""
    r2 = None if r2s is None or target.block is None else r2s[target.block]
    role = target.role
    if role == "in":
        return rotate_in(t, r1)
    if role == "out":
        return rotate_out(t, r1)
    if role == "v":
        t = t if r1 is None else rotate_in(t, r1)
        return t if r2 is None else rotate_heads_out(t, r2, arch.num_kv_heads)
    if role == "o":
        t = t if r2 is None else rotate_heads_in(t, r2, arch.num_heads)
        return t if r1 is None else rotate_out(t, r1)
    return rotate_heads_out(t, r2, arch.num_kv_heads)  # v_bias


def apply_plan(arch: Arch, plan: list[Target], r1, r2s) -> None:
    """Rotate every target in place (float64 arithmetic, stored in the tensor's dtype)."""
    done: set[int] = set()
    for target in plan:
        t = getattr(target.module, target.attr)
        if id(t) in done:
            continue
        done.add(id(t))
        _set(t, rotated(t.detach().double(), target, arch, r1, r2s))
