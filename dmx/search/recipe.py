"""Search recipes as data: :class:`SearchConfig` holds every knob that changes what a
`dmx search` finds, and is written whole into the manifest (``search.config``).

Named recipes (``--recipe``):

* ``paper`` -- the authors' release (Brevitas ``papers/dMX``, docs/reference notes in
  ../shared/reference/paper.md 2.2-2.6): one offset per linear (untied), the raw offset
  through ``abs()`` then an STE clamp, SGD lr 1 momentum 0.99 Nesterov, gradient-norm clip
  1.0 (the Hugging Face trainer's default), the hinge ``lam * max(0, avg - target)`` with
  lam 5, offsets start at the low rung, T 0.4 -> 20 after a 0.6 delay, no budget fill.
* ``default`` -- the paper's objective, start and optimizer, with the budget held by
  *projection* instead of the hinge. Why: with the hinge, the first step over the target
  gives every offset the same kick, ``lam * share * 2 * F'(b)``, however small the
  overshoot; momentum 0.99 integrates it into a move of tens of units, the clamp pins the
  forward pass at the low rung while the parameter sits far below the ladder, and the
  silent hinge never brings it back (the collapse measured in issue 11). The projection
  instead shifts all offsets by one common amount after each step so that the soft
  average lies in ``[floor, target]`` (bisection, dmx.search.assign.project_to_budget): never
  over the target, and never under a floor that rises linearly from the low rung to the
  target over the first ``ramp`` (0.5) of the steps. So, as in the paper, the offsets start
  at MXFP4 and the cross-entropy gradient raises the layers that need bits (the ranking is
  learned where MXFP4 hurts), while the floor guarantees the budget is reached before the
  anneal starts, on any model and run length. Offsets stay within ``offset_margin`` of the
  ladder, the momentum buffer holds only cross-entropy gradients (the projection is not a
  loss), so nothing can run away. Gradients are normalised to root-mean-square 1 per
  offset before SGD (lr 0.02, momentum 0.99 Nesterov), so the pace is the same whatever
  the model's loss scale or size; q/k/v and gate/up share an offset (what vLLM can serve);
  the fill is on: it only acts when the anneal leaves the hard average below the target,
  and is reported separately.
* ``target-start`` -- the default until 2026-12-05, kept for comparison: the projection
  holds the average at the target from step 0 (``ramp`` 0), offsets start at the target,
  lr 0.01 normalised, momentum 0.9. It is stable but ranked layers worse than KL on
  SmolLM2-135M (BENCHMARKS.md).

Rotations (``rotate``: none | hadamard | learned, docs/rotations.md) are off in both
recipes. The authors' runs learned R1/R2 jointly with the offsets (Cayley SGD, lr 1.5,
Hadamard-initialised): to reproduce them pass ``--recipe paper --rotate learned``. They
stay off in ``paper`` because a recipe is the offset search the paper describes, and a
rotation changes the model being searched (it is reported in the manifest either way).

A recipe is a dict of field overrides; a user flag overrides the recipe.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from dmx.errors import DMXError

__all__ = ["SearchConfig", "RECIPES", "BUDGETS", "PARAMETERIZATIONS", "GRAD_NORMS", "INITS",
           "WEIGHTINGS", "EXPORT_TARGETS", "ROTATIONS", "config_from_dict"]

BUDGETS = ("project", "hinge")
PARAMETERIZATIONS = ("clamp", "abs")
GRAD_NORMS = ("normalize", "clip", "none")
INITS = ("low", "target")
WEIGHTINGS = ("simple", "size")  # the averages the search trains against (macs: report only)
EXPORT_TARGETS = ("any", "compressed-tensors", "quark", "gguf", "none")
# search rotations: fixed (dmx.rotate.rotate_model) or learned with the offsets
# (dmx.rotate.LearnedRotations); "random" is a baseline-only comparison
ROTATIONS = ("none", "hadamard", "learned")


@dataclass(frozen=True)
class SearchConfig:
    """Every setting that changes the result of a search (not where it runs: device,
    checkpoints, progress bars are arguments of :func:`dmx.search.search`)."""

    target_bits: float
    recipe: str = "default"
    ladder: str = "fp8-fp4"
    # what is quantized
    weights_only: bool = False
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    export_target: str = "any"
    tie_fused: bool = True
    # data
    calib: tuple[str, ...] | None = None
    seqlen: int = 2048
    samples: int | None = None
    steps: int = 400
    batch_size: int = 8
    seed: int = 0
    # objective
    distill: bool = False
    weighting: str = "simple"
    budget: str = "project"
    lam: float = 5.0
    # project: the soft average is held in [floor, target], the floor rising linearly from
    # the low rung to the target over this fraction of the steps (0: at the target always)
    ramp: float = 0.5
    # offsets
    parameterization: str = "clamp"
    init: str = "low"
    offset_margin: float = 0.5
    # optimizer: SGD on the offsets
    lr: float = 0.02
    momentum: float = 0.99
    nesterov: bool = True
    grad_norm: str = "normalize"
    max_grad_norm: float = 1.0
    # anneal (code units, dmx.quant.anneal)
    delay: float = 0.6
    t_start: float = 0.4
    t_end: float = 20.0
    # after the search
    fill_budget: bool = True
    # rotations folded into the weights before the search (hadamard) or learned with the
    # offsets, then folded (learned); R1 seeded by ``seed``, R2 by ``seed + 1``
    rotate: str = "none"
    rotate_kind: str = "auto"
    rotation_lr: float = 1.5
    # online rotations (("r4",): dmx.rotate.online), for fake-quant evaluation: OUT then
    # needs runtime support (dmx eval applies it; the exports refuse it)
    rotate_online: tuple[str, ...] = ()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_recipe(cls, recipe: str = "default", **overrides) -> "SearchConfig":
        """The named recipe with ``overrides`` (None values are ignored: "not given")."""
        if recipe not in RECIPES:
            raise DMXError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise DMXError(f"unknown search setting(s): {', '.join(sorted(unknown))}")
        values = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}}
        values["recipe"] = recipe
        if values.get("rotate_online") is not None:
            from dmx.rotate.online import parse_online  # "r4" / ["r4"] -> ("r4",), checked
            values["rotate_online"] = parse_online(values["rotate_online"])
        for key in ("include", "exclude", "calib"):
            if values.get(key) is not None:
                v = values[key]
                values[key] = (v,) if isinstance(v, str) else tuple(str(x) for x in v)
        if "target_bits" not in values:
            raise DMXError("a search needs --target-bits")
        return cls(**values).checked()

    def budget_floor(self, step: int) -> float | None:
        """The lowest soft average ``--budget project`` allows before ``step`` (None: the
        average is held at the target exactly). Rising linearly from the low rung's bits,
        it reaches the target after ``ramp * steps`` steps; until then the cross-entropy
        alone may raise the offsets faster, as in the paper's start at the low rung."""
        if self.budget != "project" or self.ramp <= 0:
            return None
        from dmx.quant.ladders import get_ladder

        low = get_ladder(self.ladder).low.bits
        frac = min(1.0, step / (self.ramp * self.steps))
        return low + (self.target_bits - low) * frac

    def replace(self, **changes) -> "SearchConfig":
        return dataclasses.replace(self, **changes).checked()

    def to_dict(self) -> dict:
        """JSON-ready (tuples as lists), every field: what the manifest records."""
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}

    # ------------------------------------------------------------------ validation
    def checked(self) -> "SearchConfig":
        """Cheap checks, so that bad flags fail before a model is loaded; returns self."""
        from dmx.quant.ladders import check_target_bits, get_ladder  # one rule for search and KL

        lad = get_ladder(self.ladder)
        for flag, value in (("--steps", self.steps), ("--batch-size", self.batch_size),
                            ("--seqlen", self.seqlen)):
            _positive_int(flag, value)
        if self.seqlen < 2:
            raise DMXError(f"--seqlen must be at least 2 (next-token loss), got {self.seqlen}")
        if self.samples is not None:
            _positive_int("--samples", self.samples)
        _choice("--weighting", self.weighting, WEIGHTINGS)
        _choice("--budget", self.budget, BUDGETS)
        _choice("--parameterization", self.parameterization, PARAMETERIZATIONS)
        _choice("--grad-norm", self.grad_norm, GRAD_NORMS)
        _choice("--init", self.init, INITS)
        _choice("--export-target", self.export_target, EXPORT_TARGETS)
        _choice("--rotate", self.rotate, ROTATIONS)
        from dmx.rotate.hadamard import KINDS  # the matrices dmx.rotate can build
        _choice("--rotate-kind", self.rotate_kind, KINDS)
        check_target_bits(self.target_bits, lad)
        for flag, value in (("--lr", self.lr), ("--t-start", self.t_start),
                            ("--t-end", self.t_end), ("--max-grad-norm", self.max_grad_norm),
                            ("--rotation-lr", self.rotation_lr)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise DMXError(f"{flag} must be a positive number, got {value!r}")
        for flag, value in (("--lam", self.lam), ("--offset-margin", self.offset_margin)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise DMXError(f"{flag} must be >= 0, got {value!r}")
        if self.budget == "project" and self.parameterization != "clamp":
            raise DMXError("--budget project shifts the offsets themselves, which needs "
                           "--parameterization clamp (abs() is not monotone)")
        if not 0.0 <= self.momentum < 1.0:
            raise DMXError(f"--momentum must be in [0, 1), got {self.momentum!r}")
        if not 0.0 <= self.ramp <= 1.0:
            raise DMXError(f"--ramp must be a fraction in [0, 1], got {self.ramp!r}")
        if not 0.0 <= self.delay <= 1.0:
            raise DMXError(f"--delay must be a fraction in [0, 1], got {self.delay!r}")
        # a rotation setting that would silently do nothing is a mistake in the command
        if self.rotate == "none" and self.rotate_kind != "auto" and not self.rotate_online:
            raise DMXError(f"--rotate-kind {self.rotate_kind} needs --rotate hadamard or "
                           f"learned, or --rotate-online r4")
        if self.rotate != "learned" and self.rotation_lr != _default("rotation_lr"):
            raise DMXError("--rotation-lr is the learning rate of --rotate learned; add "
                           "--rotate learned or drop it")
        return self


def _default(name: str):
    return next(f.default for f in dataclasses.fields(SearchConfig) if f.name == name)


def _positive_int(flag: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DMXError(f"{flag} must be a positive integer, got {value!r}")


def _choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise DMXError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


# Field overrides of each named recipe over the dataclass defaults (= "default").
RECIPES: dict[str, dict] = {
    "default": {},
    "paper": dict(budget="hinge", lam=5.0, parameterization="abs", tie_fused=False,
                  init="low", lr=1.0, momentum=0.99, nesterov=True, grad_norm="clip",
                  max_grad_norm=1.0, delay=0.6, t_start=0.4, t_end=20.0, fill_budget=False),
    # the default recipe until 2026-12-05: two-sided projection from the target with
    # small normalized steps (kept for comparison; it ranked worse than KL, BENCHMARKS.md)
    "target-start": dict(budget="project", ramp=0.0, init="target", lr=0.01, momentum=0.9,
                         grad_norm="normalize"),
}


def config_from_dict(d: dict) -> SearchConfig:
    """Inverse of :meth:`SearchConfig.to_dict` (the manifest's ``search.config``); a field
    the dict lacks (a config written before it existed) takes its recipe's value."""
    values = dict(d)
    return SearchConfig.from_recipe(values.pop("recipe", "default"), **values)
