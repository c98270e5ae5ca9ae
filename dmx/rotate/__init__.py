"""Offline rotations (QuaRot / SpinQuant R1 and R2) that fold into the weights.

The rotated float model computes the same function as the original (up to rounding), but
its weights and activations have fewer outliers, so MX formats (MXFP4 above all) lose less.
Everything is folded into ordinary weights: the result is a plain Hugging Face model that
every export and runtime reads unchanged. The optional online R4 (dmx.rotate.online: a
Hadamard on down_proj's input at run time) is for fake-quant evaluation only: dmx.load
re-applies it, the exports refuse it.

Supported: HF ``llama``, ``qwen3``, ``qwen2``, ``mistral`` causal LMs (pre-norm RMSNorm,
q/k/v/o attention with any grouped-query layout, SwiGLU MLP). See docs/rotations.md.

Public API
----------
``rotate_model(model, mode="hadamard", seed=0, kind="auto", r1=True, r2=True,
untie=True) -> RotationInfo``
    In place, before wrap_model/apply_formats (wrapped layers are accepted too). ``mode``:
    "none" (nothing changes), "hadamard" (Hadamard of ``kind``: "auto" | "kron" | "block" |
    "random", see :func:`rotation_matrix`), "random" (seeded Haar-random orthogonal).
    Folds the RMSNorm scales, then R1 on the residual stream (hidden_size) and one R2 per
    attention head (head_dim) between v_proj and o_proj.
``rotate_online(model, online, info=None, kind="auto", seed=0) -> RotationInfo | None``
    ``online`` = ("r4",): fold R4 into every down_proj weight and rotate its input at run
    time (needs runtime support: recorded in ``info.online``); see dmx.rotate.online.
``LearnedRotations(model, init="hadamard", seed=0, kind="auto", lr=1.5, momentum=0.0,
r2=True, untie=True, dtype=torch.float32)``
    Folds the norms, then parametrizes R1 and one R2 per block on the model (create it after
    wrap_model: the rotated weights are computed in every forward from the frozen weights
    and the rotation matrices, so the dMX layers quantize rotated weights):
    ``.parameters()`` (the rotation matrices: all-reduce their grads under torchrun),
    ``.optimizer`` (a :class:`CayleySGD`), ``.step()`` (one Cayley step from the current
    grads), ``.zero_grad()``, ``.state_dict()`` / ``.load_state_dict(d)`` (for --resume),
    ``.orthogonality_error()``, ``.fold() -> RotationInfo`` (bakes the rotations into the
    weights and removes the parametrization; the model is a plain rotated model again).
``RotationInfo``: what was done; ``.to_manifest()`` (a JSON-able dict for the OUT manifest),
    ``.untied_lm_head`` (True when lm_head was untied from the embeddings: write
    ``config.json`` with ``patch_config(cfg)``, i.e. ``tie_word_embeddings: false``).
``out_config_files(source_dir, info)``: that config.json as ``write_out``'s ``extra_files``
    ({} when nothing was untied).
``LearnedRotations.matrices()`` / ``dmx.rotate.saved``: a learned search writes the trained
    matrices into OUT (``rotations.safetensors``); ``dmx.outdir.read_rotations(out_dir)``
    returns them with the manifest's record and ``apply_rotations(model, matrices, record)``
    folds them into an unrotated model (``dmx baseline --rotate-from OUT``).
``CayleySGD(params, lr=1.5, momentum=0.0)``: SGD on the orthogonal group by the Cayley
    transform (exactly orthogonal steps, solved in float64).
``rotation_matrix(n, kind, seed, block)``, ``hadamard_pm1(n)``, ``block_hadamard(n, block)``,
``random_orthogonal(n, seed)``, ``is_orthogonal(q)``.
"""
from __future__ import annotations

import torch.nn as nn

from dmx.errors import DMXError
from dmx.rotate.fold import apply_plan, arch_of, fold_norms, rotation_plan
from dmx.rotate.hadamard import (KINDS, block_hadamard, hadamard_pm1, is_orthogonal,
                                 random_orthogonal, rotation_matrix)
from dmx.rotate.info import MODES, ONLINE, RotationInfo, out_config_files, patch_config
from dmx.rotate.learned import CayleySGD, LearnedRotations
from dmx.rotate.online import parse_online, rotate_online
from dmx.rotate.saved import ROTATIONS_NAME, apply_rotations

__all__ = ["MODES", "ONLINE", "RotationInfo", "rotate_model", "rotate_online", "parse_online",
           "patch_config", "out_config_files", "LearnedRotations",
           "CayleySGD", "rotation_matrix", "hadamard_pm1", "block_hadamard",
           "random_orthogonal", "is_orthogonal", "KINDS", "ROTATIONS_NAME",
           "apply_rotations"]


def rotate_model(model: nn.Module, mode: str = "hadamard", seed: int = 0, kind: str = "auto",
                 r1: bool = True, r2: bool = True, untie: bool = True) -> RotationInfo:
    """Rotate ``model`` in place with fixed R1/R2 (see the module docstring)."""
    if mode not in MODES:
        raise DMXError(f"unknown rotation mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "none":
        return RotationInfo("none", seed=int(seed))
    if mode == "learned":
        raise DMXError("mode 'learned' is trained: use LearnedRotations(model), then .fold()")
    arch = arch_of(model)
    kind = "random" if mode == "random" else kind
    untied = fold_norms(arch, untie) if r1 else False  # R2 alone commutes with the norms
    # R1 and R2 of different widths; with equal widths the seeds still differ
    q1, name1 = rotation_matrix(arch.hidden, kind, seed) if r1 else (None, None)
    q2, name2 = rotation_matrix(arch.head_dim, kind, seed + 1) if r2 else (None, None)
    apply_plan(arch, rotation_plan(arch, r1, r2), q1,
               None if q2 is None else [q2] * len(arch.blocks))
    return RotationInfo(mode, name1, name2, arch.hidden, arch.head_dim, int(seed), bool(r1),
                        untied)
