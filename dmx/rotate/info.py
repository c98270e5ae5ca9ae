"""The record of a rotation: what the manifest says and what config.json needs."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["MODES", "RotationInfo", "patch_config"]

MODES = ("none", "hadamard", "random", "learned")


@dataclass
class RotationInfo:
    """What a rotation did to a model (``to_manifest()`` is its manifest record)."""
    mode: str
    r1: str | None = None            # how R1 was built (e.g. "sylvester256"), None = no R1
    r2: str | None = None            # how R2 was built, None = no R2
    hidden_size: int | None = None
    head_dim: int | None = None
    seed: int = 0
    norms_folded: bool = False
    untied_lm_head: bool = False
    learned_steps: int = 0
    online: list = field(default_factory=list)  # rotations needing runtime support: none

    def to_manifest(self) -> dict:
        return asdict(self)


def patch_config(config: dict, info: RotationInfo) -> dict:
    """config.json contents for the rotated model (a copy; untied lm_head recorded)."""
    out = dict(config)
    if info.untied_lm_head:
        out["tie_word_embeddings"] = False
    return out
