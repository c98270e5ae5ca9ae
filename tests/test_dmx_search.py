"""`dmx search` end to end on tiny models built here (widths 48 and 80: not multiples of 32).

Covers: OUT written and reloaded with bit-identical logits, the budget penalty pulling
the average bits to the target, resume-after-Ctrl-C equal to an uninterrupted run, and
every bad input (exit 2, one line, no OUT).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

import transformers  # a hard dependency: a broken install fails, never skips

from dmx.errors import DMXError  # noqa: E402
from dmx.nn.layers import dmx_parameters, wrap_model  # noqa: E402
from dmx.search import add_search_parser, read_search_log, run_search, search  # noqa: E402
from dmx.search.recipe import SearchConfig  # noqa: E402
from dmx.search.train import SearchInterrupted, train_offsets  # noqa: E402

EMBEDDED = Path(__file__).resolve().parents[1] / "dmx" / "data"  # shipped with the package
TOKENIZER_DIR = EMBEDDED / "tiny-qwen3"
WIKI = EMBEDDED / "wikitext-2-raw" / "wiki.valid.raw"

SMALL = dict(seqlen=32, samples=12, batch_size=2, progress=False,
             export_target="none")  # 48/80-wide test models: ragged blocks


def _tiny_model_dir(root: Path, kind: str) -> Path:
    """A 2-layer causal LM with hidden 48 / intermediate 80, saved with the tiny-qwen3
    tokenizer (vocab 4096)."""
    common = dict(vocab_size=4096, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=True)
    if kind == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.Qwen3Config(head_dim=12, **common)
        cls = transformers.Qwen3ForCausalLM
    torch.manual_seed(0)
    model = cls(config)
    out = root / kind
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, out / name)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: _tiny_model_dir(root, kind) for kind in ("llama", "qwen3")}


def _cli(argv) -> int:
    parser = argparse.ArgumentParser(prog="dmx")
    add_search_parser(parser.add_subparsers(dest="command"))
    return run_search(parser.parse_args(argv))


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_search_out_reloads_with_identical_logits(models, calib, tmp_path, kind):
    from dmx import outdir
    out = tmp_path / "out"
    result = search(models[kind], 6.0, calib=[calib], steps=4, out=out, **SMALL)
    assert out.is_dir() and not Path(str(out) + ".partial").exists()
    manifest = json.loads((out / "dmx_manifest.json").read_text())
    assert manifest["method"] == "dmx" and manifest["ladder"] == "fp8-fp4"
    assert {n: v["format"] for n, v in manifest["layers"].items()} == result["formats"]
    assert len(read_search_log(out)["steps"]) == 4
    ids = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = result["model"](input_ids=ids).logits
        loaded = outdir.load(out)
        got = (loaded[0] if isinstance(loaded, tuple) else loaded)(input_ids=ids).logits
    assert torch.equal(got, expected)


def test_penalty_pulls_average_bits_to_target(models, calib):
    """From all-MXFP8 (8 bits), the hinge must bring the average down towards 5; without
    it (lam 0) nothing pulls the offsets down and the average stays far higher."""
    from dmx import data

    def run(lam):
        model, tok = data.load_model_and_tokenizer(models["llama"])
        windows = data.calibration_windows(tok, [str(calib)], 32, 8, 0)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        layers = wrap_model(model, "fp8-fp4", init="high")
        # delay 1: stay at the starting temperature, where the map still has a slope
        cfg = SearchConfig.from_recipe("paper", target_bits=5.0, steps=12, batch_size=2,
                                       lr=0.2, lam=lam, delay=1.0, parameterization="clamp",
                                       grad_norm="none")
        log = train_offsets(model, layers, windows, cfg, progress=False)
        return log[0]["avg_bits"], log[-1]["hard_bits"]

    start, with_penalty = run(5.0)
    _, without = run(0.0)
    assert start > 7.5
    assert with_penalty <= 5.5, with_penalty
    assert without > with_penalty + 1.0


@pytest.mark.parametrize("rotate", ["none", "learned"])
def test_resume_after_interrupt_matches_uninterrupted(models, calib, tmp_path, rotate):
    """Bit for bit: offsets, losses, formats and, with --rotate learned (hidden 48 and
    head_dim 12: Kronecker Hadamard starts), the folded weights, hence the rotations."""
    kwargs = dict(calib=[calib], steps=6, checkpoint_every=2, rotate=rotate, **SMALL)
    ref = search(models["qwen3"], 6.0, out=tmp_path / "ref", **kwargs)
    ref_offsets = [p.detach().clone() for p in dmx_parameters(ref["model"])]
    assert any(float(p) != 0.0 for p in ref_offsets), "offsets never moved: test is vacuous"

    def stop_at_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(SearchInterrupted) as info:
        search(models["qwen3"], 6.0, out=out, callback=stop_at_3, **kwargs)
    assert info.value.step == 3 and Path(info.value.checkpoint).is_file()
    assert not out.exists()
    saved = torch.load(info.value.checkpoint, weights_only=True)
    if rotate == "learned":  # R1 and one R2 per block, orthogonal, mid-run
        assert saved["rotations"]["steps"] == 3 and len(saved["rotations"]["rotations"]) == 3
        for r in saved["rotations"]["rotations"]:
            r = r.double()
            assert float((r @ r.T - torch.eye(r.shape[0], dtype=r.dtype)).abs().max()) < 1e-5
    else:
        assert "rotations" not in saved
    resumed = search(models["qwen3"], 6.0, out=out, resume=True, **kwargs)
    got = dmx_parameters(resumed["model"])
    assert all(torch.equal(a, b) for a, b in zip(got, ref_offsets, strict=True))
    assert resumed["formats"] == ref["formats"]
    assert [r["loss"] for r in resumed["log"]] == [r["loss"] for r in ref["log"]]
    assert resumed["rotation"] == ref["rotation"]
    want, have = ref["model"].state_dict(), resumed["model"].state_dict()
    assert want.keys() == have.keys()
    assert all(torch.equal(want[k], have[k]) for k in want)
    if rotate == "learned":
        assert ref["rotation"]["learned_steps"] == 6
        assert [r["rotation_grad_norm"] for r in resumed["log"]] == \
            [r["rotation_grad_norm"] for r in ref["log"]]


def test_ctrl_c_prints_resume_command(models, calib, tmp_path, capsys, monkeypatch):
    import dmx.search.train

    real_step = dmx.search.train._train_step
    calls = []

    def interrupted_step(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(dmx.search.train, "_train_step", interrupted_step)
    out = tmp_path / "out"
    rc = _cli(["search", "--model", str(models["llama"]), "--target-bits", "5", "--calib",
               str(calib), "--seqlen", "32", "--samples", "8", "--batch-size", "2", "--steps",
               "4", "--no-progress", "--export-target", "none", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 130 and not out.exists()
    assert "interrupted after step 1" in err and "--resume" in err and "Traceback" not in err


BAD = {
    "steps 0": (["--steps", "0"], "--steps"),
    "target below ladder": (["--target-bits", "3.5"], "impossible"),
    "target above ladder": (["--target-bits", "7", "--ladder", "fp6-fp4"], "impossible"),
    "no linear matched": (["--include", "no_such_layer"],
                          "--include 'no_such_layer' matches no linear layer"),
    "missing model": (["--model", "/nonexistent/model"], "/nonexistent/model"),
}


def _base_argv(model, calib, out):
    return ["search", "--model", str(model), "--target-bits", "6", "--calib", str(calib),
            "--seqlen", "32", "--samples", "8", "--batch-size", "2", "--steps", "2",
            "--no-progress", "--export-target", "none", "-o", str(out)]


def _one_error_line(err: str) -> str:
    """The single error line (transformers' own weight-loading bar may precede it)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    return lines[0]


def _assert_bad(capsys, argv, needle, out):
    rc = _cli(argv)
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and needle in line, line
    assert not out.exists() and not Path(str(out) + ".partial").exists()


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2(models, calib, tmp_path, capsys, case):
    extra, needle = BAD[case]
    out = tmp_path / "out"
    argv = _base_argv(models["llama"], calib, out)
    if extra[0] == "--model":
        argv[argv.index("--model") + 1] = extra[1]
    elif extra[0] == "--target-bits":
        argv[argv.index("--target-bits") + 1] = extra[1]
        argv += extra[2:]
    else:
        argv += extra
    _assert_bad(capsys, argv, needle, out)


# refused before the model loads (they were found only after the weights and the text had
# loaded, or after the whole search: --checkpoint-dir -o trained, then found OUT taken)
EARLY_BAD = {
    "invalid include regex": (["--include", "(["], "--include '([' is not a valid regular"),
    "invalid exclude regex": (["--exclude", "*x"], "--exclude '*x' is not a valid regular"),
    "rung the target cannot store": (["--export-target", "quark"], "quark cannot store"),
    "checkpoints in OUT": (["--checkpoint-dir", "{out}"], "--checkpoint-dir"),
    "checkpoints inside OUT": (["--checkpoint-dir", "{out}/ck"], "--checkpoint-dir"),
    "checkpoint dir is a file": (["--checkpoint-dir", "{tmp}/file"], "not a directory"),
    "checkpoints in the model": (["--checkpoint-dir", "{model}/ck"],
                                 "inside the input directory"),
    "calibration text is a directory": (["--calib", "{tmp}"], "is a directory; pass a text"),
}


@pytest.mark.parametrize("case", sorted(EARLY_BAD))
def test_bad_input_is_refused_before_the_model_loads(models, calib, tmp_path, capsys,
                                                     monkeypatch, case):
    import dmx.data

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(dmx.data, "load_model_and_tokenizer", no_load)
    (tmp_path / "file").write_text("not a directory")
    extra, needle = EARLY_BAD[case]
    out = tmp_path / "out"
    fill = dict(out=out, tmp=tmp_path, model=models["llama"])
    argv = _base_argv(models["llama"], calib, out) + [a.format(**fill) for a in extra]
    _assert_bad(capsys, argv, needle, out)
    assert not (models["llama"] / "ck").exists()


def test_out_inside_the_model_dir_is_refused(models, calib, tmp_path, capsys):
    """It was written into the model directory, and the same command with --force was
    then refused ("is part of the input"): refused the first time, nothing written."""
    model = tmp_path / "model"
    shutil.copytree(models["llama"], model)
    before = sorted(p.name for p in model.iterdir())
    out = model / "out"
    _assert_bad(capsys, _base_argv(model, calib, out), "inside the input directory", out)
    assert sorted(p.name for p in model.iterdir()) == before


@pytest.mark.parametrize("text, needle", [("", "calibration text"),
                                          ("too short to fill one window", "calibration text"),
                                          ("\x00" * 20000, "holds NUL bytes")])
def test_empty_short_or_binary_calibration_exits_2(models, tmp_path, capsys, text, needle):
    calib = tmp_path / "calib.txt"
    calib.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    rc = _cli(_base_argv(models["llama"], calib, out))
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and needle in line, line
    assert not out.exists()


def test_existing_out_needs_force(models, calib, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = _cli(_base_argv(models["llama"], calib, out))
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "--force" in line
    assert (out / "keep.txt").read_text() == "mine"


def test_leftover_checkpoint_needs_resume_or_force(models, calib, tmp_path):
    out = tmp_path / "out"
    partial = Path(str(out) + ".partial")
    partial.mkdir()
    (partial / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(DMXError, match="--resume"):
        search(models["llama"], 6.0, calib=[calib], steps=2, out=out, **SMALL)


def test_resume_with_other_settings_is_refused(models, calib, tmp_path):
    out = tmp_path / "out"

    def stop(step, record):
        raise KeyboardInterrupt

    with pytest.raises(SearchInterrupted):
        search(models["llama"], 6.0, calib=[calib], steps=3, out=out, callback=stop, **SMALL)
    with pytest.raises(DMXError, match="steps"):
        search(models["llama"], 6.0, calib=[calib], steps=5, out=out, resume=True, **SMALL)


def test_batch_order_is_epochs_of_permutations():
    from dmx.search.train import batch_indices

    n, bs = 10, 4
    stream = torch.cat([batch_indices(3, s, n, bs) for s in range(5)])  # 20 = two epochs
    assert sorted(stream[:10].tolist()) == list(range(n))
    assert sorted(stream[10:].tolist()) == list(range(n))
    assert not torch.equal(stream[:10], stream[10:])  # each epoch its own order
    assert torch.equal(batch_indices(3, 4, n, bs), stream[16:20])  # (seed, step) only
    assert not torch.equal(batch_indices(4, 0, n, bs), stream[:4])


def test_quantization_bypass_gives_the_unquantized_logits(models):
    """--distill's reference forward must be the original model, bit for bit."""
    from dmx import data
    from dmx.search.train import quantization_bypassed

    model, _ = data.load_model_and_tokenizer(models["qwen3"])
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        layers = wrap_model(model, "fp8-fp4")
        quantized = model(input_ids=ids).logits
        with quantization_bypassed(layers):
            bypassed = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert torch.equal(bypassed, plain)
    assert not torch.equal(quantized, plain)
    assert torch.equal(again, quantized)  # the bypass is undone on exit
