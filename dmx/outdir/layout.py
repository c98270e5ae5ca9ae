"""The names and per-layer hash of an OUT directory (specs/out_layout.md, docs/CONTRACT.md):
the bottom of dmx.outdir, shared by its writer, its reader and the integrity checks."""
from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["MANIFEST_NAME", "WEIGHTS_NAME", "EVAL_NAME", "SEARCH_LOG_NAME", "FORMAT_VERSION", "METHODS",
           "layer_sha256", "writer_of"]

MANIFEST_NAME = "dmx_manifest.json"
WEIGHTS_NAME = "model.safetensors"
SEARCH_LOG_NAME = "search_log.jsonl"   # written by `dmx search` (sealed like the rest)
EVAL_NAME = "eval.json"   # written into a finished OUT by `dmx eval --save` (not sealed)
FORMAT_VERSION = 1
METHODS = ("dmx", "uniform", "kl")
# dmx/outdir/manifest.schema.json is a symlink to specs/manifest.schema.json in the
# repository (one source of truth); a built wheel carries it as a file (package data).


def writer_of(m: dict) -> str:
    """The command that wrote an OUT, from its manifest's method: the refusals said
    "a `dmx kl` OUT" and "a `dmx dmx` OUT", commands that do not exist."""
    method = m.get("method")
    return "dmx search" if method == "dmx" else f"dmx baseline --method {method}"


def layer_sha256(packed: np.ndarray, scales: np.ndarray) -> str:
    """sha256 of a layer's weight_packed bytes followed by its weight_scale bytes."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(packed).tobytes())
    h.update(np.ascontiguousarray(scales).tobytes())
    return h.hexdigest()
