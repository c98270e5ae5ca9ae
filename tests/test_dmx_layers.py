"""Ladders, the anneal map, penalties and the dMX layers (incl. a tiny Llama trained a few steps)."""
import math
from unittest.mock import patch

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mxref
from dmx.quant.anneal import TemperatureSchedule, anneal_map, clamp_ste
from dmx.nn.layers import (DMXLinear, MXLinear, apply_formats, dmx_parameters, hard_assignment,
                        set_temperature, wrap_model)
from dmx.quant.ladders import LADDERS, get_ladder
from dmx.nn.bits import average_bits
from dmx.search.penalty import hinge_penalty, scaling_penalty
from dmx.quant.fakequant import fake_quantize
from verification.strategies import mx_tensors

from torch_helpers import CUDA, EXAMPLES, bits, to_torch

pytestmark = pytest.mark.usefixtures("single_threaded")  # tests/conftest.py

HUGE_T = 1e4  # sigmoid(20 * 1e4 * 0.5) is exactly 1.0 in float32


# ---------------------------------------------------------------------------- ladders
@pytest.mark.parametrize("name", sorted(LADDERS))
def test_rungs_are_on_the_ladder_line(name):
    ladder = get_ladder(name)
    for r in ladder.rungs:
        f = mxref.get_format(r.fmt)
        b = torch.tensor(r.position)
        assert (ladder.exp_bits(b).item(), ladder.man_bits(b).item()) == (f.exp_bits, f.man_bits)
        assert ladder.element_bits(b).item() == r.bits == f.bits
        assert ladder.nearest_rung(r.position + 0.2) == r
    assert ladder.low.bits == 4


def test_fp8_fp4_is_e2plusb_m1plusb():
    ladder = get_ladder("fp8-fp4")
    b = torch.tensor(0.7)
    assert ladder.exp_bits(b).item() == pytest.approx(2.7)
    assert ladder.man_bits(b).item() == pytest.approx(1.7)
    assert ladder.element_bits(b).item() == pytest.approx(4 + 2 * 0.7)
    assert get_ladder("fp6-fp4").exp_bits(b).item() == 2.0
    assert ladder.max_cap == 448.0


def test_unknown_ladder_lists_choices():
    with pytest.raises(ValueError, match="fp8-fp4"):
        get_ladder("fp16-fp2")


# ---------------------------------------------------------------------------- anneal
def test_anneal_matches_paper_values_at_start_temperature():
    # paper.md 2.4: at T_code = 0.4, b_hat in {0, .5, 1, 1.5, 2} -> {0.036, 0.24, 1, 1.76, 1.96}
    b = anneal_map(torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0]), 0.4, "fp8-fp4")
    assert b.tolist() == pytest.approx([0.036, 0.238, 1.0, 1.762, 1.964], abs=1e-3)


@pytest.mark.parametrize("name", sorted(LADDERS))
def test_anneal_limits(name):
    ladder = get_ladder(name)
    b_hat = torch.linspace(-0.5, 2.5, 61)
    hard = anneal_map(b_hat, 1.0, ladder, hard=True)
    assert set(hard.tolist()) <= set(ladder.positions)
    # away from the boundaries the hot map is the hard step
    bounds = [(a.position + c.position) / 2 for a, c in zip(ladder.rungs, ladder.rungs[1:])]
    far = torch.stack([(b_hat - p).abs() > 0.02 for p in bounds]).all(0)
    assert torch.equal(anneal_map(b_hat, HUGE_T, ladder)[far], hard[far])
    # cold: everything at the middle of the ladder
    cold = anneal_map(b_hat, 1e-6, ladder)
    mid = (ladder.low.position + ladder.high.position) / 2
    assert (cold - mid).abs().max().item() < 1e-3


def test_hard_map_strictly_above_boundary_goes_up():
    b = anneal_map(torch.tensor([0.999, 1.0, 1.001]), 1.0, "fp8-fp4", hard=True)
    assert b.tolist() == [0.0, 0.0, 2.0]
    b3 = anneal_map(torch.tensor([0.5, 0.51, 1.5, 1.51]), 1.0, "fp8-fp6-fp4", hard=True)
    assert b3.tolist() == [0.0, 1.0, 1.0, 2.0]


def test_anneal_gradcheck_and_clamp_ste():
    b_hat = torch.tensor([0.3, 1.2], dtype=torch.float64, requires_grad=True)
    for name in LADDERS:
        assert torch.autograd.gradcheck(lambda t: anneal_map(t, 0.4, name), (b_hat,))
    x = torch.tensor([-1.0, 0.5, 3.0], requires_grad=True)
    y = clamp_ste(x, 0.0, 2.0)
    y.sum().backward()
    assert y.tolist() == [0.0, 0.5, 2.0] and x.grad.tolist() == [1.0, 1.0, 1.0]


def test_temperature_schedule():
    s = TemperatureSchedule(400)
    assert s.at(0) == s.at(239) == 0.4
    assert s.at(240) == pytest.approx(0.4) and s.at(399) == 20.0 and s.at(1000) == 20.0
    assert s.at(320) == pytest.approx(2.86, abs=0.01)  # paper.md: midpoint ~2.86
    ts = [s.at(k) for k in range(400)]
    assert all(b >= a for a, b in zip(ts, ts[1:]))
    with pytest.raises(ValueError):
        TemperatureSchedule(0)


# ---------------------------------------------------------------------------- penalty
def test_hinge_zero_below_target_slope_lam_above():
    for avg, expect_grad in [(4.5, 0.0), (6.0, 5.0)]:
        a = torch.tensor(avg, requires_grad=True)
        p = hinge_penalty(a, target=5.0, lam=5.0)
        p.backward()
        assert p.dtype == torch.float32
        assert p.item() == max(0.0, 5.0 * (avg - 5.0)) and a.grad.item() == expect_grad
    a = torch.tensor(6.0, requires_grad=True)
    scaling_penalty(a, 0.1).backward()
    assert a.grad.item() == pytest.approx(0.1)


def _two_layers(dtype=torch.float32):
    torch.manual_seed(0)
    small = DMXLinear(nn.Linear(32, 16).to(dtype), "fp8-fp4", init="low")
    big = DMXLinear(nn.Linear(64, 128).to(dtype), "fp8-fp4", init="high", quantize_input=False)
    for layer in (small, big):
        layer.hard = True
    return {"small": small, "big": big}


def test_average_bits_weightings():
    layers = _two_layers()
    # hard: small = 4 bits, big = 8 bits; only small quantizes its input
    assert average_bits(layers, "simple").item() == pytest.approx(((4 + 8) / 2 + 4) / 2)
    w = (4 * 512 + 8 * 8192) / (512 + 8192)
    assert average_bits(layers, "size").item() == pytest.approx((w + 4) / 2)
    assert average_bits(layers, "macs").item() == pytest.approx(w)
    with pytest.raises(ValueError, match="simple"):
        average_bits(layers, "flops")


def test_average_bits_float32_and_differentiable_in_bf16_model():
    layers = _two_layers(torch.bfloat16)
    for layer in layers.values():
        layer.hard = False
        assert layer.offset.dtype == torch.float32
    avg = average_bits(layers)
    assert avg.dtype == torch.float32 and avg.dim() == 0
    avg.backward()
    assert all(l.offset.grad is not None and l.offset.grad.item() != 0 for l in layers.values())


# ---------------------------------------------------------------------------- layers
def _reference_linear(linear, x, fmt, quantize_input=True):
    xq = fake_quantize(x, fmt) if quantize_input else x
    return F.linear(xq, fake_quantize(linear.weight, fmt), linear.bias)


@pytest.mark.parametrize("name", sorted(LADDERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hard_mode_and_hot_soft_mode_deploy_exact_rungs(name, dtype):
    torch.manual_seed(1)
    lin = nn.Linear(80, 24).to(dtype)
    layer = DMXLinear(lin, name)
    x = (torch.randn(5, 80) * 3).to(dtype)
    for rung in get_ladder(name).rungs:
        with torch.no_grad():
            layer.offset.fill_(rung.position)
        ref = _reference_linear(lin, x, rung.fmt)
        layer.eval()
        assert layer.hard_format() == rung.fmt
        assert torch.equal(bits(layer(x)), bits(ref))
        layer.train()
        layer.temperature = HUGE_T  # soft path at the rung: exact real-valued quantizer
        assert torch.equal(bits(layer(x)), bits(ref))
        assert layer.current_bits().item() == rung.bits


@settings(max_examples=max(20, EXAMPLES // 3))
@given(st.data())
def test_hard_mode_matches_mxref_on_random_inputs(data):
    """The operands the hard layer hands to F.linear equal mxref's quantize-dequantize bit
    for bit. The operands are compared, not the outputs: on inputs near 1e38 a GEMM's
    result depends on its summation order, which is BLAS's business, not the quantizer's."""
    name = data.draw(st.sampled_from(sorted(LADDERS)))
    rung = data.draw(st.sampled_from(get_ladder(name).rungs))
    arr, _, _ = data.draw(mx_tensors(rung.fmt, max_dims=2, dtype="float32",
                                     allow_nan=False, allow_inf=False))
    x = to_torch(arr).reshape(-1, arr.shape[-1]) if arr.ndim > 1 else to_torch(arr)[None]
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1)))  # replayable weights
    lin = nn.Linear(x.shape[-1], 3)
    layer = DMXLinear(lin, name, init=rung.position).eval()
    xq = mxref.quantize_dequantize(x.numpy(), rung.fmt)
    wq = mxref.quantize_dequantize(lin.weight.detach().numpy(), rung.fmt)
    seen, linear = [], F.linear  # F is torch's module: keep the real one before patching

    def record(inp, weight, bias=None):
        seen.append((inp, weight, bias))
        return linear(inp, weight, bias)

    with torch.no_grad(), patch("dmx.nn.layers.F.linear", record):
        layer(x)
    (x_seen, w_seen, b_seen), = seen
    assert torch.equal(bits(x_seen), bits(torch.from_numpy(xq)))
    assert torch.equal(bits(w_seen), bits(torch.from_numpy(wq)))
    assert b_seen is lin.bias


def test_offset_gradient_and_clamped_offsets():
    torch.manual_seed(2)
    layer = DMXLinear(nn.Linear(64, 32), "fp8-fp4", init=1.0)
    x = torch.randn(4, 64)
    layer(x).pow(2).sum().backward()
    g = layer.offset.grad.item()
    assert math.isfinite(g) and g != 0.0
    layer.current_bits().backward()
    assert layer.offset.grad.item() != g  # bits depend on the offset too
    layer.offset.grad = None
    with torch.no_grad():
        layer.offset.fill_(-3.0)  # outside the ladder: clamped, straight-through
    layer.temperature = 0.05
    layer.current_bits().backward()
    assert layer.offset.grad.item() > 0


def test_dmxlinear_rejects_bad_arguments():
    with pytest.raises(ValueError, match="nn.Linear"):
        DMXLinear(nn.Conv1d(2, 2, 1), "fp8-fp4")
    with pytest.raises(ValueError, match="float32"):
        DMXLinear(nn.Linear(4, 4), "fp8-fp4", offset=nn.Parameter(torch.tensor(0.0).double()))
    with pytest.raises(ValueError, match="init"):
        DMXLinear(nn.Linear(4, 4), "fp8-fp4", init="middle")


def test_mxlinear_forward_and_cache():
    torch.manual_seed(3)
    lin = nn.Linear(40, 8)
    layer = MXLinear(lin, "fp6_e2m3", "fp8_e4m3")
    x = torch.randn(3, 40)
    ref = F.linear(fake_quantize(x, "fp8_e4m3"), fake_quantize(lin.weight, "fp6_e2m3"), lin.bias)
    with torch.no_grad():
        assert torch.equal(bits(layer(x)), bits(ref))
        lin.weight.mul_(2)  # the cache must notice the in-place update
        ref2 = F.linear(fake_quantize(x, "fp8_e4m3"), fake_quantize(lin.weight, "fp6_e2m3"),
                        lin.bias)
        assert torch.equal(bits(layer(x)), bits(ref2))


# ---------------------------------------------------------------------------- whole model
def _tiny_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=128)
    return LlamaForCausalLM(cfg).to(dtype)


def test_wrap_model_ties_fused_groups_and_helpers():
    model = _tiny_llama(torch.bfloat16)
    layers = wrap_model(model)
    assert len(layers) == 14 and not any("lm_head" in n for n in layers)
    offsets = dmx_parameters(model)
    assert len(offsets) == 8  # per block: qkv, o, gate_up, down
    assert all(p.dtype == torch.float32 for p in offsets)
    blk = "model.layers.0"
    assert layers[f"{blk}.self_attn.q_proj"].offset is layers[f"{blk}.self_attn.v_proj"].offset
    assert layers[f"{blk}.mlp.gate_proj"].offset is layers[f"{blk}.mlp.up_proj"].offset
    assert layers[f"{blk}.mlp.down_proj"].offset is not layers[f"{blk}.mlp.up_proj"].offset
    assert layers[f"{blk}.self_attn.q_proj"].offset is not \
        layers["model.layers.1.self_attn.q_proj"].offset
    set_temperature(model, 3.0)
    assert all(l.temperature == 3.0 for l in layers.values())
    assert set(hard_assignment(model).values()) == {"fp4_e2m1"}
    with pytest.raises(ValueError, match="matches no linear layer"):
        wrap_model(_tiny_llama(), include=["nothing_like_this"])
    with pytest.raises(ValueError, match="already wrapped"):
        wrap_model(model)  # already wrapped: the inner linears are not wrapped again
    only_mlp = wrap_model(_tiny_llama(), include=[r"mlp\."], tie_fused=False)
    assert len(only_mlp) == 6 and len({id(l.offset) for l in only_mlp.values()}) == 6


def test_apply_formats_replaces_named_layers():
    model = _tiny_llama()
    name = "model.layers.1.mlp.down_proj"
    out = apply_formats(model, {name: "fp8_e4m3"}, {name: "fp4_e2m1"})
    assert isinstance(model.get_submodule(name), MXLinear) and out[name].act_fmt == "fp4_e2m1"
    with pytest.raises(ValueError, match="no module"):
        apply_formats(model, {"model.nope": "fp4_e2m1"})


def test_tiny_llama_moves_average_bits_to_target():
    """Paper recipe: frozen weights, SGD(lr 1, momentum .99, nesterov) on the offsets,
    loss = CE + hinge(target 5). Starting at MXFP8 the average must fall to the target."""
    model = _tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    layers = wrap_model(model, init="high")
    params = dmx_parameters(model)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=1.0, momentum=0.99, nesterov=True)
    sched = TemperatureSchedule(30)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    start = average_bits(layers).item()
    for step in range(30):
        set_temperature(model, sched.at(step))
        avg = average_bits(layers)
        loss = model(input_ids=ids, labels=ids).loss + hinge_penalty(avg, 5.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    final = average_bits(layers).item()
    assert start > 7.5
    assert final <= 5.0 + 0.5
    assert torch.isfinite(model(input_ids=ids).logits).all()


@CUDA
def test_cuda_dmxlinear_hard_and_soft():
    lin = nn.Linear(96, 16).cuda()
    layer = DMXLinear(lin, "fp8-fp6-fp4").cuda()
    x = torch.randn(4, 96, device="cuda")
    for rung in layer.ladder.rungs:
        with torch.no_grad():
            layer.offset.fill_(rung.position)
        ref = _reference_linear(lin, x, rung.fmt)
        layer.eval()
        assert torch.equal(bits(layer(x)), bits(ref))
        layer.train()
        layer.temperature = HUGE_T
        assert torch.equal(bits(layer(x)), bits(ref))
