"""Build rtl/mx_quantize_fp4.sv with Icarus and run the cocotb test mx_quantize_cocotb.py.

    python examples/rtl/cocotb/run_cocotb.py [--variant correct|ties_away|rounded_amax]
                                            [--examples N] [--generated-only] [--build-dir DIR]

Exit status: 0 every cocotb test passed, 1 a test failed, 2 bad usage or no simulator.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RTL = HERE.parent / "rtl"
DEFINES = {"correct": {}, "ties_away": {"MX_BUG_TIES_AWAY": 1},
           "rounded_amax": {"MX_BUG_ROUNDED_AMAX": 1}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=sorted(DEFINES), default="correct")
    p.add_argument("--examples", type=int, default=200, help="Hypothesis max_examples")
    p.add_argument("--generated-only", action="store_true",
                   help="leave out the explicit examples: only Hypothesis' draws")
    p.add_argument("--build-dir", type=Path, default=None)
    a = p.parse_args(argv)
    if shutil.which("iverilog") is None:
        print("run_cocotb.py: error: iverilog not found; install Icarus Verilog "
              "(apt-get install -y iverilog)", file=sys.stderr)
        return 2
    from cocotb_tools.check_results import get_results
    from cocotb_tools.runner import get_runner

    # The runner checks results itself and exits when it sees PYTEST_CURRENT_TEST (inherited
    # when a pytest test starts this script); this script reports through its exit status.
    os.environ.pop("PYTEST_CURRENT_TEST", None)
    build = a.build_dir or HERE.parent / "build" / f"cocotb-{a.variant}"
    runner = get_runner("icarus")
    runner.build(sources=[RTL / "mx_fp4_encode.sv", RTL / "mx_quantize_fp4.sv"],
                 hdl_toplevel="mx_quantize_fp4", defines=DEFINES[a.variant],
                 build_args=["-Wall"], build_dir=build, timescale=("1ns", "1ps"),
                 always=True)
    # the simulator's Python must import this checkout's mxref/verification and the test
    pythonpath = os.pathsep.join([str(HERE), *sys.path])
    results = runner.test(hdl_toplevel="mx_quantize_fp4", test_module="mx_quantize_cocotb",
                          test_dir=build, build_dir=build,
                          extra_env={"PYTHONPATH": pythonpath,
                                     "MX_COCOTB_EXAMPLES": str(a.examples),
                                     "MX_COCOTB_GENERATED_ONLY": str(int(a.generated_only))})
    n_tests, n_failed = get_results(results)
    print(f"run_cocotb.py: {a.variant}: {n_tests - n_failed} of {n_tests} cocotb tests passed")
    return 0 if n_tests and not n_failed else 1


if __name__ == "__main__":
    sys.exit(main())
