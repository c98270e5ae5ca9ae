"""Lazy public names of a package (PEP 562), for ``mxref``, ``dmx`` and dmx's subpackages.

A package lists its public names with the module that defines each; a name's module is
imported when the name is first used, so importing the package (and building the command
lines' parsers) does not load numba, ml_dtypes or torch::

    _LAZY = {"quantize": "mxref.core", ...}
    __getattr__, __dir__ = lazy_names(globals(), _LAZY)

A submodule is reachable as an attribute too (``mxref.formats``), imported on first use,
as it was when the package imported its modules eagerly.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_names(namespace: dict, table: dict[str, str]) -> tuple[Callable, Callable]:
    """The ``__getattr__`` and ``__dir__`` of the package whose globals are ``namespace``;
    ``table`` maps each lazy public name to the module that defines it."""
    package = namespace["__name__"]

    def __getattr__(name: str):
        mod = table.get(name)
        if mod is not None:
            value = getattr(importlib.import_module(mod), name)
            namespace[name] = value  # cache: later lookups skip __getattr__
            return value
        sub = f"{package}.{name}"
        try:
            return importlib.import_module(sub)
        except ModuleNotFoundError as err:
            if err.name != sub:   # the submodule exists but needs a missing package
                raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
