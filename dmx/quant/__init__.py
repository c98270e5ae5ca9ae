"""The quantizers: MX fake quantization bit-exact with mxref, the real-valued format, ladders
and annealing, and their compute backends (torch everywhere, Triton on CUDA).

Layer 1 of dmx (docs/ARCHITECTURE.md): imports mxref and torch, nothing of dmx above it.
"""
from dmx.quant.fakequant import (dequantize_codes, fake_quantize, quantize_codes,
                                 register_backend, resolve)

__all__ = ["fake_quantize", "quantize_codes", "dequantize_codes", "register_backend", "resolve"]
