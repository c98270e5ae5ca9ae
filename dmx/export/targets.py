"""The export targets: their names and the module that writes each (one registry; a new
target is a module with check/write/read_back plus a line here, docs/ARCHITECTURE.md)."""
from __future__ import annotations

from dmx.errors import DMXError

__all__ = ["TARGETS", "target_module"]

TARGETS = ("compressed-tensors", "quark", "gguf")


def target_module(to: str):
    """The module that checks, writes and reads back target ``to``."""
    if to == "compressed-tensors":
        from dmx.export import compressed_tensors as mod
    elif to == "quark":
        from dmx.export import quark as mod
    elif to == "gguf":
        from dmx.export import gguf_export as mod
    else:
        raise DMXError(f"unknown export target {to!r}; use one of {', '.join(TARGETS)}")
    return mod
