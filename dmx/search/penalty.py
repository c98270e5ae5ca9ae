"""The bit-budget penalties of the search (paper.md 2.5), on dmx.nn.bits.average_bits.

Everything is float32 whatever the model dtype: in bfloat16 the hinge moved in
coarse steps near the target and training went wrong (the BF16 lesson).
"""
from __future__ import annotations

import torch


__all__ = ["hinge_penalty", "scaling_penalty"]


def hinge_penalty(avg_bits: torch.Tensor, target: float, lam: float = 5.0) -> torch.Tensor:
    """R_t = max(0, lam * (avg_bits - target)): silent until the budget is exceeded."""
    avg = torch.as_tensor(avg_bits).float()
    return torch.clamp_min(lam * (avg - float(target)), 0.0)


def scaling_penalty(avg_bits: torch.Tensor, lam: float) -> torch.Tensor:
    """R_s = lam * avg_bits: a constant pull towards fewer bits, no target."""
    return float(lam) * torch.as_tensor(avg_bits).float()
