"""A search's offsets averaged over its last steps (trajectory averaging, as in stochastic
weight averaging) against the final offsets the search deploys, on a sweep's work dir.

    python benchmarks/bench_trajectory_mean.py --work /work/dmx_traj --targets 4.5 5 6 \\
        --seeds 0 1 2 [--fractions 0.25 0.5] [--threads 1] [--jobs 2] [--results DIR]

Why: `dmx combine` of three seeds beats each of its searches on every seed set
(BENCHMARKS.md, "Seeds combined"), and the end of a 24-step anneal churns. If part of a
single search's noise is that churn, the mean of its own last steps' offsets should rank
the units better at no extra cost (the per-step offsets are in search_log.jsonl).

The work dir holds ``dmx-default-<bits>-s<seed>`` searches of `bench_search_sweep.py`
(scored there with `dmx eval --save` on the texts below). For each search and fraction f
this takes the clamped raw offsets b_hat of the last ceil(f x steps) step lines, puts every
layer on the rung nearest its mean (the hard anneal map) and repairs the budget ranked by
the mean (fit, then fill: dmx.search.assign.repair_assignment, as `dmx combine` does),
fake-quantizes the model with that assignment (dmx.nn.layers.apply_formats; no command
writes it) and scores it on both texts (40 x 256 windows). Each result is compared window
by window with the search's own OUT (dmx.eval.paired). Cached in --results/cache/.
Writes --results/trajectory_mean-s<seeds>.md and prints it. The rule is `dmx search
--average-last F`'s (dmx.search.assign.mean_of_last_steps): this probe scores it on
searches already made, without running them again.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_rank_fusion import SEQLEN, TEXTS, score_on_texts  # noqa: E402  (one protocol)

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--targets", nargs="+", default=["4.5", "5", "6"])
    p.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--combine", action="store_true",
                   help="also the seeds combined: the mean of their trajectory means, "
                        "against the mean of their final offsets (`dmx combine`'s rule)")
    p.add_argument("--kl", nargs="+", type=Path, default=None, metavar="KL_OUT",
                   help="with --combine: also fuse the seeds' (trajectory-)mean offsets with "
                        "these KL baselines, `dmx combine --kl`'s rule")
    p.add_argument("--against-kl", default=None, metavar="PATTERN",
                   help="also each single search (its own OUT, and each fraction's mean) "
                        "against the KL OUT PATTERN.format(bits=..., "
                        "seed=...), e.g. '/work/kl/kl-{bits}-s{seed}', scored with `dmx eval "
                        "--save` on both texts; paired per seed and pooled over the seeds")
    p.add_argument("--kl-each", default=None, metavar="PATTERN",
                   help="also fuse each single search with its own seed's KL OUT "
                        "PATTERN.format(seed=...) (`dmx combine SEARCH --kl KL`'s rule), from "
                        "its final offsets and from each fraction's mean")
    p.add_argument("--max-windows", type=int, default=40,
                   help="windows of 256 tokens scored per text (the sweep's --max-windows)")
    p.add_argument("--results", type=Path,
                   default=ROOT / "benchmarks" / "results" / "recipes-trajectory")
    return p.parse_args(argv)


def trajectory_mean(log: dict, fraction: float, ladder) -> dict:
    """{unit: its mean clamped b_hat over the last ceil(fraction x steps) steps}: the rule
    of `dmx search --average-last` (dmx.search.assign.mean_of_last_steps)."""
    from dmx.search.assign import mean_of_last_steps

    units = log["units"]
    steps = [s["offsets"] for s in log["steps"]]
    if any(len(o) != len(units) for o in steps):
        raise SystemExit("a step line's offsets do not match the units (tied search?)")
    return dict(zip(units, mean_of_last_steps(steps, fraction, ladder)))


def saved_result(out: Path, text: Path, windows: int) -> dict | None:
    from dmx.outdir.evaljson import find_result, load_eval
    return find_result(load_eval(out), text, SEQLEN, windows)


def assignment(outs: list, fraction: float, kl: list | None = None,
               kl_weight: float = 0.5, rule: str | None = None) -> dict:
    """The assignment of the trajectory mean of ``outs`` (one search, or the mean of
    several searches' trajectory means: a combination): {"model" (the source model dir),
    "formats", "acts" (input formats), "repair", "steps", "final" (the first OUT's own
    formats)}. ``kl``: KL OUTs to fuse the mean with, by `dmx combine --kl`'s rule
    (dmx.search.rank_fusion: its ``rule``, None "auto" as `dmx combine` resolves it for
    ``outs``; ``kl_weight`` KL's share under "mean") instead of the nearest
    rung and the repair. The repair fills (promotes while a unit fits under the target), as
    the default recipe of `dmx search` and `dmx combine --fill-budget` do, also where the
    search itself ran with --no-fill-budget (the sweeps do, to show where it lands)."""
    from dmx.outdir import read_manifest, read_search_log
    from dmx.quant.anneal import hard_rung
    from dmx.quant.ladders import get_ladder
    from dmx.search.assign import repair_assignment
    from dmx.search.recipe import config_from_dict

    m = read_manifest(outs[0])
    cfg = config_from_dict(m["search"]["config"])
    if cfg.tie_fused:
        raise SystemExit(f"{outs[0]}: a tied search; this probe handles untied units only")
    lad = get_ladder(m["ladder"])
    names = list(m["layers"])
    logs = [read_search_log(o) for o in outs]
    means = [trajectory_mean(log, fraction, lad) for log in logs]
    mean = {n: float(np.mean([one[n] for one in means])) for n in names}
    raw = {n: hard_rung(mean[n], lad).fmt for n in names}
    shapes = {n: tuple(m["layers"][n]["shape"]) for n in names}
    quant_in = {n: m["layers"][n].get("act_format") is not None for n in names}
    units = [(n,) for n in names]
    if kl:
        from dmx.search.baseline import greedy_promote
        from dmx.search.rank_fusion import fused_order, kl_sensitivities_of, resolve_rule
        sens, _ = kl_sensitivities_of(kl, m, cfg, units)
        order, _ = fused_order({u: mean[u[0]] for u in units}, sens, kl_weight=kl_weight,
                               rule=resolve_rule(rule, len(outs)))
        rank = {u: float(len(order) - i) for i, u in enumerate(order)}
        formats = greedy_promote(units, rank, shapes, lad, cfg.target_bits, cfg.weighting,
                                 cfg.weights_only)
        repair = {"bits_before": float("nan"), "bits_after": cfg.target_bits, "moves": []}
    else:
        repair = repair_assignment(raw, mean, shapes, lad, cfg.target_bits, cfg.weighting,
                                   quant_in, True, units=units)
        formats = repair["formats"]
    return {"model": m["source_model"], "formats": formats,
            "acts": {n: (formats[n] if quant_in[n] else None) for n in names},
            "repair": repair, "steps": len(logs[0]["steps"]),
            "final": {n: e["format"] for n, e in m["layers"].items()}}


def score(outs: list, fraction: float, cache: Path, threads: int | None,
          windows: int, kl: list | None = None) -> dict:
    """:func:`assignment` of ``outs`` and its scores on the first ``windows`` windows of
    each text (cached)."""
    a = assignment(outs, fraction, kl)
    if cache.is_file():   # a record of other formats (an older rule) is scored again
        record = json.loads(cache.read_text())
        if record["formats"] == a["formats"]:
            return record
    from dmx import data
    from dmx.nn.layers import apply_formats
    from dmx.threads import set_threads

    if threads:   # a worker process of its own (inline, the caller's setting stands)
        set_threads(threads)
    t0 = time.time()
    model, tok = data.load_model_and_tokenizer(a["model"])
    apply_formats(model, a["formats"], a["acts"])
    results = score_on_texts(model, tok, windows)
    repair, formats = a["repair"], a["formats"]
    record = {"outs": [str(o) for o in outs], "fraction": fraction, "steps": a["steps"],
              "bits_before": repair["bits_before"], "bits_after": repair["bits_after"],
              "moves": len(repair["moves"]), "formats": formats,
              "differ_from_final": sorted(n for n in formats if formats[n] != a["final"][n]),
              "results": results, "seconds": round(time.time() - t0, 1)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(record))
    return record


def _cells(ours: dict, theirs: dict | None) -> str:
    """'WikiText 93.1 vs 94.8: -1.7 ppl (...): lower; TinyStories ...' (ours - theirs)."""
    from dmx.eval.paired import paired, paired_line
    cells = []
    for name in TEXTS:
        mine, own = ours[name], (theirs or {}).get(name)
        if own is None or own.get("window_nll") is None:
            cells.append(f"{name} {mine['ppl']:.2f} (the other side not scored)")
            continue
        cells.append(f"{name} {mine['ppl']:.2f} vs {own['ppl']:.2f}: "
                     f"{paired_line(paired(own['window_nll'], mine['window_nll']))}")
    return "; ".join(cells)


def pooled_minus(seeds: list, theirs: list, ours: list) -> str:
    """"pooled <cell>; s0 <cell>; ...": ``ours`` minus ``theirs`` (per-seed results with
    window losses), paired window by window, pooled by averaging each side over seeds."""
    from dmx.eval.paired import paired, paired_cell
    mean = lambda runs: list(np.mean([r["window_nll"] for r in runs], axis=0))  # noqa: E731
    return (f"pooled {paired_cell(paired(mean(theirs), mean(ours)))}; " + "; ".join(
        f"s{s} {paired_cell(paired(t['window_nll'], o['window_nll']))}"
        for s, t, o in zip(seeds, theirs, ours)))


def _fused_each(args, jobs: list, done: list) -> list:
    """Lines: per fraction, each search fused with its own KL from its trajectory mean
    minus fused from its final offsets (f = 0), per seed and pooled; with --against-kl
    also each minus the KL OUT of its budget."""
    got = {(b, who, f): r["results"] for (kind, b, who, f, _, _), r in zip(jobs, done)
           if kind == "fused1"}
    lines = []
    for bits in args.targets:
        for f in (0.0, *args.fractions):
            for name, text in TEXTS.items():
                ours = [got[bits, s, f][name] for s in args.seeds]
                cells = []
                if f > 0:
                    base = [got[bits, s, 0.0][name] for s in args.seeds]
                    cells.append("minus fused from the final offsets: "
                                 + pooled_minus(args.seeds, base, ours))
                if args.against_kl:
                    kls = [saved_result(Path(args.against_kl.format(bits=bits, seed=s)), text,
                                   args.max_windows) for s in args.seeds]
                    cells.append("minus KL: " + pooled_minus(args.seeds, kls, ours))
                which = "final offsets" if f == 0.0 else f"last {f:g}"
                ppl = np.exp(np.mean([r["window_nll"] for r in ours]))
                lines.append(f"- {bits} bits, fused from the {which}, {name} (pooled ppl "
                             f"{ppl:.2f}): " + " | ".join(cells or ["-"]))
    return lines


def _against_kl(args, jobs: list, done: list) -> list:
    """Lines: each fraction's single searches (f = 0: the search's own OUT) minus the KL
    OUT of the same budget and calibration seed, per seed and pooled, on both texts."""
    lines = []
    for bits in args.targets:
        for f in (0.0, *args.fractions):
            for name, text in TEXTS.items():
                ours, theirs = [], []
                for seed in args.seeds:
                    kl = Path(args.against_kl.format(bits=bits, seed=seed))
                    theirs.append(saved_result(kl, text, args.max_windows))
                    if f == 0.0:
                        ours.append(saved_result(args.work / f"dmx-default-{bits}-s{seed}", text,
                                            args.max_windows))
                    else:
                        ours += [r["results"][name] for (kind, b, who, ff, _, _), r
                                 in zip(jobs, done)
                                 if kind == "one" and b == bits and who == seed and ff == f]
                if any(r is None or r.get("window_nll") is None for r in ours + theirs):
                    raise SystemExit(f"--against-kl: a {bits}-bit OUT is not scored on "
                                     f"{name}; run `dmx eval --save` on it")
                which = "its own OUT" if f == 0.0 else f"last {f:g}"
                lines.append(f"- {bits} bits, {which}, {name}: "
                             + pooled_minus(args.seeds, theirs, ours))
    return lines


def main(argv=None) -> int:
    from dmx.eval.paired import paired, paired_line
    from dmx.threads import set_threads

    args = _parse(argv)
    t0 = time.time()
    cache = args.results / "cache"
    jobs = []   # (kind, bits, seed or set, fraction, outs, cache file)
    for bits in args.targets:
        outs = [args.work / f"dmx-default-{bits}-s{seed}" for seed in args.seeds]
        for out in outs:
            if not (out / "dmx_manifest.json").is_file():
                raise SystemExit(f"{out}: no search there; run bench_search_sweep.py first")
        w = f"w{args.max_windows}"
        for seed, out in zip(args.seeds, outs):
            for f in args.fractions:
                jobs.append(("one", bits, seed, f, [out], cache / f"{out.name}-f{f:g}-{w}.json"))
            for f in (0.0, *args.fractions) if args.kl_each else ():
                jobs.append(("fused1", bits, seed, f, [out],
                             cache / f"{out.name}-kl1-f{f:g}-{w}.json"))
        if args.combine and len(outs) > 1:
            tag = ".".join(args.seeds)
            # fraction 0: the last step alone, i.e. `dmx combine` of the final offsets
            for f in (0.0, *args.fractions):
                jobs.append(("comb", bits, tag, f, outs,
                             cache / f"comb-{bits}-{tag}-f{f:g}-{w}.json"))
            for f in (0.0, *args.fractions) if args.kl else ():
                jobs.append(("fused", bits, tag, f, outs,
                             cache / f"fused-{bits}-{tag}-kl{len(args.kl)}-f{f:g}-{w}.json"))
    kls = [args.kl if j[0] == "fused" else
           [Path(args.kl_each.format(seed=j[2]))] if j[0] == "fused1" else None for j in jobs]
    calls = ([j[4] for j in jobs], [j[3] for j in jobs], [j[5] for j in jobs])
    if args.jobs == 1:
        set_threads(args.threads)
        done = list(map(score, *calls, [None] * len(jobs), [args.max_windows] * len(jobs),
                        kls))
    else:   # each scoring in a process of its own (its own torch thread pool)
        with ProcessPoolExecutor(args.jobs) as pool:
            done = list(pool.map(score, *calls, [args.threads] * len(jobs),
                                 [args.max_windows] * len(jobs), kls))
    command = " ".join(argv or sys.argv[1:])
    lines = ["# A search's offsets averaged over its last steps vs its final offsets", "",
             f"Command: `python benchmarks/bench_trajectory_mean.py {command}`  ",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"{(time.time() - t0) / 60:.1f} min. Evaluation: first {args.max_windows} "
             f"windows x {SEQLEN} of each text; differences are trajectory mean - final, "
             f"paired window by window (95 % interval).", "", "One search each:", ""]
    finals = {}
    for (kind, bits, who, f, outs, _), rec in zip(jobs, done):
        if kind == "fused1":   # reported below
            continue
        if kind == "fused":
            if f == 0.0:
                finals["fused", bits] = rec["results"]
                lines.append(f"- {bits} bits, seeds {who} fused with {len(args.kl)} KL, the "
                             f"final offsets (as `dmx combine --kl`): " + "; ".join(
                                 f"{n} {r['ppl']:.2f}" for n, r in rec["results"].items()))
            else:
                lines.append(f"- {bits} bits, seeds {who} fused with {len(args.kl)} KL, last "
                             f"{f:g}, against the fused final offsets: "
                             + _cells(rec["results"], finals.get(("fused", bits))))
            continue
        head = (f"- {bits} bits, {'seed' if kind == 'one' else 'seeds'} {who}, last {f:g} "
                f"of {rec['steps']} steps: raw {rec['bits_before']:.3f} -> "
                f"{rec['bits_after']:.3f} bits ({rec['moves']} moves), "
                f"{len(rec['differ_from_final'])} layers differ from the first search's "
                f"final assignment; ")
        if kind == "one":
            own = {name: saved_result(outs[0], text, args.max_windows)
                   for name, text in TEXTS.items()}
            lines.append(head + _cells(rec["results"], own))
        elif f == 0.0:
            finals[bits] = rec["results"]
            lines.append(head.replace("last 0 of", "the final offsets of") + "as `dmx "
                         "combine`: " + "; ".join(f"{n} {r['ppl']:.2f}"
                                                  for n, r in rec["results"].items()))
        else:
            lines.append(head + "against the combined final offsets: "
                         + _cells(rec["results"], finals.get(bits)))
    pooled = []
    for bits in args.targets:
        for f in args.fractions:
            for name, text in TEXTS.items():
                pairs = [(saved_result(o[0], text, args.max_windows), r["results"][name])
                         for (kind, b, _, ff, o, _), r in zip(jobs, done)
                         if kind == "one" and b == bits and ff == f]
                if not pairs or any(p is None or p.get("window_nll") is None
                                    for p, _ in pairs):
                    continue
                mean = lambda runs: list(np.mean(runs, axis=0))  # noqa: E731
                line = paired_line(paired(mean([p["window_nll"] for p, _ in pairs]),
                                          mean([q["window_nll"] for _, q in pairs])))
                pooled.append(f"- {bits} bits, last {f:g}, {name}, {len(pairs)} seeds "
                              f"pooled: {line}")
    lines += ["", "Single searches pooled over the seeds (each side's window losses averaged "
              "over its seeds):", "", *pooled]
    if args.kl_each:
        lines += ["", f"One search fused with its seed's KL baseline (`{args.kl_each}`, `dmx "
                  "combine SEARCH --kl KL`'s rule), from the mean of the last steps minus "
                  "from the final offsets, per seed and pooled:", "", *_fused_each(args, jobs, done)]
    if args.against_kl:
        lines += ["", f"Single searches against KL (`{args.against_kl}`), search - KL, per "
                  "seed and pooled (each side's window losses averaged over the seeds):", "",
                  *_against_kl(args, jobs, done)]
    text = "\n".join(lines) + "\n"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"trajectory_mean-s{'.'.join(args.seeds)}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
