"""CPU threads for torch and mxref's Numba kernels (``--threads`` of every dmx command)."""
from __future__ import annotations

from dmx.errors import DMXError

__all__ = ["set_threads", "add_threads_arg", "apply_threads"]


def add_threads_arg(parser) -> None:
    """``--threads N`` (search, baseline, eval, demo share one definition)."""
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and Numba (default: torch's default, all "
                             "cores; use 1 per process when several jobs share the machine)")


def apply_threads(args) -> None:
    """Set the threads if the command line asked for a number."""
    if getattr(args, "threads", None) is not None:
        set_threads(args.threads)


def set_threads(n: int) -> None:
    """CPU threads for torch and mxref's Numba kernels. The demo's tensors are small: on a
    2-core machine one thread each was 5x faster than the default (measured: 10 search
    steps 11 s vs 64 s while other jobs ran), because both runtimes spin up their own
    thread pools and oversubscribe the cores."""
    import numba
    import torch

    import mxref
    if n < 1:
        raise DMXError(f"--threads must be a positive integer, got {n}")
    import numpy as np
    mxref.quantize(np.zeros(32, np.float32), "fp4_e2m1")  # start Numba's pool first: it
    torch.set_num_threads(n)                               # resets torch's thread count
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
