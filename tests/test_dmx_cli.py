"""The dmx CLI frame: every bad input is one line on stderr, exit 2, and no partial OUT."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dmx import data

from dmx import outdir
from dmx.eval import report
from dmx.cli import main
from cli_helpers import fails as _fails
from tiny_models import tiny_model_dir, tiny_root

pytestmark = pytest.mark.usefixtures("single_threaded")  # tests/conftest.py


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tiny_model_dir(tiny_root(tmp_path_factory), "qwen3")


def test_missing_model_dir(capsys, tmp_path):
    _fails(capsys, ["baseline", "--model", str(tmp_path / "nope"), "--method", "uniform",
                    "--format", "fp4_e2m1", "-o", str(tmp_path / "out")],
           "no such directory", tmp_path)


def test_not_a_causal_lm(capsys, tmp_path):
    enc = tmp_path / "bert"
    enc.mkdir()
    (enc / "config.json").write_text(json.dumps({"architectures": ["BertModel"],
                                                 "model_type": "bert"}))
    _fails(capsys, ["baseline", "--model", str(enc), "--method", "uniform", "--format",
                    "fp4_e2m1", "-o", str(tmp_path / "out")], "not a causal LM", tmp_path)
    (enc / "config.json").write_text("{not json")
    _fails(capsys, ["eval", "--model", str(enc)], "unreadable JSON")


def test_missing_tokenizer(capsys, tmp_path, src):
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(src, bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    _fails(capsys, ["eval", "--model", str(bare), "--max-windows", "1"], "tokenizer")


@pytest.mark.parametrize("content,match", [("", "empty"), ("only a few words", "fewer than")])
def test_bad_calibration_text(capsys, tmp_path, src, content, match):
    calib = tmp_path / "calib.txt"
    calib.write_text(content)
    _fails(capsys, ["baseline", "--model", str(src), "--method", "kl", "--target-bits", "6",
                    "--calib", str(calib), "--seqlen", "64", "--samples", "2",
                    "-o", str(tmp_path / "out")], match, tmp_path)


@pytest.mark.parametrize("target", ["3.5", "8.5"])
def test_impossible_target(capsys, tmp_path, src, target):
    _fails(capsys, ["baseline", "--model", str(src), "--method", "kl", "--target-bits", target,
                    "-o", str(tmp_path / "out")], "impossible with ladder fp8-fp4", tmp_path)


def test_search_impossible_target_through_frame(capsys, tmp_path, src):
    """`dmx search` is wired to dmx.search; its own checks report exit 2, one line."""
    assert main(["search", "--model", str(src), "--target-bits", "9", "-o",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "impossible" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_existing_out_needs_force(capsys, tmp_path, src):
    out = tmp_path / "out"
    argv = ["baseline", "--model", str(src), "--method", "uniform", "--format", "fp8_e4m3",
            "--export-target", "none", "-o", str(out)]  # the tiny model is 48 wide
    assert main(argv) == 0
    capsys.readouterr()
    manifest = (out / outdir.MANIFEST_NAME).read_text()
    _fails(capsys, argv, "already exists; pass --force", tmp_path)
    assert (out / outdir.MANIFEST_NAME).read_text() == manifest
    assert main(argv + ["--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_flag_combinations(capsys, tmp_path, src):
    o = ["-o", str(tmp_path / "o")]
    _fails(capsys, ["baseline", "--model", str(src), "--method", "uniform", *o], "--format")
    _fails(capsys, ["baseline", "--model", str(src), "--method", "kl", *o], "--target-bits")
    _fails(capsys, ["baseline", "--model", str(src), "--method", "uniform", "--format",
                    "fp3_e1m1", *o], "fp3_e1m1")
    _fails(capsys, ["baseline", "--model", str(src), "--method", "gptq", *o], "invalid choice")
    _fails(capsys, ["eval"], "either an OUT directory or --model")
    _fails(capsys, ["eval", "--model", str(src), "--save"], "--save")
    _fails(capsys, ["eval", str(tmp_path / "missing")], "no such directory")
    _fails(capsys, ["eval", "--model", str(src), "--data", str(tmp_path / "x.txt")],
           "no such file")
    _fails(capsys, ["report", str(src), "-o", str(tmp_path / "r")], "dmx_manifest.json")
    _fails(capsys, ["frobnicate"], "invalid choice")
    assert list(tmp_path.iterdir()) == []


def test_demo_refuses_existing_out(capsys, tmp_path):
    (tmp_path / "demo").mkdir()
    _fails(capsys, ["demo", "--out", str(tmp_path / "demo")], "already exists", tmp_path)


def test_ctrl_c_exits_130(capsys, monkeypatch, tmp_path):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "run_report", interrupted)
    assert main(["report", "x", "-o", str(tmp_path / "r")]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_report_writes_md_json_png(capsys, tmp_path, src):
    for fmt in ("fp4_e2m1", "fp8_e4m3"):
        assert main(["baseline", "--model", str(src), "--method", "uniform", "--format", fmt,
                     "--export-target", "none", "-o", str(tmp_path / fmt)]) == 0
    text = tmp_path / "t.txt"
    text.write_text(data.default_eval_file().read_text()[:8_000])
    assert main(["eval", str(tmp_path / "fp8_e4m3"), "--save", "--data", str(text),
                 "--seqlen", "32", "--max-windows", "2", "--no-progress"]) == 0
    rep = tmp_path / "rep"
    assert main(["report", str(tmp_path / "fp4_e2m1"), str(tmp_path / "fp8_e4m3"),
                 "--reference-ppl", "100", "-o", str(rep)]) == 0
    assert sorted(p.name for p in rep.iterdir()) == ["pareto.png", "report.json", "report.md"]
    assert (rep / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((rep / "report.json").read_text())["runs"]
    assert [r["avg_bits"] for r in rows] == [4.0, 8.0]
    assert rows[0]["ppl"] is None and rows[1]["ppl"] > 0
    md = (rep / "report.md").read_text()
    assert "| fp8_e4m3 | uniform |" in md and "Not evaluated" in md
    capsys.readouterr()
    _fails(capsys, ["report", str(tmp_path / "fp8_e4m3"), "-o", str(rep)], "already exists")
    # scored on a second text: the report shows the latest, or the one --data names
    other = tmp_path / "u.txt"
    other.write_text(data.default_calibration_file().read_text()[:8_000])
    assert main(["eval", str(tmp_path / "fp8_e4m3"), "--save", "--data", str(other),
                 "--seqlen", "32", "--max-windows", "2", "--no-progress"]) == 0
    ppl = {}
    for name, pick in (("latest", []), ("t", ["--data", str(text)]),
                       ("u", ["--data", "u.txt"])):
        assert main(["report", str(tmp_path / "fp8_e4m3"), *pick, "-o",
                     str(tmp_path / f"rep-{name}")]) == 0
        (row,) = json.loads((tmp_path / f"rep-{name}" / "report.json").read_text())["runs"]
        ppl[name] = (row["ppl"], row["eval_key"].split("|")[0])
    assert ppl["latest"] == ppl["u"] and ppl["u"][1] == "u.txt" and ppl["t"][1] == "t.txt"
    assert ppl["t"][0] != ppl["u"][0]


def test_subprocess_one_line_no_traceback(tmp_path):
    """The installed entry point: exit 2, one stderr line, no traceback."""
    r = subprocess.run([sys.executable, "-m", "dmx", "baseline", "--model", str(tmp_path),
                        "--method", "kl", "--target-bits", "6", "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("dmx: error: "), r.stderr
    assert "no config.json" in lines[0] and not (tmp_path / "o").exists()


def test_demo_end_to_end_tiny_settings(capsys, monkeypatch, tmp_path):
    """The demo's wiring (search, baselines, eval, report, atomic rename) with tiny sizes;
    the real sizes are in dmx.demo.demo_settings."""
    from dmx import demo
    tiny = {"search_steps": 2, "search_batch": 1, "calib_seqlen": 32, "kl_samples": 1,
            "eval_seqlen": 32, "eval_windows": 2}
    monkeypatch.setattr(demo, "demo_settings", lambda quick=False: tiny)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "settings: search 2 steps" in out and "wrote" in out
    runs = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert runs == ["dmx-6", "fused-6", "kl-6", "report", "uniform-mxfp4", "uniform-mxfp8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temp dirs left
    rows = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())["runs"]
    assert {r["run"]: r["method"] for r in rows if "dmx" in r["method"]} == \
        {"dmx-6": "dmx", "fused-6": "dmx+kl"}   # the fused pick is a series of its own
    assert {r["method"] for r in rows} == {"dmx", "dmx+kl", "kl", "uniform"}
    assert all(r["ppl"] is not None and r["path"].startswith(str(tmp_path / "demo"))
               for r in rows)
    kl = next(r for r in rows if r["method"] == "kl")
    assert kl["avg_bits"] <= 6.0
    # the search against KL on the same windows, with its interval: said and reported
    found = next(r for r in rows if r["run"] == "dmx-6")
    assert found["paired"]["windows"] == 2 and kl["paired_missing"] == "the reference run"
    assert "dmx-6 vs kl-6: " in out and " over 2 windows): " in out
    # the search fused with the KL baseline: `dmx combine dmx-6 --kl kl-6`'s rule
    fused = outdir.read_manifest(tmp_path / "demo" / "fused-6")
    assert fused["search"]["combined"]["seeds"] == [0] and \
        len(fused["search"]["combined"]["kl"]["inputs"]) == 1
    assert "fused-6 vs kl-6: " in out
    assert "| vs kl-6 |" in (tmp_path / "demo" / "report" / "report.md").read_text()
    from PIL import Image
    with Image.open(tmp_path / "demo" / "report" / "dynamics.png") as im:
        assert im.format == "PNG" and im.mode == "P"  # the search's dynamics, 256 colours


@pytest.mark.parametrize("n, labelled", [(3, True), (report.MAX_LABELLED_RUNS + 1, False)])
def test_pareto_plot_names_points_only_while_they_fit(tmp_path, monkeypatch, n, labelled):
    """Up to MAX_LABELLED_RUNS runs each point is named (and each method's points joined);
    a sweep with more draws the points only: 40 overlapping names are unreadable."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    rows = [{"method": ("dmx", "kl")[i % 2], "avg_bits": 5.0 + 0.01 * i, "ppl": 80.0 + i,
             "run": f"run-{i}"} for i in range(n)]
    report._plot(rows, None, tmp_path / "pareto.png", "t")
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = figures[0].axes[0]
    assert len(ax.texts) == (n if labelled else 0)
    assert len(ax.lines) == (2 if labelled else 0)


def test_pareto_plot_stacks_the_names_of_points_that_coincide(tmp_path, monkeypatch):
    """A fused pick that equals KL's sits on KL's point: the second name goes one line
    below the first instead of over it; a point elsewhere keeps the usual place."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    rows = [{"method": "kl", "avg_bits": 6.0, "ppl": 93.05, "run": "kl-6"},
            {"method": "dmx+kl", "avg_bits": 6.0, "ppl": 93.05, "run": "fused-6"},
            {"method": "uniform", "avg_bits": 4.0, "ppl": 95.22, "run": "mxfp4"},
            {"method": "uniform", "avg_bits": 8.0, "ppl": 92.69, "run": "mxfp8"}]
    report._plot(rows, None, tmp_path / "pareto.png", "t")
    offsets = {t.get_text(): t.xyann for t in figures[0].axes[0].texts}
    assert sorted([offsets["kl-6"][1], offsets["fused-6"][1]]) == [-5, 4]   # one below
    assert offsets["mxfp4"] == offsets["mxfp8"] == (4, 4)
