"""Two sets of scored runs, paired window by window per seed and pooled over the seeds.

    python benchmarks/bench_paired_runs.py --targets 4.5 5 6 --seeds 0 1 2 3 4 \\
        --ours '/work/dmx_noce/dmx-default-{bits}-s{seed}' \\
        --theirs 'default=benchmarks/results/recipes-trajectory/cache/dmx-default-{bits}-s{seed}-f0.5-w40.json' \\
        --theirs 'KL=/work/fuse1/kl-{bits}-s{seed}' [--out FILE]

A variant of the search against the default search and KL of the same budgets and
calibration seeds: every run was scored on the same windows of both texts of
bench_rank_fusion's protocol (40 x 256 of wiki.test.raw and TinyStories). A pattern names
either an OUT directory scored with `dmx eval --save` (its eval.json) or a JSON cache of
bench_trajectory_mean / bench_rank_fusion (its "results"); ``{bits}`` and ``{seed}`` are
filled in. Each line is "ours minus theirs": pooled (each side's window losses averaged
over the seeds, then paired) and per seed, with the 95 % interval and the verdict of
dmx.eval.paired. Nothing is scored here: a run not scored on a text is refused.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_rank_fusion import TEXTS, WINDOWS  # noqa: E402  (one protocol)
from bench_trajectory_mean import pooled_minus, saved_result  # noqa: E402


def scored(path: Path, name: str, text: Path, windows: int) -> dict:
    """One run's result on one text ({"ppl", "window_nll", ...}): from an OUT's eval.json
    or a cache JSON's "results"; SystemExit naming what is missing."""
    if path.suffix == ".json":
        if not path.is_file():
            raise SystemExit(f"bench_paired_runs: {path} does not exist")
        result = json.loads(path.read_text()).get("results", {}).get(name)
    elif not (path / "eval.json").is_file():
        raise SystemExit(f"bench_paired_runs: {path} has no eval.json; run `dmx eval --save` "
                         f"on it")
    else:
        result = saved_result(path, text, windows)
    if result is None or result.get("window_nll") is None:
        raise SystemExit(f"bench_paired_runs: {path} is not scored on {name} ({text}, "
                         f"{windows} windows)")
    return result


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ours", required=True, metavar="PATTERN",
                   help="the runs compared, e.g. '/work/w/dmx-default-{bits}-s{seed}'")
    p.add_argument("--theirs", required=True, action="append", metavar="LABEL=PATTERN",
                   help="what they are compared with (repeatable)")
    p.add_argument("--targets", nargs="+", default=["4.5", "5", "6"])
    p.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    p.add_argument("--max-windows", type=int, default=WINDOWS)
    p.add_argument("--out", type=Path, default=None, help="also write the lines here")
    args = p.parse_args(argv)
    against = []
    for item in args.theirs:
        label, sep, pattern = item.partition("=")
        if not sep or not label or not pattern:
            p.error(f"--theirs takes LABEL=PATTERN, got {item!r}")
        against.append((label, pattern))
    args.theirs = against
    return args


def compare(args) -> list[str]:
    """The lines: per budget and text, ours minus each of theirs."""
    lines = []
    for bits in args.targets:
        for name, text in TEXTS.items():
            def runs(pattern):
                return [scored(Path(pattern.format(bits=bits, seed=s)), name, text,
                               args.max_windows) for s in args.seeds]
            ours = runs(args.ours)
            cells = [f"minus {label}: " + pooled_minus(args.seeds, runs(pattern), ours)
                     for label, pattern in args.theirs]
            lines.append(f"- {bits} bits, {name}: " + " | ".join(cells))
    return lines


def main(argv=None) -> int:
    args = _parse(argv)
    lines = [f"`python benchmarks/bench_paired_runs.py {' '.join(sys.argv[1:])}`", "",
             f"ours = {args.ours}; seeds {' '.join(args.seeds)}; ours minus theirs, ppl "
             f"(95 % interval, paired windows) and the verdict", "", *compare(args)]
    print("\n".join(lines))
    if args.out:
        from dmx.outdir import atomic_write_text
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
