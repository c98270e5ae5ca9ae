"""Data-parallel `dmx search` under ``torchrun`` (torch.distributed).

    torchrun --standalone --nproc-per-node 2 -m dmx search --model DIR --target-bits 5 -o OUT

Every process holds the whole model and the same calibration windows. ``--batch-size`` is
the GLOBAL batch: each step, every rank takes its own contiguous slice of the step's
window indices (:func:`dmx.search.train.batch_indices`, a function of (seed, step) only) and
weights its cross-entropy (and KL) by its share of the batch; the penalty is added on rank
0 only. The offsets' gradients are then summed over the ranks, which gives the gradient of
the single-process loss on the same global batch (up to float rounding: a sum of per-rank
means is not bit-identical to one mean), so every rank takes the same SGD step. Rank 0
alone writes checkpoints and OUT and shows the progress bar.

Failures: a bad input seen by one rank (a missing file, a leftover checkpoint) is shared
with all ranks through :func:`agree` / :func:`on_main`, so every process stops with the
same one-line error instead of the others hanging in a collective.

Single process (no ``WORLD_SIZE`` > 1 in the environment): :func:`setup` returns a
context with ``enabled = False`` and every helper here is a plain call.
"""
from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import torch

from dmx.errors import DMXError

__all__ = ["DistContext", "SINGLE", "env_world", "setup", "teardown", "agree", "on_main",
           "barrier", "reduce_sum", "all_reduce_grads", "is_main_process", "env_rank", "ready",
           "pin_layer_devices",
           "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 1800.0  # collectives and rendezvous; DMX_DIST_TIMEOUT overrides it
_OWNED = False  # True when setup() created the process group (then teardown() destroys it)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``world_size`` processes, this one is ``rank``."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Tensors in collectives live here: CPU for gloo, this rank's GPU for nccl."""
        return torch.device(self.device if self.backend == "nccl" else "cpu")

    def rank_slice(self, ids: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, float]:
        """This rank's contiguous part of a step's ``batch_size`` windows and its share of
        the batch (windows / batch_size; the first ranks take one more when it does not
        divide)."""
        part = torch.tensor_split(ids, self.world_size)[self.rank]
        return part, part.shape[0] / batch_size


SINGLE = DistContext()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DMXError(f"environment variable {name}={value!r} is not an integer; launch "
                       f"with torchrun or unset it") from None


def env_world() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) from torchrun's environment; (1, 0, 0) without it."""
    world = _env_int("WORLD_SIZE")
    if world is None or world == 1:
        return 1, 0, 0
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if world < 1:
        raise DMXError(f"WORLD_SIZE={world}: must be a positive number of processes")
    if rank is None:
        raise DMXError(f"WORLD_SIZE={world} is set but RANK is not; launch with torchrun "
                       f"(it sets both) or unset WORLD_SIZE for one process")
    if not 0 <= rank < world:
        raise DMXError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    return world, rank, rank if local is None else local


def env_rank() -> str:
    """RANK as the environment says it (for messages)."""
    return os.environ.get("RANK", "0")


def ready() -> bool:
    """Is a process group up (so that errors are shared between the ranks)?"""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Rank 0 or a single process (from the environment: usable before :func:`setup`)."""
    try:
        return env_world()[1] == 0
    except DMXError:
        return True


def _timeout_s() -> float:
    raw = os.environ.get("DMX_DIST_TIMEOUT")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DMXError(f"DMX_DIST_TIMEOUT={raw!r} must be a positive number of seconds")
    return value


def _check_parallel_args(world: int, batch_size, device_map) -> None:
    if device_map is not None:
        raise DMXError("--device-map spreads one model over several GPUs in one process; "
                       "it cannot be combined with torchrun (data parallel). Use one or "
                       "the other")
    if batch_size is not None and batch_size < world:
        raise DMXError(f"--batch-size {batch_size} is smaller than the {world} processes: "
                       f"--batch-size is the global batch, split over the processes, and "
                       f"each needs at least one window per step")


def setup(device: str = "cpu", batch_size: int | None = None,
          device_map=None) -> DistContext:
    """The process group of a torchrun launch: gloo on CPU, nccl on CUDA with this process
    on GPU ``LOCAL_RANK``. A group that is up already (an earlier search in this process,
    or the caller's own) is used as it is, on the device given. One process: a context
    with ``enabled = False``. Bad environments are one-line DMXErrors, raised before
    anything connects where possible."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # a group that is up already (a
        world, rank = dist.get_world_size(), dist.get_rank()  # caller's own, or ours)
        if world == 1:
            return DistContext(device=str(device))
        _check_parallel_args(world, batch_size, device_map)
        backend = dist.get_backend()
        cuda = str(device).startswith("cuda")
        if backend == "nccl" and not cuda:
            raise DMXError("the process group uses nccl: pass --device cuda (or start a "
                           "gloo group for CPU)")
        if str(device) == "cuda":  # the GPU the caller made current
            device = f"cuda:{torch.cuda.current_device()}"
        return DistContext(world_size=world, rank=rank, local_rank=_env_int("LOCAL_RANK") or 0,
                           backend=backend, device=str(device))
    world, rank, local = env_world()
    if world == 1:
        return DistContext(device=str(device))
    _check_parallel_args(world, batch_size, device_map)
    cuda = str(device).startswith("cuda")
    if cuda:
        if str(device) not in ("cuda", f"cuda:{local}"):
            raise DMXError(f"--device {device} under torchrun: pass --device cuda, each "
                           f"process then uses GPU LOCAL_RANK")
        n_gpus = torch.cuda.device_count()
        if local >= n_gpus:
            raise DMXError(f"LOCAL_RANK={local} but only {n_gpus} CUDA device(s) are visible;"
                           f" start at most {n_gpus} processes per node")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    backend = "nccl" if cuda else "gloo"
    if not dist.is_available():
        raise DMXError("this torch build has no torch.distributed; run without torchrun")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise DMXError(f"WORLD_SIZE={world} is set but {' and '.join(missing)} "
                       f"{'is' if len(missing) == 1 else 'are'} not: launch with "
                       f"torchrun, or unset WORLD_SIZE for one process")
    timeout = datetime.timedelta(seconds=_timeout_s())
    try:
        dist.init_process_group(backend, init_method="env://", world_size=world,
                                rank=rank, timeout=timeout)
    except Exception as err:  # DistNetworkError, RuntimeError, ValueError, timeouts
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DMXError(f"cannot start the {backend} process group of {world} processes "
                       f"(rank {rank}, MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                       f"MASTER_PORT={os.environ.get('MASTER_PORT')}): "
                       f"{type(err).__name__}: {msg[:300]}") from None
    global _OWNED
    _OWNED = True
    atexit.register(teardown)
    return DistContext(world_size=world, rank=rank, local_rank=local, backend=backend,
                       device=str(device))


def teardown() -> None:
    """Destroy the process group if :func:`setup` created it (idempotent)."""
    global _OWNED
    if not _OWNED:
        return
    _OWNED = False
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to clean up
            pass


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def _share_outcome(ctx: DistContext, error: BaseException | None) -> None:
    """Collective: every rank learns whether any rank failed; if one did, all raise (the
    failing rank its own exception, the others a DMXError with the lowest failing rank's
    message)."""
    import torch.distributed as dist

    mine = None if error is None else (type(error).__name__, str(error),
                                       isinstance(error, DMXError))
    outcomes: list = [None] * ctx.world_size
    dist.all_gather_object(outcomes, mine)
    if error is not None:
        raise error
    for rank, outcome in enumerate(outcomes):
        if outcome is not None:
            name, msg, is_dmx = outcome
            raise DMXError(msg if is_dmx else f"process {rank} failed ({name}: {msg})")


def agree(ctx: DistContext, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on every rank; if it fails on any rank, it fails on all with
    that rank's message (instead of the others waiting forever in the next collective)."""
    if not ctx.enabled:
        return fn(*args, **kwargs)
    try:
        result = fn(*args, **kwargs)
    except Exception as err:
        _share_outcome(ctx, err)
        raise  # unreachable: _share_outcome raises
    _share_outcome(ctx, None)
    return result


def on_main(ctx: DistContext, fn, *args, broadcast: bool = False, **kwargs):
    """``fn`` on rank 0 only (writing OUT, reading a checkpoint); the others wait for it and
    fail with its message if it fails. ``broadcast``: every rank gets rank 0's result
    (pickled; keep it small), otherwise the others get None."""
    if not ctx.enabled:
        return fn(*args, **kwargs)
    import torch.distributed as dist

    result, error = None, None
    if ctx.is_main:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:
            error = err
    payload = [None if error is None else (type(error).__name__, str(error),
                                           isinstance(error, DMXError)),
               result if broadcast else None]
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    if payload[0] is not None:
        name, msg, is_dmx = payload[0]
        raise DMXError(msg if is_dmx else f"process 0 failed ({name}: {msg})")
    return result if ctx.is_main else payload[1]


def reduce_sum(ctx: DistContext, values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sums of 0-d tensors over the ranks (one collective), detached, float32, on the
    device of the first value."""
    flat = torch.stack([v.detach().float().to(ctx.comm_device) for v in values])
    if ctx.enabled:
        import torch.distributed as dist

        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    dev = values[0].device
    return [t.to(dev) for t in flat.unbind()]


def all_reduce_grads(ctx: DistContext, params: list[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` (the offsets, and learned rotation matrices) over
    the ranks, in place (one collective, float32). A parameter without a gradient on every
    rank keeps ``grad = None`` (SGD then skips it, as it would in one process)."""
    if not ctx.enabled or not params:
        return
    import torch.distributed as dist

    dev = ctx.comm_device
    grads = [torch.zeros(p.numel(), dtype=torch.float32, device=dev) if p.grad is None
             else p.grad.detach().to(device=dev, dtype=torch.float32).reshape(-1)
             for p in params]
    present = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=dev)
    flat = torch.cat(grads + [present])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    n = len(params)
    has = flat[-n:].cpu().tolist()  # one device sync, not one per parameter
    sums = torch.split(flat[:-n], [p.numel() for p in params])
    for i, p in enumerate(params):
        if has[i] == 0.0:
            p.grad = None
        else:
            p.grad = sums[i].to(device=p.device, dtype=p.dtype).reshape(p.shape).clone()


def _weight_device(layer) -> torch.device:
    return layer.linear.weight.device


def pin_layer_devices(layers: dict) -> list:
    """Make each CUDA layer's forward run with its own GPU as the current device.

    Triton kernels (dmx.quant.triton_ops, used for CUDA inputs) launch on the *current* device, while
    ``--device-map`` puts layers on several GPUs (and ``--device cuda:1`` on a GPU that is
    not the current one): a forward pre-hook switches to the layer's GPU and a forward
    hook (also on an exception) switches back. Backward needs nothing: autograd runs each
    device's backward on a thread whose current device is that device. A no-op when every
    layer is on the CPU or on the current GPU; returns the hook handles.
    """
    devices = {_weight_device(layer) for layer in layers.values()}
    cuda = [d for d in devices if d.type == "cuda"]
    if not cuda or (len(devices) == 1 and cuda[0].index in (None, torch.cuda.current_device())):
        return []
    handles = []
    for layer in layers.values():
        dev = _weight_device(layer)
        if dev.type != "cuda":
            continue
        saved: list = []

        def enter(module, args, dev=dev, saved=saved):
            saved.append(torch.cuda.current_device())
            torch.cuda.set_device(dev)

        def leave(module, args, output, saved=saved):
            if saved:
                torch.cuda.set_device(saved.pop())

        handles.append(layer.register_forward_pre_hook(enter))
        handles.append(layer.register_forward_hook(leave, always_call=True))
    return handles
