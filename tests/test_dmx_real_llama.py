"""The whole dmx pipeline on a real pretrained checkpoint nobody here trained.

tests/data/stories260K-hf is llama2.c's stories260K (MIT) as a LlamaForCausalLM: widths
64 and 172, so the MLP's 172-wide input is 5 full blocks plus a ragged block of 12, and
the tokenizer is a SentencePiece-style BPE, not the embedded model's. search -> OUT ->
load must give the searched model's logits bit for bit; the packed bytes must be mxref's
encoding of the weights; perplexity must stay close to the unquantized model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import safetensors  # noqa: F401 (hard dependencies: a broken install fails, never skips)
import transformers  # noqa: F401

import mxref  # noqa: E402
from dmx import data  # noqa: E402
from dmx import outdir
from dmx.eval.command import evaluate  # noqa: E402
from dmx.search import search  # noqa: E402

MODEL = Path(__file__).resolve().parent / "data" / "stories260K-hf"
WIKI = Path(__file__).resolve().parents[1] / "dmx" / "data" / "wikitext-2-raw" / "wiki.valid.raw"


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    calib = tmp_path_factory.mktemp("calib") / "calib.txt"
    calib.write_text(WIKI.read_text(encoding="utf-8")[:30000], encoding="utf-8")
    out = tmp_path_factory.mktemp("runs") / "out"
    # --export-target none: the point here is the ragged 172-wide down_proj blocks
    result = search(MODEL, 6.0, calib=[calib], steps=6, batch_size=2, seqlen=64, samples=12,
                    out=out, progress=False, export_target="none")
    return out, result, calib


def test_default_export_target_leaves_ragged_layers_out_and_says_so(tmp_path, capsys):
    """The default --export-target any: down_proj (172 wide) cannot be exported anywhere,
    so it stays in full precision, said before the first step with the coverage."""
    from dmx.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text(WIKI.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    out = tmp_path / "out"
    assert main(["search", "--model", str(MODEL), "--target-bits", "5", "--calib", str(calib),
                 "--steps", "1", "--batch-size", "1", "--seqlen", "32", "--samples", "1",
                 "--no-progress", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "leaving 5 of 35 linears in full precision" in err and "172" in err, err
    manifest = json.loads((out / "dmx_manifest.json").read_text())
    assert not any(n.endswith("down_proj") for n in manifest["layers"])
    every = manifest["avg_bits"]["all_linears"]
    assert (every["n_linears"], every["n_quantized"]) == (36, 30)  # + lm_head
    assert every["weights_simple"] > manifest["avg_bits"]["simple"]  # float32 layers count


def test_ragged_mlp_layers_are_quantized(searched):
    out, result, _ = searched
    manifest = json.loads((out / "dmx_manifest.json").read_text())
    down = manifest["layers"]["model.layers.0.mlp.down_proj"]
    assert down["shape"] == [64, 172]
    assert len(manifest["layers"]) == 5 * 7  # every linear of the 5 blocks, not lm_head


def test_loaded_logits_equal_searched_model(searched):
    out, result, _ = searched
    ids = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = result["model"](input_ids=ids).logits
        model, _tok, _manifest = outdir.load(out)
        got = model(input_ids=ids).logits
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


def test_packed_bytes_are_mxref_encoding_of_the_weights(searched):
    """Independent of dmx's torch quantizers: re-encode the source float32 weight with
    mxref and compare with the bytes in OUT/model.safetensors."""
    from safetensors.numpy import load_file

    out, result, _ = searched
    source = load_file(str(MODEL / "model.safetensors"))
    stored = load_file(str(out / "model.safetensors"))
    checked = 0
    for name, fmt in result["formats"].items():
        w = source[f"{name}.weight"]
        mx = mxref.quantize(w, fmt, axis=-1, block_size=32)
        assert np.array_equal(stored[f"{name}.weight_scale"], mx.scales.reshape(w.shape[0], -1))
        assert np.array_equal(stored[f"{name}.weight_packed"], mxref.pack_codes(mx.codes, fmt))
        checked += 1
    assert checked == 35


def test_perplexity_close_to_unquantized(searched):
    out, _result, calib = searched
    fp_model, tok = data.load_model_and_tokenizer(MODEL)
    q_model, q_tok, _ = outdir.load(out)
    fp = evaluate(fp_model, tok, data_file=calib, seqlen=64, max_windows=20, progress=False)
    q = evaluate(q_model, q_tok, data_file=calib, seqlen=64, max_windows=20, progress=False)
    fp_ppl, q_ppl = float(fp["ppl"]), float(q["ppl"])
    # wiki text is far from TinyStories (ppl ~170): quantization noise can move it either
    # way, so only "it changed" (the weights really are MX) and "not destroyed" are checked
    assert math.isfinite(q_ppl) and q_ppl != fp_ppl
    assert q_ppl < fp_ppl * 1.5, (fp_ppl, q_ppl)
