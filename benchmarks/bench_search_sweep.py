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
    p.add_argument("--max-windows", type=int, default=None,
                   help="evaluate on the first N windows of the test text only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
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


def main(argv=None) -> int:
    args = _parse(argv)
    from dmx.search import search

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    common_eval = ["--eval-file", args.eval_file, "--seqlen", str(args.seqlen),
                   "--device", args.device]
    if args.max_windows:
        common_eval += ["--max-windows", str(args.max_windows)]
    rows = []  # (label, out_dir, wall seconds of producing it)

    for target in args.targets:
        out = work / f"dmx-{target:g}"
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

    for fmt in ("fp4_e2m1", "fp8_e4m3"):
        out = work / f"uniform-{fmt}"
        _, wall, _ = _cli(["baseline", "--model", args.model, "--method", "uniform",
                           "--format", fmt, "--force", "-o", str(out)])
        rows.append((f"uniform-{fmt}", out, wall, None))
    for label, _, _, achieved in list(rows):
        if not label.startswith("dmx-"):
            continue
        out = work / f"kl-{label[4:]}"
        _, wall, _ = _cli(["baseline", "--model", args.model, "--method", "kl", "--ladder",
                           args.ladder, "--target-bits", f"{achieved:.6f}", "--calib",
                           args.calib, "--seqlen", str(args.seqlen), "--device", args.device,
                           "--force", "-o", str(out)])
        rows.append((f"kl-{label[4:]}", out, wall, None))

    eval_walls = {}
    for label, out, _, _ in rows:
        _, wall, _ = _cli(["eval", str(out), *common_eval])
        eval_walls[label] = wall
    _, wall, _ = _cli(["eval", args.model, *common_eval])
    eval_walls["unquantized"] = wall

    report_md = work / "report.md"
    _cli(["report", *[str(out) for _, out, _, _ in rows], "--format", "markdown", "-o",
          str(report_md), "--force"])
    _write_results(args, rows, eval_walls, report_md.read_text())
    return 0


def _write_results(args, rows, eval_walls, report: str) -> None:
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
             "", "## Report (`dmx report`)", "", report.strip(), "",
             "## Wall time per step of the sweep", "", "| run | produce (s) | eval (s) |",
             "|---|---|---|"]
    for label, _, wall, _ in rows:
        lines.append(f"| {label} | {wall:.1f} | {eval_walls[label]:.1f} |")
    lines.append(f"| unquantized | - | {eval_walls['unquantized']:.1f} |")
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.results).with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, args.results)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    raise SystemExit(main())
