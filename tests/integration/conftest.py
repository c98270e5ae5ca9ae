"""OUT directories the runtime tests export: the embedded demo's search result and stories260K.

Session-scoped, so the llama.cpp and the transformers tests share one short search.
"""
from __future__ import annotations

import pytest

from dmx import data
from runtime_helpers import STORIES, formats_of


@pytest.fixture(scope="session")
def demo_out(tmp_path_factory):
    """A short dMX search on the embedded tiny-qwen3 at 6 bits, weights only (GGUF stores
    weights only, so llama.cpp and `dmx eval` then run the same numbers, bar Q8_0): the
    mixed MXFP4 + MXFP8 assignment `dmx demo` produces, in seconds."""
    from dmx.search import search

    root = tmp_path_factory.mktemp("demo")
    calib = root / "calib.txt"
    calib.write_text(data.default_calibration_file().read_text(encoding="utf-8")[:40000],
                     encoding="utf-8")
    out = root / "dmx-6"
    search(str(data.embedded_model_dir()), 6.0, calib=[calib], steps=4, batch_size=2,
           seqlen=64, samples=8, init="target", lam=0.1, out=out, progress=False,
           weights_only=True)
    assert formats_of(out) == {"fp4_e2m1", "fp8_e4m3"}
    return out


@pytest.fixture(scope="session")
def stories_out(tmp_path_factory):
    """stories260K (Llama, real weights) with MXFP4 attention, weights only. Its MLP
    (in_features 172, not a multiple of 32) stays full precision: every target refuses it."""
    from dmx.baseline import uniform_baseline

    out = tmp_path_factory.mktemp("stories") / "mxfp4-attn"
    uniform_baseline(str(STORIES), "fp4_e2m1", out, weights_only=True, include=["self_attn"])
    return out
