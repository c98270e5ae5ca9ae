"""`dmx search --seeds` one after another vs `--jobs N` side by side, in one run.

    python benchmarks/bench_seed_jobs.py                       # SmolLM2-135M if built, 2 seeds
    python benchmarks/bench_seed_jobs.py --model embedded --steps 40
    python benchmarks/bench_seed_jobs.py --seeds 0 --fuse-kl   # one search + its KL baseline

Both commands get the same cores: sequential with ``--threads C`` (C = the cores), parallel
with ``--jobs N --threads C/N``. Each is a fresh `python -m dmx search` process (model load,
the searches, the calibration perplexity at the end, the combination), timed wall to wall.
The two combined OUTs are compared layer by layer (the searches are the same; only the thread
count of their float sums differs). ``--fuse-kl``: every seed also gets its KL baseline
(`--kl-samples`), run in the same pool with ``--jobs`` (with one seed: beside the search).
Output: benchmarks/results/seed_jobs.md (seed_jobs_fuse_kl.md with ``--fuse-kl``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dmx.outdir import atomic_write_text, read_manifest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling build_smollm2
from build_smollm2 import DEFAULT_OUT  # noqa: E402  (where the benchmarks' model is built)

SMOLLM2 = DEFAULT_OUT.expanduser()
EMBEDDED = ROOT / "dmx" / "data" / "tiny-qwen3"


def _run(argv: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dmx", "search", *argv], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench_seed_jobs: `dmx search {' '.join(argv)}` failed:\n{proc.stderr[-2000:]}")
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir; `embedded` = tiny-qwen3 "
                    "(default: SmolLM2-135M from benchmarks/build_smollm2.py, else embedded)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--fuse-kl", action="store_true",
                    help="a KL baseline per seed too, fused (dmx search --fuse-kl)")
    ap.add_argument("--kl-samples", type=int, default=4)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    model = (EMBEDDED if args.model == "embedded" else Path(args.model) if args.model
             else SMOLLM2 if SMOLLM2.is_dir() else EMBEDDED)
    tasks = len(args.seeds) * (2 if args.fuse_kl else 1)  # searches (and KL baselines)
    jobs = min(tasks, args.cores)
    per_job = max(1, args.cores // jobs)  # the same cores for both commands
    common = ["--model", str(model), "--target-bits", "6", "--steps", str(args.steps),
              "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size),
              "--export-target", "none", "--checkpoint-every", "0", "--no-progress",
              "--seeds", *map(str, args.seeds)]
    if args.fuse_kl:
        common += ["--fuse-kl", "--kl-samples", str(args.kl_samples)]
    work = Path(tempfile.mkdtemp(prefix="dmx-seed-jobs-"))
    try:
        seq = _run([*common, "--threads", str(args.cores), "-o", str(work / "seq")])
        par = _run([*common, "--jobs", str(jobs), "--threads", str(per_job),
                    "-o", str(work / "par")])
        seq_fmt, par_fmt = ({n: e["format"] for n, e in
                             read_manifest(work / d)["layers"].items()} for d in ("seq", "par"))
        differ = sum(seq_fmt[n] != par_fmt[n] for n in seq_fmt)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0]
    what = " --fuse-kl" if args.fuse_kl else ""
    lines = [
        f"# `dmx search --seeds{what}`: one after another vs `--jobs`",
        "",
        f"`python benchmarks/bench_seed_jobs.py{''.join(' ' + arg for arg in sys.argv[1:])}`",
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.cores} cores; load "
        f"average {load:.2f} at the end). Model {model.name}, seeds "
        f"{' '.join(map(str, args.seeds))}, {args.steps} steps x {args.batch_size} x "
        f"{args.seqlen} each" + (f", each with its KL baseline ({args.kl_samples} windows)"
                                 if args.fuse_kl else "") +
        "; wall time of the whole command (model load per process, searches, combination).",
        "",
        "| command | wall s |",
        "|---|---|",
        f"| `--threads {args.cores}` (one after another) | {seq:.1f} |",
        f"| `--jobs {jobs} --threads {per_job}` | {par:.1f} |",
        "",
        f"Speed-up of `--jobs`: **{seq / par:.2f}x**. Layers whose format differs between "
        f"the two combined OUTs: {differ} of {len(seq_fmt)} (the searches are the same; only the "
        "thread count of their float sums differs).",
        "",
    ]
    out = Path(args.results) / ("seed_jobs_fuse_kl.md" if args.fuse_kl else "seed_jobs.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
