"""Budget-exact dMX assignments: where the offsets start, and the final budget repair.

The hard assignment of a dMX search (every layer on the rung its offset selects) is not
guaranteed to meet the budget: the hinge penalty is silent below the target, and the
anneal freezes the choice wherever the offsets are when the temperature rises, so short
runs end under the target (benchmarks/results/search_sweep.md), and the tail of the
anneal can end a step over it. Two tools:

* :func:`offset_for_bits` -- the raw offset whose *soft* format at a temperature has
  exactly the requested element bits (``dmx search --init target``: the penalty is at
  its boundary from step 0).
* :func:`repair_assignment` -- after the hard assignment: *fit* (if the average exceeds
  the target, demote the units whose offsets are closest to their lower boundary until
  it fits) and, optionally, *fill* (promote the units whose offsets are closest to their
  upper boundary while the average stays <= target). A unit is a fused group (q/k/v,
  gate/up: they move together, :func:`dmx.nn.layers.fused_units`) or a single linear.
  The average is :func:`dmx.nn.bits.average_bits_of` (the penalty's definitions) with the
  weighting the penalty used. The ranking is the search's own: the learned offsets.
  Fill uses the rule of the KL baseline (:func:`dmx.search.baseline.greedy_promote`: in rank
  order, every unit that still fits), so the two differ only in the ranking.
"""
from __future__ import annotations

import math

from dmx.errors import DMXError

__all__ = ["mean_of_last_steps", "offset_for_bits", "project_to_budget", "bound_to_budget",
           "effective_offsets", "average_coefficients", "repair_assignment", "repair_layers",
           "set_offsets"]

_EPS = 1e-6  # "average <= target" up to float32 rounding (dmx.nn.bits averages in float32)
_KEYS = {"simple": "simple", "size": "size_weighted"}


def mean_of_last_steps(step_offsets: list, fraction: float, ladder) -> list[float]:
    """--average-last: each offset's mean b_hat over the last ceil(fraction x steps) of
    ``step_offsets`` (one list of b_hat per step, the search log's order), every value
    clamped to the ladder's span first, as the forward pass clamps it."""
    if not step_offsets:
        raise DMXError("--average-last: the search logged no step")
    last = step_offsets[-max(1, math.ceil(fraction * len(step_offsets))):]
    lo, hi = ladder.low.position, ladder.high.position
    return [sum(min(hi, max(lo, o[i])) for o in last) / len(last)
            for i in range(len(last[0]))]


def offset_for_bits(ladder, bits: float, temperature: float) -> float:
    """Raw offset b_hat whose soft format at ``temperature`` (code units) has ``bits``
    element bits, clamped to the ladder's positions (the soft map never reaches the end
    rungs exactly: a target at or below the low rung's soft bits gives the low rung)."""
    import torch

    from dmx.quant.anneal import anneal_map
    from dmx.quant.ladders import get_ladder

    lad = get_ladder(ladder)
    bits = float(bits)
    if not math.isfinite(bits):
        raise DMXError(f"offset_for_bits: bits must be a finite number, got {bits!r}")

    def soft_bits(b_hat: float) -> float:
        b = anneal_map(torch.tensor(b_hat, dtype=torch.float64), temperature, lad)
        return float(lad.element_bits(b))

    lo, hi = lad.low.position, lad.high.position
    if bits <= soft_bits(lo):
        return lo
    if bits >= soft_bits(hi):
        return hi
    for _ in range(60):  # bisection: the soft bits increase monotonically with b_hat
        mid = 0.5 * (lo + hi)
        if soft_bits(mid) < bits:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class _BitsProbe:
    """Stands in for a DMXLinear in dmx.nn.bits.average_bits with a leaf tensor as its
    bits, so that autograd reads off each layer's coefficient in the (linear) average."""

    def __init__(self, layer):
        import torch
        self.bits = torch.zeros((), dtype=torch.float64, requires_grad=True)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.quantize_input = layer.quantize_input

    def current_bits(self):
        return self.bits


def average_coefficients(layers: dict, weighting: str) -> list[float]:
    """c_i with average_bits(layers) = sum_i c_i * bits_i (the average is linear in the
    per-layer bits): dmx.nn.bits' one definition, differentiated."""
    import torch

    from dmx.nn.bits import average_bits
    probes = [_BitsProbe(layer) for layer in layers.values()]
    avg = average_bits(probes, weighting)
    return [float(g) for g in torch.autograd.grad(avg, [p.bits for p in probes])]


def project_to_budget(layers: dict, params: list, target: float, weighting: str,
                      temperature: float, margin: float, iters: int = 40,
                      floor: float | None = None) -> float:
    """Shift every offset by one common amount so that the *soft* average bits at
    ``temperature`` equal ``target``, each offset kept within ``margin`` of the ladder's
    ends; returns the shift. In place, no gradient.

    This is how the default recipe holds the budget (dmx.search.recipe): the soft average is
    monotone in the common shift, so bisection finds it; a target the box cannot reach
    leaves every offset at the nearest end. The relative order of the offsets, which is
    what the cross-entropy learned, is unchanged (up to the box). With ``floor`` (below
    ``target``) the projection is onto ``floor <= average <= target`` instead: an average in
    that band is left alone (offsets only kept in the box), so the cross-entropy raises
    them until the budget binds (dmx.search.recipe: ``ramp``). The soft bits of all
    offsets are computed as one vector per bisection step (DMXLinear.current_bits with
    the clamp parameterization: anneal_map of the clamped offset).
    """
    import torch

    lad = next(iter(layers.values())).ladder
    lo, hi = lad.low.position - float(margin), lad.high.position + float(margin)
    soft = _soft_average(layers, params, weighting, temperature, lo, hi)
    with torch.no_grad():
        base = torch.stack([p.detach().double().cpu() for p in params])
        goal = target
        if floor is not None and floor < target:
            now = soft(base)
            if floor <= now <= target:  # inside the band: only the box applies
                for p, b in zip(params, base):
                    p.copy_(b.clamp(lo, hi).to(p.dtype))
                return 0.0
            goal = target if now > target else floor
        # from every offset at the low end of the box to every offset at the high end
        shift = _bisect(lambda a: soft(base + a), lo - float(base.max()),
                        hi - float(base.min()), goal, iters)
        for p, b in zip(params, base):
            p.copy_((b + shift).clamp(lo, hi).to(p.dtype))
    return shift


def _offset_coefficients(layers: dict, params: list, weighting: str):
    """Each offset's weight in the average bits (float64 vector over ``params``): the sum
    of :func:`average_coefficients` of the layers that share it (a q/k/v group: 3)."""
    import torch

    index = {id(p): i for i, p in enumerate(params)}
    coef = torch.zeros(len(params), dtype=torch.float64)
    for layer, c in zip(layers.values(), average_coefficients(layers, weighting)):
        coef[index[id(layer.offset)]] += c
    return coef


def _soft_average(layers: dict, params: list, weighting: str, temperature: float,
                  lo: float, hi: float, coef=None, hard: bool = False):
    """A function of a vector of effective offsets (one per parameter in ``params``, boxed
    to [lo, hi]) giving the soft average bits at ``temperature``: dmx.nn.bits' definition
    (its coefficients, :func:`average_coefficients`) on the anneal map of the clamped
    offsets, as DMXLinear.current_bits computes it, for all offsets at once. ``hard``:
    the hard map's instead (the rungs the offsets deploy with)."""
    from dmx.quant.anneal import anneal_map

    lad = next(iter(layers.values())).ladder
    if coef is None:
        coef = _offset_coefficients(layers, params, weighting)

    def soft(e) -> float:
        b = e.clamp(lo, hi).clamp(lad.low.position, lad.high.position)
        return float((coef * lad.element_bits(anneal_map(b, temperature, lad,
                                                         hard=hard))).sum())
    return soft


def _bisect_at_most(f, a: float, z: float, goal: float, iters: int) -> float:
    """The largest x in [a, z] with f(x) <= goal (to ``iters`` halvings), for f increasing
    and f(a) <= goal; unlike :func:`_bisect`, exact for a step function."""
    for _ in range(iters):
        mid = 0.5 * (a + z)
        a, z = (mid, z) if f(mid) <= goal else (a, mid)
    return a


def _bisect(f, a: float, z: float, goal: float, iters: int) -> float:
    """x in [a, z] with f(x) = goal, for f increasing (to ``iters`` halvings)."""
    for _ in range(iters):
        mid = 0.5 * (a + z)
        a, z = (mid, z) if f(mid) < goal else (a, mid)
    return 0.5 * (a + z)


def effective_offsets(params: list, parameterization: str, lo: float, hi: float):
    """(raw, effective): the offsets as one float64 CPU vector, and what the anneal map sees
    of them (the raw offset, or its absolute value with ``parameterization="abs"``),
    clamped to [lo, hi]. No gradient."""
    import torch

    with torch.no_grad():
        raw = torch.stack([p.detach().double().cpu().reshape(()) for p in params])
    return raw, (raw.abs() if parameterization == "abs" else raw).clamp(lo, hi)


def bound_to_budget(layers: dict, params: list, before: list, target: float, weighting: str,
                    temperature: float, margin: float, parameterization: str = "clamp",
                    floor: float | None = None, max_stretch: float = 8.0,
                    iters: int = 40, held_on: str = "soft") -> dict:
    """``--budget bound``: keep the soft average in ``[floor, target]`` after an SGD step
    without adding anything to the loss (nothing enters the momentum, so nothing can run
    away: the collapse of the hinge in issue 11), and without moving the layers the
    cross-entropy did not choose. In place, no gradient; returns ``{"shift", "stretch"}``.

    Works on the *effective* offsets e (what the forward pass sees before the ladder
    clamp: the raw offset, or its absolute value with ``parameterization="abs"``; written
    back with the raw offset's sign, so abs()'s gradient keeps its direction), boxed to
    ``[low - margin, high + margin]`` (abs: ``[0, high + margin]``).

    * Over the target: every e shrinks towards the low end by one common amount s times
      its offset's weight in the average relative to the lightest one, w,
      ``e -> max(box_low, e - s * w)`` (a soft threshold: the bounded form of the hinge's
      push ``lam * share * F'``, which is proportional to the share too; layers already at
      the bottom stay there). Untied with ``weighting="simple"`` every w is 1; a tied
      q/k/v group has w = 3, gate/up 2: it costs that many layers' bits, and its gradient
      is the sum of as many layers', so without w it would win the budget for its size.
    * Under ``floor`` (the ramp): this step's own move, ``e_after - e_before``, is stretched
      by a common factor in ``[1, max_stretch]``: the layers the gradient raises rise
      faster, the others do not move (a uniform shift, the projection's way, would lift
      them all). Only if the longest stretch is still short is the rest a uniform shift.

    ``held_on="hard"`` (``--budget-average hard``): the target is a ceiling on the *hard*
    average (the rungs the offsets deploy with), the shrink the largest (least negative)
    one that brings it to <= target; the floor stays on the soft average.
    """
    import torch

    lad = next(iter(layers.values())).ladder
    use_abs = parameterization == "abs"
    lo = lad.low.position if use_abs else lad.low.position - float(margin)
    hi = lad.high.position + float(margin)
    coef = _offset_coefficients(layers, params, weighting)
    soft = _soft_average(layers, params, weighting, temperature, lo, hi, coef)
    ceiling = soft if held_on == "soft" else _soft_average(
        layers, params, weighting, temperature, lo, hi, coef, hard=True)
    weight = coef / coef.min()  # every layer counts in the average: all coefficients > 0
    with torch.no_grad():
        raw, eff = effective_offsets(params, parameterization, lo, hi)
        _, eff_old = effective_offsets(before, parameterization, lo, hi)
        sign = torch.where(raw < 0, -1.0, 1.0) if use_abs else torch.ones_like(raw)
        shift, stretch = 0.0, 1.0

        def shrink(eff):  # weight >= 1: a = lo - hi puts every offset at the bottom
            if ceiling is soft:
                return _bisect(lambda a: soft(eff + a * weight), lo - hi, 0.0, target, iters)
            # a step function: the largest shift whose average is <= target
            return _bisect_at_most(lambda a: ceiling(eff + a * weight), lo - hi, 0.0,
                                   target, iters)

        now = soft(eff)
        if ceiling(eff) > target:
            shift = shrink(eff)
            eff = (eff + shift * weight).clamp(lo, hi)
        elif floor is not None and now < floor:
            move = eff - eff_old
            longest = (eff_old + max_stretch * move).clamp(lo, hi)
            if soft(longest) < floor:
                stretch, eff = max_stretch, longest
                shift = _bisect(lambda a: soft(eff + a), 0.0, hi - lo, floor, iters)
                eff = (eff + shift).clamp(lo, hi)
            else:
                stretch = _bisect(lambda a: soft(eff_old + a * move), 1.0, max_stretch,
                                  floor, iters)
                eff = (eff_old + stretch * move).clamp(lo, hi)
            if ceiling is not soft and ceiling(eff) > target:  # a soft floor, a hard ceiling
                extra = shrink(eff)
                shift, eff = shift + extra, (eff + extra * weight).clamp(lo, hi)
        for p, e, sg in zip(params, eff, sign):
            p.copy_((sg * e).to(p.dtype).reshape(p.shape))
    return {"shift": shift, "stretch": stretch}


def _unit_label(unit: tuple[str, ...]) -> str:
    from dmx.nn.layers import fused_key

    return (fused_key(unit[0]) or unit[0]) if len(unit) > 1 else unit[0]


def repair_assignment(formats: dict, offsets: dict, shapes: dict, ladder, target: float,
                      weighting: str = "simple", quantize_input=True,
                      fill: bool = True, units=None) -> dict:
    """Move whole units between rungs so that the average bits are <= ``target`` and,
    with ``fill``, as close to it as the ranking allows.

    ``formats``: {name: format key} (the hard assignment); ``offsets``: {name: raw offset}
    (tied layers have the same one); ``shapes``: {name: (out, in)}; ``quantize_input``:
    a bool for all layers or {name: bool} (a layer whose input is quantized counts in the
    activation average, as in dmx.nn.bits). Returns ``{"formats", "moves", "bits_before",
    "bits_after", "target", "weighting", "fill"}``; ``moves`` lists
    ``{"unit", "layers", "offset", "from", "to", "step": "fit"|"fill"}`` in order.
    The fit step ranks by distance above the unit's lower boundary (smallest first), the
    fill step by distance below its upper boundary (smallest first; after a move on a
    ladder with a middle rung, the unit competes again with its next boundary); ties keep
    model order. A unit demoted to fit is not promoted again by fill.
    """
    from dmx.nn.layers import fused_units
    from dmx.nn.bits import average_bits_of
    from dmx.quant.ladders import get_ladder

    lad = get_ladder(ladder)
    if weighting not in _KEYS:
        raise DMXError(f"weighting must be one of {', '.join(_KEYS)}, got {weighting!r}")
    target = float(target)
    if not (math.isfinite(target) and lad.low.bits <= target <= lad.high.bits):
        raise DMXError(f"target {target} is outside ladder {lad.name} "
                       f"([{lad.low.bits}, {lad.high.bits}] bits)")
    missing = set(formats) - set(offsets) or set(formats) - set(shapes)
    if missing:
        raise DMXError(f"repair_assignment: no offset or shape for {sorted(missing)[:3]}")
    rung_of = {r.fmt: i for i, r in enumerate(lad.rungs)}
    quant_in = (quantize_input if isinstance(quantize_input, dict)
                else {n: bool(quantize_input) for n in formats})
    # a unit moves as one: the fused groups (default), or the layers sharing an offset
    units = fused_units(list(formats)) if units is None else [tuple(u) for u in units]
    level, offset = {}, {}
    for u in units:
        fmts = {formats[n] for n in u}
        offs = {float(offsets[n]) for n in u}
        if len(fmts) != 1 or len(offs) != 1:
            raise DMXError(f"repair_assignment: the tied layers {', '.join(u)} have different "
                           f"formats or offsets")
        fmt = fmts.pop()
        if fmt not in rung_of:
            raise DMXError(f"repair_assignment: {u[0]} is in {fmt}, not a rung of ladder "
                           f"{lad.name}")
        level[u], offset[u] = rung_of[fmt], offs.pop()
    # the hard map's decision boundaries: the midpoints between neighbouring rungs
    bounds = [0.5 * (a.position + b.position) for a, b in zip(lad.rungs, lad.rungs[1:])]
    key = _KEYS[weighting]

    def avg(lv: dict) -> float:
        fm = {n: lad.rungs[lv[u]].fmt for u in units for n in u}
        acts = {n: (f if quant_in.get(n, True) else None) for n, f in fm.items()}
        return average_bits_of(fm, acts, shapes)[key]

    def move(u, to: int, step: str):
        moves.append({"unit": _unit_label(u), "layers": list(u), "offset": offset[u],
                      "from": lad.rungs[level[u]].fmt, "to": lad.rungs[to].fmt,
                      "step": step})
        level[u] = to

    moves: list[dict] = []
    before = avg(level)
    current = before
    demoted = set()
    # fit: one rung down at a time, the unit nearest to its lower boundary first
    while current > target + _EPS:
        u = min((u for u in units if level[u] > 0),
                key=lambda u: offset[u] - bounds[level[u] - 1])
        move(u, level[u] - 1, "fit")
        demoted.add(u)
        current = avg(level)
    # fill: one rung up at a time, the unit nearest to its upper boundary first, every
    # move that still fits (a move that does not fit never will: the average only grows)
    blocked = set(demoted)
    while fill:
        ranked = sorted((u for u in units if level[u] < len(bounds) and u not in blocked),
                        key=lambda u: bounds[level[u]] - offset[u])
        for u in ranked:
            bits = avg({**level, u: level[u] + 1})
            if bits <= target + _EPS:
                move(u, level[u] + 1, "fill")
                current = bits
                break
            blocked.add(u)
        else:
            break
    new = {n: lad.rungs[level[u]].fmt for u in units for n in u}
    return {"formats": new, "moves": moves, "bits_before": before, "bits_after": current,
            "target": target, "weighting": weighting, "fill": bool(fill)}


def set_offsets(layers: dict, formats: dict) -> list[str]:
    """Put the offset of every DMXLinear whose hard format differs from ``formats[name]``
    on that rung's position, so that the wrapped model (its forward, hard_assignment,
    dmx.nn.bits.average_bits) deploys the repaired assignment. Returns the moved names."""
    import torch

    moved = [n for n, layer in layers.items() if layer.hard_format() != formats[n]]
    with torch.no_grad():
        for name in moved:
            layer = layers[name]
            rung = next((r for r in layer.ladder.rungs if r.fmt == formats[name]), None)
            if rung is None:
                raise DMXError(f"set_offsets: {formats[name]} is not a rung of ladder "
                               f"{layer.ladder.name}")
            layer.offset.fill_(rung.position)  # tied layers share this Parameter
    return moved


def repair_layers(layers: dict, ladder, target: float, weighting: str = "simple",
                  fill: bool = True) -> dict:
    """:func:`repair_assignment` on the wrapped layers of a finished search (their current
    hard formats and raw offsets), applied with :func:`set_offsets`; returns its result
    without the formats (read them back with dmx.nn.layers.hard_assignment)."""
    formats = {n: layer.hard_format() for n, layer in layers.items()}
    offsets = {n: float(layer.raw_offset().detach()) for n, layer in layers.items()}
    shapes = {n: (layer.out_features, layer.in_features) for n, layer in layers.items()}
    quant_in = {n: layer.quantize_input for n, layer in layers.items()}
    tied: dict[int, list[str]] = {}
    for n, layer in layers.items():  # untied searches (--no-tie-fused) move layers alone
        tied.setdefault(id(layer.offset), []).append(n)
    result = repair_assignment(formats, offsets, shapes, ladder, target, weighting, quant_in,
                               fill, units=list(tied.values()))
    set_offsets(layers, result["formats"])
    return {k: v for k, v in result.items() if k != "formats"}
