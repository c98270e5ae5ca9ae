"""``dmx combine --kl``: rank the units by dMX's combined offsets *and* KL's sensitivities.

On SmolLM2-135M (BENCHMARKS.md, issue 11) the two rankings are good in different places:
KL's finite differences (each unit alone in the low format, everything else exact) rank
the early k_proj that a short search under-ranks at 4.5 bits, and the searches' mean
offsets rank better where many layers move (5 and 6 bits). Two ways to fuse them:

- "max": a unit's score is the *better* of its two percentile ranks, so what either side
  puts near the top is promoted. One search's blind spot (a layer it puts at the bottom)
  does not keep KL's pick out.
- "mean": the mean of the two ranks keeps what both rank well.

Measured (benchmarks/results/recipes-fusion-max/): one search fused by the mean was
behind KL on held-out text at 4.5 bits, by the better rank it was not; three searches
(whose mean offset is steadier) fused by the mean were at or below KL at every budget, by
the better rank behind at 6 bits on one window set. So "auto", the default, is "max" for
one search and "mean" for several. On stories260K the pairing went the other way, by
0.01-0.04 ppl (benchmarks/results/second-model-auto/): a choice made on one model.

The rule:

1. every unit's dMX score is its mean offset over the searches (dmx.search.combine), its
   KL score the sum of its sensitivities over the KL OUTs given (KL's own combination of
   several calibration seeds);
2. each score becomes a percentile rank in [0, 1] over the units (equal scores share
   their average rank: many units sit exactly at the ladder's bottom after a search);
3. the fused score is the better of the two ranks ("max"; equal scores by the worse one)
   or their mean ("mean"); the units are ordered by it, highest first (then by the dMX
   mean, then model order);
4. the assignment is KL's greedy promotion in that order
   (:func:`dmx.search.baseline.greedy_promote`): all units low, each promoted while the
   average bits stay at or below the target, so the budget is met as closely as the units
   allow, never exceeded.

Public API: ``RULES`` ({name: the rule in words}, as manifests record it),
``KL_RULES`` (what ``--kl-rule`` takes), ``resolve_rule(rule, n_searches) -> "max"|"mean"``,
``percentile_ranks(values) -> {key: rank}``, ``fused_order(mean, sens, rule="max") ->
([unit], {unit: score})``, ``layer_signature(manifest)``,
``kl_sensitivities_of(kl_outs, search_manifest, cfg, units) -> (sums, inputs)``.
"""
from __future__ import annotations

from pathlib import Path

from dmx.errors import DMXError

__all__ = ["RULES", "KL_RULES", "resolve_rule", "percentile_ranks", "fused_order",
           "layer_signature", "kl_sensitivities_of"]

_RANKS = ("percentile ranks of the searches' mean offset and of the KL OUTs' summed "
          "sensitivity (ties: average rank)")
RULES = {
    "max": f"the better of the {_RANKS}, ties by the worse; greedy promotion in that order",
    "mean": f"mean of the {_RANKS}; greedy promotion in that order",
}
KL_RULES = ("auto", *RULES)


def resolve_rule(rule: str | None, n_searches: int) -> str:
    """The rule ``--kl-rule`` ``rule`` (None: "auto") means for ``n_searches`` searches:
    "auto" is "max" for one search and "mean" for several (the module docstring)."""
    rule = rule or "auto"
    if rule not in KL_RULES:
        raise DMXError(f"--kl-rule {rule}: use one of {', '.join(KL_RULES)}")
    if rule == "auto":
        return "max" if n_searches == 1 else "mean"
    return rule


def percentile_ranks(values: dict) -> dict:
    """{key: rank in [0, 1]}: 0 for the smallest value, 1 for the largest; equal values
    share the mean of the ranks they span. A single key ranks 0.5."""
    keys = list(values)
    if len(keys) == 1:
        return {keys[0]: 0.5}
    ordered = sorted(keys, key=lambda k: values[k])
    rank, i = {}, 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and values[ordered[j + 1]] == values[ordered[i]]:
            j += 1
        for k in ordered[i:j + 1]:
            rank[k] = (i + j) / 2 / (len(keys) - 1)
        i = j + 1
    return rank


def fused_order(mean: dict, sens: dict, kl_weight: float = 0.5,
                rule: str = "max") -> tuple[list, dict]:
    """(the units -- the keys of ``mean`` and ``sens``, in model order -- by decreasing
    fused score, ties by decreasing ``mean``, then model order; {unit: fused score}).
    ``rule`` "max": the better of the two ranks, ties by the worse one
    (``kl_weight`` unused), so a unit either side ranks near the top comes first
    (benchmarks/results/recipes-fusion-max/). "mean": (1 - w) x rank(mean) + w x
    rank(sens), ``kl_weight`` = w KL's share (benchmarks/results/recipes-fusion-weight/
    tried 0.25, 0.5 and 0.75)."""
    if set(mean) != set(sens):
        raise DMXError("fused_order: the two rankings name different units")
    if not 0.0 <= kl_weight <= 1.0:
        raise DMXError(f"the KL weight must be in [0, 1], got {kl_weight}")
    if rule not in RULES:
        raise DMXError(f"fusion rule {rule!r}: use one of {', '.join(RULES)}")
    rm, rs = percentile_ranks(mean), percentile_ranks(sens)
    units = list(mean)
    if rule == "max":
        score = {u: max(rm[u], rs[u]) for u in units}
        second = {u: min(rm[u], rs[u]) for u in units}
    else:
        score = {u: (1.0 - kl_weight) * rm[u] + kl_weight * rs[u] for u in units}
        second = {u: 0.0 for u in units}
    order = sorted(range(len(units)),
                   key=lambda i: (-score[units[i]], -second[units[i]], -mean[units[i]], i))
    return [units[i] for i in order], score


def layer_signature(m: dict) -> dict:
    """{layer: (shape, inputs quantized)} of an OUT's manifest: what two OUTs must share to
    rank the same units (the searches combined, the KL baselines fused with them)."""
    return {n: (tuple(e["shape"]), e.get("act_format") is not None)
            for n, e in m["layers"].items()}


def _label(unit) -> str:
    return "+".join(unit)


def kl_sensitivities_of(kl_outs, search: dict, cfg, units) -> tuple[dict, list]:
    """({unit: summed sensitivity}, [the inputs as the manifest records them]) of the KL
    OUTs ``kl_outs``, after checking that each scored the searches' units: the same source
    model, ladder, layers (names, shapes, inputs quantized or not), units (tied or not) and
    no rotation. ``search``: one search's manifest; ``cfg``: its SearchConfig."""
    from dmx.outdir import read_manifest

    kl_outs = [str(k) for k in kl_outs]
    paths = [str(Path(k).resolve()) for k in kl_outs]
    for i, p in enumerate(paths):
        if p in paths[:i]:
            raise DMXError(f"--kl {kl_outs[i]} is given twice; pass each KL baseline once")
    want_layers = layer_signature(search)
    sums = {u: 0.0 for u in units}
    inputs = []
    for k in kl_outs:
        m = read_manifest(k)
        if m["method"] != "kl" or "sensitivity" not in (m.get("baseline") or {}):
            from dmx.outdir.layout import writer_of  # not "a `dmx dmx` OUT"
            raise DMXError(f"--kl {k}: an OUT of `{writer_of(m)}`; --kl takes OUTs written "
                           f"by `dmx baseline --method kl`")
        if str(Path(m["source_model"]).resolve()) != str(Path(search["source_model"]).resolve()):
            raise DMXError(f"--kl {k}: a baseline of {m['source_model']}, the searches are of "
                           f"{search['source_model']}; use a KL baseline of the same model")
        if m["ladder"] != search["ladder"]:
            raise DMXError(f"--kl {k}: ladder {m['ladder']}, the searches' is "
                           f"{search['ladder']}; run the baseline with --ladder "
                           f"{search['ladder']}")
        if m.get("rotation"):
            raise DMXError(f"--kl {k}: measured on rotated weights; use a baseline with "
                           f"--rotate none, as the searches")
        if layer_signature(m) != want_layers:
            raise DMXError(f"--kl {k}: it quantizes other layers than the searches (or leaves "
                           f"other inputs unquantized); run it with the searches' "
                           f"--include/--exclude/--export-target/--weights-only")
        if bool(m["baseline"].get("tie_fused")) != bool(cfg.tie_fused):
            theirs, ours = (("fused groups", "single linears") if cfg.tie_fused is False
                            else ("single linears", "fused groups"))
            raise DMXError(f"--kl {k}: it scored {theirs}, the searches' units are {ours}; "
                           f"run it with {'--tie-fused' if cfg.tie_fused else '--no-tie-fused'}")
        sens = m["baseline"]["sensitivity"]
        missing = [_label(u) for u in units if _label(u) not in sens]
        if missing:
            raise DMXError(f"--kl {k}: no sensitivity for {missing[0]}; run the baseline "
                           f"again with the searches' layers")
        for u in units:
            sums[u] += float(sens[_label(u)])
        inputs.append({"out": str(Path(k).resolve()), "seed": m["seed"],
                       "manifest_sha256": m["manifest_sha256"]})
    return sums, inputs
