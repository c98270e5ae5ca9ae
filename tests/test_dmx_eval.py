"""dmx.data windows and dmx.eval.command perplexity (GPTQ protocol), `dmx eval`."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from dmx import data

from dmx.eval import command as evaluate

from dmx import outdir
from dmx.cli import main
from dmx.errors import DMXError
from tiny_models import tiny_model_dir, tiny_root

pytestmark = pytest.mark.usefixtures("single_threaded")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_qwen3():
    return data.load_model_and_tokenizer(data.embedded_model_dir())


@pytest.fixture(scope="module")
def tok(tiny_qwen3):
    return tiny_qwen3[1]


def test_eval_windows_follow_the_protocol(tok, tmp_path):
    text = "The cat sat.\n\n = Heading = \nMore text here, and more.\n" * 40
    f = tmp_path / "t.txt"
    f.write_text(text)
    ids = data.tokenize_whole(tok, text)
    w, info = data.eval_windows(tok, f, 16)
    assert info["n_tokens"] == ids.numel() and info["windows_total"] == ids.numel() // 16
    assert torch.equal(w.flatten(), ids[: w.numel()])  # non-overlapping, in order
    w2, info2 = data.eval_windows(tok, f, 16, max_windows=3)
    assert torch.equal(w2, w[:3]) and info2["windows"] == 3
    rows, info3 = data.eval_windows(tok, f, 16, join="rows")
    want = data.tokenize_whole(tok, "\n\n".join(l if l.strip() else ""
                                                 for l in text.splitlines(keepends=True)))
    assert info3["n_tokens"] == want.numel() != info["n_tokens"]


def test_eval_windows_bad_input(tok, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DMXError, match="empty"):
        data.eval_windows(tok, empty, 16)
    short = tmp_path / "short.txt"
    short.write_text("two words")
    with pytest.raises(DMXError, match="fewer than one window"):
        data.eval_windows(tok, short, 256)
    with pytest.raises(DMXError, match="no such text file"):
        data.eval_windows(tok, tmp_path / "missing.txt", 16)


def test_calibration_windows_seeded(tok, tmp_path):
    f = [tmp_path / "calib.txt"]
    f[0].write_text(data.default_calibration_file().read_text()[:40_000])
    a = data.calibration_windows(tok, f, 64, 8, seed=0)
    b = data.calibration_windows(tok, f, 64, 8, seed=0)
    c = data.calibration_windows(tok, f, 64, 8, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in a}) == 8  # distinct windows
    stream = data.tokenize_whole(tok, data.read_text(f))
    starts = torch.nonzero(stream[:-63] == a[0, 0]).flatten()
    assert any(torch.equal(stream[i:i + 64], a[0]) for i in starts)  # a piece of the text


def test_an_empty_calibration_file_beside_others_gets_a_note(tok, tmp_path, capsys):
    """--calib a.txt empty.txt calibrates on a.txt, and says that empty.txt added nothing
    (it was accepted silently: a truncated or wrong file went unnoticed)."""
    full, empty = tmp_path / "a.txt", tmp_path / "empty.txt"
    full.write_text(data.default_calibration_file().read_text()[:20_000])
    empty.write_text("\n  \n")
    data.calibration_windows(tok, [full], 64, 4)
    assert "empty" not in capsys.readouterr().err
    windows = data.calibration_windows(tok, [full, empty], 64, 4)
    assert windows.shape == (4, 64)
    err = capsys.readouterr().err
    assert f"calibration text {empty} is empty" in err and str(full) not in err


def test_calibration_windows_bad_input(tok, tmp_path, capsys):
    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(DMXError, match="empty"):
        data.calibration_windows(tok, [empty], 64, 4)
    short = tmp_path / "s.txt"
    short.write_text("a few words only")
    with pytest.raises(DMXError, match="fewer than one window"):
        data.calibration_windows(tok, [short], 64, 4)
    w = data.calibration_windows(tok, [short], 2, 10_000)
    assert w.shape[0] < 10_000 and "using all" in capsys.readouterr().err


def test_perplexity_is_the_models_own_loss(tiny_qwen3):
    """exp(mean next-token CE over every position) = HF's labels loss, window by window."""
    model, tok = tiny_qwen3
    w, _ = data.eval_windows(tok, data.default_eval_file(), 64, max_windows=3)
    res = evaluate.perplexity(model, w, batch_size=2, progress=False)
    with torch.no_grad():
        losses = [float(model(input_ids=w[i:i + 1], labels=w[i:i + 1]).loss) for i in range(3)]
    assert res["scored"] == 3 * 63
    assert res["ppl"] == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)


@pytest.mark.skipif(not os.environ.get("DMX_FULL_EVAL"),
                    reason="the full 1,550-window evaluation takes minutes on 2 CPU cores; "
                           "set DMX_FULL_EVAL=1 to check the 116.0 anchor")
def test_tiny_qwen3_full_precision_anchor(tiny_qwen3):
    """dmx/data/README.md: fp32 tiny-qwen3 on wiki.test.raw, 256-token windows,
    all tokens scored, ppl 116.0."""
    model, tok = tiny_qwen3
    res = evaluate.evaluate(model, tok, None, 256, progress=False)
    assert res["windows"] == res["windows_total"] == 1550
    assert round(res["ppl"], 1) == 116.0


def test_dmx_eval_cli_save_and_uniform(tmp_path_factory, tmp_path, capsys):
    src = tiny_model_dir(tiny_root(tmp_path_factory), "qwen3")
    out = tmp_path / "out"
    assert main(["baseline", "--model", str(src), "--method", "uniform", "--format",
                 "fp8_e4m3", "--export-target", "none", "-o", str(out)]) == 0
    capsys.readouterr()
    text = tmp_path / "t.txt"
    text.write_text(data.default_eval_file().read_text()[:20_000])
    args = ["--data", str(text), "--seqlen", "32", "--max-windows", "3", "--no-progress"]
    assert main(["eval", str(out), "--save", *args]) == 0
    line = capsys.readouterr().out
    assert "windows x 32 (first 3 of" in line and "all tokens scored, ppl" in line
    saved = json.loads((out / outdir.EVAL_NAME).read_text())
    res = saved["results"][saved["latest"]]
    assert res["windows"] == 3 and res["seqlen"] == 32
    # the same numbers through --model --uniform (quantized on the fly) as through OUT
    assert main(["eval", "--model", str(src), "--uniform", "fp8_e4m3", *args]) == 0
    line2 = capsys.readouterr().out
    assert line2.split("ppl")[-1].strip() == line.splitlines()[0].split("ppl")[-1].strip()
