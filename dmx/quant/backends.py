"""Which implementation computes a quantizer: one explicit choice, as torchao's
``kernel_preference`` does.

* ``Backend.TORCH`` -- the reference torch code (any device, any dtype, every profile).
* ``Backend.TRITON`` -- the Triton kernels (:mod:`dmx.quant.triton_kernels`, with autograd
  in :mod:`dmx.quant.triton_ops`): CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` (how the tests run them without a GPU).
* ``Backend.AUTO`` (default) -- Triton for float32/bfloat16/float16 CUDA tensors when
  Triton is importable and ``DMX_TRITON=0`` is not set (the one place that switch is
  read), torch otherwise.

:func:`choose` resolves AUTO for one tensor; the callers (:func:`dmx.quant.fake_quantize`,
:class:`dmx.nn.DMXLinear`) dispatch on its answer. A new backend is a new member here
plus a branch in those two dispatchers (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import enum
import os

from dmx.errors import DMXError
from dmx.quant import triton_kernels as tk

__all__ = ["Backend", "as_backend", "choose", "TRITON_DTYPES"]


class Backend(str, enum.Enum):
    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"


def as_backend(value) -> Backend:
    """A Backend from a member or its name ("auto", "torch", "triton")."""
    try:
        return Backend(value)
    except ValueError:
        raise DMXError(f"unknown backend {value!r}; use one of "
                       f"{', '.join(b.value for b in Backend)}") from None


TRITON_DTYPES = ("float32", "bfloat16", "float16")   # what the kernels read and write


def _triton_device(x) -> bool:
    return x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def choose(x, backend=Backend.AUTO) -> Backend:
    """TORCH or TRITON for the tensor ``x`` under the requested ``backend``.

    An explicit TRITON that cannot run ``x`` is a DMXError naming why (never a silent
    fallback: a test or benchmark that asks for Triton must get it).
    """
    backend = as_backend(backend)
    if backend is Backend.TORCH:
        return backend
    ok_dtype = str(x.dtype).removeprefix("torch.") in TRITON_DTYPES
    if backend is Backend.AUTO:
        usable = (os.environ.get("DMX_TRITON", "1") != "0" and x.is_cuda and ok_dtype
                  and tk.available())
        return Backend.TRITON if usable else Backend.TORCH
    if not tk.available():
        raise DMXError("backend 'triton' needs the triton package; install it or use "
                       "backend='torch'")
    if not _triton_device(x):
        raise DMXError(f"backend 'triton' runs CUDA tensors (CPU ones only under "
                       f"TRITON_INTERPRET=1), got a {x.device.type} tensor")
    if not ok_dtype:
        raise DMXError(f"backend 'triton' takes {', '.join(TRITON_DTYPES)} tensors, got "
                       f"{x.dtype}; use backend='torch'")
    return backend
