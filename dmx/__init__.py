"""dmx: differentiable mixed-precision assignment of OCP MX formats (torch side).

Imports are lazy so that ``import dmx`` stays cheap (no torch/transformers import until a
name is used); other modules add their names to ``_LAZY``. Entry points that
share their module's name are not re-exported (``dmx.search`` names the module):
``dmx.search.search``, ``dmx.eval.command.evaluate``, ``dmx.export.export``.
"""
from __future__ import annotations

from mxref.lazy import lazy_names

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "DMXError": "dmx.errors",
    "fake_quantize": "dmx.quant.fakequant",
    "quantize_codes": "dmx.quant.fakequant",
    "dequantize_codes": "dmx.quant.fakequant",
    "register_backend": "dmx.quant.fakequant",
    "real_format_quantize": "dmx.quant.realfmt",
    "Rung": "dmx.quant.ladders",
    "Ladder": "dmx.quant.ladders",
    "LADDERS": "dmx.quant.ladders",
    "get_ladder": "dmx.quant.ladders",
    "anneal_map": "dmx.quant.anneal",
    "TemperatureSchedule": "dmx.quant.anneal",
    "average_bits": "dmx.nn.bits",
    "hinge_penalty": "dmx.search.penalty",
    "scaling_penalty": "dmx.search.penalty",
    "MXLinear": "dmx.nn.layers",
    "DMXLinear": "dmx.nn.layers",
    "wrap_model": "dmx.nn.layers",
    "apply_formats": "dmx.nn.layers",
    "set_temperature": "dmx.nn.layers",
    "hard_assignment": "dmx.nn.layers",
    "dmx_parameters": "dmx.nn.layers",
    "fused_key": "dmx.nn.names",
    "load": "dmx.outdir.read",
}

__all__ = sorted(_LAZY) + ["__version__"]
__getattr__, __dir__ = lazy_names(globals(), _LAZY)
