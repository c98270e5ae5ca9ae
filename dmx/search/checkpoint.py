"""Search checkpoints: the offsets, optimizer state, step and log of an unfinished `dmx search`.

A checkpoint lives in ``<OUT>.partial/checkpoint.pt`` by default (``--checkpoint-dir``
overrides it), so an interrupted run never leaves anything at OUT itself. It is written
atomically (mxref.outputs.atomic_write: temp file in the same directory, fsync, rename):
a Ctrl-C or crash while saving leaves the previous checkpoint intact.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dmx.errors import DMXError

__all__ = ["CHECKPOINT_NAME", "CHECKPOINT_VERSION", "default_checkpoint_dir", "save_checkpoint",
           "load_checkpoint", "check_same_config"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1


def default_checkpoint_dir(out) -> Path:
    """``OUT.partial`` next to OUT (a sibling, so OUT appears only when the search is done)."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def save_checkpoint(ckpt_dir, state: dict) -> Path:
    """Write ``state`` to ``ckpt_dir/checkpoint.pt`` atomically; returns the path."""
    from mxref.outputs import atomic_write
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / CHECKPOINT_NAME
    atomic_write(path, lambda fh: torch.save({"version": CHECKPOINT_VERSION, **state}, fh),
                 force=True, what="checkpoint", tool="dmx search", error=DMXError)
    return path


def load_checkpoint(ckpt_dir) -> dict:
    """Read ``ckpt_dir/checkpoint.pt``; a one-line DMXError if it is missing or unreadable."""
    path = Path(ckpt_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise DMXError(f"--resume: no checkpoint at {path}; run without --resume to start "
                       f"a new search")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign file: say which and what to do
        raise DMXError(f"--resume: cannot read checkpoint {path} ({type(err).__name__}); "
                       f"delete it and start again without --resume") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise DMXError(f"--resume: {path} is not a dmx search checkpoint of version "
                       f"{CHECKPOINT_VERSION}; delete it and start again without --resume")
    return state


def check_same_config(saved: dict, current: dict, path) -> None:
    """Resuming with different settings would silently mix two searches: refuse, naming
    the first setting that differs."""
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise DMXError(f"--resume: the checkpoint in {path} was made with {key}="
                           f"{saved.get(key)!r}, this run has {current.get(key)!r}; rerun "
                           f"with the same settings or start over with --force")
