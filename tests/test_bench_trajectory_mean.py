"""benchmarks/bench_trajectory_mean.py: the mean of a search's last steps' offsets, and the
assignment scored from it, on a real (short) search of the embedded model."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
_spec = importlib.util.spec_from_file_location("bench_trajectory_mean",
                                               ROOT / "benchmarks" / "bench_trajectory_mean.py")
traj = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(traj)


def test_trajectory_mean_averages_the_last_steps_clamped_to_the_ladder():
    from dmx.quant.ladders import get_ladder

    lad = get_ladder("fp8-fp4")
    lo, hi = lad.low.position, lad.high.position
    log = {"units": ["a", "b"],
           "steps": [{"offsets": [lo - 5.0, 0.0]}, {"offsets": [lo, hi + 3.0]},
                     {"offsets": [hi, hi]}, {"offsets": [lo, lo]}]}
    # last ceil(0.5 x 4) = 2 steps
    assert traj.trajectory_mean(log, 0.5, lad) == {"a": (hi + lo) / 2, "b": (hi + lo) / 2}
    # last ceil(0.6 x 4) = 3 steps; b's hi + 3 counts as hi (the forward pass's clamp)
    assert traj.trajectory_mean(log, 0.6, lad) == pytest.approx(
        {"a": (lo + hi + lo) / 3, "b": (hi + hi + lo) / 3})
    assert traj.trajectory_mean(log, 0.01, lad) == {"a": lo, "b": lo}   # at least one step


@pytest.mark.usefixtures("single_threaded")   # main() sets this process's threads
def test_the_final_steps_alone_reproduce_the_searchs_own_out(tmp_path, capsys):
    """f so small that only the last step is averaged: the assignment is the search's own
    (its final offsets, no repair needed), so the score equals `dmx eval` of its OUT
    bit for bit: the probe measures what it claims and nothing else."""
    from dmx.cli import main
    from dmx.data import embedded_model_dir

    out = tmp_path / "dmx-default-5-s0"
    assert main(["search", "--model", str(embedded_model_dir()), "--target-bits", "5",
                 "--steps", "3", "--batch-size", "2", "--seqlen", "64", "--no-fill-budget",
                 "--no-progress", "-o", str(out)]) == 0
    for text in traj.TEXTS.values():
        assert main(["eval", str(out), "--data", str(text), "--seqlen", str(traj.SEQLEN),
                     "--max-windows", "2", "--save", "--no-progress"]) == 0
    res = tmp_path / "res"
    assert traj.main(["--work", str(tmp_path), "--targets", "5", "--seeds", "0",
                      "--fractions", "0.01", "--max-windows", "2", "--jobs", "1",
                      "--results", str(res)]) == 0
    (cache,) = (res / "cache").iterdir()
    rec = json.loads(cache.read_text())
    assert rec["differ_from_final"] == [] and rec["moves"] == 0
    for name, text in traj.TEXTS.items():
        own = traj._result(out, text, 2)
        assert rec["results"][name]["window_nll"] == own["window_nll"]
    assert "+0.00 ppl" in (res / "trajectory_mean.md").read_text()
