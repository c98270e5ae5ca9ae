"""benchmarks/bench_window_independence.py: the Newey-West standard error and the pairing of
a sweep's OUTs (the numbers it reports are in BENCHMARKS.md, not asserted here)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from dmx.eval.paired import newey_west_se
from script_helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
bench = load_script("benchmarks/bench_window_independence.py")


def test_newey_west_se_matches_the_plain_one_without_autocorrelation_and_grows_with_it():
    """dmx.eval.paired.newey_west_se (what the benchmark measures with)."""
    rng = np.random.default_rng(0)
    iid = rng.standard_normal(4000)
    plain = iid.std(ddof=1) / math.sqrt(len(iid))
    assert math.isclose(newey_west_se(iid.tolist(), 0), plain, rel_tol=1e-9)  # no lags
    assert 0.9 < newey_west_se(iid.tolist(), 3) / plain < 1.1
    ar = np.zeros(4000)  # AR(1), rho 0.8: the long-run sd is sqrt((1+rho)/(1-rho)) = 3x
    for i in range(1, len(ar)):
        ar[i] = 0.8 * ar[i - 1] + rng.standard_normal()
    ratio = newey_west_se(ar.tolist(), 30) / (ar.std(ddof=1) / math.sqrt(len(ar)))
    assert 2.3 < ratio < 3.3


def _out(work: Path, name: str, windows: list[float]) -> None:
    (work / name).mkdir()
    (work / name / "eval.json").write_text(json.dumps({"results": {
        "wiki.test.raw|seqlen=256": {"window_nll": windows}}}))


def test_it_pairs_each_search_with_its_seeds_kl_and_writes_a_row_per_text(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.normal(4.0, 0.3, 40)
    _out(tmp_path, "kl-default-5-s0", base.tolist())
    _out(tmp_path, "dmx-default-5-s0", (base - 0.02 + rng.normal(0, 0.01, 40)).tolist())
    _out(tmp_path, "dmx-default-5-comb0.1.2", (base + 0.001 * rng.standard_normal(40)).tolist())
    _out(tmp_path, "dmx-default-6-s0", base.tolist())  # no KL at 6 bits: not paired
    assert sorted((a.name, b.name) for a, b in bench.pairs(tmp_path)) == [
        ("dmx-default-5-comb0.1.2", "kl-default-5-s0"), ("dmx-default-5-s0", "kl-default-5-s0")]
    results = tmp_path / "out.md"
    assert bench.main(["--work", str(tmp_path), "--results", str(results)]) == 0
    lines = results.read_text().splitlines()
    assert any(line.startswith("| wiki.test.raw | 2 | 40 |") for line in lines)  # pairs
    assert lines[-1].startswith("| wiki.test.raw | 3 |")  # runs: KL and the two searches


def test_a_work_dir_without_pairs_is_refused(tmp_path, capsys):
    assert bench.main(["--work", str(tmp_path), "--results", str(tmp_path / "o.md")]) == 2
    assert "no dmx/kl pairs" in capsys.readouterr().err
    assert not (tmp_path / "o.md").exists()
