"""Temperature-annealed discretization b = F(b_hat, T) and its schedule.

Temperature convention (code units): ``T`` here is Brevitas' ``T_code``; the paper's
temperature is T_doc = 20 * T_code. For the two-rung ladders the map is the paper's

    b = 2 / (1 + exp(-T_doc * (b_hat / 2 - 0.5)))   with T_doc = 20 * T,

rescaled to the ladder's positions. The default schedule runs T = 0.4 -> 20
(T_doc 8 -> 400). Small T: smooth, the optimizer explores (T -> 0 sends every b to
the middle of the ladder). Large T: a step at the boundary, so the format a layer
trains with becomes the format it deploys with.
"""
from __future__ import annotations

import math

import torch

from dmx.errors import DMXError
from dmx.quant.ladders import get_ladder

__all__ = ["anneal_map", "hard_rung", "TemperatureSchedule", "clamp_ste", "abs_ste", "T_DOC_PER_T_CODE"]

T_DOC_PER_T_CODE = 20.0  # the paper's T = 20 * (Brevitas code temperature)


def clamp_ste(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Clamp in the forward pass, identity gradient (so an offset pushed past the ladder's
    end can still come back)."""
    return x + (x.clamp(lo, hi) - x).detach()


def abs_ste(x: torch.Tensor) -> torch.Tensor:
    """|x| with gradient sign(x) and +1 at 0 (Brevitas' abs_binary_sign_grad): the paper
    recipe's offset map. torch.abs has gradient 0 at 0, which would freeze an offset that
    starts at the low rung (position 0) forever."""
    sign = torch.where(x >= 0, 1.0, -1.0).to(x.dtype).detach()
    return x * sign


def anneal_map(b_hat: torch.Tensor, T: float, ladder, hard: bool = False) -> torch.Tensor:
    """Map the raw offset b_hat to the ladder position b at temperature T (code units).

    One sigmoid per pair of neighbouring rungs (p_i, p_{i+1}), centred on their midpoint:
    b = p_0 + sum_i (p_{i+1} - p_i) * sigmoid(20 T ((b_hat - p_i) / (p_{i+1} - p_i) - 0.5)).
    With two rungs at 0 and 2 this is exactly the paper's map. ``hard=True`` is the T -> inf
    limit: b_hat strictly above a boundary goes to the upper rung (no gradient).
    """
    ladder = get_ladder(ladder)
    if not isinstance(b_hat, torch.Tensor):
        b_hat = torch.as_tensor(b_hat, dtype=torch.float32)
    if not hard and not (T > 0 and math.isfinite(T)):
        raise DMXError(f"temperature must be a positive finite number, got {T!r}")
    b = torch.zeros_like(b_hat) + ladder.low.position
    for lo, hi in zip(ladder.rungs, ladder.rungs[1:]):
        width = hi.position - lo.position
        if hard:
            step = (b_hat > lo.position + 0.5 * width).to(b_hat.dtype)
            b = b + width * step.detach()
        else:
            b = b + width * torch.sigmoid(
                T_DOC_PER_T_CODE * T * ((b_hat - lo.position) / width - 0.5))
    return b


def hard_rung(b_hat, ladder):
    """The rung a raw offset deploys with: the hard map (T -> inf) at ``b_hat`` (a float or
    0-d tensor; float32, as the search's offsets)."""
    ladder = get_ladder(ladder)
    b_hat = torch.as_tensor(b_hat).detach().to(torch.float32)
    return ladder.rung_at(float(anneal_map(b_hat, 1.0, ladder, hard=True)))


class TemperatureSchedule:
    """T(step): constant ``t_start`` for the first ``delay`` fraction of the steps, then
    exponential from ``t_start`` to ``t_end``, reached at the last step (total_steps - 1).

    Mirrors Brevitas' TemperatureAnnealingCallback: start = int(delay * total_steps),
    T(start + k) = t_start * (t_end / t_start) ** (k / (K - 1)), K = total_steps - start.
    """

    def __init__(self, total_steps: int, delay: float = 0.6, t_start: float = 0.4,
                 t_end: float = 20.0):
        if int(total_steps) != total_steps or total_steps < 1:
            raise DMXError(f"total_steps must be a positive integer, got {total_steps!r}")
        if not 0.0 <= delay <= 1.0:
            raise DMXError(f"delay must be a fraction in [0, 1], got {delay!r}")
        if not (t_start > 0 and t_end > 0):
            raise DMXError(f"temperatures must be positive, got {t_start!r} -> {t_end!r}")
        self.total_steps = int(total_steps)
        self.delay = float(delay)
        self.t_start = float(t_start)
        self.t_end = float(t_end)
        self.start = int(self.delay * self.total_steps)

    def at(self, step: int) -> float:
        if step < self.start:
            return self.t_start
        k_total = self.total_steps - self.start
        if k_total <= 1 or step >= self.total_steps - 1:
            return self.t_end
        frac = (step - self.start) / (k_total - 1)
        return self.t_start * (self.t_end / self.t_start) ** frac

    def __repr__(self) -> str:
        return (f"TemperatureSchedule(total_steps={self.total_steps}, delay={self.delay}, "
                f"t_start={self.t_start}, t_end={self.t_end})")
