"""Learned rotations kept in OUT, and applied again to the unrotated model.

``dmx search --rotate learned`` folds its trained R1/R2 into the weights it quantizes, so
OUT's weights alone cannot give them back. It also writes the matrices themselves
(``rotations.safetensors``: ``r1``, ``r2.<block>``, float32, exactly the values folded), so
a baseline can run on the same rotated model (``dmx baseline --rotate-from OUT``, which
reads it with :func:`dmx.outdir.read_rotations`): KL selection or a uniform format against
the search's assignment, the rotation held equal.
"""
from __future__ import annotations

import torch.nn as nn

from dmx.errors import DMXError
from dmx.rotate.fold import apply_plan, arch_of, fold_norms, rotation_plan
from dmx.rotate.info import RotationInfo

__all__ = ["ROTATIONS_NAME", "rotations_bytes", "apply_rotations"]

ROTATIONS_NAME = "rotations.safetensors"


def rotations_bytes(matrices: dict) -> bytes:
    """The file ``ROTATIONS_NAME`` holds, from ``LearnedRotations.matrices()``."""
    from safetensors.torch import save
    return save({k: v.contiguous() for k, v in matrices.items()})


def apply_rotations(model: nn.Module, matrices: dict, record: dict | None = None,
                    untie: bool = True) -> RotationInfo:
    """Fold the norms, then the given R1 / per-block R2 into ``model`` (in place, float64
    arithmetic, as ``LearnedRotations.fold`` does): the same rotated weights the search
    quantized. Matrices that do not fit the model are refused in one line."""
    arch = arch_of(model)
    r1 = matrices.get("r1")
    r2s = [matrices[f"r2.{i}"] for i in range(len(arch.blocks)) if f"r2.{i}" in matrices]
    if r1 is not None and tuple(r1.shape) != (arch.hidden, arch.hidden):
        raise DMXError(f"the saved R1 is {tuple(r1.shape)}, this model's residual stream is "
                       f"{arch.hidden} wide: rotations from another model")
    if r2s and (len(r2s) != len(arch.blocks)
                or any(tuple(r.shape) != (arch.head_dim, arch.head_dim) for r in r2s)):
        raise DMXError(f"the saved R2 matrices do not fit this model ({len(arch.blocks)} "
                       f"blocks, head_dim {arch.head_dim}): rotations from another model")
    if r1 is None and not r2s:
        raise DMXError("the rotations file holds neither r1 nor r2.<block>")
    untied = fold_norms(arch, untie) if r1 is not None else False
    apply_plan(arch, rotation_plan(arch, r1 is not None, bool(r2s)),
               None if r1 is None else r1.double(), [r.double() for r in r2s] or None)
    rec = record or {}
    return RotationInfo("learned", rec.get("r1"), rec.get("r2"), arch.hidden, arch.head_dim,
                        int(rec.get("seed", 0)), r1 is not None, untied,
                        int(rec.get("learned_steps", 0)))
