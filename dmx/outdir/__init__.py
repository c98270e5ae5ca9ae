"""The OUT directory (specs/out_layout.md, docs/CONTRACT.md): its only writer
(:mod:`dmx.outdir.write`), its only reader (:mod:`dmx.outdir.read`), the integrity seal
(:mod:`dmx.outdir.integrity`), eval.json (:mod:`dmx.outdir.evaljson`) and the file names
(:mod:`dmx.outdir.layout`). Layer 3 of dmx (docs/ARCHITECTURE.md); importing it stays
torch-free (torch is imported by the functions that need it).
"""
from dmx.outdir.integrity import validate_manifest
from dmx.outdir.layout import (EVAL_NAME, FORMAT_VERSION, MANIFEST_NAME, METHODS,
                               SEARCH_LOG_NAME, WEIGHTS_NAME, layer_sha256)
from dmx.outdir.read import (OutModel, QuantLayer, check_config_fits, load, read_manifest,
                             read_out, read_rotations, read_search_log)
from dmx.outdir.write import atomic_write_text, check_new_out, write_out

__all__ = ["MANIFEST_NAME", "WEIGHTS_NAME", "EVAL_NAME", "FORMAT_VERSION", "METHODS",
           "SEARCH_LOG_NAME", "layer_sha256", "read_manifest", "read_out", "read_search_log", "read_rotations", "check_config_fits", "load", "OutModel",
           "QuantLayer", "write_out", "atomic_write_text", "check_new_out", "validate_manifest"]
