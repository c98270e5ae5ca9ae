"""Are neighbouring evaluation windows independent enough for dmx.eval.paired's intervals?

`dmx eval` scores consecutive windows of one text, and `dmx report --against` judges two
runs by the mean of their per-window NLL differences with a standard error that treats the
windows as independent. Neighbouring windows of one article are alike, so the differences
could be autocorrelated, and the plain standard error then too small. This measures it on
OUTs already scored with `dmx eval --save` (no model is run):

    python benchmarks/bench_window_independence.py --work /work/dmx_unrot2 \\
        [--lags 3] [--results benchmarks/results/window_independence.md]

Pairs: every ``dmx-<recipe>-<bits>-s<seed>`` (and ``...-comb<seeds>``) OUT of a sweep
work dir against ``kl-<recipe>-<bits>-s<seed>`` (a combination against the KL of its first
seed), on every text both were scored on. Per text: the mean autocorrelation of the
differences at lags 1..L; the Newey-West (Bartlett, L lags) standard error over the plain
one (> 1: the plain interval is too narrow); and how many verdicts (lower / higher / tie)
change when the interval uses the Newey-West standard error instead. The same two numbers
for each run's own window NLLs (every OUT of the pairs once): what `dmx eval`'s interval
of one perplexity (dmx.eval.paired.nll_summary, Newey-West since this measurement) rests on.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

NAME = re.compile(r"^dmx-(?P<recipe>[\w.]+?)-(?P<bits>\d+(?:\.\d+)?)-(?:s(?P<seed>\d+)|"
                  r"comb(?P<seeds>[\d.]+))$")


def window_nll(out: Path) -> dict:
    path = out / "eval.json"
    if not path.is_file():
        return {}
    results = json.loads(path.read_text())["results"]
    return {k: np.array(v["window_nll"]) for k, v in results.items() if v.get("window_nll")}


def pairs(work: Path):
    for out in sorted(work.iterdir()):
        m = NAME.match(out.name)
        if not m:
            continue
        seed = m["seed"] or m["seeds"].split(".")[0]
        kl = work / f"kl-{m['recipe']}-{m['bits']}-s{seed}"
        if kl.is_dir():
            yield out, kl


def main(argv=None) -> int:
    from dmx.eval.paired import difference_interval, newey_west_se, paired
    from dmx.outdir import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="a bench_search_sweep.py work dir")
    p.add_argument("--lags", type=int, default=3)
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"
                                            / "window_independence.md"))
    args = p.parse_args(argv)
    by_text, single, read = {}, {}, {}
    for out, kl in pairs(Path(args.work)):
        for run in (out, kl):
            if run.name in read:  # a KL OUT pairs with several searches: read it once
                continue
            read[run.name] = window_nll(run)
            for text, x in read[run.name].items():
                if len(x) >= args.lags + 3:
                    single.setdefault(text, {})[run.name] = (
                        float(np.corrcoef(x[:-1], x[1:])[0, 1]),
                        newey_west_se(x.tolist(), args.lags) / newey_west_se(x.tolist(), 0))
        a_all, b_all = read[kl.name], read[out.name]
        for text in sorted(set(a_all) & set(b_all)):
            a, b = a_all[text], b_all[text]
            if len(a) != len(b) or len(a) < args.lags + 3:
                continue
            d = b - a
            plain = paired(a.tolist(), b.tolist())
            nw = newey_west_se(d.tolist(), args.lags)
            acf = [float(np.corrcoef(d[:-k], d[k:])[0, 1]) for k in range(1, args.lags + 1)]
            by_text.setdefault(text, []).append(dict(
                pair=f"{out.name} - {kl.name}", windows=len(d), acf=acf,
                factor=nw / plain["delta_nll_se"],
                plain=plain["verdict"],
                nw=difference_interval(plain["ppl_a"], plain["delta_nll"], nw, len(d))[1]))
    if not by_text:
        print(f"no dmx/kl pairs with per-window losses in {args.work}", file=sys.stderr)
        return 2
    lines = [f"# Are neighbouring evaluation windows independent? ({time.strftime('%Y-%m-%d')})",
             "", f"Command: `python benchmarks/bench_window_independence.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"| text | pairs | windows | mean autocorrelation, lags 1..{args.lags} | "
             f"Newey-West SE / plain SE: mean (min..max) | verdicts changed |",
             "|---|---|---|---|---|---|"]
    for text, rows in by_text.items():
        acf = np.mean([r["acf"] for r in rows], axis=0)
        f = np.array([r["factor"] for r in rows])
        changed = [r for r in rows if r["plain"] != r["nw"]]
        n = rows[0]["windows"]
        lines.append(f"| {text.split('|')[0]} | {len(rows)} | {n} | "
                     f"{', '.join(f'{x:+.3f}' for x in acf)} | {f.mean():.3f} "
                     f"({f.min():.3f}..{f.max():.3f}) | {len(changed)} of "
                     f"{len(rows)}" + "".join(f"; {r['pair']}: {r['plain']} -> {r['nw']}"
                                               for r in changed) + " |")
    lines += ["", "Each run's own window NLLs (one perplexity's interval):", "",
              "| text | runs | lag-1 autocorrelation: mean (min..max) | Newey-West SE / plain "
              "SE: mean (min..max) |", "|---|---|---|---|"]
    for text, runs in single.items():
        r = np.array(list(runs.values()))
        lines.append(f"| {text.split('|')[0]} | {len(r)} | {r[:, 0].mean():+.3f} "
                     f"({r[:, 0].min():+.3f}..{r[:, 0].max():+.3f}) | {r[:, 1].mean():.3f} "
                     f"({r[:, 1].min():.3f}..{r[:, 1].max():.3f}) |")
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(Path(args.results), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
