"""Search recipes on a real model (issue 11): dMX `--recipe default` and `--recipe paper` at
several budgets and seeds vs the KL heuristic at the same achieved bits and uniform
MXFP4/MXFP8, one evaluation protocol for all.

    python benchmarks/build_smollm2.py                     # the model (once, cached)
    python benchmarks/bench_recipes.py --targets 5 6 --seeds 0 1 --steps 24

Every search runs with ``--no-fill-budget``: what is evaluated is what the method found
(a search that ends over the target is still demoted to fit, and the table says how many
units that moved). KL runs at each search's achieved bits with the search's seed (its
calibration windows). Each command's line and output are kept under ``--results``
(``runs/<name>.log``), so a sweep can be spread over several sittings (``--reuse`` keeps
finished OUTs); ``--stages`` picks search, baseline, eval, table. The table gives the mean
and the spread (min..max) over seeds, the fraction of KL's remaining distance to MXFP8
that each recipe closes, the raw bits each recipe landed on, the Pareto plot, and
dynamics.png (one run per recipe) from `dmx report`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_MODEL = Path.home() / ".cache" / "dmx" / "smollm2-135m-instruct-f32"
WIKI = ROOT / "dmx" / "data" / "wikitext-2-raw"


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--calib", default=str(WIKI / "wiki.valid.raw"))
    p.add_argument("--eval", dest="eval_file", default=str(WIKI / "wiki.test.raw"))
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=64,
                   help="evaluate on the first N windows of the test text (0 = all)")
    p.add_argument("--recipes", nargs="+", default=["default", "paper"])
    p.add_argument("--targets", type=float, nargs="+", default=[5.0, 6.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--seqlen", type=int, default=128, help="calibration window length")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--kl-samples", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rotate", default="none", choices=("none", "hadamard", "learned"),
                   help="rotation for every run (issue 12): searches get --rotate; uniform and "
                        "KL baselines get hadamard too (learned: none, there is no loss to "
                        "learn it from, so the baselines run unrotated and the table says so)")
    p.add_argument("--extra", default="", help="more `dmx search` flags, one string")
    p.add_argument("--stages", default="search,baseline,eval,table")
    p.add_argument("--reuse", action="store_true", help="keep finished OUT dirs")
    p.add_argument("--work", default="/tmp/dmx_recipes", help="where the OUT dirs go")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "recipes"),
                   help="directory for recipes.md, the logs and the plots")
    return p.parse_args(argv)


def _dmx(args, name: str, argv: list[str]) -> None:
    """One `dmx` command in its own process; its command line and output go to
    results/runs/<name>.log (appended: a rerun adds to the record)."""
    logs = Path(args.results) / "runs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(args.threads)
    line = "dmx " + shlex.join(argv)
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "dmx", *argv], env=env, capture_output=True,
                          text=True)
    wall = time.time() - t0
    err = "\n".join(ln for ln in proc.stderr.splitlines() if "it/s]" not in ln
                    and "step/s]" not in ln and "s/step]" not in ln)
    with open(logs / f"{name}.log", "a") as fh:
        fh.write(f"$ {line}\n{proc.stdout}{err}\n# exit {proc.returncode}, {wall:.1f} s, "
                 f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n")
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SystemExit(f"bench_recipes: `{line}` failed with exit {proc.returncode}: {last}")


def _done(out: Path, need_eval: bool = False) -> bool:
    if not (out / "dmx_manifest.json").is_file():
        return False
    return not need_eval or (out / "eval.json").is_file()


def _manifest(out: Path) -> dict:
    return json.loads((out / "dmx_manifest.json").read_text())


def _ppl(out: Path) -> float:
    ev = json.loads((out / "eval.json").read_text())
    return ev["results"][ev["latest"]]["ppl"]


def main(argv=None) -> int:
    args = _parse(argv)
    stages = set(args.stages.split(","))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    eval_flags = ["--data", args.eval_file, "--seqlen", str(args.eval_seqlen), "--device",
                  args.device, "--no-progress"]
    if args.max_windows:
        eval_flags += ["--max-windows", str(args.max_windows)]

    def evaluate(out: Path) -> None:
        if "eval" in stages and _done(out) and not (args.reuse and _done(out, True)):
            _dmx(args, f"eval-{out.name}", ["eval", str(out), *eval_flags, "--save"])

    # the anchors first (cheap): unquantized, uniform MXFP4 and MXFP8
    ref = Path(args.results) / "unquantized.json"
    if "eval" in stages and not (args.reuse and ref.is_file()):
        _dmx(args, "eval-unquantized", ["eval", "--model", args.model, *eval_flags])
        log = (Path(args.results) / "runs" / "eval-unquantized.log").read_text()
        ppl = [ln for ln in log.splitlines() if "ppl" in ln][-1]
        ref.write_text(json.dumps({"protocol": ppl.strip()}) + "\n")
    base_rotate = ["--rotate", "hadamard"] if args.rotate == "hadamard" else []
    for fmt in ("fp4_e2m1", "fp8_e4m3"):
        out = work / f"uniform-{fmt}"
        if "baseline" in stages and not (args.reuse and _done(out)):
            _dmx(args, out.name, ["baseline", "--model", args.model, "--method", "uniform",
                                  "--format", fmt, "--device", args.device, "--no-progress",
                                  "--force", "-o", str(out), *base_rotate])
        evaluate(out)
    # seed-major: every recipe and target gets its first seed before any gets a second;
    # each search is evaluated, then KL at its achieved bits, so a cut-short sweep still
    # leaves complete pairs
    searches = [(r, t, s) for s in args.seeds for t in args.targets for r in args.recipes]
    for recipe, target, seed in searches:
        name = f"dmx-{recipe}-{target:g}-s{seed}"
        out = work / name
        if "search" in stages and not (args.reuse and _done(out)):
            _dmx(args, name, [
                "search", "--model", args.model, "--recipe", recipe, "--target-bits",
                repr(target), "--calib", args.calib, "--seqlen", str(args.seqlen),
                "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                "--seed", str(seed), "--device", args.device, "--no-fill-budget",
                "--checkpoint-every", "0", "--no-progress", "--force", "-o", str(out),
                "--rotate", args.rotate, *shlex.split(args.extra)])
        evaluate(out)
        kl = work / f"kl-{recipe}-{target:g}-s{seed}"
        if "baseline" in stages and _done(out) and not (args.reuse and _done(kl)):
            bits = _manifest(out)["avg_bits"]["simple"]
            _dmx(args, kl.name, [
                "baseline", "--model", args.model, "--method", "kl", "--target-bits",
                repr(bits), "--calib", args.calib, "--seqlen", str(args.seqlen),
                "--samples", str(args.kl_samples), "--seed", str(seed), "--device",
                args.device, "--no-progress", "--force", "-o", str(kl), *base_rotate])
        evaluate(kl)
        if "table" in stages:  # after every pair: the table is always current
            _table(args, work, time.time() - t_start)
    return 0


# ----------------------------------------------------------------------------- table
def _spread(values, spec: str = ".2f") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{spec}} (1 seed)"
    return (f"{statistics.mean(values):{spec}} ({min(values):{spec}}..{max(values):{spec}}, "
            f"{len(values)} seeds)")


def _table(args, work: Path, wall: float) -> None:
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    evaluated = {p.name: p for p in work.iterdir() if _done(p, need_eval=True)}
    fp8 = _ppl(evaluated["uniform-fp8_e4m3"]) if "uniform-fp8_e4m3" in evaluated else None
    fp4 = _ppl(evaluated["uniform-fp4_e2m1"]) if "uniform-fp4_e2m1" in evaluated else None
    lines = ["# Search recipes on a real model (issue 11)", "",
             f"Command: `python benchmarks/bench_recipes.py {shlex.join(sys.argv[1:])}`  ",
             f"Machine: CPU, {os.cpu_count()} cores ({platform.machine()}), {args.threads} "
             f"thread(s) per command; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"this invocation {wall / 60:.1f} min.", "",
             f"Model `{args.model}`; calibration {Path(args.calib).name} (windows of "
             f"{args.seqlen} tokens, {args.steps} steps x {args.batch_size}); evaluation: "
             f"{Path(args.eval_file).name}, first {args.max_windows or 'all'} windows of "
             f"{args.eval_seqlen} tokens. Searches ran with --no-fill-budget (what the "
             f"method found; a search over the target is demoted to fit). KL: "
             f"{args.kl_samples} calibration windows, at each search's achieved bits.",
             "", f"Rotation: searches `--rotate {args.rotate}`; baselines (uniform, KL) "
             + ("`--rotate hadamard`." if args.rotate == "hadamard" else "unrotated."), ""]
    unq = results / "unquantized.json"
    if unq.is_file():
        lines += [f"Unquantized: {json.loads(unq.read_text())['protocol']}", ""]
    lines += [f"Uniform MXFP4: {fp4 if fp4 is None else f'{fp4:.2f}'}; uniform MXFP8: "
              f"{fp8 if fp8 is None else f'{fp8:.2f}'}.", "",
              "| recipe | target | raw bits (found) | achieved bits | fit moves | dMX ppl "
              "| KL ppl (same bits) | dMX - KL | closed of KL's gap to MXFP8 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for target in args.targets:
        for recipe in args.recipes:
            raw, achieved, fits, ours, kls, closed = [], [], [], [], [], []
            for seed in args.seeds:
                d = evaluated.get(f"dmx-{recipe}-{target:g}-s{seed}")
                k = evaluated.get(f"kl-{recipe}-{target:g}-s{seed}")
                if d is None:
                    continue
                m = _manifest(d)
                raw.append(m["search"]["raw_bits"]["simple"])
                achieved.append(m["avg_bits"]["simple"])
                fits.append(sum(mv["step"] == "fit" for mv in m["search"]["budget_repair"]
                                ["moves"]))
                ours.append(_ppl(d))
                if k is not None:
                    kls.append(_ppl(k))
                    if fp8 is not None and kls[-1] > fp8:
                        closed.append((kls[-1] - ours[-1]) / (kls[-1] - fp8))
            if not ours:
                continue
            diff = [a - b for a, b in zip(ours, kls)] if len(kls) == len(ours) else []
            lines.append(
                f"| {recipe} | {target:g} | {_spread(raw, '.3f')} | {_spread(achieved, '.3f')} | "
                f"{sum(fits)} | {_spread(ours)} | {_spread(kls)} | {_spread(diff)} | "
                + (f"{100 * statistics.mean(closed):.0f}% "
                   f"({100 * min(closed):.0f}..{100 * max(closed):.0f}%)" if closed else "-")
                + " |")
    lines.append("")
    report = work / "report"
    order = sorted(evaluated)
    dyn = [evaluated[n] for n in order if n.startswith("dmx-") and n.endswith("-s0")]
    others = [evaluated[n] for n in order if not (n.startswith("dmx-") and n.endswith("-s0"))]
    subprocess.run([sys.executable, "-m", "dmx", "report", *map(str, dyn + others), "--force",
                    "-o", str(report)], check=True, capture_output=True)
    for png in ("pareto.png", "dynamics.png"):
        if (report / png).is_file():
            shutil.copyfile(report / png, results / png)
    lines += ["![perplexity vs average bits](pareto.png)", "",
              "Offset trajectories and soft vs hard bits of the seed-0 runs:", "",
              "![dynamics](dynamics.png)", "", "## `dmx report` of all runs", "",
              (report / "report.md").read_text().split("\n", 1)[1]
              .replace("](pareto.png)", "](pareto.png)")]
    (results / "recipes.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {results / 'recipes.md'}")


if __name__ == "__main__":
    raise SystemExit(main())
