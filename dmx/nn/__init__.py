"""Quantized modules and whole-model helpers: MXLinear, DMXLinear, wrap_model, the bit
accounting of a model (:mod:`dmx.nn.bits`). Layer 2 of dmx (docs/ARCHITECTURE.md)."""
from dmx.nn.layers import (DMXLinear, MXLinear, apply_formats, dmx_parameters, fused_key,
                           hard_assignment, set_temperature, wrap_model)

__all__ = ["MXLinear", "DMXLinear", "wrap_model", "apply_formats", "set_temperature",
           "hard_assignment", "dmx_parameters", "fused_key"]
