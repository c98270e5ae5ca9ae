"""The search's losses, float32 whatever the model dtype: next-token cross-entropy and the
KL divergence from a reference model's predictions (used by the search and the KL
baseline alike)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["next_token_ce", "distill_kl"]


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def distill_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || quantized) per token, in float32."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    log_p = F.log_softmax(ref_logits.float(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean()
