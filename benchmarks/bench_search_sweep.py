"""Quality sweep for issue #5: dMX at several budgets vs uniform MXFP4/MXFP8 and the KL
heuristic at the same achieved bits, on the embedded tiny-qwen3.

    python benchmarks/bench_search_sweep.py                       # CPU defaults
    python benchmarks/bench_search_sweep.py --device cuda --steps 400 --batch-size 8
    python benchmarks/bench_search_sweep.py --jobs 2 --threads 1    # two runs at a time

Calibrates on wiki.valid.raw and evaluates on wiki.test.raw (seqlen 256). For every
target it runs `dmx search`, then `dmx baseline` (uniform fp4/fp8 once, KL at each dMX
point's achieved bits), `dmx eval` on every OUT, and `dmx report`; the report table,
the settings, the machine and each step's wall time go to
benchmarks/results/search_sweep.md (``--results``), the pareto plot next to it
(``search_pareto.png``). ``--jobs N`` runs the independent commands of a stage (the
searches, the baselines, the evaluations) N at a time, each in its own process.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _parse(argv=None):
    from dmx import data

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(data.embedded_model_dir()))
    p.add_argument("--calib", default=str(data.default_calibration_file()))
    p.add_argument("--eval", dest="eval_file", default=str(data.default_eval_file()))
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--targets", type=float, nargs="+", default=[4.5, 5.0, 6.0, 7.0])
    p.add_argument("--ladder", default="fp8-fp4")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--recipe", default="default", help="dmx search --recipe: default or paper")
    p.add_argument("--lr", type=float, default=None, help="dmx search --lr (default: recipe's)")
    p.add_argument("--lam", type=float, default=None, help="hinge slope (dmx search --lam)")
    p.add_argument("--init", default=None, help="dmx search --init: low or target")
    p.add_argument("--extra", default="", help="more `dmx search` flags, one string")
    p.add_argument("--fill-budget", action=argparse.BooleanOptionalAction, default=None,
                   help="dmx search --fill-budget (default: the recipe's)")
    p.add_argument("--distill", action="store_true")
    p.add_argument("--weighting", default="simple")
    p.add_argument("--kl-samples", type=int, default=16,
                   help="calibration windows the KL baseline scores layers on (default 16)")
    p.add_argument("--max-windows", type=int, default=None,
                   help="evaluate on the first N windows of the test text only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is much faster on a crowded machine)")
    p.add_argument("--jobs", type=int, default=1,
                   help="commands run at a time within a stage, each in its own process")
    p.add_argument("--stages", default="search,baseline,eval,report",
                   help="comma-separated subset of search,baseline,eval,report")
    p.add_argument("--reuse", action="store_true",
                   help="keep OUT dirs already in --work (their manifest's wall time is "
                        "reported) instead of recomputing them")
    p.add_argument("--work", default="/tmp/dmx_search_sweep", help="where the OUT dirs go")
    p.add_argument("--results", default=str(ROOT / "benchmarks/results/search_sweep.md"))
    return p.parse_args(argv)


def _dmx(args, argv: list[str]) -> float:
    """Run one `dmx` command in its own process (``--threads`` torch/Numba threads): its
    wall seconds. Its stdout is echoed; a failure stops the sweep with its last line."""
    env = dict(os.environ)
    if args.threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            env[var] = str(args.threads)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "dmx", *argv], env=env, capture_output=True,
                          text=True)
    sys.stdout.write(proc.stdout)
    sys.stdout.flush()
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SystemExit(f"bench_search_sweep: `dmx {shlex.join(argv)}` failed with exit "
                         f"{proc.returncode}: {last}")
    return time.time() - t0


def _run_all(args, tasks: list) -> list:
    """Call the independent ``tasks`` (no-argument callables) ``--jobs`` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        return list(pool.map(lambda task: task(), tasks))


def _reusable(args, out: Path) -> bool:
    return args.reuse and (out / "dmx_manifest.json").is_file()


def _manifest(out: Path) -> dict:
    return json.loads((out / "dmx_manifest.json").read_text())


def _search_argv(args, target: float, out: Path) -> list[str]:
    argv = ["search", "--model", args.model, "--target-bits", repr(target), "--ladder",
            args.ladder, "--recipe", args.recipe, "--calib", args.calib, "--seqlen",
            str(args.seqlen), "--steps", str(args.steps), "--batch-size",
            str(args.batch_size), "--weighting", args.weighting, "--device", args.device,
            "--seed", str(args.seed), "--checkpoint-every", "0", "--no-progress", "--force",
            "-o", str(out), *shlex.split(args.extra)]
    for flag, value in (("--lr", args.lr), ("--lam", args.lam), ("--init", args.init)):
        if value is not None:
            argv += [flag, str(value)]
    if args.samples:
        argv += ["--samples", str(args.samples)]
    if args.distill:
        argv.append("--distill")
    if args.fill_budget is not None:
        argv.append("--fill-budget" if args.fill_budget else "--no-fill-budget")
    return argv


def main(argv=None) -> int:
    args = _parse(argv)
    t_sweep = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    stages = set(args.stages.split(","))
    # the average the search's penalty and the KL baseline's budget use
    bits_key = "simple" if args.weighting == "simple" else "size_weighted"

    dmx_outs = [(f"dmx-{t:g}", work / f"dmx-{t:g}", t) for t in args.targets]
    _run_all(args, [
        (lambda t=t, out=out: _dmx(args, _search_argv(args, t, out)))
        for _, out, t in dmx_outs if "search" in stages and not _reusable(args, out)])
    rows = []  # (label, out_dir, wall seconds of producing it (the manifest's), bits)
    for label, out, target in dmx_outs:
        m = _manifest(out)
        rows.append((label, out, m["wall_time_s"], m["avg_bits"][bits_key]))
        repair = m.get("search", {}).get("budget_repair") or {}
        print(f"dMX target {target:g}: achieved {m['avg_bits']['simple']:.3f} bits "
              f"(size-weighted {m['avg_bits']['size_weighted']:.3f}; hard assignment before "
              f"the budget repair {repair.get('bits_before', float('nan')):.3f}) in "
              f"{m['wall_time_s']:.1f} s", flush=True)
    if stages == {"search"}:
        return 0

    baselines = []  # (label, out, dmx argv)
    for fmt in ("fp4_e2m1", "fp8_e4m3"):
        out = work / f"uniform-{fmt}"
        baselines.append((f"uniform-{fmt}", out, [
            "baseline", "--model", args.model, "--method", "uniform", "--format", fmt,
            "--device", args.device, "--no-progress", "--force", "-o", str(out)]))
    for label, _, _, achieved in list(rows):
        out = work / f"kl-{label[4:]}"
        # the dMX point's achieved bits, exactly (KL never exceeds its target)
        baselines.append((f"kl-{label[4:]}", out, [
            "baseline", "--model", args.model, "--method", "kl", "--ladder", args.ladder,
            "--target-bits", repr(achieved), "--weighting", args.weighting, "--calib",
            args.calib, "--seqlen", str(args.seqlen), "--samples", str(args.kl_samples),
            "--seed", str(args.seed), "--device", args.device, "--no-progress", "--force",
            "-o", str(out)]))
    _run_all(args, [(lambda a=a: _dmx(args, a)) for _, out, a in baselines
                    if "baseline" in stages and not _reusable(args, out)])
    for label, out, _ in baselines:
        rows.append((label, out, _manifest(out)["wall_time_s"], None))

    eval_flags = ["--data", args.eval_file, "--seqlen", str(args.seqlen), "--device",
                  args.device, "--no-progress"]
    if args.max_windows:
        eval_flags += ["--max-windows", str(args.max_windows)]
    tasks = [lambda: _reference(args)]  # in this process, alongside the workers
    if "eval" in stages:
        tasks += [(lambda out=out: _dmx(args, ["eval", str(out), *eval_flags, "--save"]))
                  for _, out, _, _ in rows]
    reference, *walls = _run_all(args, tasks)
    eval_walls = {label: w for (label, _, _, _), w in zip(rows, walls)}
    eval_walls["unquantized"] = reference["wall_time_s"]
    print(f"unquantized: {reference['protocol']}", flush=True)

    report_dir = work / "report"
    _dmx(args, ["report", *[str(out) for _, out, _, _ in rows], "--reference-ppl",
                repr(reference["ppl"]), "--force", "-o", str(report_dir)])
    plot = Path(args.results).with_name("search_pareto.png")
    shutil.copyfile(report_dir / "pareto.png", plot)
    _write_results(args, rows, eval_walls, (report_dir / "report.md").read_text(), reference,
                   time.time() - t_sweep)
    print(f"wrote {plot}")
    return 0


def _reference(args) -> dict:
    """Perplexity of the unquantized model, same protocol (the report's reference line)."""
    from dmx.data import load_model_and_tokenizer
    from dmx.eval.command import evaluate

    t0 = time.time()
    model, tok = load_model_and_tokenizer(args.model, device=args.device)
    r = evaluate(model, tok, args.eval_file, args.seqlen, args.max_windows, progress=False)
    r["wall_time_s"] = time.time() - t0
    return r


def _write_results(args, rows, eval_walls, report: str, reference: dict,
                   sweep_s: float) -> None:
    import torch

    cmd = "python benchmarks/bench_search_sweep.py " + shlex.join(sys.argv[1:])
    device = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
              else f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})")
    lines = ["# dMX quality sweep (issue #5)", "",
             f"Command: `{cmd}`  ", f"Device: {device}; torch {torch.__version__}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"Model {args.model}; calibration {args.calib}; evaluation {args.eval_file}; "
             f"seqlen {args.seqlen}; ladder {args.ladder}; steps {args.steps}, batch "
             f"{args.batch_size}, samples {args.samples or args.steps * args.batch_size}, recipe "
             f"{args.recipe} {args.extra}, lr {args.lr}, lam {args.lam}, init {args.init}, "
             f"fill-budget {args.fill_budget} (None: the recipe's), "
             f"distill {args.distill}, weighting {args.weighting}, seed {args.seed}.",
             f"Whole sweep: {sweep_s / 60:.1f} min wall, {args.jobs} command(s) at a time, "
             f"{args.threads or 'default'} thread(s) each"
             f"{' (finished OUTs reused: their own wall times)' if args.reuse else ''}.",
             f"Unquantized model: {reference['protocol']}.", "",
             "## Report (`dmx report`)", "",
             # the report's plot is copied next to this file under another name
             report.strip().replace("](pareto.png)", "](search_pareto.png)"), "",
             "## Wall time per step of the sweep", "", "| run | produce (s) | eval (s) |",
             "|---|---|---|"]
    for label, _, wall, _ in rows:
        ev = eval_walls.get(label)
        lines.append(f"| {label} | {wall:.1f} | {'-' if ev is None else f'{ev:.1f}'} |")
    lines.append(f"| unquantized | - | {eval_walls['unquantized']:.1f} |")
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.results).with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, args.results)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    raise SystemExit(main())
