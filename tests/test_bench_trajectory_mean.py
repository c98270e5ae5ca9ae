"""benchmarks/bench_trajectory_mean.py: the mean of a search's last steps' offsets, and the
assignment scored from it, on a real (short) search of the embedded model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from script_helpers import load_script, search_kl_and_fused

ROOT = Path(__file__).resolve().parents[1]
traj = load_script("benchmarks/bench_trajectory_mean.py")


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
def test_the_final_steps_alone_reproduce_the_searchs_and_combines_own_outs(tmp_path):
    """f so small that only the last step is averaged: one search's assignment is its own
    (its final offsets, no repair needed) and the seeds' is `dmx combine`'s, so the scores
    equal `dmx eval` of those OUTs window by window: the probe measures what it claims."""
    from dmx.cli import main
    from dmx.data import embedded_model_dir

    outs = [tmp_path / f"dmx-default-5-s{seed}" for seed in (0, 1)]
    for seed, out in enumerate(outs):
        assert main(["search", "--model", str(embedded_model_dir()), "--target-bits", "5",
                     "--steps", "3", "--batch-size", "2", "--seqlen", "64", "--seed",
                     str(seed), "--average-last", "0", "--no-fill-budget", "--no-progress",
                     "-o", str(out)]) == 0
    comb = tmp_path / "combined"
    assert main(["combine", *map(str, outs), "--fill-budget", "-o", str(comb)]) == 0
    for out in (*outs, comb):
        for text in traj.TEXTS.values():
            assert main(["eval", str(out), "--data", str(text), "--seqlen", str(traj.SEQLEN),
                         "--max-windows", "2", "--save", "--no-progress"]) == 0
    res = tmp_path / "res"
    assert traj.main(["--work", str(tmp_path), "--targets", "5", "--seeds", "0", "1",
                      "--fractions", "0.01", "--max-windows", "2", "--jobs", "1",
                      "--combine", "--results", str(res),
                      # each search against itself: the pairing must give exactly 0
                      "--against-kl", str(tmp_path / "dmx-default-{bits}-s{seed}")]) == 0
    for out in outs:
        rec = json.loads((res / "cache" / f"{out.name}-f0.01-w2.json").read_text())
        assert rec["differ_from_final"] == [] and rec["moves"] == 0
        for name, text in traj.TEXTS.items():
            assert rec["results"][name]["window_nll"] == traj.saved_result(out, text, 2)["window_nll"]
    rec = json.loads((res / "cache" / "comb-5-0.1-f0-w2.json").read_text())
    assert rec["formats"] == {n: e["format"] for n, e in
                              json.loads((comb / "dmx_manifest.json").read_text())["layers"].items()}
    for name, text in traj.TEXTS.items():
        assert rec["results"][name]["window_nll"] == traj.saved_result(comb, text, 2)["window_nll"]
    report = (res / "trajectory_mean-s0.1.md").read_text()
    assert "+0.00 ppl" in report
    against = [line for line in report.splitlines() if line.startswith("- 5 bits, its own")]
    assert len(against) == 2 and all(
        "pooled +0.00 (+0.00..+0.00) tie; s0 +0.00 (+0.00..+0.00) tie; "
        "s1 +0.00 (+0.00..+0.00) tie" in line for line in against), against


@pytest.mark.usefixtures("single_threaded")
def test_kl_each_fused_from_the_final_offsets_is_dmx_combine_kl(tmp_path):
    """--kl-each at f = 0 (the final offsets) is `dmx combine SEARCH --kl KL` of one
    search: the same formats and the same window losses."""
    out, _, fused = search_kl_and_fused(tmp_path, traj.TEXTS.values(), traj.SEQLEN, 2)
    res = tmp_path / "res"
    assert traj.main(["--work", str(tmp_path), "--targets", "5", "--seeds", "0",
                      "--fractions", "0.5", "--max-windows", "2", "--jobs", "1",
                      "--kl-each", str(tmp_path / "kl-s{seed}"), "--results", str(res)]) == 0
    rec = json.loads((res / "cache" / f"{out.name}-kl1-f0-w2.json").read_text())
    assert rec["formats"] == {n: e["format"] for n, e in
                              json.loads((fused / "dmx_manifest.json").read_text())["layers"].items()}
    for name, text in traj.TEXTS.items():
        assert rec["results"][name]["window_nll"] == traj.saved_result(fused, text, 2)["window_nll"]
    assert "fused from the last 0.5" in (res / "trajectory_mean-s0.md").read_text()
