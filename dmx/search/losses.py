"""The search's losses, float32 whatever the model dtype: next-token cross-entropy, the
KL divergence from a reference model's predictions (used by the search and the KL
baseline alike) and the KL between the two models' attention probabilities."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["next_token_ce", "distill_kl", "attention_kl"]


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def distill_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || quantized) per token, in float32."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    log_p = F.log_softmax(ref_logits.float(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean()


def attention_kl(attentions, ref_attentions) -> torch.Tensor:
    """KL(reference || quantized) of every attention row (one query's distribution over the
    keys), averaged over the batch, heads and queries of each layer, then over the layers.
    ``attentions``: one [batch, heads, queries, keys] tensor of probabilities per layer, as
    a Hugging Face model returns them with ``output_attentions=True``. Keys a causal mask
    hides have probability 0 in both, and add 0 (xlogy(0, .) = 0)."""
    if len(attentions) != len(ref_attentions) or not attentions:
        raise ValueError("attention_kl needs the same, non-zero number of layers on both sides")
    total = 0.0
    for q, p in zip(attentions, ref_attentions):
        p, q = p.float(), q.float()
        # clamp: a probability that underflowed to 0 where the reference's is not
        kl = torch.xlogy(p, p) - p * torch.log(q.clamp_min(torch.finfo(q.dtype).tiny))
        total = total + kl.sum(-1).mean()
    return total / len(attentions)
