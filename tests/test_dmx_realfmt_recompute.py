"""The memory-light soft quantizer (dmx.quant.realfmt's autograd Functions) against the reference
graph it replaced (``_real_format_quantize_torch`` / ``_real_format_linear_torch``, every op
recorded by autograd): the same forward bits, the same gradients bit for bit, and only the
input kept for backward."""
import pytest
import torch
import torch.nn as nn

import dmx.nn.layers
from dmx import data
from dmx.quant import realfmt
from dmx.nn.layers import dmx_parameters, wrap_model
from dmx.quant.realfmt import real_format_linear, real_format_quantize

from torch_helpers import bits

pytestmark = pytest.mark.usefixtures("single_threaded")  # tests/conftest.py

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _input(shape, dtype, seed, specials=True):
    """Magnitudes over ~40 binades (saturation, subnormal range), exact zeros, a NaN block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x * torch.exp2(torch.randint(-20, 20, shape, generator=g).double())
    x = x.to(dtype)
    if specials:
        flat = x.view(-1)
        flat[:40] = 0.0
        flat[-3] = float("nan")
    return x


def _bits_pair(seed):
    g = torch.Generator().manual_seed(seed)
    # fractional formats, and an OCP point (E4M3) where every power of two is exact
    if seed % 3 == 0:
        return 4.0, 3.0
    return 1.0 + 3.0 * torch.rand((), generator=g).item(), 3.0 * torch.rand((), generator=g).item()


def _grads(fn, tensors, g):
    leaves = [t.detach().clone().requires_grad_(t.dtype.is_floating_point) for t in tensors]
    y = fn(*leaves)
    return y, torch.autograd.grad(y, leaves, g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((3, 64), -1), ((5, 70), -1), ((2, 3, 96), 1),
                                        ((64,), 0), ((4, 33, 40), 1)])
def test_quantizer_values_and_gradients_equal_the_reference_graph(dtype, shape, axis):
    for seed in range(3):
        x = _input(shape, dtype, seed)
        e, m = (torch.tensor(v) for v in _bits_pair(seed))

        def new(x, e, m):
            return real_format_quantize(x, e, m, axis, 32)

        def ref(x, e, m):
            return realfmt._real_format_quantize_torch(x, e, m, axis, 32)

        g = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
        y_new, d_new = _grads(new, (x, e, m), g)
        y_ref, d_ref = _grads(ref, (x, e, m), g)
        assert torch.equal(bits(y_new), bits(y_ref))
        for a, b in zip(d_new, d_ref):  # d/dx, d/de, d/dm
            assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("error_sign", [1.0, -1.0])
@pytest.mark.parametrize("quantize_input", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_values_and_gradients_equal_the_reference_graph(monkeypatch, quantize_input,
                                                              with_bias, dtype, error_sign):
    # pieces of 2 blocks: every tensor below is quantized in several pieces
    monkeypatch.setattr(realfmt, "_PIECE_ELEMENTS", 64)
    for seed, (xshape, out) in enumerate([((6, 96), 40), ((2, 5, 70), 24), ((3, 4, 64), 8)]):
        x = _input(xshape, dtype, seed)
        w = _input((out, xshape[-1]), dtype, seed + 10, specials=False)
        b = _input((out,), dtype, seed + 20, specials=False) if with_bias else None
        e, m = (torch.tensor(v) for v in _bits_pair(seed + 1))
        x_views = [x]
        if x.dim() == 3:  # a non-contiguous input too (quantized in one piece)
            x_views.append(x.transpose(0, 1).contiguous().transpose(0, 1))
        for xv in x_views:
            args = [xv, w, e, m] + ([b] if with_bias else [])

            def new(x, w, e, m, b=None):
                return real_format_linear(x, w, b, e, m, 32, None, quantize_input,
                                          error_sign)

            def ref(x, w, e, m, b=None):
                return realfmt._real_format_linear_torch(x, w, b, e, m, 32, None,
                                                         quantize_input, error_sign)

            g = torch.randn(xv.shape[:-1] + (out,)).to(dtype)
            y_new, d_new = _grads(new, args, g)
            y_ref, d_ref = _grads(ref, args, g)
            assert torch.equal(bits(y_new), bits(y_ref))
            for a, r in zip(d_new, d_ref):  # x, w, e, m (, bias)
                assert torch.equal(bits(a), bits(r))


@pytest.mark.parametrize("quantize_input", [True, False])
def test_mirrored_error_is_the_quantization_error_subtracted(quantize_input):
    """error_sign -1 (--error-signs random): F.linear(x - (Q(x) - x), w - (Q(w) - w)), each
    Q the real-format quantizer on its own; +1 is F.linear(Q(x), Q(w)) exactly."""
    x = _input((4, 96), torch.float32, 3, specials=False)
    w = _input((8, 96), torch.float32, 4, specials=False)
    e, m = torch.tensor(2.6), torch.tensor(1.3)
    q = lambda v: real_format_quantize(v, e, m, -1, 32)  # noqa: E731
    xs = x - (q(x) - x) if quantize_input else x
    want = torch.nn.functional.linear(xs, w - (q(w) - w))
    got = real_format_linear(x, w, None, e, m, 32, None, quantize_input, -1.0)
    assert torch.equal(bits(got), bits(want))
    plain = torch.nn.functional.linear(q(x) if quantize_input else x, q(w))
    assert torch.equal(bits(real_format_linear(x, w, None, e, m, 32, None, quantize_input)),
                       bits(plain))
    assert not torch.equal(bits(got), bits(plain))


def test_model_offset_gradients_equal_the_reference_graph(monkeypatch):
    """A whole search forward + backward on the embedded model: tied offsets (q/k/v,
    gate/up) gather gradients from several layers, so this also checks that autograd
    accumulates them in the reference graph's order."""
    ids = torch.randint(4096, (2, 48), generator=torch.Generator().manual_seed(0))

    def offset_grads(linear_fn):
        monkeypatch.setattr(dmx.nn.layers, "real_format_linear", linear_fn)
        model = data.load_model(data.embedded_model_dir())
        for p in model.parameters():
            p.requires_grad_(False)
        layers = wrap_model(model, "fp8-fp4", init=1.0)
        for layer in layers.values():
            layer.train()
        logits = model(input_ids=ids, use_cache=False).logits
        logits.float().logsumexp(-1).mean().backward()
        return logits.detach(), torch.stack([p.grad for p in dmx_parameters(model)])

    logits_new, g_new = offset_grads(real_format_linear)
    logits_ref, g_ref = offset_grads(realfmt._real_format_linear_torch)
    assert torch.equal(bits(logits_new), bits(logits_ref))
    assert torch.equal(bits(g_new), bits(g_ref)) and bool((g_new != 0).all())


def _saved_bytes(fn) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward."""
    seen = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_linear_keeps_only_its_input_for_backward():
    lin = nn.Linear(256, 128)
    offset = nn.Parameter(torch.tensor(1.0))
    x = torch.randn(4, 64, 256, requires_grad=True)
    e, m = 2.0 + offset, 1.0 + offset  # the 0-d bits, as DMXLinear derives them

    def run(fn):
        return lambda: fn(x, lin.weight, lin.bias, e, m, 32, None, True)

    new = _saved_bytes(run(real_format_linear))
    ref = _saved_bytes(run(realfmt._real_format_linear_torch))
    assert new == x.untyped_storage().nbytes() + 2 * 4  # x and the two 0-d bits
    assert ref > 8 * x.untyped_storage().nbytes()  # what the reference graph kept


def test_soft_layer_compiles_fullgraph():
    """Under torch.compile the layer traces the reference graph (autograd.Function's
    torch.autograd.grad replay is not traceable) and the compiler plans the memory."""
    from dmx.nn.layers import DMXLinear
    torch.manual_seed(0)
    layer = DMXLinear(nn.Linear(64, 32), "fp8-fp4", init=1.0).train()
    x = torch.randn(4, 64)
    eager = layer(x)
    eager.sum().backward()
    g_eager, layer.offset.grad = layer.offset.grad, None
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    compiled.sum().backward()
    assert torch.equal(bits(compiled), bits(eager))
    assert torch.equal(layer.offset.grad, g_eager)
