"""The float32 sweep: mxref agrees with the independent float64 model on sampled ranges,
and the second model is not a copy (it catches a wrong rounding rule)."""
import numpy as np
import pytest

import mxref
from verification.cli import main
from verification.exhaustive import run, second_model_encode

STARTS = [0x00000000, 0x3E000000, 0x40000000, 0x7F700000, 0x7F800000, 0xBF000000, 0xFF7F0000]


@pytest.mark.parametrize("fmt", sorted(mxref.FORMATS))
@pytest.mark.parametrize("profile", ["ocp", "microxcaling", "ocp_ovf", "ocp_ftz", "int8_asym"])
def test_slices_agree(fmt, profile):
    for s in STARTS:
        r = run(fmt, profile, limit=1 << 12, start=s, progress=False)
        assert r["mismatches"] == 0, r["first_mismatches"]


def test_second_model_detects_a_rounding_difference():
    x = np.array([0.25, 0.75, 2.5, 5.0], np.float32)     # FP4 ties
    assert not np.array_equal(second_model_encode(x, "fp4_e2m1", "ocp"),
                              mxref.encode(x, "fp4_e2m1", "microxcaling"))


def test_cli_limit(capsys):
    assert main(["exhaustive", "--format", "fp4_e2m1", "--input", "float32",
                 "--limit", str(1 << 20), "--start", str(0x3F000000)]) == 0
    assert "no mismatches" in capsys.readouterr().out
    assert main(["exhaustive", "--format", "fp4_e2m1", "--limit", "0"]) == 2
