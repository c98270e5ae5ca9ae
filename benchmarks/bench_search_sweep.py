"""Quality sweep for issue #5: dMX at several budgets vs uniform MXFP4/MXFP8 and the KL
heuristic at the same achieved bits, on the embedded tiny-qwen3.

    python benchmarks/bench_search_sweep.py                       # CPU defaults
    python benchmarks/bench_search_sweep.py --device cuda --steps 400 --batch-size 8

Calibrates on wiki.valid.raw and evaluates on wiki.test.raw (seqlen 256). For every
target it runs `dmx search`, then `dmx baseline` (uniform fp4/fp8 once, KL at each dMX
point's achieved bits), `dmx eval` on every OUT, and `dmx report`; the report table,
the settings, the machine and each step's wall time go to
benchmarks/results/search_sweep.md (``--results``).
"""
from __future__ import annotations

import argparse
import contextlib
import io as _io
import json
import os
import platform
import shlex
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
    p.add_argument("--lr", type=float, default=1.0)
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
    p.add_argument("--stages", default="search,baseline,eval,report",
                   help="comma-separated subset of search,baseline,eval,report")
    p.add_argument("--reuse", action="store_true",
                   help="keep OUT dirs already in --work (their manifest's wall time is "
                        "reported) instead of recomputing them")
    p.add_argument("--work", default="/tmp/dmx_search_sweep", help="where the OUT dirs go")
    p.add_argument("--results", default=str(ROOT / "benchmarks/results/search_sweep.md"))
    return p.parse_args(argv)


def _cli(argv: list[str]) -> tuple[int, float, str]:
    """Run one `dmx` command in-process: (exit code, wall seconds, its stdout)."""
    from dmx.cli import main

    buf = _io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    out = buf.getvalue()
    sys.stdout.write(out)
    if rc:
        raise SystemExit(f"bench_search_sweep: `dmx {shlex.join(argv)}` failed with exit {rc}")
    return rc, time.time() - t0, out


def _reusable(args, out: Path) -> bool:
    return args.reuse and (out / "dmx_manifest.json").is_file()


def main(argv=None) -> int:
    args = _parse(argv)
    from dmx.search import search

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []  # (label, out_dir, wall seconds of producing it)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    stages = set(args.stages.split(","))
    for target in args.targets:
        out = work / f"dmx-{target:g}"
        if _reusable(args, out) or "search" not in stages:
            m = json.loads((out / "dmx_manifest.json").read_text())
            rows.append((f"dmx-{target:g}", out, m["wall_time_s"], m["avg_bits"]["simple"]))
            continue
        t0 = time.time()
        r = search(args.model, target, ladder=args.ladder, calib=[args.calib],
                   seqlen=args.seqlen, samples=args.samples, steps=args.steps,
                   batch_size=args.batch_size, lr=args.lr, device=args.device, seed=args.seed,
                   out=out, force=True, distill=args.distill, weighting=args.weighting,
                   checkpoint_every=0)
        wall = time.time() - t0
        a = r["achieved_bits"]
        print(f"dMX target {target:g}: achieved {a['simple']:.3f} bits "
              f"(size-weighted {a['size_weighted']:.3f}) in {wall:.1f} s", flush=True)
        rows.append((f"dmx-{target:g}", out, wall, a["simple"]))

    if stages == {"search"}:
        return 0
    for fmt in ("fp4_e2m1", "fp8_e4m3"):
        out = work / f"uniform-{fmt}"
        rows.append((f"uniform-{fmt}", out, _produce(args, stages, out, [
            "baseline", "--model", args.model, "--method", "uniform", "--format", fmt,
            "--device", args.device, "--no-progress", "--force", "-o", str(out)]), None))
    for label, _, _, achieved in list(rows):
        if not label.startswith("dmx-"):
            continue
        out = work / f"kl-{label[4:]}"
        # the dMX point's achieved bits, exactly (KL never exceeds its target)
        rows.append((f"kl-{label[4:]}", out, _produce(args, stages, out, [
            "baseline", "--model", args.model, "--method", "kl", "--ladder", args.ladder,
            "--target-bits", repr(achieved), "--weighting", args.weighting, "--calib",
            args.calib, "--seqlen", str(args.seqlen), "--samples", str(args.kl_samples),
            "--seed", str(args.seed), "--device", args.device, "--no-progress", "--force",
            "-o", str(out)]), None))

    eval_walls = {}
    eval_flags = ["--data", args.eval_file, "--seqlen", str(args.seqlen), "--device",
                  args.device, "--no-progress"]
    if args.max_windows:
        eval_flags += ["--max-windows", str(args.max_windows)]
    if "eval" in stages:
        for label, out, _, _ in rows:
            _, eval_walls[label], _ = _cli(["eval", str(out), *eval_flags, "--save"])
    reference = _reference(args)
    eval_walls["unquantized"] = reference["wall_time_s"]
    print(f"unquantized: {reference['protocol']}", flush=True)

    report_dir = work / "report"
    _cli(["report", *[str(out) for _, out, _, _ in rows], "--reference-ppl",
          repr(reference["ppl"]), "--force", "-o", str(report_dir)])
    _write_results(args, rows, eval_walls, (report_dir / "report.md").read_text(), reference)
    return 0


def _produce(args, stages, out: Path, argv: list[str]) -> float:
    """Make one baseline OUT (or reuse it): the wall seconds it took."""
    if _reusable(args, out) or "baseline" not in stages:
        return json.loads((out / "dmx_manifest.json").read_text())["wall_time_s"]
    return _cli(argv)[1]


def _reference(args) -> dict:
    """Perplexity of the unquantized model, same protocol (the report's reference line)."""
    from dmx.data import load_model_and_tokenizer
    from dmx.evaluate import evaluate

    t0 = time.time()
    model, tok = load_model_and_tokenizer(args.model, device=args.device)
    r = evaluate(model, tok, args.eval_file, args.seqlen, args.max_windows, progress=False)
    r["wall_time_s"] = time.time() - t0
    return r


def _write_results(args, rows, eval_walls, report: str, reference: dict) -> None:
    import torch

    cmd = "python benchmarks/bench_search_sweep.py " + shlex.join(sys.argv[1:])
    device = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
              else f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})")
    lines = ["# dMX quality sweep (issue #5)", "",
             f"Command: `{cmd}`  ", f"Device: {device}; torch {torch.__version__}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"Model {args.model}; calibration {args.calib}; evaluation {args.eval_file}; "
             f"seqlen {args.seqlen}; ladder {args.ladder}; steps {args.steps}, batch "
             f"{args.batch_size}, samples {args.samples or args.steps * args.batch_size}, lr "
             f"{args.lr}, distill {args.distill}, weighting {args.weighting}, seed {args.seed}.",
             f"Unquantized model: {reference['protocol']}.", "",
             "## Report (`dmx report`)", "", report.strip(), "",
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
