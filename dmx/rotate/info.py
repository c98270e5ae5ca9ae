"""The record of a rotation: what the manifest says and what config.json needs."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["MODES", "RotationInfo", "patch_config", "out_config_files"]

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


def out_config_files(source_dir, info: RotationInfo) -> dict:
    """``extra_files`` for ``dmx.io.write_out``: the patched config.json when the rotation
    untied lm_head (write_out copies the source's, which would tie it again on load),
    else nothing."""
    if not info.untied_lm_head:
        return {}
    config = json.loads((Path(source_dir) / "config.json").read_text())
    return {"config.json": json.dumps(patch_config(config, info), indent=2) + "\n"}
