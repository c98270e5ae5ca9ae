"""KL sensitivities with the blocks before each unit replayed vs full passes, in one run.

    python benchmarks/bench_kl_replay.py                   # SmolLM2-135M if built, 4 windows
    python benchmarks/bench_kl_replay.py --model embedded --samples 8

`dmx baseline --method kl` (and `dmx search --fuse-kl`) runs one forward pass per unit with
that unit alone quantized. Since 2026-12-08 a unit's pass starts at its own decoder block,
the blocks before it returning what they returned in the unquantized reference pass
(dmx.search.replay). This times `kl_sensitivities` both ways on the same model, windows and
thread count, alternating the order over ``--repeats``, and checks that the sensitivities
are bit for bit equal. The anchor is the full pass (the code before 2026-12-08, kept as
the no-replay path). Output: benchmarks/results/kl_replay.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling build_smollm2
from build_smollm2 import DEFAULT_OUT  # noqa: E402  (where the benchmarks' model is built)

SMOLLM2 = DEFAULT_OUT.expanduser()


def _timed(replayed: bool, model, units, windows, batch_size):
    from dmx.search import baseline

    t0 = time.perf_counter()
    sens = baseline.kl_sensitivities(model, units, windows, "fp4_e2m1", batch_size=batch_size,
                                     progress=False, replay_blocks=replayed)
    return time.perf_counter() - t0, sens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir; `embedded` = tiny-qwen3 "
                    "(default: SmolLM2-135M from benchmarks/build_smollm2.py, else embedded)")
    ap.add_argument("--samples", type=int, default=4, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="timings of each way, alternated")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    import torch

    from dmx import data
    from dmx.outdir import atomic_write_text
    from dmx.search import baseline

    torch.set_num_threads(args.threads)
    model_dir = (data.embedded_model_dir() if args.model == "embedded" else
                 Path(args.model) if args.model else
                 SMOLLM2 if SMOLLM2.is_dir() else data.embedded_model_dir())
    model = baseline._load(model_dir, "cpu")[0]
    windows = data.calibration_windows(data.load_tokenizer(model_dir),
                                       [str(data.default_calibration_file())], args.seqlen,
                                       args.samples, 0)
    units = [(n,) for n in baseline.quantizable_layers(model)]
    load0 = os.getloadavg()[0]
    times = {True: [], False: []}
    sens = {}
    for r in range(args.repeats):
        for replayed in ((False, True) if r % 2 == 0 else (True, False)):
            t, sens[replayed] = _timed(replayed, model, units, windows, args.batch_size)
            times[replayed].append(t)
            print(f"{'replayed' if replayed else 'full passes'}: {t:.1f} s", flush=True)
    bits = {k: np.array(list(v.values()), dtype=np.float64).view(np.uint64)
            for k, v in sens.items()}
    equal = list(sens[True]) == list(sens[False]) and np.array_equal(bits[True], bits[False])
    full, rep = min(times[False]), min(times[True])
    lines = [
        "# KL sensitivities: blocks replayed vs full passes",
        "",
        f"Command: `python benchmarks/bench_kl_replay.py {' '.join(sys.argv[1:])}`".rstrip() + "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{args.threads}, load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"Model `{model_dir}`: {len(units)} units (one per linear), {windows.shape[0]} "
        f"windows x {args.seqlen} tokens, batch {args.batch_size}; best of {args.repeats} "
        "each, the order alternated.",
        "",
        "| way | seconds (each run) | best |",
        "|---|---|---|",
        f"| full passes (the anchor) | {', '.join(f'{t:.1f}' for t in times[False])} | {full:.1f} |",
        f"| blocks before each unit replayed | {', '.join(f'{t:.1f}' for t in times[True])} | {rep:.1f} |",
        "",
        f"**Speed-up: {full / rep:.2f}x.** Sensitivities bit for bit equal: "
        f"**{'yes' if equal else 'NO'}** ({len(units)} values compared as float64 bits).",
    ]
    out = Path(args.results) / "kl_replay.md"
    atomic_write_text(out, "\n".join(lines) + "\n")
    print("\n".join(lines[-1:]))
    print(f"wrote {out}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
