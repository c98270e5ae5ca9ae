"""dmx.quant.fakequant against the golden model: equal bit patterns, never allclose."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mxref
from dmx.errors import DMXError
from dmx.quant.fakequant import dequantize_codes, fake_quantize, quantize_codes
from torch_helpers import CUDA, EXAMPLES, bits, to_numpy, to_torch
from verification.strategies import element_formats, mx_blocks, mx_tensors, profiles

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16, "float64": torch.float64}
pytestmark = pytest.mark.usefixtures("single_threaded")  # tests/conftest.py


def reference(x: torch.Tensor, fmt, axis, bs, profile):
    """mxref's MXArray and its dequantized value cast to x.dtype (float64 stays float64).

    The cast is numpy's / ml_dtypes' (round to nearest even, NaN stays the canonical quiet
    NaN), not torch's: torch's own float32 -> bfloat16 cast writes NaN as 0x7FC0 on its
    scalar path but 0xFFFF on its vectorised CPU path and 0x7FFF on CUDA.
    """
    mx = mxref.quantize(to_numpy(x), fmt, axis, bs, profile)
    ref = mxref.dequantize(mx, np.float64 if x.dtype == torch.float64 else np.float32)
    # a dequantized value past the input dtype's finite range (float16 inputs near its max)
    # casts to inf, as fake_quantize's own cast does: expected, and compared bit for bit
    with np.errstate(over="ignore"):
        return mx, to_torch(ref.astype(to_numpy(x[..., :0]).dtype))


def check_all(x: torch.Tensor, fmt, axis=-1, bs=32, profile="ocp"):
    mx, ref = reference(x, fmt, axis, bs, profile)
    y = fake_quantize(x, fmt, axis, bs, profile)
    assert y.dtype == x.dtype and y.shape == x.shape and y.device == x.device
    bad = (bits(y) != bits(ref)).nonzero()
    assert bad.numel() == 0, (
        f"fake_quantize differs from mxref ({fmt}, {profile.name if hasattr(profile, 'name') else profile}, "
        f"{x.dtype}, {x.device}) at {bad.shape[0]} elements; first: "
        + "; ".join(f"{tuple(i.tolist())}: x={x.cpu()[tuple(i)].item()!r} "
                    f"got={y.cpu()[tuple(i)].item()!r} want={ref[tuple(i)].item()!r}"
                    for i in bad[:3]))
    codes, scales = quantize_codes(x, fmt, axis, bs, profile)
    assert codes.dtype == torch.uint8 and scales.dtype == torch.uint8
    np.testing.assert_array_equal(codes.cpu().numpy(), mx.codes)
    np.testing.assert_array_equal(scales.cpu().numpy(), mx.scales)
    back = dequantize_codes(codes, scales, fmt, bs)
    expect = np.moveaxis(mxref.dequantize(mx), mx.axis, -1)
    np.testing.assert_array_equal(back.cpu().numpy().view(np.uint32),
                                  np.ascontiguousarray(expect).view(np.uint32))


# ---------------------------------------------------------------------------- properties
@settings(max_examples=EXAMPLES)
@given(st.data())
def test_random_tensors_match_mxref(data):
    fmt = data.draw(element_formats())
    dtype = data.draw(st.sampled_from(sorted(TORCH_DTYPES)))
    profile = data.draw(profiles())
    arr, axis, bs = data.draw(mx_tensors(fmt, dtype=dtype))
    check_all(to_torch(arr), fmt, axis, bs, profile)


@settings(max_examples=EXAMPLES)
@given(st.data())
def test_adversarial_blocks_match_mxref(data):
    """Blocks built to stress the scale rule (near powers of two, ties, saturation,
    NaN/Inf, zeros, subnormals, clamped scales), three blocks per row."""
    fmt = data.draw(element_formats())
    dtype = data.draw(st.sampled_from(sorted(TORCH_DTYPES)))
    profile = data.draw(profiles())
    rows = [np.concatenate([data.draw(mx_blocks(fmt, 32, dtype)) for _ in range(3)])
            for _ in range(2)]
    x = to_torch(np.stack(rows))
    check_all(x, fmt, -1, 32, profile)
    check_all(x.T.contiguous(), fmt, 0, 32, profile)


@pytest.mark.parametrize("fmt", sorted(mxref.FORMATS))
@pytest.mark.parametrize("profile", sorted(mxref.PRESETS))
def test_every_format_profile_and_dtype(fmt, profile):
    g = torch.Generator().manual_seed(hash((fmt, profile)) % 2**31)
    base = torch.randn(6, 75, generator=g) * torch.exp(3 * torch.randn(6, 75, generator=g))
    base[0, :7] = 0.0
    base[1, 3] = float("nan")
    base[2, 40] = -float("inf")
    base[3] = -0.0
    base[4, ::3] *= 1e-6
    for dtype in TORCH_DTYPES.values():
        x = base.to(dtype)
        for axis in (-1, 0):
            check_all(x, fmt, axis, 32, profile)


def test_known_values_fp4():
    # block max 6 -> scale 1; 2.5 is a tie between 2 and 3 (even: 2); 5 -> 4 or 6 tie (even: 4)
    x = torch.tensor([6.0, 2.5, 5.0, -0.25, -0.0, 0.75, 100.0 / 17] + [0.0] * 25)
    y = fake_quantize(x, "fp4_e2m1")
    assert y[:7].tolist() == [6.0, 2.0, 4.0, -0.0, -0.0, 1.0, 6.0]
    assert torch.signbit(y[3]) and torch.signbit(y[4])


def test_fp4_floor_log2_trap():
    # float32 log2(7.9999995) rounds to 3.0; the exact floor is 2 -> scale 2^0, max clamps to 6
    x = torch.full((32,), np.nextafter(np.float32(8.0), np.float32(0)), dtype=torch.float32)
    _, scales = quantize_codes(x, "fp4_e2m1")
    assert scales.tolist() == [127]
    assert fake_quantize(x, "fp4_e2m1")[0].item() == 6.0


# ---------------------------------------------------------------------------- autograd
def test_straight_through_gradient():
    x = torch.randn(4, 64, dtype=torch.float32, requires_grad=True)
    g = torch.randn(4, 64)
    fake_quantize(x, "fp4_e2m1").backward(g)
    assert torch.equal(x.grad, g)


def test_bfloat16_gradient_dtype():
    x = torch.randn(3, 40).to(torch.bfloat16).requires_grad_(True)
    y = fake_quantize(x, "fp8_e4m3", axis=0)
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad, torch.ones_like(x))


def test_traces_without_graph_breaks():
    """fullgraph=True fails on any graph break; aot_eager keeps the check fast."""
    fq = torch.compile(fake_quantize, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 96)
    for fmt in ("fp4_e2m1", "fp8_e4m3"):
        assert torch.equal(bits(fq(x, fmt)), bits(fake_quantize(x, fmt)))


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call, match", [
    (lambda: fake_quantize(torch.ones(4, dtype=torch.int32), "fp4_e2m1"), "dtype"),
    (lambda: fake_quantize(torch.tensor(1.0), "fp4_e2m1"), "0-d"),
    (lambda: fake_quantize(torch.ones(4), "fp4_e2m1", axis=2), "axis"),
    (lambda: fake_quantize(torch.ones(4), "fp4_e2m1", block_size=0), "block size"),
    (lambda: fake_quantize(torch.ones(4), "fp5_e9m9"), "unknown format"),
    (lambda: fake_quantize(torch.ones(4), "fp4_e2m1", profile="nope"), "unknown profile"),
    (lambda: quantize_codes([1.0, 2.0], "fp4_e2m1"), "torch.Tensor"),
    (lambda: dequantize_codes(torch.zeros(4, dtype=torch.uint8),
                              torch.zeros(2, dtype=torch.uint8), "fp4_e2m1"), "shape"),
    (lambda: dequantize_codes(torch.full((4,), 16, dtype=torch.uint8),
                              torch.zeros(1, dtype=torch.uint8), "fp4_e2m1"), "out of range"),
    (lambda: dequantize_codes(torch.zeros(4, dtype=torch.int64),
                              torch.zeros(1, dtype=torch.uint8), "fp4_e2m1"), "uint8"),
])
def test_bad_input_raises_one_line_value_error(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_dmx_error_is_value_error_and_mxerror():
    assert issubclass(DMXError, ValueError) and issubclass(DMXError, mxref.MXError)


# ---------------------------------------------------------------------------- CUDA
@CUDA
@settings(max_examples=EXAMPLES)
@given(st.data())
def test_cuda_matches_mxref(data):
    fmt = data.draw(element_formats())
    dtype = data.draw(st.sampled_from(["float32", "bfloat16", "float16"]))
    profile = data.draw(profiles())
    arr, axis, bs = data.draw(mx_tensors(fmt, dtype=dtype))
    check_all(to_torch(arr).cuda(), fmt, axis, bs, profile)


@CUDA
def test_cuda_adversarial_blocks():
    for fmt in mxref.FORMATS:
        for dtype in ("float32", "bfloat16", "float16"):
            blocks = [mx_blocks(fmt, 32, dtype).example() for _ in range(8)]
            check_all(to_torch(np.stack(blocks)).cuda(), fmt)
