"""The quantizers: MX fake quantization bit-exact with mxref, the real-valued format, ladders
and annealing, and their compute backends (torch everywhere, Triton on CUDA).

Layer 1 of dmx (docs/ARCHITECTURE.md): imports mxref and torch, nothing of dmx above it.
Its names load lazily, as ``dmx``'s do: importing a torch-free part (``dmx.quant.ladders``
for the command line's parsers) does not load torch.
"""
from __future__ import annotations

from mxref.lazy import lazy_names

# public name -> module that defines it
_LAZY = dict.fromkeys(["fake_quantize", "quantize_codes", "dequantize_codes",
                       "register_backend", "resolve"], "dmx.quant.fakequant")

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_names(globals(), _LAZY)
