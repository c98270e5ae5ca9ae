"""Quantized modules and whole-model helpers: MXLinear, DMXLinear, wrap_model, the bit
accounting of a model (:mod:`dmx.nn.bits`). Layer 2 of dmx (docs/ARCHITECTURE.md).

Its names load lazily, as ``dmx``'s do: importing a torch-free part (``dmx.nn.names`` for
the command line's parsers) does not load torch.
"""
from __future__ import annotations

from mxref.lazy import lazy_names

# public name -> module that defines it
_LAZY = {
    **dict.fromkeys(["MXLinear", "DMXLinear", "wrap_model", "apply_formats", "set_temperature",
                     "hard_assignment", "dmx_parameters"], "dmx.nn.layers"),
    "fused_key": "dmx.nn.names",
}

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_names(globals(), _LAZY)
