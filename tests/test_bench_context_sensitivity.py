"""bench_context_sensitivity's two finite differences, recomputed independently: a fresh
model with the formats applied by dmx.nn.layers.apply_formats (not the benchmark's wrapped
model and offsets) must give the same KL for a layer alone in the low rung (isolated) and
for all layers low but one promoted (in context)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from script_helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
bench = load_script("benchmarks/bench_context_sensitivity.py")

torch = pytest.importorskip("torch")


def _kl_with(model_dir, tok, windows, formats):
    from dmx import data
    from dmx.nn.layers import apply_formats
    from dmx.search.losses import distill_kl

    ref_model, _ = data.load_model_and_tokenizer(model_dir)
    quant, _ = data.load_model_and_tokenizer(model_dir)
    apply_formats(quant, formats, dict(formats))
    with torch.no_grad():
        ref = ref_model(input_ids=windows, use_cache=False).logits
        return float(distill_kl(quant(input_ids=windows, use_cache=False).logits, ref))


def test_scores_match_an_independent_recomputation(tmp_path):
    from dmx import data
    from dmx.search.baseline import quantizable_layers

    model_dir = str(data.embedded_model_dir())
    model, tok = data.load_model_and_tokenizer(model_dir)
    names = quantizable_layers(model)
    kl_out = tmp_path / "kl"
    kl_out.mkdir()
    layers = {n: {"format": "fp8_e4m3" if i < 3 else "fp4_e2m1"} for i, n in enumerate(names)}
    (kl_out / "dmx_manifest.json").write_text(json.dumps({"layers": layers}))
    results = tmp_path / "ctx.md"
    calib = ROOT / "dmx" / "data" / "wikitext-2-raw" / "wiki.valid.raw"
    argv = ["--kl-out", str(kl_out), "--model", model_dir, "--calib", str(calib),
            "--seqlen", "32", "--samples", "8", "--windows", "4", "--top", "3",
            "--eval-seqlen", "32", "--max-windows", "2", "--results", str(results)]
    assert bench.main(argv) == 0
    scores = json.loads(results.with_suffix(".json").read_text())
    text = results.read_text()
    assert text.count("\n| ") == 4 and "3 of 3 |" in text  # header, 3 rows; KL shares all 3
    windows = data.calibration_windows(tok, [str(calib)], 32, 8, 0)[:4]
    name = names[1]
    low = {n: "fp4_e2m1" for n in names}
    isolated = _kl_with(model_dir, tok, windows, {name: "fp4_e2m1"})
    assert scores["isolated_kl"][name] == pytest.approx(isolated, rel=1e-5, abs=1e-7)
    base = _kl_with(model_dir, tok, windows, low)
    promoted = _kl_with(model_dir, tok, windows, {**low, name: "fp8_e4m3"})
    assert scores["base_kl"] == pytest.approx(base, rel=1e-5, abs=1e-7)
    assert scores["in_context_gain"][name] == pytest.approx(base - promoted, rel=1e-4,
                                                            abs=1e-6)
    # --scores reuses them: the same one-shot rows, without scoring again
    again = tmp_path / "again.md"
    reuse = ["--scores", str(results.with_suffix(".json"))]
    assert bench.main(argv[:-1] + [str(again)] + reuse) == 0
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert [line for line in again.read_text().splitlines() if line.startswith("| ")] == rows
    assert "scores from" in again.read_text()


def test_the_kl_outs_row_is_its_result_on_the_one_shot_protocol(tmp_path):
    """An OUT scored on two texts: the table's KL row is the result on --eval's protocol,
    whichever text was scored last (eval.json's "latest")."""
    from dmx.outdir.evaljson import save_eval

    out = tmp_path / "kl"
    out.mkdir()
    for file, ppl in (("/d/wiki.test.raw", 92.14), ("/d/eval.txt", 21.24)):
        save_eval(out, {"file": file, "seqlen": 256, "windows": 40, "windows_total": 1185,
                        "join": "file", "ppl": ppl})
    args = bench._parse(["--kl-out", str(out), "--eval", "/d/wiki.test.raw"])
    assert bench.kl_scored(args)["ppl"] == 92.14
    args = bench._parse(["--kl-out", str(out), "--eval", "/d/wiki.test.raw",
                         "--max-windows", "0"])  # the whole text: not what it was scored on
    assert bench.kl_scored(args) is None
