"""Issue #7's bar: the embedded demo model's *search result* exports to all three targets
and every MX layer reads back bit for bit with the target's own reader (Q8_0 layers of the
GGUF export: lossy by design, the error is bounded and reported). Quark refuses the result's
MXFP8 weights (amd-quark cannot run them); tests/integration runs these exports in llama.cpp
and transformers.

A short dMX search on tiny-qwen3 (the model `dmx demo` uses) at a budget that mixes MXFP4
and MXFP8, then `dmx.export.export(..., verify=True)` per target.
"""
from __future__ import annotations

import json

import pytest

import transformers  # noqa: F401 (a hard dependency: a broken install fails, never skips)

from dmx.export import export  # noqa: E402


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    from demo_search import demo_search

    out = demo_search(tmp_path_factory.mktemp("demo"))
    formats = {v["format"] for v in json.loads((out / "dmx_manifest.json").read_text())
               ["layers"].values()}
    assert formats == {"fp4_e2m1", "fp8_e4m3"}  # a mixed assignment: both paths exercised
    return out


@pytest.mark.parametrize("to", ["compressed-tensors", "gguf"])
def test_demo_search_result_exports_and_reads_back(searched, tmp_path, to):
    checks = export(searched, to, tmp_path / to, log=lambda *_: None)
    assert len(checks) == 42  # every linear of tiny-qwen3 was read back
    for c in checks:
        if c.stored_as == "Q8_0":  # llama.cpp has no MXFP8: re-quantized, error bounded
            assert to == "gguf" and c.max_abs_err < 2e-3, (c.name, c.max_abs_err)
        else:
            assert c.exact and c.mismatches == 0 and c.bytes_equal, c
    assert (tmp_path / to).is_dir()
