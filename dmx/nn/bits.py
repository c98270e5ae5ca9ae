"""Bit accounting: the average element bits of a model's quantized linears (paper.md 2.5).

One definition for everything that counts bits: the search's penalty differentiates
:func:`average_bits` of its DMXLinear layers, and a fixed assignment (baselines, the
budget repair, the manifest's ``avg_bits``) is counted by the same function through
:class:`FixedBits` stand-ins. Everything is float32 whatever the model dtype: in bfloat16
the hinge moved in coarse steps near the target and training went wrong (the BF16 lesson).
"""
from __future__ import annotations

import torch

import mxref
from dmx.errors import DMXError

__all__ = ["WEIGHTINGS", "average_bits", "FixedBits", "average_bits_of", "all_linear_bits"]

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


class FixedBits:
    """A stand-in for DMXLinear with a fixed format, so that :func:`average_bits`
    computes the manifest's averages by the very definition the search trains against."""

    def __init__(self, bits: int, in_features: int, out_features: int, quantize_input: bool):
        self.bits, self.in_features, self.out_features = bits, in_features, out_features
        self.quantize_input = quantize_input

    def current_bits(self):
        return torch.tensor(float(self.bits))


def average_bits_of(formats: dict, act_formats: dict | None, shapes: dict) -> dict:
    """{"simple", "size_weighted"} element bits of a fixed assignment (average_bits'
    definitions: mean of the weight and input-activation averages, each layer once or
    weighted by size). ``shapes``: {name: (out, in)}. A layer whose input format differs
    from its weight format is not expressible there and is refused."""
    act_formats = act_formats or {}
    layers = {}
    for name, fmt in formats.items():
        act = act_formats.get(name)
        if act is not None and mxref.get_format(act).key != mxref.get_format(fmt).key:
            raise DMXError(f"{name}: input format {act} differs from weight format {fmt}; dmx "
                           f"ties a layer's input format to its weight format")
        out_f, in_f = shapes[name]
        layers[name] = FixedBits(mxref.get_format(fmt).bits, in_f, out_f, act is not None)
    return {"simple": float(average_bits(layers, "simple")),
            "size_weighted": float(average_bits(layers, "size"))}


def all_linear_bits(model, formats: dict, act_formats: dict | None) -> dict:
    """The honest budget: averages over *every* linear of the model, a layer that is not
    in ``formats`` (lm_head, layers left out) counted at its stored dtype bits (32 for
    float32, 16 for bfloat16), weights and input activations alike; an unquantized input
    of a quantized layer likewise. Same definitions as :func:`average_bits` (``weights_*``: the
    weight average alone)."""
    import torch.nn as nn
    act_formats = act_formats or {}
    weights, acts = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        owner = name[: -len(".linear")] if name.endswith(".linear") else name  # a wrapper's
        stored = module.weight.element_size() * 8
        out_f, in_f = module.out_features, module.in_features
        w_bits = mxref.get_format(formats[owner]).bits if owner in formats else stored
        act = act_formats.get(owner)
        a_bits = mxref.get_format(act).bits if act is not None else stored
        # quantize_input=False: average_bits returns the weight average alone, so the
        # activations go in as "weights" of size in_features (their per-token weighting)
        weights[owner] = FixedBits(w_bits, in_f, out_f, False)
        acts[owner] = FixedBits(a_bits, in_f, 1, False)
    if not weights:
        raise DMXError("the model has no nn.Linear layers")
    w_simple, w_size = (float(average_bits(weights, k)) for k in ("simple", "size"))
    a_simple, a_size = (float(average_bits(acts, k)) for k in ("simple", "size"))
    return {"simple": (w_simple + a_simple) / 2, "size_weighted": (w_size + a_size) / 2,
            "weights_simple": w_simple, "weights_size_weighted": w_size,
            "n_linears": len(weights), "n_quantized": sum(1 for n in weights if n in formats)}
