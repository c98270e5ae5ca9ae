"""dmx: differentiable mixed-precision assignment of OCP MX formats (torch side).

Imports are lazy so that ``import dmx`` stays cheap (no torch/transformers import until a
name is used); other modules add their names to ``_LAZY``. Entry points that
share their module's name are not re-exported (``dmx.search`` names the module):
``dmx.search.search``, ``dmx.evaluate.evaluate``, ``dmx.export.export``.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "DMXError": "dmx.errors",
    "fake_quantize": "dmx.quant",
    "quantize_codes": "dmx.quant",
    "dequantize_codes": "dmx.quant",
    "register_backend": "dmx.quant",
    "real_format_quantize": "dmx.realfmt",
    "Rung": "dmx.ladders",
    "Ladder": "dmx.ladders",
    "LADDERS": "dmx.ladders",
    "get_ladder": "dmx.ladders",
    "anneal_map": "dmx.anneal",
    "TemperatureSchedule": "dmx.anneal",
    "average_bits": "dmx.penalty",
    "hinge_penalty": "dmx.penalty",
    "scaling_penalty": "dmx.penalty",
    "MXLinear": "dmx.layers",
    "DMXLinear": "dmx.layers",
    "wrap_model": "dmx.layers",
    "apply_formats": "dmx.layers",
    "set_temperature": "dmx.layers",
    "hard_assignment": "dmx.layers",
    "dmx_parameters": "dmx.layers",
    "fused_key": "dmx.layers",
    "load": "dmx.io",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'dmx' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__():
    return __all__
