"""OUT directories the runtime tests export: the embedded demo's search result and stories260K.

Session-scoped, so the llama.cpp and the transformers tests share one short search.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from runtime_helpers import STORIES, formats_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: demo_search


@pytest.fixture(scope="session")
def demo_out(tmp_path_factory):
    """A short dMX search on the embedded tiny-qwen3 at 6 bits, weights only (GGUF stores
    weights only, so llama.cpp and `dmx eval` then run the same numbers, bar Q8_0): the
    mixed MXFP4 + MXFP8 assignment `dmx demo` produces, in seconds."""
    from demo_search import demo_search  # noqa: E402 (tests/ on the path above)

    out = demo_search(tmp_path_factory.mktemp("demo"), weights_only=True)
    assert formats_of(out) == {"fp4_e2m1", "fp8_e4m3"}
    return out


@pytest.fixture(scope="session")
def stories_out(tmp_path_factory):
    """stories260K (Llama, real weights) with MXFP4 attention, weights only. Its MLP
    (in_features 172, not a multiple of 32) stays full precision: every target refuses it."""
    from dmx.search.baseline import uniform_baseline

    out = tmp_path_factory.mktemp("stories") / "mxfp4-attn"
    uniform_baseline(str(STORIES), "fp4_e2m1", out, weights_only=True, include=["self_attn"])
    return out
