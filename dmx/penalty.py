"""Average bit-width of a wrapped model and the bit-budget penalties (paper.md 2.5).

Everything is float32 whatever the model dtype: in bfloat16 the hinge moved in
coarse steps near the target and training went wrong (the BF16 lesson).
"""
from __future__ import annotations

import torch

from dmx.errors import DMXError

__all__ = ["average_bits", "hinge_penalty", "scaling_penalty", "WEIGHTINGS"]

WEIGHTINGS = ("simple", "size", "macs")


def _weighted_mean(bits: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    dev = bits[0].device  # with --device-map the layers (and offsets) span devices
    w = torch.tensor(weights, dtype=torch.float32, device=dev)
    return (torch.stack([b.float().to(dev) for b in bits]) * w).sum() / w.sum()


def average_bits(layers: dict, weighting: str = "simple") -> torch.Tensor:
    """Average element bits of ``{name: DMXLinear}``, a differentiable 0-d float32 tensor.

    * ``simple`` (paper default): (mean over weight quantizers + mean over input-activation
      quantizers) / 2, each layer counted once; with every input quantized and the formats
      tied this is the plain mean over layers.
    * ``size``: the same, weights weighted by their element count (memory) and activations
      by their per-token element count (in_features).
    * ``macs``: one mean weighted by multiply-accumulates per token (in * out).
    """
    if weighting not in WEIGHTINGS:
        raise DMXError(f"unknown weighting {weighting!r}; choose one of: {', '.join(WEIGHTINGS)}")
    layers = list(layers.values()) if isinstance(layers, dict) else list(layers)
    if not layers:
        raise DMXError("average_bits needs at least one DMXLinear layer")
    bits = [layer.current_bits() for layer in layers]
    if weighting == "macs":
        return _weighted_mean(bits, [l.in_features * l.out_features for l in layers])
    acts = [i for i, l in enumerate(layers) if l.quantize_input]
    if weighting == "simple":
        w_weights = [1.0] * len(layers)
        a_weights = [1.0] * len(acts)
    else:
        w_weights = [float(l.in_features * l.out_features) for l in layers]
        a_weights = [float(layers[i].in_features) for i in acts]
    avg_w = _weighted_mean(bits, w_weights)
    if not acts:
        return avg_w
    avg_a = _weighted_mean([bits[i] for i in acts], a_weights)
    return (avg_w + avg_a) / 2


def hinge_penalty(avg_bits: torch.Tensor, target: float, lam: float = 5.0) -> torch.Tensor:
    """R_t = max(0, lam * (avg_bits - target)): silent until the budget is exceeded."""
    avg = torch.as_tensor(avg_bits).float()
    return torch.clamp_min(lam * (avg - float(target)), 0.0)


def scaling_penalty(avg_bits: torch.Tensor, lam: float) -> torch.Tensor:
    """R_s = lam * avg_bits: a constant pull towards fewer bits, no target."""
    return float(lam) * torch.as_tensor(avg_bits).float()
