"""Our vLLM checkpoints run in transformers and give dmx.load's logits.

Every compressed-tensors and Quark export is loaded with ``from_pretrained`` in its default
dtype and in bfloat16, run on 128 tokens of wiki.test.raw, and compared with ``dmx.load`` of
the same OUT in the same dtype:

* weights-only OUTs: **the same logits, bit for bit** (the engines decode the MX weights to
  the numbers mxref decodes, and the rest of the model is the same transformers code);
* OUTs with MX activations: the engines quantize activations with their own scale rule
  (compressed-tensors ``generate_mx_scales`` and Quark ``scale_calculation_mode="even"``
  round the block max to the element's precision before taking the exponent; dmx uses OCP's
  floor), so the logits differ: measured relative L2 error 0.11 (tiny-qwen3 uniform W4A4,
  both engines), asserted below 0.2; a wrong weight layout (nibbles swapped) gives 1.0+.

What cannot run is refused at export time (MXFP8 weights to Quark), checked here too.
"""
from __future__ import annotations

import json

import pytest
import torch

from dmx import data
from dmx.errors import DMXError
from dmx.export import export
from runtime_helpers import formats_of

WA_TOLERANCE = 0.2     # relative L2 of the logits, MX activations (measured 0.11)


def _quark_or_skip():
    return pytest.importorskip(
        "quark.torch", reason="amd-quark is not installed (in the test extra for Python >= "
                              "3.11: pip install -e '.[test]'); the Quark export's transformers "
                              "run needs it")


@pytest.fixture(scope="module")
def text_ids():
    return data.default_eval_file().read_text(encoding="utf-8")[:3000]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _dmx_logits(out, text, dtype):
    import dmx
    model, tok, _ = dmx.load(out, dtype=dtype)
    ids = tok(text, return_tensors="pt").input_ids[:, :128]
    return _logits(model, ids), ids


def _hf(dest, dtype=None):
    from transformers import AutoModelForCausalLM
    kw = {} if dtype is None else {"dtype": dtype}
    return AutoModelForCausalLM.from_pretrained(str(dest), **kw)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def uniform_outs(tmp_path_factory):
    """tiny-qwen3, every linear MXFP4: weights only, and weights + activations."""
    from dmx.search.baseline import uniform_baseline
    root = tmp_path_factory.mktemp("uniform")
    outs = {}
    for name, wo in (("w4a16", True), ("w4a4", False)):
        uniform_baseline(str(data.embedded_model_dir()), "fp4_e2m1", root / name, weights_only=wo)
        outs[name] = root / name
    return outs


def _check_weights_only(out, dest, text, default_dtype):
    """Default dtype and bfloat16: both bit-identical to dmx.load in that dtype."""
    for dtype in (None, torch.bfloat16):
        model = _hf(dest, dtype)
        got = next(model.parameters()).dtype
        assert got == (default_dtype if dtype is None else dtype)
        ref, ids = _dmx_logits(out, text, got)
        assert torch.equal(_logits(model, ids), ref), (dest.name, got)
        gen = model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
        assert gen.shape[1] == 12


@pytest.mark.parametrize("which", ["demo", "stories", "w4a16"])
def test_compressed_tensors_logits_equal_dmx_load(which, demo_out, stories_out, uniform_outs,
                                                   text_ids, tmp_path):
    out = {"demo": demo_out, "stories": stories_out, "w4a16": uniform_outs["w4a16"]}[which]
    dest = tmp_path / "ct"
    export(out, "compressed-tensors", dest, log=lambda *_: None)
    assert json.loads((dest / "config.json").read_text())["dtype"] == "bfloat16"
    # compressed-tensors decodes MX weights to bfloat16: the export makes that the default
    _check_weights_only(out, dest, text_ids, default_dtype=torch.bfloat16)


@pytest.mark.parametrize("which", ["stories", "w4a16"])
def test_quark_logits_equal_dmx_load(which, stories_out, uniform_outs, text_ids, tmp_path):
    _quark_or_skip()
    out = {"stories": stories_out, "w4a16": uniform_outs["w4a16"]}[which]
    dest = tmp_path / "quark"
    export(out, "quark", dest, log=lambda *_: None)
    _check_weights_only(out, dest, text_ids, default_dtype=torch.float32)


@pytest.mark.parametrize("to", ["compressed-tensors", "quark"])
def test_mx_activations_within_tolerance(to, uniform_outs, text_ids, tmp_path):
    if to == "quark":
        _quark_or_skip()
    out, dest = uniform_outs["w4a4"], tmp_path / to
    export(out, to, dest, log=lambda *_: None)
    for dtype in (None, torch.bfloat16):
        model = _hf(dest, dtype)
        got = next(model.parameters()).dtype
        ref, ids = _dmx_logits(out, text_ids, got)
        err = _rel(_logits(model, ids), ref)
        assert err < WA_TOLERANCE, (to, got, err)
        assert model.generate(ids[:, :8], max_new_tokens=4, do_sample=False).shape[1] == 12


def test_wrong_layout_is_far_outside_the_tolerance(uniform_outs, text_ids, tmp_path):
    """The comparison can fail: swap the two FP4 nibbles of every byte of one export."""
    from safetensors.torch import load_file, save_file

    out, dest = uniform_outs["w4a16"], tmp_path / "ct"
    export(out, "compressed-tensors", dest, log=lambda *_: None)
    for f in dest.glob("model-*.safetensors"):
        t = load_file(str(f))
        t = {k: ((v >> 4) | (v << 4)) if k.endswith("weight_packed") else v for k, v in t.items()}
        save_file(t, str(f), metadata={"format": "pt"})
    model = _hf(dest)
    ref, ids = _dmx_logits(out, text_ids, torch.bfloat16)
    assert _rel(_logits(model, ids), ref) > 5 * WA_TOLERANCE


def test_quark_refuses_mxfp8_weights(demo_out, tmp_path):
    """amd-quark cannot dequantize per-group FP8 weights, so such an export would load and
    then fail in generate: refused, with the reason and the alternative."""
    assert "fp8_e4m3" in formats_of(demo_out)
    with pytest.raises(DMXError, match=r"MXFP8 weights .*Unsupported QuantSchema.*"
                                       r"--to compressed-tensors"):
        export(demo_out, "quark", tmp_path / "q", log=lambda *_: None)
    assert not (tmp_path / "q").exists()

