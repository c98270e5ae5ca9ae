"""The names of a model's linears that dMX treats specially: the projections an engine fuses
(:data:`FUSED_GROUPS`, :func:`fused_key`, :func:`fused_units`) and those never quantized
(:data:`NEVER_QUANTIZED`). Plain strings, no torch: the command line's parsers and the
baselines read them without loading torch. :mod:`dmx.nn.layers` re-exports them.
"""
from __future__ import annotations

import re

__all__ = ["FUSED_GROUPS", "fused_key", "fused_units", "NEVER_QUANTIZED"]

# Projections that serving engines fuse into one matmul (so they must share a format):
# (regex on the last name component, group tag).
FUSED_GROUPS = ((r"q_proj|k_proj|v_proj", "qkv"), (r"gate_proj|up_proj", "gate_up"))


def fused_key(name: str) -> str | None:
    """The fused group a projection belongs to (``model.layers.0.self_attn.q_proj`` ->
    ``model.layers.0.self_attn.qkv``), or None. The one definition of which projections
    an engine fuses: search ties their offsets, baselines move them together, exports
    refuse to split them."""
    parent, _, last = name.rpartition(".")
    for pattern, tag in FUSED_GROUPS:
        if re.fullmatch(pattern, last):
            return f"{parent}.{tag}" if parent else tag
    return None


def fused_units(names: list[str]) -> list[tuple[str, ...]]:
    """Names grouped into units that share a format (fused q/k/v and gate/up), in order."""
    units: dict[str, list[str]] = {}
    for n in names:
        units.setdefault(fused_key(n) or n, []).append(n)
    return [tuple(v) for v in units.values()]


# lm_head and the embeddings: never quantized by dMX (the selection's default exclusion)
NEVER_QUANTIZED = ("lm_head", "embed")
