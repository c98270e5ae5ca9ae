"""bench_calib_fit scores each OUT on the search's own calibration windows: recomputed here
from the settings the search was given (not from its manifest, which the benchmark reads),
with the OUT loaded the way `dmx eval` loads it."""
from __future__ import annotations

from pathlib import Path

import pytest
from script_helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
bench = load_script("benchmarks/bench_calib_fit.py")

pytestmark = pytest.mark.usefixtures("single_threaded")  # tests/conftest.py


def test_own_windows_are_the_searchs_and_the_table_reads_them(tmp_path):
    from dmx import data
    from dmx.eval.command import perplexity
    from dmx.outdir.read import load
    from dmx.search import baseline, search
    from dmx.search.recipe import SearchConfig

    model_dir = str(data.embedded_model_dir())
    calib = tmp_path / "calib.txt"
    calib.write_text(data.default_calibration_file().read_text()[:40_000])
    cfg = SearchConfig.from_recipe("default", target_bits=6.0, steps=2, batch_size=2,
                                   seqlen=32, samples=4, seed=3, calib=[str(calib)],
                                   fill_budget=False)
    search(model_dir, cfg, out=tmp_path / "dmx", progress=False, checkpoint_every=0)
    baseline.kl_baseline(model_dir, 6.0, tmp_path / "kl", calib=[calib], samples=2,
                         seqlen=32, progress=False)
    results = tmp_path / "fit.md"
    assert bench.main(["--pairs", f"{tmp_path / 'dmx'}:{tmp_path / 'kl'}",
                       "--held-out-windows", "2", "--held-out-seqlen", "32",
                       "--results", str(results)]) == 0
    row = [line for line in results.read_text().splitlines() if line.startswith("| dmx |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    tok = data.load_tokenizer(model_dir)
    windows = data.calibration_windows(tok, [str(calib)], 32, 4, 3)  # the search's settings
    for out, cell in ((tmp_path / "dmx", cells[2]), (tmp_path / "kl", cells[3])):
        model, _, _ = load(out, device="cpu")
        assert float(cell) == pytest.approx(perplexity(model, windows, progress=False)["ppl"],
                                            abs=0.006)  # the table rounds to 2 decimals
    assert cells[6] == cells[7] == "-"  # no eval.json saved


def test_bad_pairs_are_refused():
    with pytest.raises(SystemExit):
        bench._parse(["--pairs", "only-one-dir"])
