"""``dmx combine``: one assignment from several dMX searches that differ only in ``--seed``.

A short search is path-dependent: its first noisy steps lock choices in and the end of the
anneal churns (BENCHMARKS.md, issue 11), so on SmolLM2-135M two seeds of the same 24-step
search share only 35-37 of the 52 units they promote at 5 bits. Averaging independent
seeds' learned offsets is bagging: the noise of each path averages out, the preference
the seeds share stays.

The rule, in the search's own terms:

1. Every input's learned offsets b_hat (its ``search_log.jsonl`` final line, before the
   budget repair: what its own assignment came from, the mean of its last steps under
   ``--average-last``), each clamped to the ladder's positions as the forward pass clamps it,
   are averaged per layer (tied layers share one offset, so their mean is shared too).
2. Every unit goes to the rung nearest its mean: the hard anneal map
   (:func:`dmx.quant.anneal.hard_rung`), as a search's raw assignment.
3. The budget is repaired with the search's rule, ranking by the mean
   (:func:`dmx.search.assign.repair_assignment`): fit (demote while over the target), then
   fill (promote while it fits) unless ``--no-fill-budget``. Both assignments are kept in
   the manifest (``search.raw_bits``, ``search.budget_repair``), as a search keeps them.

Inputs must be sealed ``dmx search`` OUTs of one model, with every search setting equal but
the seed (the recipe, budget, calibration, steps, layers...): averaging offsets learned
for different budgets or data would rank nothing in particular. Searches with a rotation
are refused: each seed rotates its own weights (R1 is seeded by ``--seed``), so their
offsets rank different weights.

With ``--kl KL_OUT ...`` steps 2 and 3 are replaced: the units are ranked by the better of
two percentile ranks, the searches' mean offset and the KL OUTs' summed sensitivity, for
one search, and by their mean for several (``--kl-rule auto``; ``max`` or ``mean`` for
either), and promoted greedily in that order, KL's rule (dmx.search.rank_fusion). One
search is enough with ``--kl`` (one search fused with one KL baseline).

Public API: ``combine_searches(outs, out, fill=None, force=False, device="cpu", kl=None,
kl_rule=None) -> dict``,
``summary_line(result)``, ``add_combine_parser(subparsers)`` / ``run_combine(args)``.
``dmx search --seeds`` (dmx.search.command.search_seeds) runs the searches and calls
``combine_searches``.
"""
from __future__ import annotations

import time
from pathlib import Path

from dmx.errors import DMXError
from dmx.outdir.layout import writer_of
from dmx.search.rank_fusion import layer_signature

__all__ = ["combine_searches", "mean_offsets", "summary_line", "add_combine_parser",
           "run_combine"]


def _read_search(out) -> tuple[dict, dict]:
    """(manifest, search log) of a sealed `dmx search` OUT, or a one-line refusal."""
    from dmx.outdir import read_manifest, read_search_log

    m = read_manifest(out)  # the seal is checked: the offsets are the ones it wrote
    if m["method"] != "dmx" or "config" not in (m.get("search") or {}):
        hint = "; pass KL baselines with --kl" if m["method"] == "kl" else ""
        raise DMXError(f"{out}: an OUT of `{writer_of(m)}`; combine takes OUTs written by "
                       f"`dmx search`{hint}")
    if m["search"].get("combined"):
        raise DMXError(f"{out}: already a combination; combine the searches it was made from")
    log = read_search_log(out)
    if not isinstance(log.get("offsets"), dict):
        raise DMXError(f"{out}: its search log has no final offsets; rerun the search")
    return m, log


def _config(m: dict):
    """The search's SearchConfig (a field an older manifest lacks: its recipe's value)."""
    from dmx.search.recipe import config_from_dict

    return config_from_dict(m["search"]["config"])


def _comparable(m: dict) -> dict:
    """What must be equal across the inputs, by the name a user would look for."""
    cfg = _config(m).to_dict()
    cfg.pop("seed")
    if cfg.get("calib") is not None:  # the same file, however it was spelled
        cfg["calib"] = [str(Path(f).resolve()) for f in cfg["calib"]]
    layers = layer_signature(m)
    return {"source model": str(Path(m["source_model"]).resolve()),
            "profile": m["profile"], "block size": m["block_size"],
            "layers (names, shapes, inputs quantized)": layers,
            **{f"search setting '{k}'": v for k, v in cfg.items()}}


def _check_inputs(outs: list, manifests: list, kl=None) -> None:
    if not outs:
        raise DMXError("combine needs the OUT directories of `dmx search` runs")
    if len(outs) < 2 and not kl:
        raise DMXError("combine needs at least two OUT directories (searches of different "
                       "--seed), or one with --kl KL_OUT (fused with KL baselines)")
    paths = [str(Path(o).resolve()) for o in outs]
    for i, p in enumerate(paths):
        if p in paths[:i]:
            raise DMXError(f"{outs[i]} is given twice; pass each search once")
    first = _comparable(manifests[0])
    for out, m in zip(outs[1:], manifests[1:]):
        other = _comparable(m)
        for key, value in first.items():
            if other.get(key) != value:
                shown = "" if key.startswith("layers") else f" ({value!r} vs {other.get(key)!r})"
                raise DMXError(f"{out} differs from {outs[0]} in {key}{shown}; combine "
                               f"searches that differ only in --seed")
    seeds = [_config(m).seed for m in manifests]
    for i, s in enumerate(seeds):
        if s in seeds[:i]:
            raise DMXError(f"{outs[i]} and {outs[seeds.index(s)]} both have --seed {s}: the "
                           f"same search twice; combine searches of different seeds")
    cfg = _config(manifests[0])
    if cfg.rotate != "none" or cfg.rotate_online:
        raise DMXError(f"the searches used --rotate {cfg.rotate}"
                       f"{' --rotate-online' if cfg.rotate_online else ''}: each seed "
                       f"rotates its own weights, so their offsets rank different weights; "
                       f"combine searches made with --rotate none")


def mean_offsets(logs: list, ladder) -> dict:
    """{layer: mean over the searches of the b_hat it assigned from (its final offset, or
    with --average-last the mean of its last steps), clamped to the ladder's span}."""
    lo, hi = ladder.low.position, ladder.high.position
    names = list(logs[0]["offsets"])
    return {n: sum(min(hi, max(lo, float(log["offsets"][n]))) for log in logs) / len(logs)
            for n in names}


def combine_searches(outs, out, fill: bool | None = None, force: bool = False,
                     device: str = "cpu", kl=None, kl_rule: str | None = None) -> dict:
    """Write OUT with the assignment of the mean offsets of the searches ``outs`` (see the
    module docstring); ``fill``: None takes the searches' own --fill-budget. ``kl``: KL
    baseline OUTs whose sensitivities are fused with the mean offsets by ``kl_rule``
    (dmx.search.rank_fusion.KL_RULES; None: "auto") instead. Returns a summary."""
    from dmx import data, outdir
    from dmx.nn.bits import average_bits_of
    from dmx.nn.layers import fused_units
    from dmx.quant.anneal import hard_rung
    from dmx.quant.ladders import get_ladder
    from dmx.search.assign import repair_assignment

    t0 = time.time()
    outs = [str(o) for o in outs]
    read = [_read_search(o) for o in outs]
    manifests, logs = [m for m, _ in read], [log for _, log in read]
    _check_inputs(outs, manifests, kl)
    first = manifests[0]
    cfg = _config(first)
    source = first["source_model"]
    # every input: the --kl baselines too (`-o KL_OUT --force` replaced a KL input with the
    # combination), and never a path inside one (an OUT written into a search's OUT or the
    # model directory, which the same command with --force then refused)
    inputs = [Path(o) for o in outs] + [Path(k) for k in kl or ()] + [Path(source)]
    from dmx.outdir.write import refuse_inside
    refuse_inside("-o/--out", out, inputs)
    outdir.check_new_out(out, force, inputs)
    if not Path(source).is_dir():
        raise DMXError(f"the searches' source model {source} is not there; combine on the "
                       f"machine that has it")
    lad = get_ladder(first["ladder"])
    if kl and fill is False:
        raise DMXError("--kl assigns by greedy promotion, which fills the budget as closely "
                       "as the units allow; drop --no-fill-budget")
    # --kl: KL's greedy promotion fills the budget whatever the searches did
    fill = True if kl else (cfg.fill_budget if fill is None else bool(fill))
    names = list(first["layers"])
    mean = mean_offsets(logs, lad)
    if set(mean) != set(names):
        raise DMXError(f"{outs[0]}: its search log's offsets do not name its layers; rerun "
                       f"the search")
    raw = {n: hard_rung(mean[n], lad).fmt for n in names}
    shapes = {n: tuple(first["layers"][n]["shape"]) for n in names}
    quant_in = {n: first["layers"][n].get("act_format") is not None for n in names}
    units = fused_units(names) if cfg.tie_fused else [(n,) for n in names]
    fusion = None
    if kl:
        from dmx.search.rank_fusion import resolve_rule
        rule = resolve_rule(kl_rule, len(outs))
        formats, fusion = _fused_assignment(kl, first, cfg, units, mean, shapes, lad, rule,
                                            kl_rule or "auto")
        repair = None
    else:
        repair = repair_assignment(raw, mean, shapes, lad, cfg.target_bits, cfg.weighting,
                                   quant_in, fill, units=units)
        formats = repair.pop("formats")
    acts = {n: (formats[n] if quant_in[n] else None) for n in names}
    raw_bits = average_bits_of(raw, {n: (raw[n] if quant_in[n] else None) for n in names},
                               shapes)
    achieved = average_bits_of(formats, acts, shapes)
    seeds = [_config(m).seed for m in manifests]
    model, _ = data.load_model_and_tokenizer(source, device=device)
    meta = {"method": "dmx", "ladder": lad.name, "target_bits": cfg.target_bits,
            "seed": seeds[0],
            "search": {"config": cfg.to_dict(), "raw_bits": raw_bits, "achieved_bits": achieved,
                       "budget_repair": repair,
                       "raw_formats_differ": sorted(n for n in names if formats[n] != raw[n]),
                       "combined": {"inputs": [{"out": str(Path(o).resolve()), "seed": s,
                                                "manifest_sha256": m["manifest_sha256"]}
                                               for o, s, m in zip(outs, seeds, manifests)],
                                    "seeds": seeds, "fill": fill,
                                    "rule": "mean of the clamped offsets each search "
                                            "assigned from; nearest rung; fit/fill ranked "
                                            "by the mean",
                                    "offsets": mean,
                                    **({} if fusion is None else {"kl": fusion})},
                       "train_seconds": sum(float(m["search"].get("train_seconds") or 0)
                                            for m in manifests)}}
    # the cost of the result: every search's wall time, and the combination's own
    own = time.time() - t0
    meta["search"]["combined"]["combine_seconds"] = round(own, 3)
    meta["wall_time_s"] = round(own + sum(float(m.get("wall_time_s") or 0)
                                          for m in manifests), 3)
    outdir.write_out(out, model, formats, acts, source, meta, force)
    return {"out": str(out), "formats": formats, "raw_formats": raw, "raw_bits": raw_bits,
            "achieved_bits": achieved, "budget_repair": repair, "seeds": seeds,
            "offsets": mean, "kl": fusion}


def _fused_assignment(kl_outs, first: dict, cfg, units, mean: dict, shapes: dict, lad,
                      rule: str, asked: str):
    """({name: format}, what the manifest records) of the rank fusion of the searches'
    mean offsets with the KL OUTs' sensitivities (dmx.search.rank_fusion) by ``rule``
    ("max" or "mean"; ``asked``: the --kl-rule it came from)."""
    from dmx.search.baseline import greedy_promote
    from dmx.search.rank_fusion import RULES, fused_order, kl_sensitivities_of

    sens, inputs = kl_sensitivities_of(kl_outs, first, cfg, units)
    order, score = fused_order({u: mean[u[0]] for u in units}, sens, rule=rule)
    # greedy_promote promotes by decreasing value: hand it the fused order as values
    rank = {u: float(len(order) - i) for i, u in enumerate(order)}
    formats = greedy_promote(units, rank, shapes, lad, cfg.target_bits, cfg.weighting,
                             cfg.weights_only)
    return formats, {"inputs": inputs, "rule": RULES[rule], "rule_name": rule,
                     "rule_asked": asked,
                     "scores": {"+".join(u): score[u] for u in order},
                     "sensitivity_sum": {"+".join(u): sens[u] for u in units}}


def add_combine_parser(subparsers):
    from dmx.search.rank_fusion import KL_RULES
    from dmx.threads import add_threads_arg

    p = subparsers.add_parser(
        "combine", help="average the learned offsets of several dmx searches (seeds) into "
                        "one assignment",
        description="Average the learned offsets of several `dmx search` OUTs that differ "
                    "only in --seed, put every layer on the rung nearest its mean, repair "
                    "the budget by the mean (fit, then fill unless --no-fill-budget), and "
                    "write the result as a new OUT (docs/dmx_search.md, 'Combining seeds'). "
                    "With --kl, rank by the mean offsets and KL baselines' sensitivities "
                    "together instead ('Fusing seeds with KL').")
    # "*", not "+": `--kl A B` before the searches takes them all, and run_combine says
    # so (argparse's own line would only say that OUT is missing)
    p.add_argument("outs", nargs="*", metavar="OUT",
                   help="OUT directories written by `dmx search` (two or more; one with --kl)")
    p.add_argument("-o", "--out", required=True, help="the OUT directory to write")
    p.add_argument("--fill-budget", action="store_true", default=None, dest="fill",
                   help="promote units by the mean while the budget allows (default: as the "
                        "searches were run)")
    p.add_argument("--no-fill-budget", action="store_false", dest="fill",
                   help="leave the mean's assignment under the target if it lands there")
    p.add_argument("--kl", nargs="+", metavar="KL_OUT", default=None,
                   help="`dmx baseline --method kl` OUTs of the same model and layers (e.g. "
                        "one per calibration seed): rank the units by two percentile ranks, the "
                        "searches' mean offset and the summed KL sensitivity, and promote "
                        "greedily in that order (docs/dmx_search.md)")
    p.add_argument("--kl-rule", choices=KL_RULES, default=None,
                   help="how --kl fuses the two ranks: max, the better one; mean, their mean; "
                        "auto (default): max for one search, mean for several (measured best "
                        "each way on SmolLM2-135M)")
    p.add_argument("--device", default="cpu", help="where the weights are packed (cpu)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    add_threads_arg(p)
    return p


def run_combine(args) -> int:
    from dmx.threads import apply_threads

    if not args.outs:
        raise DMXError("no search OUTs given" + (
            f": --kl took all {len(args.kl)} paths after it; put the searches first: dmx "
            "combine OUT OUT ... --kl KL_OUT ... -o OUT" if args.kl else
            "; pass two or more OUTs of `dmx search`"))
    apply_threads(args)
    if args.kl_rule and not args.kl:
        raise DMXError("--kl-rule says how --kl fuses; add --kl KL_OUT ... or drop it")
    res = combine_searches(args.outs, args.out, args.fill, args.force, args.device, args.kl,
                           args.kl_rule)
    print(f"dmx combine: {summary_line(res)}")
    return 0


def summary_line(res: dict) -> str:
    """What a combination did, in one line (dmx combine, dmx search --seeds)."""
    if res.get("kl"):
        one = len(res["seeds"]) == 1
        return (f"seed{'' if one else 's'} {', '.join(map(str, res['seeds']))} fused with "
                f"{len(res['kl']['inputs'])} KL baseline(s) -> {res['out']}: "
                f"{res['achieved_bits']['simple']:.3f} bits (the "
                f"{'search' if one else 'mean'}'s nearest rungs alone "
                f"{res['raw_bits']['simple']:.3f}; promoted greedily by the fused rank, "
                f"{res['kl']['rule_name']})")
    moves = res["budget_repair"]["moves"]
    return (f"seeds {', '.join(map(str, res['seeds']))} -> {res['out']}: "
            f"{res['achieved_bits']['simple']:.3f} bits (mean's nearest rungs "
            f"{res['raw_bits']['simple']:.3f}; {sum(m['step'] == 'fit' for m in moves)} fit, "
            f"{sum(m['step'] == 'fill' for m in moves)} fill moves)")
