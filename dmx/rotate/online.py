"""Online rotations for fake-quant evaluation: R4, a Hadamard on down_proj's input.

QuaRot/SpinQuant's R4 rotates the input of down_proj (width ``intermediate_size``): the
weight is folded offline, W -> W Q, and the activation is rotated at run time, x -> x Q,
so down_proj computes (x Q)(W Q)^T = x W^T, the same function. It cannot be folded into
gate/up (SwiGLU's elementwise product sits in between), so it needs **runtime support**:
an OUT made with it is only right where something applies x Q before down_proj. dmx does
(``dmx.load`` / ``dmx eval`` re-attach it from the manifest); vLLM, llama.cpp and plain
transformers do not, so every exporter refuses such an OUT
(:func:`dmx.rotate.info.refuse_online_rotations`).

Why bother: down_proj's inputs carry the largest outliers of a SwiGLU model, and MX blocks
of rotated activations have fewer of them (docs/rotations.md), so the quantizer of
down_proj sees the rotated input and the rotated weight.

How the online half is attached: a forward pre-hook on each block's MLP makes sure that
whatever module sits at ``mlp.down_proj`` at call time (plain nn.Linear, MXLinear,
DMXLinear, dmx.outdir.read's DecodedMXLinear) carries a forward pre-hook that rotates its input.
Hooking the MLP rather than down_proj itself survives wrap_model / apply_formats swapping
the module (the KL baseline swaps it for every scored unit); the wrappers call
``F.linear`` on ``.linear.weight``, never ``.linear(x)``, so an inner Linear's own hook
never runs twice.

R3 (a Hadamard per head on q and k after RoPE) is not built: (H q).(H k) = q.k, so it only
changes numbers where q/k or the KV cache are quantized, which dmx does not do.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dmx.errors import DMXError
from dmx.rotate.fold import _set, arch_of, rotate_in
from dmx.rotate.hadamard import rotation_matrix
from dmx.rotate.info import ONLINE, RotationInfo

__all__ = ["ONLINE", "parse_online", "OnlineRotation", "r4_matrix", "rotate_online",
           "attach_r4", "carry_online", "reattach_online"]

R4_SEED_OFFSET = 2  # R1 is seeded by seed, R2 by seed + 1 (a random R4 differs from both)
_MARK = "_dmx_online_r4"  # set on a module once it carries the rotation hook


def parse_online(value) -> tuple[str, ...]:
    """``"r4"``, ``"r3,r4"``, ``["r4"]`` or None -> a sorted tuple of online rotations;
    DMXError naming an unknown (or unbuilt: R3) one."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    names = {s.strip().lower() for item in items for s in str(item).split(",") if s.strip()}
    if "r3" in names:
        raise DMXError("--rotate-online r3 is not built: it rotates q/k after RoPE, which "
                       "changes nothing unless q/k or the KV cache are quantized (dmx "
                       "quantizes neither); use --rotate-online r4")
    bad = sorted(names - set(ONLINE))
    if bad:
        raise DMXError(f"--rotate-online: unknown online rotation(s) {', '.join(bad)}; use "
                       f"{', '.join(ONLINE)}")
    return tuple(sorted(names))


class OnlineRotation:
    """x -> x @ Q on the last dimension, Q orthogonal; applied block by block when Q is
    block-diagonal with equal blocks (the MX-block Hadamard: 32 x 32 products, not n x n)."""

    def __init__(self, q: torch.Tensor):
        self.q = q.detach().to(torch.float64)
        self.width = int(q.shape[0])
        self.block = _equal_block(self.q)
        self._cast: dict = {}  # (dtype, device) -> the block in that dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, x.device)
        if key not in self._cast:
            self._cast[key] = self.q[:self.block, :self.block].to(dtype=x.dtype,
                                                                  device=x.device)
        b = self._cast[key]
        if self.block == self.width:
            return x @ b
        shape = x.shape
        return (x.reshape(*shape[:-1], self.width // self.block, self.block) @ b).reshape(shape)


def _equal_block(q: torch.Tensor) -> int:
    """The smallest b such that q is block-diagonal with n/b copies of its first b x b
    block (n when it is not)."""
    n = q.shape[0]
    for b in range(1, n):
        if n % b or q[:b, b:].any():  # (cheap test first: the rest of the first rows)
            continue
        if torch.equal(q, torch.block_diag(*[q[:b, :b]] * (n // b))):
            return b
    return n


def r4_matrix(width: int, kind: str = "auto", seed: int = 0) -> tuple[torch.Tensor, str]:
    """R4 for down_proj inputs of ``width`` (rotation_matrix's ``kind``; seeded by
    seed + 2 so that a random R4 differs from R1 and R2)."""
    return rotation_matrix(width, kind, seed + R4_SEED_OFFSET)


def _down_width(model: nn.Module) -> int:
    widths = {b.down.in_features for b in arch_of(model).blocks}
    if len(widths) != 1:
        raise DMXError(f"--rotate-online r4 needs one intermediate size, found "
                       f"{sorted(widths)}")
    return widths.pop()


def _rotate_input(module, args):
    return (getattr(module, _MARK)(args[0]), *args[1:])


def attach_r4(model: nn.Module, q: torch.Tensor) -> None:
    """Rotate every down_proj's input by ``q`` at run time (the weights must already hold
    W Q: :func:`rotate_online` folds them, OUT stores them folded)."""
    rot = OnlineRotation(q)
    for layer in model.model.layers:
        mlp = layer.mlp
        if getattr(mlp, _MARK, None) is not None:
            raise DMXError("R4 is already attached to this model; attach it once")
        setattr(mlp, _MARK, rot)
        mlp.register_forward_pre_hook(_ensure_down_rotates)


def _ensure_down_rotates(mlp, args):
    """MLP pre-hook: whatever module is down_proj now (wrap_model and the KL baseline swap
    it) gets the input-rotating pre-hook, once."""
    down = mlp.down_proj
    if getattr(down, _MARK, None) is None:
        setattr(down, _MARK, getattr(mlp, _MARK))
        down.register_forward_pre_hook(_rotate_input)


def rotate_online(model: nn.Module, online, info: RotationInfo | None = None,
                  kind: str = "auto", seed: int = 0) -> RotationInfo | None:
    """Apply the online rotations ``online`` (:func:`parse_online`'s names) in place: fold
    R4 into every down_proj weight (float64 arithmetic) and attach its online half.

    Call it on the plain model, before or after R1/R2 (they touch down_proj's output
    side, R4 its input side: the two commute). Returns ``info`` (a new
    ``RotationInfo("none")`` when None) with R4 recorded, or ``info`` unchanged when
    ``online`` is empty."""
    online = parse_online(online)
    if not online:
        return info
    info = info if info is not None else RotationInfo("none", seed=int(seed))
    width = _down_width(model)
    q, name = r4_matrix(width, kind, seed)
    for b in arch_of(model).blocks:
        _set(b.down.weight, rotate_in(b.down.weight.detach().double(), q))
    attach_r4(model, q)
    _record(info, online=list(online), r4=name, r4_kind=kind, intermediate_size=width,
            needs_runtime_support=True)
    return info


_FIELDS = ("online", "r4", "r4_kind", "intermediate_size", "needs_runtime_support")


def _record(info: RotationInfo, **values) -> None:
    for key in _FIELDS:
        setattr(info, key, values[key])


def carry_online(info: RotationInfo, before: RotationInfo | None) -> RotationInfo:
    """``info`` (e.g. learned rotations' record, made after R4 was applied) with the
    online rotations ``before`` recorded copied in."""
    if before is not None and before.online:
        _record(info, **{key: getattr(before, key) for key in _FIELDS})
    return info


def reattach_online(model: nn.Module, record: dict | None) -> None:
    """For a model loaded from OUT (weights already folded): attach the online rotations
    its manifest ``rotation`` record lists, rebuilding each matrix from the record and
    checking it is the one that was folded."""
    online = list((record or {}).get("online") or [])
    if not online:
        return
    unknown = sorted(set(online) - set(ONLINE))
    if unknown:
        raise DMXError(f"the manifest asks for online rotation(s) {', '.join(unknown)} that "
                       f"this dmx cannot apply; upgrade dmx")
    width = _down_width(model)
    if record.get("intermediate_size") != width:
        raise DMXError(f"the manifest's R4 is for width {record.get('intermediate_size')}, "
                       f"the model's down_proj reads {width}; OUT is inconsistent, rewrite it")
    q, name = r4_matrix(width, record.get("r4_kind") or "auto", int(record.get("seed", 0)))
    if name != record.get("r4"):
        raise DMXError(f"the manifest's R4 is {record.get('r4')!r} but this dmx builds "
                       f"{name!r}; evaluate OUT with the dmx that wrote it")
    attach_r4(model, q)
