"""Triton kernels against mxref (fixed formats: equal bit patterns) and dmx.quant.realfmt.

On a machine without CUDA the kernels run under Triton's interpreter
(TRITON_INTERPRET=1, CPU tensors); without Triton the module is skipped. NaN outputs
are compared by position (isnan); their payload is whatever torch's CPU cast gives,
which is not even consistent across torch's own scalar and vector paths.
"""
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # must be set before the kernels are first defined (dmx.quant.triton_kernels defines them lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mxref  # noqa: E402
from dmx.quant import triton_ops  # noqa: E402
from dmx.quant.fakequant import fake_quantize  # noqa: E402
from dmx.quant import triton_kernels as tk  # noqa: E402
from dmx.errors import DMXError  # noqa: E402
from dmx.quant.backends import Backend, choose  # noqa: E402
from dmx.quant.realfmt import real_format_quantize  # noqa: E402
from verification.strategies import element_formats, mx_blocks  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter overflow notes


def native_numpy(x: torch.Tensor) -> np.ndarray:
    """x as a numpy array of its own dtype (bfloat16 through ml_dtypes)."""
    t = x.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def mxref_reference(x: torch.Tensor, fmt, axis=-1, bs=32, profile="ocp") -> torch.Tensor:
    arr = native_numpy(x)  # the input dtype itself (ftz profiles read its subnormals)
    ref = mxref.dequantize(mxref.quantize(arr, fmt, axis, bs, profile), np.float32)
    return torch.from_numpy(np.ascontiguousarray(ref)).to(x.dtype)


def assert_same_bits(y: torch.Tensor, ref: torch.Tensor, what: str):
    y, ref = y.detach().cpu(), ref.detach().cpu()
    assert y.dtype == ref.dtype and y.shape == ref.shape
    nan_y, nan_r = torch.isnan(y), torch.isnan(ref)
    assert torch.equal(nan_y, nan_r), f"{what}: NaN positions differ"
    iv = INT_VIEW[y.dtype]
    diff = (y.view(iv) != ref.view(iv)) & ~nan_r
    assert not diff.any(), (f"{what}: {int(diff.sum())} elements differ, e.g. "
                            f"{y[diff][:4].tolist()} vs {ref[diff][:4].tolist()}")


def run_kernel(x, fmt, axis=-1, bs=32, profile="ocp"):
    f, p = mxref.get_format(fmt), mxref.get_profile(profile)
    assert tk.supports(x, f, axis, bs, p)
    return tk.mx_fake_quantize(x, f, axis, bs, p)


def adversarial(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 75, generator=g) * torch.exp(3 * torch.randn(6, 75, generator=g))
    base[0, :7] = 0.0
    base[1, 3] = float("nan")
    base[2, 40] = -float("inf")
    base[3] = -0.0
    base[4, ::3] *= 1e-6
    base[5, :32] = torch.finfo(dtype).tiny * torch.arange(32) / 8  # subnormal block
    return base.to(dtype)


# ---------------------------------------------------------------------------- fixed format
@pytest.mark.parametrize("fmt", sorted(mxref.FORMATS))
@pytest.mark.parametrize("profile", ["ocp", "rceil", "microxcaling"])
def test_fixed_format_matches_mxref(fmt, profile):
    for dtype in DTYPES:
        x = adversarial(dtype, hash((fmt, profile)) % 1000).to(DEV)
        if not tk.supports(x, mxref.get_format(fmt), -1, 32, mxref.get_profile(profile)):
            continue  # declined inputs go to dmx.quant.fakequant's torch code
        for axis in (-1, 0):
            assert_same_bits(run_kernel(x, fmt, axis, 32, profile),
                             mxref_reference(x, fmt, axis, 32, profile),
                             f"{fmt}/{profile}/{dtype}/axis{axis}")


@settings(max_examples=15)
@given(st.data())
def test_adversarial_blocks_match_mxref(data):
    fmt = data.draw(element_formats())
    dtype = data.draw(st.sampled_from(["float32", "bfloat16", "float16"]))
    rows = [np.concatenate([data.draw(mx_blocks(fmt, 32, dtype)) for _ in range(3)])
            for _ in range(2)]
    arr = np.stack(rows)
    if dtype == "bfloat16":
        x = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    else:
        x = torch.from_numpy(np.ascontiguousarray(arr))
    tail = data.draw(st.integers(1, 96))  # a ragged last block as well
    x = x[:, :tail].contiguous().to(DEV)
    assert_same_bits(run_kernel(x, fmt), mxref_reference(x, fmt), f"{fmt}/{dtype}")


def test_unsupported_inputs_are_declined():
    x = torch.randn(4, 64)
    f = mxref.get_format("fp8_e4m3")
    assert not tk.supports(x.double(), f, -1, 32, mxref.get_profile("ocp"))
    assert not tk.supports(x, f, -1, 32, mxref.get_profile("ocp_ovf"))
    assert not tk.supports(x, f, -1, 32, mxref.get_profile("ocp_ftz"))
    assert not tk.supports(x, f, -1, 24, mxref.get_profile("ocp"))  # not a power of two
    # backend "auto" sends CPU tensors to torch; an explicit "triton" that cannot run an
    # input says so instead of falling back
    assert choose(x) is Backend.TORCH
    with pytest.raises(DMXError, match="backend 'triton' does not support"):
        fake_quantize(x.to(DEV), "fp8_e4m3", profile="ocp_ovf", backend="triton")


# ---------------------------------------------------------------------------- real format
def _real_pair(x, eb, mb, cap=448.0):
    """(torch result, triton result) with gradients to x, e, m for the same upstream grad."""
    outs = []
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype).to(DEV)
    for backend in ("torch", "triton"):
        xi = x.clone().requires_grad_()
        e = torch.tensor(eb, device=DEV, requires_grad=True)
        m = torch.tensor(mb, device=DEV, requires_grad=True)
        y = triton_ops.real_format_quantize(xi, e, m, -1, 32, cap, backend=backend)
        y.backward(g)
        outs.append((y.detach(), xi.grad, e.grad, m.grad))
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eb,mb", [(2.0, 1.0), (3.0, 2.0), (4.0, 3.0), (2.0, 3.0)])
def test_real_format_integer_points_exact(dtype, eb, mb):
    """At integer (e, m) the forward and dx are bit-identical to dmx.quant.realfmt."""
    x = adversarial(torch.float32, 7)
    x = torch.nan_to_num(x, nan=0.0, posinf=3.0, neginf=-3.0).to(dtype).to(DEV)
    (y0, dx0, de0, dm0), (y1, dx1, de1, dm1) = _real_pair(x, eb, mb)
    assert_same_bits(y1, y0, "forward")
    assert_same_bits(dx1, dx0, "dx")
    # scalar gradients on ordinary data (torch's own chain overflows to NaN on the
    # adversarial tensor: step^2 in the division's backward)
    x = (torch.randn(6, 80) * torch.exp2(torch.randint(-8, 8, (6, 1)).float())).to(dtype)
    (y0, dx0, de0, dm0), (y1, dx1, de1, dm1) = _real_pair(x.to(DEV), eb, mb)
    torch.testing.assert_close(de1, de0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dm1, dm0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eb,mb", [(2.7, 1.7), (3.3, 2.3), (2.5, 1.5)])
def test_real_format_fractional_points_close(eb, mb):
    """Between rungs exp2 of a fraction enters: values agree to float32 rounding."""
    x = (torch.randn(6, 80) * torch.exp2(torch.randint(-8, 8, (6, 1)).float())).to(DEV)
    (y0, dx0, de0, dm0), (y1, dx1, de1, dm1) = _real_pair(x, eb, mb)
    torch.testing.assert_close(y1, y0, rtol=2e-6, atol=0)
    # dx is g inside the range; torch's chain (g * step / step) can be an ulp off, and an
    # element on the saturation boundary can flip
    assert (dx1 != dx0).float().mean() < 0.2
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(de1, de0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dm1, dm0, rtol=1e-4, atol=1e-4)


def test_real_format_ragged_and_nan_block():
    x = torch.randn(3, 45)
    x[1, 2] = float("nan")
    x = x.to(DEV)
    (y0, dx0, de0, dm0), (y1, dx1, de1, dm1) = _real_pair(x, 3.0, 2.0)
    assert_same_bits(y1, y0, "forward")
    # a NaN block contributes no gradient here (torch's autograd propagates NaN)
    assert torch.isfinite(de1) and torch.isfinite(dm1)
    assert (dx1[1, :32] == 0).all()


def test_fused_linear_matches_composition():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64).to(DEV)
    w = (torch.randn(48, 64) / 8).to(DEV)
    b = torch.randn(48).to(DEV)
    grads = []
    for path in ("torch", "triton"):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        e = torch.tensor(3.0, device=DEV, requires_grad=True)
        m = torch.tensor(2.0, device=DEV, requires_grad=True)
        if path == "torch":
            xq = real_format_quantize(xi, e, m, -1, 32, 448.0)
            wq = real_format_quantize(wi, e, m, -1, 32, 448.0)
            y = torch.nn.functional.linear(xq, wq, bi)
        else:
            y = triton_ops.dmx_linear(xi, wi, bi, e, m, 32, 448.0, True, backend="triton")
        y.square().sum().backward()
        grads.append((y.detach(), xi.grad, wi.grad, bi.grad, e.grad, m.grad))
    for a, b_ in zip(*grads):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4)


def test_cpu_fallbacks_use_torch():
    """On CPU the public wrappers are the torch implementations (same bits)."""
    x = torch.randn(4, 64, requires_grad=True)
    e, m = torch.tensor(3.0), torch.tensor(2.0)
    assert torch.equal(triton_ops.real_format_quantize(x, e, m), real_format_quantize(x, e, m))
    w = torch.randn(8, 64)
    y = triton_ops.dmx_linear(x, w, None, e, m)
    ref = torch.nn.functional.linear(real_format_quantize(x, e, m), real_format_quantize(w, e, m))
    assert torch.equal(y, ref)


@CUDA
def test_auto_backend_on_cuda():
    x = adversarial(torch.bfloat16).cuda()
    assert choose(x) is Backend.TRITON
    assert_same_bits(fake_quantize(x, "fp4_e2m1"), mxref_reference(x, "fp4_e2m1"), "backend")


@pytest.mark.parametrize("init,temperature", [(0.3, 0.4), (0.98, 2.0), (2.5, 0.4)])
def test_offset_linear_matches_dmxlinear(init, temperature):
    """DMXLinear's soft forward on backend "triton" (dmx.quant.triton_ops: format computed
    in-kernel from the raw offset) against backend "torch": outputs, dx, dW and d offset."""
    from dmx.nn.layers import DMXLinear
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False).to(DEV)
    x = torch.randn(2, 5, 64, device=DEV)
    outs = []
    for backend in ("torch", "triton"):
        layer = DMXLinear(torch.nn.Linear(64, 48, bias=False).to(DEV), "fp8-fp4", init=init,
                          backend=backend)
        layer.linear.weight.data.copy_(lin.weight.data)
        layer.temperature = temperature
        layer.train()
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, layer.linear.weight.grad, layer.offset.grad))
    (y0, dx0, dw0, do0), (y1, dx1, dw1, do1) = outs
    # (e, m) agree to float32 rounding (sigmoid/exp approximations), so an element on a
    # rounding boundary can flip to the neighbouring grid point: compare the bulk
    close = torch.isclose(y1, y0, rtol=1e-4, atol=1e-6).float().mean()
    assert close > 0.99
    torch.testing.assert_close(dx1, dx0, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(dw1, dw0, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(do1, do0, rtol=2e-2, atol=1e-3)
