"""Format ladders: the path one learnable offset b moves a layer's format along.

A ladder is a list of rungs (hardware MX element formats) at increasing positions
b. Between rungs the (exponent, mantissa) bits are interpolated linearly, so a
layer's format is E(e(b)) M(m(b)) with real-valued e, m during training.

* ``fp8-fp4``      E(2+b) M(1+b): E2M1 at b=0, E4M3 at b=2 (the paper's main ladder).
* ``fp6-fp4``      E2 M(1+b): E2M1 at b=0, E2M3 at b=2 (the paper's MXFP6/MXFP4 variant).
* ``fp8-fp6-fp4``  the same line as fp8-fp4 with the E3M2 rung it passes through at b=1.

Bits convention: element bits 1 + e + m (MXFP4 = 4, MXFP8 = 8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mxref

from dmx.errors import DMXError

if TYPE_CHECKING:   # torch loads in _interp: the command line's parsers read LADDERS
    import torch

__all__ = ["Rung", "Ladder", "LADDERS", "get_ladder", "check_target_bits"]


@dataclass(frozen=True)
class Rung:
    """A hardware format on a ladder: mxref key, position b, and its bit layout."""

    fmt: str
    position: float
    exp_bits: int
    man_bits: int

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @classmethod
    def of(cls, fmt: str, position: float) -> "Rung":
        """A rung whose bit layout is read from mxref (formats.toml), never typed."""
        info = mxref.get_format(fmt)
        if info.is_int:
            raise DMXError(f"{info.key} is an integer format; ladders hold float formats only")
        return cls(info.key, float(position), info.exp_bits, info.man_bits)


class Ladder:
    """Rungs at strictly increasing positions; e, m interpolate linearly between them."""

    def __init__(self, name: str, rungs):
        rungs = tuple(rungs)
        if len(rungs) < 2:
            raise DMXError(f"ladder {name!r} needs at least two rungs, got {len(rungs)}")
        pos = [r.position for r in rungs]
        if any(b <= a for a, b in zip(pos, pos[1:])):
            raise DMXError(f"ladder {name!r}: rung positions must increase, got {pos}")
        self.name = name
        self.rungs = rungs

    def __repr__(self) -> str:
        inner = ", ".join(f"{r.fmt}@{r.position:g}" for r in self.rungs)
        return f"Ladder({self.name!r}: {inner})"

    @property
    def low(self) -> Rung:
        return self.rungs[0]

    @property
    def high(self) -> Rung:
        return self.rungs[-1]

    @property
    def positions(self) -> list[float]:
        return [r.position for r in self.rungs]

    @property
    def max_cap(self) -> float:
        """Largest value any format on the ladder may produce: the top rungs' real max
        normal (448 for E4M3, where the formula 1.875 * 2^8 = 480 would hit E4M3's NaN code)."""
        return max(mxref.get_format(r.fmt).max_normal for r in self.rungs)

    def _interp(self, b, attr: str) -> torch.Tensor:
        # piecewise linear through the rungs; b outside the ladder is clamped
        import torch
        b = torch.as_tensor(b, dtype=torch.float32) if not isinstance(b, torch.Tensor) else b
        out = torch.zeros_like(b) + getattr(self.low, attr)
        for lo, hi in zip(self.rungs, self.rungs[1:]):
            slope = (getattr(hi, attr) - getattr(lo, attr)) / (hi.position - lo.position)
            if slope:
                out = out + slope * (b - lo.position).clamp(0.0, hi.position - lo.position)
        return out

    def exp_bits(self, b) -> torch.Tensor:
        """Real-valued exponent bits at position b (differentiable)."""
        return self._interp(b, "exp_bits")

    def man_bits(self, b) -> torch.Tensor:
        """Real-valued mantissa bits at position b (differentiable)."""
        return self._interp(b, "man_bits")

    def element_bits(self, b) -> torch.Tensor:
        """1 + e(b) + m(b): element bits of the continuous format (differentiable)."""
        return 1.0 + self.exp_bits(b) + self.man_bits(b)

    def nearest_rung(self, b) -> Rung:
        """The rung closest to position b (ties go to the lower rung)."""
        b = float(b)
        return min(self.rungs, key=lambda r: (abs(r.position - b), r.position))

    def rung_at(self, position) -> Rung:
        """The rung at exactly this position (as produced by the hard anneal map)."""
        return self.nearest_rung(position)


LADDERS: dict[str, Ladder] = {
    "fp8-fp4": Ladder("fp8-fp4", [Rung.of("fp4_e2m1", 0), Rung.of("fp8_e4m3", 2)]),
    "fp6-fp4": Ladder("fp6-fp4", [Rung.of("fp4_e2m1", 0), Rung.of("fp6_e2m3", 2)]),
    "fp8-fp6-fp4": Ladder("fp8-fp6-fp4", [Rung.of("fp4_e2m1", 0), Rung.of("fp6_e3m2", 1),
                                          Rung.of("fp8_e4m3", 2)]),
}


def get_ladder(name) -> Ladder:
    """A ladder by name (a Ladder is returned as is)."""
    if isinstance(name, Ladder):
        return name
    if name not in LADDERS:
        raise DMXError(f"unknown ladder {name!r}; choose one of: {', '.join(LADDERS)}")
    return LADDERS[name]


def check_target_bits(target, ladder) -> float:
    """``target`` as a float, or a one-line error when the ladder cannot reach it (the one
    rule for search, KL baseline and demo)."""
    t = float(target)
    lo, hi = ladder.low.bits, ladder.high.bits
    if not (math.isfinite(t) and lo <= t <= hi):
        raise DMXError(f"--target-bits {target} is impossible with ladder {ladder.name}: choose "
                       f"a value in [{lo}, {hi}] (element bits of {ladder.low.fmt} and "
                       f"{ladder.high.fmt})")
    return t
