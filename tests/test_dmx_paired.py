"""dmx.eval.paired: the evaluation's own noise, and two runs compared window by window."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dmx import data
from dmx.cli import main
from dmx.errors import DMXError
from dmx.eval import paired as P
from cli_helpers import fails as _fails
from tiny_models import tiny_model_dir, tiny_root

pytestmark = pytest.mark.usefixtures("single_threaded")  # tests/conftest.py

# Student t 0.975 quantiles (printed tables, 4 decimals)
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 9: 2.2622, 19: 2.0930,
        39: 2.0227, 120: 1.9799}


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_the_tables(df):
    assert P.t_quantile(0.975, df) == pytest.approx(T975[df], rel=2e-3)
    assert P.t_quantile(0.025, df) == pytest.approx(-T975[df], rel=2e-3)  # symmetric


def test_nll_summary_recomputed_independently():
    rng = np.random.default_rng(0)
    w = list(rng.normal(4.0, 0.3, size=40))
    s = P.nll_summary(w, tokens_per_window=255)
    assert s["nll_se_lags"] == 3  # Newey-West's rule for 40 windows
    c = np.asarray(w) - np.mean(w)
    gamma = [np.dot(c[k:], c[:40 - k]) / 40 for k in range(4)]  # autocovariances, lags 0..3
    long_run = gamma[0] + 2 * sum((1 - k / 4) * gamma[k] for k in (1, 2, 3))
    se = math.sqrt(long_run / 40 * 40 / 39)
    assert s["nll"] == pytest.approx(np.mean(w), rel=1e-12) and s["scored"] == 40 * 255
    assert s["ppl"] == pytest.approx(math.exp(np.mean(w)), rel=1e-12)
    assert s["nll_se"] == pytest.approx(se, rel=1e-12)
    lo, hi = s["ppl_ci95"]
    assert lo < s["ppl"] < hi
    assert math.log(hi) - np.mean(w) == pytest.approx(T975[39] * se, rel=2e-3)
    two = P.nll_summary([4.0, 4.5], 10)  # no lags: the usual standard error
    assert two["nll_se_lags"] == 0 and two["nll_se"] == pytest.approx(0.25, rel=1e-12)
    one = P.nll_summary([4.0], 10)
    assert one["nll_se"] is None and one["ppl_ci95"] is None
    with pytest.raises(DMXError, match="no windows"):
        P.nll_summary([], 10)


def test_nll_summary_widens_for_alike_neighbouring_windows():
    """Windows whose NLLs follow an AR(1) with rho 0.5 (neighbours alike): the interval is
    wider than the independent-windows one, by about what Newey-West's 3 lags allow."""
    rng = np.random.default_rng(2)
    w = [4.0]
    for _ in range(399):
        w.append(4.0 + 0.5 * (w[-1] - 4.0) + rng.normal(0, 0.3))
    s = P.nll_summary(w, 255)
    plain = np.std(w, ddof=1) / math.sqrt(len(w))
    assert s["nll_se_lags"] == 5 and 1.35 < s["nll_se"] / plain < 1.75  # long-run: 1.73x


def test_paired_sees_a_shift_the_unpaired_intervals_cannot():
    """Hard and easy windows vary a lot (0.5 nats); b is a steady 0.02 nats worse on every
    window: the two runs' own intervals overlap, the paired one says "higher"."""
    rng = np.random.default_rng(1)
    a = list(rng.normal(4.0, 0.5, size=40))
    b = [x + 0.02 + e for x, e in zip(a, rng.normal(0, 0.005, size=40))]
    ia, ib = P.nll_summary(a, 255)["ppl_ci95"], P.nll_summary(b, 255)["ppl_ci95"]
    assert ib[0] < ia[1]  # unpaired: overlapping
    p = P.paired(a, b)
    assert p["verdict"] == "higher" and p["delta_ppl_ci95"][0] > 0
    assert p["delta_ppl"] == pytest.approx(math.exp(np.mean(b)) - math.exp(np.mean(a)))
    assert P.paired(b, a)["verdict"] == "lower"
    # noise with no shift is a tie, and the interval holds the true difference 0
    c = [x + e for x, e in zip(a, rng.normal(0, 0.05, size=40))]
    q = P.paired(a, c)
    assert q["verdict"] == "tie" and q["delta_ppl_ci95"][0] < 0 < q["delta_ppl_ci95"][1]
    assert "tie" in P.paired_line(q) and "40 windows" in P.paired_line(q)


def test_paired_refuses_other_windows():
    with pytest.raises(DMXError, match="different windows"):
        P.paired([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(DMXError, match="at least 2 windows"):
        P.paired([1.0], [1.0])


def test_eval_records_window_losses_and_report_against(capsys, tmp_path_factory, tmp_path):
    """`dmx eval --save` records each window's loss (their mean is the saved NLL); `dmx
    report --against` compares runs on the same windows and says why it cannot otherwise."""
    src = tiny_model_dir(tiny_root(tmp_path_factory), "qwen3")
    for fmt in ("fp4_e2m1", "fp8_e4m3"):
        assert main(["baseline", "--model", str(src), "--method", "uniform", "--format", fmt,
                     "--export-target", "none", "-o", str(tmp_path / fmt)]) == 0
    text = tmp_path / "t.txt"
    text.write_text(data.default_eval_file().read_text()[:20_000])
    args = ["--save", "--data", str(text), "--seqlen", "32", "--max-windows", "6",
            "--no-progress"]
    for fmt in ("fp4_e2m1", "fp8_e4m3"):
        assert main(["eval", str(tmp_path / fmt), *args]) == 0
    assert "95 % interval over the windows" in capsys.readouterr().out
    res = {}
    for fmt in ("fp4_e2m1", "fp8_e4m3"):
        ev = json.loads((tmp_path / fmt / "eval.json").read_text())
        res[fmt] = ev["results"][ev["latest"]]
        w = res[fmt]["window_nll"]
        assert len(w) == 6 and res[fmt]["nll"] == pytest.approx(sum(w) / 6, rel=1e-12)
        lo, hi = res[fmt]["ppl_ci95"]
        assert lo < res[fmt]["ppl"] < hi
    rep = tmp_path / "rep"
    assert main(["report", str(tmp_path / "fp4_e2m1"), str(tmp_path / "fp8_e4m3"),
                 "--against", str(tmp_path / "fp8_e4m3"), "-o", str(rep)]) == 0
    out = capsys.readouterr().out
    rows = json.loads((rep / "report.json").read_text())["runs"]
    assert "window_nll" not in rows[0]
    want = P.paired(res["fp8_e4m3"]["window_nll"], res["fp4_e2m1"]["window_nll"])
    assert rows[0]["paired"] == want and rows[1]["paired_missing"] == "the reference run"
    # the difference is of the two saved perplexities (a random tiny model: either sign)
    assert want["delta_ppl"] == pytest.approx(res["fp4_e2m1"]["ppl"] - res["fp8_e4m3"]["ppl"],
                                              rel=1e-9)
    md = (rep / "report.md").read_text()
    assert "| vs fp8_e4m3 |" in md and f"{want['delta_ppl']:+.2f}" in md
    assert f"vs fp8_e4m3: {want['delta_ppl']:+.2f}" in out
    # scored on other windows: said in the cell, not compared
    assert main(["eval", str(tmp_path / "fp4_e2m1"), *args[:-2], "4", "--no-progress"]) == 0
    assert main(["report", str(tmp_path / "fp4_e2m1"), str(tmp_path / "fp8_e4m3"),
                 "--against", str(tmp_path / "fp8_e4m3"), "-o", str(tmp_path / "r2")]) == 0
    (row, _) = json.loads((tmp_path / "r2" / "report.json").read_text())["runs"]
    assert row["paired"] is None and row["paired_missing"] == "scored on other windows"
    # the report never replaces the --against OUT, even when it is not among the runs
    _fails(capsys, ["report", str(tmp_path / "fp4_e2m1"), "--against", str(tmp_path / "fp8_e4m3"),
                    "--force", "-o", str(tmp_path / "fp8_e4m3")], "fp8_e4m3")
    assert (tmp_path / "fp8_e4m3" / "dmx_manifest.json").is_file()
    # an --against run saved before per-window losses: one line, what to do
    ev = json.loads((tmp_path / "fp8_e4m3" / "eval.json").read_text())
    for r in ev["results"].values():
        r.pop("window_nll")
    (tmp_path / "fp8_e4m3" / "eval.json").write_text(json.dumps(ev))
    capsys.readouterr()
    _fails(capsys, ["report", str(tmp_path / "fp4_e2m1"), "--against",
                    str(tmp_path / "fp8_e4m3"), "-o", str(tmp_path / "r3")],
           "no per-window losses")
