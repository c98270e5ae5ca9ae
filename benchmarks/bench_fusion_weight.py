"""How much of `dmx combine --kl`'s fused rank should be KL's? One search fused with its
seed's KL baseline at several KL weights w, each against that KL baseline, on a window
range of both evaluation texts.

    python benchmarks/bench_fusion_weight.py --work /work/dmx_traj \\
        --kl '/work/traj_kl/kl-s{seed}' --kl-out '/work/fuse1/kl-{bits}-s{seed}' \\
        --targets 4.5 5 6 --seeds 0 1 2 3 4 --weights 0.25 0.5 0.75 \\
        --windows 0:40 [--with-search] [--fraction 0.5 [F ...]] [--rule mean max] \\
        [--threads 1] [--jobs 2] [--results DIR]

The fused score is (1 - w) x rank(the search's offset) + w x rank(KL's sensitivity)
(dmx.search.rank_fusion.fused_order, rule "mean"; w = 0.5 is `dmx combine --kl --kl-rule
mean`, the default for several searches), or with ``--rule max`` the better of the two
ranks (`dmx combine --kl`'s default for one search). For each
search ``dmx-default-<bits>-s<seed>`` of --work, the offsets are those `dmx search`
assigns from (the mean of the last --fraction of its steps, `--average-last`; 0: the final
offsets; with several fractions, each one's columns and its difference from the first's),
ranked with the sensitivities of the KL OUT --kl, promoted greedily to the search's budget
(KL's rule), fake-quantized (dmx.nn.layers.apply_formats) and scored on windows FIRST:END
of 256 tokens of WikiText test and TinyStories. The KL side is the KL OUT --kl-out of the
same budget and seed, fake-quantized with its manifest's formats
(``--windows 0:40``: its `dmx eval --save` results, the numbers every earlier table used).
``--with-search`` also scores each search alone: its trajectory mean put on the nearest
rungs and repaired to the budget, as `dmx search --average-last` assigns
(bench_trajectory_mean.assignment). Another window range than 0:40 replicates a table on
windows no earlier choice was made on.
Every comparison is paired window by window (dmx.eval.paired), pooled over the seeds by
averaging each side's window losses. Scorings are cached in --results/cache/. Writes
--results/fusion_weight-<FIRST>-<END>[+...].md (a table per range; with several ranges, one
more of all of them pooled, each run's window losses concatenated) and prints it.
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
from bench_trajectory_mean import assignment  # noqa: E402  (--average-last's rule)

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--kl", required=True, metavar="PATTERN",
                   help="the KL OUT whose sensitivities are fused, PATTERN.format(seed=...)")
    p.add_argument("--kl-out", required=True, metavar="PATTERN",
                   help="the KL baseline compared with, PATTERN.format(bits=..., seed=...)")
    p.add_argument("--targets", nargs="+", default=["4.5", "5", "6"])
    p.add_argument("--seeds", nargs="+", default=["0", "1", "2", "3", "4"],
                   help="one search per entry; a dotted entry (0.1.2) is a set: its searches' "
                        "offsets averaged (`dmx combine`) and fused with its seeds' KL "
                        "baselines, against those KL baselines' window losses averaged")
    p.add_argument("--weights", nargs="*", type=float, default=[0.25, 0.5, 0.75],
                   help="KL's shares of the fused rank (none: with --with-search, the "
                        "searches alone)")
    p.add_argument("--windows", nargs="+", default=["0:40"], metavar="FIRST:END",
                   help="window ranges scored; with several, a table per range and one of "
                        "all of them pooled")
    p.add_argument("--fraction", nargs="+", type=float, default=[0.5],
                   help="`--average-last` fractions (0: the final offsets); with several, "
                        "each is also compared with the first")
    from dmx.search.rank_fusion import RULES
    p.add_argument("--rule", nargs="+", choices=tuple(RULES), default=["mean"],
                   help="how the two ranks fuse (dmx.search.rank_fusion.fused_order): mean, "
                        "at each --weights, and/or max, the better of the two (no weight); "
                        "with both, max is also compared with w = 0.5")
    p.add_argument("--with-search", action="store_true",
                   help="also each search alone (its trajectory mean, repaired) against KL")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--results", type=Path,
                   default=ROOT / "benchmarks" / "results" / "recipes-fusion-weight")
    args = p.parse_args(argv)
    args.weights = (args.weights if "mean" in args.rule else []) + \
        (["max"] if "max" in args.rule else [])
    args.ranges = []
    for r in args.windows:
        first, _, end = r.partition(":")
        if not (first.isdigit() and end.isdigit()) or int(end) <= int(first):
            p.error(f"--windows {r}: give FIRST:END with 0 <= FIRST < END")
        args.ranges.append((int(first), int(end) - int(first)))
    return args


def out_formats(out: Path) -> tuple:
    """(source model, weight formats, input formats) an OUT's manifest records."""
    from dmx.outdir import read_manifest
    m = read_manifest(out)
    return (m["source_model"], {n: e["format"] for n, e in m["layers"].items()},
            {n: e.get("act_format") for n, e in m["layers"].items()})


def formats_of(job: tuple) -> tuple:
    """(source model, weight formats, input formats) of one job: ("fused", search, kl, w,
    fraction), ("search", search, fraction) -- the search alone, its trajectory mean
    repaired as `dmx search` does (bench_trajectory_mean.assignment) -- or ("kl", out)."""
    if job[0] == "kl":
        return out_formats(job[1])
    if job[0] == "search":
        a = assignment(list(job[1]), job[2])
    else:
        w = job[3]
        a = (assignment(list(job[1]), job[4], kl=list(job[2]), rule="max") if w == "max"
             else assignment(list(job[1]), job[4], kl=list(job[2]), kl_weight=w, rule="mean"))
    return a["model"], a["formats"], a["acts"]


def _same_scoring(cache: Path, model_dir: str, formats: dict, acts: dict) -> dict | None:
    """An earlier scoring in ``cache``'s folder, on the same windows, of the same formats
    (another fraction or weight often assigns the same layers): reused, not rescored."""
    first, end = cache.name.rsplit("-", 2)[-2:]   # "...-<first>-<end>.json"
    for f in sorted(cache.parent.glob(f"*-{first}-{end}")):
        if f == cache:
            continue
        record = json.loads(f.read_text())
        # records written before 2026-12-07 name neither: they are all of one model
        if (record["formats"] == formats and record.get("acts", acts) == acts
                and Path(record.get("model", model_dir)) == Path(model_dir)):
            return record
    return None


def score(job: tuple, cache: Path, threads: int | None, first: int, count: int) -> dict:
    """Scores of one job (:func:`formats_of`), cached; a cached record of other formats (made
    by an older rule) is scored again."""
    model_dir, formats, acts = formats_of(job)
    if cache.is_file():
        record = json.loads(cache.read_text())
        if record["formats"] == formats:
            return record
    same = _same_scoring(cache, model_dir, formats, acts)
    if same is not None:
        record = {**same, "job": [str(j) for j in job], "from": same["job"]}
        _write(cache, record)
        return record
    from dmx import data
    from dmx.nn.layers import apply_formats
    from dmx.threads import set_threads

    if threads:
        set_threads(threads)
    t0 = time.time()
    model, tok = data.load_model_and_tokenizer(model_dir)
    apply_formats(model, formats, acts)
    record = {"job": [str(j) for j in job], "model": str(model_dir), "formats": formats,
              "acts": acts, "results": score_on_texts(model, tok, count, first),
              "seconds": round(time.time() - t0, 1)}
    _write(cache, record)
    return record


def _write(cache: Path, record: dict) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(cache)


def _saved(out: Path, text: Path, count: int) -> dict | None:
    from dmx.outdir.evaljson import find_result, load_eval
    return find_result(load_eval(out), text, SEQLEN, count)


def _tag(w) -> str:
    """A fused entry's name in the cache files: its KL weight, or "max" (the max rule)."""
    return w if w == "max" else f"{w:g}"


def _members(tag: str) -> list:
    """The seeds of a --seeds entry: "0" is one search, "0.1.2" a set of three."""
    return tag.split(".")


def _jobs(args, first: int, count: int) -> list:
    """[(job, cache file)] of one window range."""
    rng, cache, out = f"{first}-{first + count}", args.results / "cache", []
    for bits in args.targets:
        for tag in args.seeds:
            seeds = _members(tag)
            searches = tuple(args.work / f"dmx-default-{bits}-s{s}" for s in seeds)
            # a KL OUT shared by two members (a pair linked to one baseline) is fused once:
            # `dmx combine` refuses it twice, and averaging it with itself changes nothing
            kls = tuple(dict.fromkeys(Path(args.kl.format(seed=s)).resolve() for s in seeds))
            for f in args.fraction:
                for w in args.weights:
                    out.append((("fused", searches, kls, w, f),
                                cache / f"fused-{bits}-s{tag}-w{_tag(w)}-f{f:g}-{rng}.json"))
                if args.with_search:
                    out.append((("search", searches, f),
                                cache / f"search-{bits}-s{tag}-f{f:g}-{rng}.json"))
            for seed in seeds:   # each KL baseline once, even where two sets share it
                kl_out = Path(args.kl_out.format(bits=bits, seed=seed))
                # windows 0-...: its own `dmx eval --save` results, when it has them
                saved = first == 0 and all(_saved(kl_out, t, count) for t in TEXTS.values())
                job = (("kl", kl_out), cache / f"kl-{bits}-s{seed}-{rng}.json")
                if not saved and job not in out:
                    out.append(job)
    return out


def main(argv=None) -> int:
    from dmx.eval.paired import paired, paired_line

    args = _parse(argv)
    t0 = time.time()
    cache = args.results / "cache"
    work = [(job, f, first, count) for first, count in args.ranges
            for job, f in _jobs(args, first, count)]
    calls = [list(c) for c in zip(*work)]
    if args.jobs == 1:
        from dmx.threads import set_threads
        set_threads(args.threads)
        done = dict(zip(calls[1], map(score, calls[0], calls[1], [None] * len(work),
                                      calls[2], calls[3])))
    else:   # each scoring in a process of its own (its own torch thread pool)
        with ProcessPoolExecutor(args.jobs) as pool:
            done = dict(zip(calls[1], pool.map(score, calls[0], calls[1],
                                               [args.threads] * len(work), *calls[2:])))

    def kl_side(bits, seed, name, first, count) -> list:
        f = cache / f"kl-{bits}-s{seed}-{first}-{first + count}.json"
        if f in done:
            return done[f]["results"][name]["window_nll"]
        return _saved(Path(args.kl_out.format(bits=bits, seed=seed)), TEXTS[name],
                      count)["window_nll"]

    def side(bits, tag, name, w, f, first, count) -> list:
        """One entry's window losses on one range (w: a weight, "search", or None for KL:
        the KL baselines of a set's seeds, their window losses averaged; f: the fraction)."""
        rng = f"{first}-{first + count}"
        if w is None:
            return list(np.mean([kl_side(bits, s, name, first, count)
                                 for s in _members(tag)], axis=0))
        file = (cache / f"search-{bits}-s{tag}-f{f:g}-{rng}.json" if w == "search"
                else cache / f"fused-{bits}-s{tag}-w{_tag(w)}-f{f:g}-{rng}.json")
        return done[file]["results"][name]["window_nll"]

    def losses(bits, name, w, f, ranges) -> list:
        """The window losses over ``ranges`` (concatenated), averaged over the seeds."""
        return list(np.mean([sum((side(bits, s, name, w, f, *r) for r in ranges), [])
                             for s in args.seeds], axis=0))

    several = len(args.fraction) > 1
    kinds = (["search"] if args.with_search else []) + args.weights
    entries = [(f, w) for f in args.fraction for w in kinds]

    def label(f, w) -> str:
        what = ("search alone" if w == "search" else "the better rank" if w == "max"
                else f"w = {w:g}")
        return f"f = {f:g}, {what}" if several else what

    # the differences shown: each weight from w = 0.5 at the same fraction, and with
    # several fractions each entry from the first fraction's
    pairs = [((f, 0.5), (f, w)) for f, w in entries
             if 0.5 in args.weights and w not in ("search", 0.5)]
    pairs += [((args.fraction[0], w), (f, w)) for f, w in entries if f != args.fraction[0]]

    def table(ranges) -> list:
        rows = []
        for bits in args.targets:
            for name in TEXTS:
                kl = losses(bits, name, None, None, ranges)
                cells = [f"{np.exp(np.mean(kl)):.2f}"]
                for f, w in entries:
                    ours = losses(bits, name, w, f, ranges)
                    cells.append(f"{np.exp(np.mean(ours)):.2f}: "
                                 + paired_line(paired(kl, ours)))
                cells += [paired_line(paired(losses(bits, name, a[1], a[0], ranges),
                                             losses(bits, name, b[1], b[0], ranges)))
                          for a, b in pairs]
                rows.append(f"| {bits} | {name} | " + " | ".join(cells) + " |")
        head = (["bits", "text", "KL ppl"]
                + [f"{label(f, w)}: ppl, minus KL" for f, w in entries]
                + [f"{label(*b)} minus {label(*a)}" for a, b in pairs])
        which = " + ".join(f"{a}-{a + n - 1}" for a, n in ranges)
        return [f"## Windows {which}", "", "| " + " | ".join(head) + " |",
                "|" + "---|" * len(head), *rows, ""]

    tables = [line for r in args.ranges for line in table([r])]
    if len(args.ranges) > 1:
        tables += table(args.ranges)
    names = "+".join(f"{a}-{a + n}" for a, n in args.ranges)
    if several:
        names += "-f" + "+".join(f"{f:g}" for f in args.fraction)
    text = "\n".join([
        "# Fusion weight: one search fused with its KL baseline", "",
        f"Command: `python benchmarks/bench_fusion_weight.py {' '.join(argv or sys.argv[1:])}`  ",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {(time.time() - t0) / 60:.1f} "
        f"min. Seeds {', '.join(args.seeds)} pooled (each side's window losses averaged over "
        f"the seeds); windows of {SEQLEN} tokens of each text, every token scored; w = KL's "
        f"share of the fused rank; offsets: "
        + ", ".join(f"f = {f:g}: " + (f"the mean of the last {f:g} of the steps" if f
                                      else "the final ones") for f in args.fraction)
        + ". "
        f"Paired differences, 95 % interval over the windows, tie when it includes 0.", "",
        *tables])
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"fusion_weight-{names}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
