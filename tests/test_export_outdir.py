"""Checks of the reader of a tiny OUT directory (docs/CONTRACT.md); ``build_out``, which
writes it, is in tests/tiny_out.py (shared with the export and integrity tests).
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

import mxref
from tiny_out import build_out


@pytest.fixture(scope="module")
def qwen_out(tmp_path_factory):
    return build_out(tmp_path_factory.mktemp("src"), "qwen3")


def test_reader_decodes_exactly_what_was_packed(qwen_out):
    from dmx.outdir.read import read_out

    src = read_out(qwen_out)
    assert len(src.layers) == 14 and "model.embed_tokens.weight" in src.tensors
    name = "model.layers.1.mlp.down_proj"
    layer = src.layers[name]
    assert layer.fmt == "fp8_e4m3" and layer.shape == (64, 128)
    from safetensors.numpy import load_file
    raw = load_file(str(qwen_out / "model.safetensors"))
    assert np.array_equal(mxref.pack_codes(layer.codes, layer.fmt), raw[name + ".weight_packed"])


def test_reader_rejects_changed_bytes(tmp_path, qwen_out):
    from safetensors.numpy import load_file, save_file
    from dmx.errors import DMXError
    from dmx.outdir.read import read_out

    bad = tmp_path / "bad"
    shutil.copytree(qwen_out, bad)
    t = load_file(str(bad / "model.safetensors"))
    t["model.layers.0.mlp.up_proj.weight_scale"][0, 0] ^= 1
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(DMXError, match="sha256"):
        read_out(bad)
