"""cocotb test of rtl/mx_quantize_fp4.sv: Hypothesis blocks in, mxref expectations out.

Hypothesis draws MX blocks with ``verification.strategies.mx_blocks`` (maxima next to
powers of two, exact ties at the block scale, saturation, NaN/Inf, signed zeros,
subnormals), float32 and bfloat16; each block is driven into the running simulation and
the DUT's scale and codes must equal ``mxref.quantize(block, "fp4_e2m1")`` (profile
``ocp``) bit for bit. A failure is shrunk by Hypothesis to a minimal block.

Hypothesis is synchronous and the simulation is not, so the property runs in a
``cocotb.bridge`` thread and reaches the DUT through a ``cocotb.resume`` function that
blocks until the simulator has clocked one block through. Not a pytest module: run it
with ``python examples/rtl/cocotb/run_cocotb.py`` (it builds the simulation first).

Environment: ``MX_COCOTB_EXAMPLES`` (default 200) sets Hypothesis' max_examples;
``HYPOTHESIS_PROFILE=ci`` derandomizes it (the project's CI profile);
``MX_COCOTB_GENERATED_ONLY=1`` leaves out the two explicit examples, so that only
Hypothesis' own draws can find a bug (how the tests show the stimulus finds one).
"""
from __future__ import annotations

import os
import warnings

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.task import bridge, resume
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisSideeffectWarning

import mxref
from verification.strategies import mx_blocks

# cocotb configures pytest (for assertion rewriting), which loads Hypothesis' pytest plugin
# without ever starting a pytest session, so Hypothesis believes it is still initialising
# and warns on every strategy it builds. The warning does not apply here.
warnings.filterwarnings("ignore", category=HypothesisSideeffectWarning)

FMT = "fp4_e2m1"
K = 32


PHASES = ([Phase.generate, Phase.shrink] if os.environ.get("MX_COCOTB_GENERATED_ONLY") == "1"
          else [Phase.explicit, Phase.generate, Phase.shrink])


def float32_words(block: np.ndarray) -> list[int]:
    """The block as float32 bit patterns: bfloat16 widens exactly (16 zero bits below)."""
    if block.dtype == np.float32:
        return block.view(np.uint32).tolist()
    return (block.view(np.uint16).astype(np.uint32) << 16).tolist()


def _f32(*bits: int) -> np.ndarray:
    """A K-element float32 block from leading bit patterns (the rest +0)."""
    return np.array(list(bits) + [0] * (K - len(bits)), np.uint32).view(np.float32)


@cocotb.test()
async def quantize_matches_mxref(dut):
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst_n.value = 0
    dut.in_valid.value = 0
    dut.x.value = 0
    await FallingEdge(dut.clk)
    dut.rst_n.value = 1

    @resume
    async def quantize_on_dut(words: list[int]) -> tuple[int, list[int]]:
        await FallingEdge(dut.clk)               # drive between edges
        dut.x.value = sum(w << (32 * i) for i, w in enumerate(words))
        dut.in_valid.value = 1
        await RisingEdge(dut.clk)                # the block is registered here
        await ReadOnly()                         # outputs settled after the edge
        assert int(dut.out_valid.value) == 1, "out_valid did not follow in_valid"
        packed = int(dut.codes.value)
        return int(dut.scale.value), [(packed >> (4 * i)) & 0xF for i in range(K)]

    blocks = st.one_of(mx_blocks(FMT, K, "float32"), mx_blocks(FMT, K, "bfloat16"))

    @settings(max_examples=int(os.environ.get("MX_COCOTB_EXAMPLES", "200")), deadline=None,
              database=None, derandomize=os.environ.get("HYPOTHESIS_PROFILE") == "ci",
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
              phases=PHASES)
    @given(block=blocks)
    # The two classic MX traps, always run first: the block max 7.9999995 sits one float32
    # ulp below 8 (floor(log2) must give 2, scale 2^0, element 6.0), and 0.25 next to a
    # max of 4.0 is an exact tie between 0 and 0.5 (ties to even: 0).
    @example(block=_f32(0x40FFFFFF, 0x3F800000))
    @example(block=_f32(0x40800000, 0x3E800000, 0xBF400000))
    def dut_matches_mxref(block):
        want = mxref.quantize(block, FMT)                  # profile ocp
        scale, codes = quantize_on_dut(float32_words(block))
        want_scale, want_codes = int(want.scales[0]), want.codes.tolist()
        bad = [i for i in range(K) if codes[i] != want_codes[i]]
        assert (scale, codes) == (want_scale, want_codes), (
            f"DUT scale {scale:02X} (mxref {want_scale:02X}); codes differ at elements "
            + ", ".join(f"{i}: x {float32_words(block)[i]:08X} DUT {codes[i]:X} mxref "
                        f"{want_codes[i]:X}" for i in bad[:4])
            + (" ..." if len(bad) > 4 else ""))

    await bridge(dut_matches_mxref)()
