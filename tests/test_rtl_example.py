"""examples/rtl: a SystemVerilog MX quantizer simulated with Icarus Verilog, checked by mxverify.

The correct design must pass level-1 and level-2 quantize vectors through the $readmemh
testbench (examples/rtl/run.sh -> `mxverify check`, exit 0); each buggy variant must fail
with the mismatch category and bit named; the cocotb test (Hypothesis stimulus, mxref
expectations) must pass on the correct design and catch the ties-away bug by itself.
Needs the `iverilog` binary (.ci/run installs it); cocotb comes with the test extra.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cocotb  # noqa: F401  (test extra: a missing cocotb must fail here, not skip)
import pytest
from hypothesis import settings

from verification.vectors import build

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "rtl"

pytestmark = pytest.mark.skipif(
    shutil.which("iverilog") is None or shutil.which("vvp") is None,
    reason="Icarus Verilog is not installed (apt-get install -y iverilog; .ci/run does it)")


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    """Level-1 and level-2 fp4_e2m1 quantize suites, generated once for every variant."""
    root = tmp_path_factory.mktemp("rtl_vectors")
    out = {}
    for level in ("1", "2"):
        out[level] = root / f"level{level}"
        build(str(out[level]), "quantize", "fp4_e2m1", level, seed=1, emit=("hex",))
    return out


def run_sh(variant, vectors, out):
    """examples/rtl/run.sh: compile, simulate, `mxverify check`; returns (rc, stdout, report)."""
    env = dict(os.environ, PYTHON=sys.executable)
    p = subprocess.run(["bash", str(EXAMPLE / "run.sh"), "--variant", variant,
                        "--vectors", str(vectors), "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode in (0, 1), p.stdout + p.stderr
    report = json.loads((out / "report.json").read_text())
    return p.returncode, p.stdout, report


@pytest.mark.parametrize("level", ["1", "2"])
def test_correct_design_passes_mxverify_check(suites, level, tmp_path):
    rc, stdout, report = run_sh("correct", suites[level], tmp_path)
    n = json.loads((suites[level] / "manifest.json").read_text())["n_vectors"]
    assert rc == 0, stdout
    assert f"In {n} vectors (quantize fp4_e2m1, profile ocp), no errors found." in stdout
    assert report["verdict"] == "pass" and report["vectors"] == n
    assert len((tmp_path / "dut.hex").read_text().splitlines()) == n   # the DUT's own dump


def test_ties_away_bug_is_caught_as_ties_in_the_last_bit(suites, tmp_path):
    rc, stdout, report = run_sh("ties_away", suites["1"], tmp_path)
    assert rc == 1
    # every mismatch is an element that rounded a tie up by one step, in the categories
    # that hold exact ties (midpoints, subnormal halves, half the smallest subnormal)
    assert "tie" in report["mismatches_by_category"]
    assert set(report["mismatches_by_category"]) <= {"tie", "subnormal_result", "underflow"}
    assert report["mismatches_by_class"] == {"one_step": report["mismatches"]}
    first = report["failures"][0]
    assert (first["category"], first["field"], first["xor"], first["class"]) == \
        ("tie", "codes", "01", "one_step")
    assert abs(first["got_value"]) > abs(first["expected_value"])      # away from zero
    assert f"vector {first['vector']} (tie) block 0 element {first['element']} codes" in stdout
    assert "xor 01" in stdout and stdout.rstrip().splitlines()[-1].startswith("FAIL:")


def test_rounded_amax_bug_is_caught_as_a_doubled_scale(suites, tmp_path):
    rc, stdout, report = run_sh("rounded_amax", suites["1"], tmp_path)
    assert rc == 1
    scale_fails = [f for f in report["failures"] if f["field"] == "scale"]
    first = scale_fails[0]
    assert (first["category"], first["xor"], first["steps"], first["class"]) == \
        ("amax_position", "01", 1, "scale")                             # 2^k -> 2^(k+1)
    assert "amax_position" in report["mismatches_by_category"]
    assert f"vector {first['vector']} (amax_position) block 0 scale: expected" in stdout


def test_run_sh_refuses_a_suite_the_testbench_cannot_read(tmp_path):
    build(str(tmp_path / "conv"), "convert", "fp4_e2m1", "1", seed=1, emit=("hex",))
    p = subprocess.run(["bash", str(EXAMPLE / "run.sh"), "--vectors", str(tmp_path / "conv"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHON=sys.executable), timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"run.sh: error: {tmp_path / 'conv'}: a convert fp4_e2m1 suite (block size 32); this "
        f"DUT needs --op quantize --format fp4_e2m1, blocks of 32"]
    assert not (tmp_path / "out" / "dut.hex").exists()


def run_cocotb(variant, tmp_path, *extra, hypothesis_profile=None):
    env = dict(os.environ)
    if hypothesis_profile:
        env["HYPOTHESIS_PROFILE"] = hypothesis_profile
    p = subprocess.run([sys.executable, str(EXAMPLE / "cocotb" / "run_cocotb.py"),
                        "--variant", variant, "--build-dir", str(tmp_path / "sim"), *extra],
                       capture_output=True, text=True, env=env, timeout=600)
    return p.returncode, p.stdout + p.stderr


def test_cocotb_hypothesis_blocks_match_mxref_on_the_correct_design(tmp_path):
    # as many examples as the loaded Hypothesis profile asks for (default 150)
    rc, log = run_cocotb("correct", tmp_path, "--examples", str(settings().max_examples))
    assert rc == 0, log[-3000:]
    assert "correct: 1 of 1 cocotb tests passed" in log


def test_cocotb_hypothesis_finds_the_ties_away_bug_without_explicit_examples(tmp_path):
    rc, log = run_cocotb("ties_away", tmp_path, "--examples", "150", "--generated-only",
                         hypothesis_profile="ci")                      # derandomized
    assert rc == 1, log[-3000:]
    # Hypothesis reports its shrunk example as "Falsifying example" (6.155) or "Failing test
    # case" (6.170): either way the bug was found by Hypothesis' own draws and shrunk
    assert ("Falsifying example" in log or "Failing test case" in log), log[-3000:]
    assert "ties_away: 0 of 1 cocotb tests passed" in log
