"""The record of a rotation: what the manifest says and what config.json needs."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dmx.errors import DMXError

__all__ = ["MODES", "ONLINE", "RotationInfo", "patch_config", "out_config_files",
           "online_rotations", "refuse_online_rotations"]

MODES = ("none", "hadamard", "random", "learned")
ONLINE = ("r4",)  # online rotations dmx can apply (dmx.rotate.online); R3 is not built


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
    online: list = field(default_factory=list)  # online rotations (["r4"]): see below
    # R4 (dmx.rotate.online): folded into down_proj's weight, applied to its input at run
    # time, so OUT then needs runtime support (dmx.load re-attaches it; exports refuse it)
    r4: str | None = None            # how R4 was built, None = no R4
    r4_kind: str | None = None       # rotation_matrix's kind, to rebuild it on load
    intermediate_size: int | None = None
    needs_runtime_support: bool = False

    def to_manifest(self) -> dict:
        return asdict(self)


def patch_config(config: dict, info: RotationInfo) -> dict:
    """config.json contents for the rotated model (a copy; untied lm_head recorded)."""
    out = dict(config)
    if info.untied_lm_head:
        out["tie_word_embeddings"] = False
    return out


def out_config_files(source_dir, info: RotationInfo) -> dict:
    """``extra_files`` for ``dmx.outdir.write_out``: the patched config.json when the rotation
    untied lm_head (write_out copies the source's, which would tie it again on load),
    else nothing."""
    if not info.untied_lm_head:
        return {}
    config = json.loads((Path(source_dir) / "config.json").read_text())
    return {"config.json": json.dumps(patch_config(config, info), indent=2) + "\n"}


def online_rotations(manifest: dict) -> list:
    """The online rotations an OUT manifest's ``rotation`` record lists ([] when none)."""
    return list((manifest.get("rotation") or {}).get("online") or [])


def refuse_online_rotations(manifest: dict, target: str) -> None:
    """DMXError when OUT needs an online rotation at run time, which ``target``'s
    runtimes do not apply (its weights alone would compute the wrong function)."""
    online = online_rotations(manifest)
    if online:
        raise DMXError(f"OUT was made with --rotate-online {','.join(online)}: its down_proj "
                       f"weights expect a Hadamard-rotated input at run time, which no "
                       f"{target} runtime applies; evaluate it with dmx eval, or rerun "
                       f"without --rotate-online to export")
