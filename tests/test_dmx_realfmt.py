"""dmx.quant.realfmt: bit-exact at the OCP points, sensible gradients in between."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mxref
from dmx.quant.fakequant import fake_quantize
from dmx.quant.realfmt import format_max, pow2, real_format_quantize
from verification.strategies import mx_blocks, mx_tensors

from torch_helpers import CUDA, EXAMPLES, bits, to_torch

pytestmark = pytest.mark.usefixtures("single_threaded")  # tests/conftest.py

# (format, max_cap): the four ladder rungs use the default cap (E4M3's 448); E5M2's top
# binade is Inf/NaN, so its real max normal is passed as the cap.
OCP_POINTS = [("fp4_e2m1", None), ("fp6_e2m3", None), ("fp6_e3m2", None),
              ("fp8_e4m3", None), ("fp8_e5m2", mxref.get_format("fp8_e5m2").max_normal)]


def at_point(x, fmt, cap, axis=-1, bs=32):
    f = mxref.get_format(fmt)
    return real_format_quantize(x, torch.tensor(float(f.exp_bits)),
                                torch.tensor(float(f.man_bits)), axis, bs, cap)


@settings(max_examples=max(20, EXAMPLES // 2))  # the quantizer itself is covered in test_dmx_quant
@given(st.data())
def test_integer_points_equal_fake_quantize(data):
    fmt, cap = data.draw(st.sampled_from(OCP_POINTS))
    dtype = data.draw(st.sampled_from(["float32", "bfloat16", "float16"]))
    arr, axis, bs = data.draw(mx_tensors(fmt, dtype=dtype))
    x = to_torch(arr)
    assert torch.equal(bits(at_point(x, fmt, cap, axis, bs)), bits(fake_quantize(x, fmt, axis, bs)))


@settings(max_examples=max(20, EXAMPLES // 2))  # the quantizer itself is covered in test_dmx_quant
@given(st.data())
def test_integer_points_on_adversarial_blocks(data):
    fmt, cap = data.draw(st.sampled_from(OCP_POINTS))
    dtype = data.draw(st.sampled_from(["float32", "bfloat16", "float16"]))
    x = to_torch(np.stack([data.draw(mx_blocks(fmt, 32, dtype)) for _ in range(3)]))
    assert torch.equal(bits(at_point(x, fmt, cap)), bits(fake_quantize(x, fmt)))


@pytest.mark.parametrize("e, m, expect", [(2, 1, 6.0), (3, 2, 28.0), (4, 3, 448.0), (2, 3, 7.5)])
def test_format_max_at_ocp_points(e, m, expect):
    got = format_max(torch.tensor(float(e)), torch.tensor(float(m)), 448.0)
    assert got.item() == expect


def test_format_max_between_points_matches_paper():
    # paper.md 2.3: beta = 0.5 -> 11.70, beta = 1.5 -> 91.99 on E(2+b)M(1+b)
    for b, expect in [(0.5, 11.70), (1.5, 91.99)]:
        got = format_max(torch.tensor(2 + b), torch.tensor(1 + b), 448.0).item()
        assert abs(got - expect) < 0.01


def test_pow2_exact_at_integers_and_smooth_between():
    n = torch.arange(-140, 128, dtype=torch.float32)
    assert torch.equal(pow2(n), torch.ldexp(torch.ones_like(n), n.to(torch.int32)))
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pow2, (t,))


def test_gradcheck_smooth_parts():
    """format_max is smooth in (e, m) below the cap: autograd equals finite differences."""
    e = torch.tensor(2.7, dtype=torch.float64, requires_grad=True)
    m = torch.tensor(1.6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: format_max(a, b, 448.0), (e, m))


def _offgrid_block(seed=0):
    # one block whose max is a power of two: |u| <= 2^emax <= maxval, so nothing saturates
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(32, generator=g, dtype=torch.float64) * 2 - 1
    x[0] = 1.0
    return x


def test_mantissa_gradient_is_rounding_error_inside_range():
    """d y / d m = scale * ln2 * (|u| - q) * sign, plus the scale's straight-through term
    (q - u) * d scale / d m with d scale / d m = -scale * d ln(maxval) / d m."""
    x = _offgrid_block()
    e = torch.tensor(3.0, dtype=torch.float64)
    m = torch.tensor(1.4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = real_format_quantize(x, e, m)
    (y * g).sum().backward()
    with torch.no_grad():
        maxval = format_max(e, m, 448.0)
        emax = math.floor(math.log2(maxval.item()))
        s = 2.0 ** (0 - emax)  # amax = 1 -> floor(log2 amax) = 0
        u, q = x / s, y / s
        dmax_dm = math.log(2) * 2.0 ** (-m.item()) * 2.0 ** (2.0 ** (e.item() - 1))
        ds_dm = -s * dmax_dm / maxval.item()
        expect = (g * (s * math.log(2) * (u - q) + (q - u) * ds_dm)).sum()
    assert abs(m.grad.item() - expect.item()) < 1e-9 * max(1.0, abs(expect.item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_gradients_finite_and_nonzero_inside_range(dtype):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    for b in (0.3, 0.9, 1.5):
        e = torch.tensor(2.0 + b, requires_grad=True)
        m = torch.tensor(1.0 + b, requires_grad=True)
        y = real_format_quantize(x, e, m)
        ((y.float() - x.float()) ** 2).sum().backward()
        for p in (e, m):
            assert p.grad is not None and math.isfinite(p.grad.item()) and p.grad.item() != 0.0


def test_input_gradient_is_one_inside_zero_when_saturated():
    x = torch.tensor([1.0, 0.3, -0.7] + [0.0] * 29, requires_grad=True)
    x.data[0] = 1.9  # E2M1: scale 2^-2, u = 7.6 > 6 saturates
    y = real_format_quantize(x, torch.tensor(2.0), torch.tensor(1.0))
    y.sum().backward()
    assert x.grad[:3].tolist() == [0.0, 1.0, 1.0]


def test_nan_block_is_all_nan_and_other_blocks_finite():
    x = torch.randn(64)
    x[5] = float("inf")
    y = real_format_quantize(x, torch.tensor(3.3), torch.tensor(2.3))
    assert torch.isnan(y[:32]).all() and torch.isfinite(y[32:]).all()


def test_bad_bits_raise():
    x = torch.randn(32)
    with pytest.raises(ValueError, match="exp_bits"):
        real_format_quantize(x, torch.tensor(0.5), torch.tensor(1.0))
    with pytest.raises(ValueError, match="man_bits"):
        real_format_quantize(x, torch.tensor(2.0), torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="scalar"):
        real_format_quantize(x, torch.ones(2), torch.tensor(1.0))


@CUDA
def test_cuda_integer_points():
    x = torch.randn(16, 96, device="cuda") * 10
    for fmt, cap in OCP_POINTS:
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            assert torch.equal(bits(at_point(xd, fmt, cap)), bits(fake_quantize(xd, fmt)))
