"""Conformance matrix: the known disagreement classes get their named causes."""
import importlib.util

import pytest

from verification.conformance import run


def _causes(res, lib, fmt):
    return {c["cause"] for c in res["causes"] if c["library"] == lib and c["format"] == fmt}


def test_ml_dtypes_named_causes():
    res = run(["ml_dtypes"], ["fp8_e4m3", "fp4_e2m1", "int8"], "1", progress=False)
    assert "saturation: OFP8 overflow to NaN/Inf" in _causes(res, "ml_dtypes", "fp8_e4m3")
    assert _causes(res, "ml_dtypes", "fp4_e2m1") == {"NaN/Inf handling"}
    assert any(s.get("format") == "int8" for s in res["skipped"])


@pytest.mark.skipif(importlib.util.find_spec("gfloat") is None, reason="gfloat not installed")
def test_gfloat_named_causes():
    res = run(["gfloat"], ["fp4_e2m1", "int8"], "1", progress=False)
    assert "scale rule: float32 log2 error" in _causes(res, "gfloat", "fp4_e2m1")
    assert "scale rule: float32 log2 error + -128" in _causes(res, "gfloat", "int8")
    assert not any("unexplained" in c or "partial" in c
                   for f in ("fp4_e2m1", "int8") for c in _causes(res, "gfloat", f))


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")
def test_torchao_named_causes():
    res = run(["torchao"], ["fp8_e4m3"], "1", progress=False)
    by = {}
    for c in res["causes"]:
        by.setdefault(c["variant"], set()).add(c["cause"])
    assert by["FLOOR"] <= {"NaN/Inf handling", "scale 2^-127: elements scaled by 2^-126"}
    assert by["RCEIL"] == {"NaN/Inf handling",
                           "scale rule: rceil + scale 2^-127: elements flushed to zero"}
    rows = [r for r in res["matrix"] if r["variant"] == "FLOOR" and r["category"] == "tie"]
    assert rows and rows[0]["agree"] == rows[0]["total"]
