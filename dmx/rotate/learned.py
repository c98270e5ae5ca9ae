"""Learned rotations (SpinQuant-style): R1/R2 trained on the orthogonal group, then folded.

:class:`LearnedRotations` folds the norm scales into the weights, then registers a
``torch.nn.utils.parametrize`` parametrization on every tensor R1/R2 act on, so each forward
computes the rotated weight from the frozen weight and the current rotation matrices; the
dMX layers (which read ``linear.weight``) quantize the rotated weight, and the loss's
gradient reaches the matrices. :class:`CayleySGD` moves them along the orthogonal group
(Cayley transform), so they stay orthogonal to rounding; :meth:`LearnedRotations.fold`
writes the final rotations into the weights and removes the parametrization.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from dmx.errors import DMXError
from dmx.rotate.fold import Target, apply_plan, arch_of, fold_norms, rotated, rotation_plan
from dmx.rotate.hadamard import random_orthogonal, rotation_matrix
from dmx.rotate.info import RotationInfo

__all__ = ["CayleySGD", "LearnedRotations", "INITS"]

INITS = ("hadamard", "random", "identity")


class CayleySGD(torch.optim.Optimizer):
    """(Momentum) SGD for square orthogonal matrices along the Cayley curve.

    With Euclidean gradient G at X, A = G X^T - X G^T is skew-symmetric and
    X <- (I + a/2 A)^-1 (I - a/2 A) X is orthogonal for every step a and descends
    (Wen & Yin 2013). With momentum, A is accumulated (skew too). The step is
    a = min(lr, 1 / ||A||_F), the bound SpinQuant's Cayley SGD uses (lr 1.5 in the paper).
    Solved in float64 whatever the parameter dtype (float32 masters, the BF16 lesson), so a
    step adds only the rounding to the parameter's dtype to the orthogonality error.
    """

    def __init__(self, params, lr: float = 1.5, momentum: float = 0.0):
        if not lr > 0:
            raise DMXError(f"rotation lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise DMXError(f"rotation momentum must be in [0, 1), got {momentum}")
        super().__init__(params, {"lr": float(lr), "momentum": float(momentum)})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2 or p.shape[0] != p.shape[1]:
                    raise DMXError(f"CayleySGD optimises square matrices, got {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                x, g = p.double(), p.grad.double()
                a = g @ x.T - x @ g.T
                if beta:
                    buf = self.state[p].get("momentum_buffer")
                    a = a if buf is None else beta * buf + a
                    self.state[p]["momentum_buffer"] = a.clone()
                norm = float(torch.linalg.matrix_norm(a))
                if norm == 0.0:
                    continue
                step = min(lr, 1.0 / norm)
                eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
                p.copy_(torch.linalg.solve(eye + 0.5 * step * a, (eye - 0.5 * step * a) @ x))
        return loss


class _Rotate(nn.Module):
    """Parametrization: the unrotated tensor -> the rotated one, reading the current R1/R2."""

    def __init__(self, target: Target, owner: "LearnedRotations"):
        super().__init__()
        self.target = target
        # a plain attribute, not a submodule: the matrices stay out of the model's
        # parameters and state_dict (they belong to LearnedRotations)
        object.__setattr__(self, "_owner", owner)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        o = self._owner
        # at least float32 arithmetic: rotating in bf16 breaks orthogonality (the BF16 lesson)
        work = torch.promote_types(t.dtype, torch.float32)
        out = rotated(t.to(work), self.target, o.arch, o.r1, None if o.r2 is None else list(o.r2))
        return out.to(t.dtype)


def _initial(n: int, init: str, kind: str, seed: int) -> tuple[torch.Tensor, str]:
    if init == "hadamard":
        return rotation_matrix(n, kind, seed)
    if init == "random":
        return random_orthogonal(n, seed), f"random{n}(seed={seed})"
    return torch.eye(n, dtype=torch.float64), f"identity{n}"


def _forget_quantized_weights(model: nn.Module) -> None:
    """Drop the quantized weights MXLinear/DMXLinear cache in evaluation: the cache is keyed
    on the weight tensor's address and version, and a recomputed rotated weight can land at
    a freed address with the same version after the rotations changed."""
    for m in model.modules():
        cache = getattr(m, "_cache", None)
        if cache is not None and hasattr(cache, "key"):
            cache.key = None


class LearnedRotations:
    """Trainable R1 (residual stream) and one R2 per block, parametrized on ``model``.

    Create it after ``wrap_model`` (a parametrized nn.Linear is no longer wrapped). Train:
    ``loss.backward(); offsets_opt.step(); rot.step(); rot.zero_grad()``. Finish with
    :meth:`fold`. The model's own parameters stay as they are (frozen or not)."""

    def __init__(self, model: nn.Module, init: str = "hadamard", seed: int = 0,
                 kind: str = "auto", lr: float = 1.5, momentum: float = 0.0,
                 r1: bool = True, r2: bool = True, untie: bool = True,
                 dtype: torch.dtype = torch.float32):
        if init not in INITS:
            raise DMXError(f"unknown rotation init {init!r}; use one of {', '.join(INITS)}")
        if not (r1 or r2):
            raise DMXError("LearnedRotations needs R1, R2 or both")
        self.model = model
        self.arch = arch_of(model)
        if any(parametrize.is_parametrized(t.module) for t in rotation_plan(self.arch)):
            raise DMXError("this model already has parametrized weights (rotations applied "
                           "twice?); fold() the first LearnedRotations before making another")
        self.untied = fold_norms(self.arch, untie) if r1 else False
        self.seed = int(seed)
        device = self.arch.embed.weight.device
        self.r1 = self.r2 = None
        self.r1_name = self.r2_name = None
        if r1:
            m, self.r1_name = _initial(self.arch.hidden, init, kind, self.seed)
            self.r1 = nn.Parameter(m.to(device=device, dtype=dtype))
        if r2:
            m, self.r2_name = _initial(self.arch.head_dim, init, kind, self.seed + 1)
            self.r2 = nn.ParameterList(
                [nn.Parameter(m.to(device=b.v.weight.device, dtype=dtype))
                 for b in self.arch.blocks])
        self.plan = rotation_plan(self.arch, r1, r2)
        for target in self.plan:
            parametrize.register_parametrization(target.module, target.attr,
                                                 _Rotate(target, self))
        self.optimizer = CayleySGD(self.parameters(), lr, momentum)
        self.steps = 0
        _forget_quantized_weights(model)

    def parameters(self) -> list[nn.Parameter]:
        """The rotation matrices: R1 first, then R2 of every block in order."""
        return ([] if self.r1 is None else [self.r1]) + ([] if self.r2 is None else list(self.r2))

    def step(self) -> None:
        """One Cayley step from the matrices' current gradients."""
        self.optimizer.step()
        self.steps += 1
        _forget_quantized_weights(self.model)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def orthogonality_error(self) -> float:
        """max |R R^T - I| over all matrices (float64)."""
        err = 0.0
        for p in self.parameters():
            x = p.detach().double()
            eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
            err = max(err, float((x @ x.T - eye).abs().max()))
        return err

    def matrices(self) -> dict:
        """The current rotation matrices by name ("r1", "r2.<block>"; float32 copies, on
        the CPU): what ``dmx search`` writes into OUT (:mod:`dmx.rotate.saved`)."""
        out = {} if self.r1 is None else {"r1": self.r1.detach().cpu().float().clone()}
        for i, p in enumerate([] if self.r2 is None else self.r2):
            out[f"r2.{i}"] = p.detach().cpu().float().clone()
        return out

    def state_dict(self) -> dict:
        return {"rotations": [p.detach().cpu().clone() for p in self.parameters()],
                "optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        params = self.parameters()
        saved = state["rotations"]
        if len(saved) != len(params) or any(s.shape != p.shape for s, p in zip(saved, params)):
            raise DMXError("the saved rotations do not fit this model (other model or other "
                           "R1/R2 settings)")
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        _forget_quantized_weights(self.model)

    def fold(self) -> RotationInfo:
        """Write the current rotations into the weights (float64 arithmetic) and remove the
        parametrization; returns the record for the manifest. The object is spent."""
        if not self.plan:
            raise DMXError("these rotations were already folded")
        for target in self.plan:  # restore the unrotated tensors (shared ones stay shared)
            if parametrize.is_parametrized(target.module, target.attr):
                parametrize.remove_parametrizations(target.module, target.attr,
                                                    leave_parametrized=False)
        r1 = None if self.r1 is None else self.r1.detach().double()
        r2s = None if self.r2 is None else [p.detach().double() for p in self.r2]
        apply_plan(self.arch, self.plan, r1, r2s)
        self.plan = []
        _forget_quantized_weights(self.model)
        a = self.arch
        return RotationInfo("learned", self.r1_name and f"learned from {self.r1_name}",
                            self.r2_name and f"learned from {self.r2_name}", a.hidden,
                            a.head_dim, self.seed, self.r1 is not None, self.untied,
                            self.steps)
