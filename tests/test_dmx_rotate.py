"""dmx.rotate: rotations that leave the float model's function unchanged, fold into the
weights, and (learned) stay orthogonal; Hadamard lowers MXFP4 error on real weights.

Equivalence is checked in float64 with the RMSNorms computed in float64 too
(:func:`_float64_norms`): Hugging Face's RMSNorm casts to float32 inside, which alone moves
float64 logits by ~1e-6 whatever the rotation. A second check keeps the stock norms.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from dmx import outdir
from dmx.data import embedded_model_dir
from dmx.errors import DMXError
from dmx.nn.layers import apply_formats
from dmx.quant.fakequant import fake_quantize
from dmx.rotate import (CayleySGD, LearnedRotations, block_hadamard, hadamard_pm1,
                        is_orthogonal, patch_config, random_orthogonal, rotate_model,
                        rotation_matrix)
from dmx.rotate.fold import arch_of, fold_norms

from rotate_helpers import (MODELS, STORIES, _float64_norms, _ids, _load, _logits,
                            _random_model)

pytestmark = pytest.mark.usefixtures("single_threaded")  # tests/conftest.py


# ----------------------------------------------------------------------------- matrices
@pytest.mark.parametrize("n", [1, 2, 8, 12, 20, 24, 28, 36, 48, 64, 96, 172, 192, 256, 576,
                               768])
def test_rotation_matrices_are_orthogonal(n):
    q, name = rotation_matrix(n)
    assert q.shape == (n, n) and q.dtype == torch.float64 and is_orthogonal(q), name
    found = hadamard_pm1(n)
    if found is not None:  # a true Hadamard matrix: +-1 entries, H H^T = n I
        h = torch.from_numpy(found[0]).double()  # float64 products of +-1: exact
        assert set(h.unique().tolist()) <= {-1, 1}
        assert torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))
    for kind in ("block", "random"):
        assert is_orthogonal(rotation_matrix(n, kind, seed=3)[0])


def test_constructions_and_fallbacks():
    assert rotation_matrix(576)[1] == "blockdiag18xsylvester32"  # auto: MX-block aligned
    assert rotation_matrix(576, "kron")[1] == "paley36xsylvester16"
    assert rotation_matrix(192, "kron")[1] == "paley12xsylvester16"
    assert rotation_matrix(48)[1] == "paley12xsylvester4"  # 32 does not divide: full
    assert rotation_matrix(8)[1] == "sylvester8"  # narrower than a block: full
    assert rotation_matrix(172)[1].startswith("random172")  # 4 x 43: no construction here
    with pytest.raises(DMXError, match="172"):
        rotation_matrix(172, "kron")
    b = block_hadamard(96)
    assert torch.count_nonzero(b) == 3 * 32 * 32 and is_orthogonal(b)
    assert torch.equal(random_orthogonal(20, 5), random_orthogonal(20, 5))
    assert not torch.equal(random_orthogonal(20, 5), random_orthogonal(20, 6))
    with pytest.raises(DMXError, match="kind"):
        rotation_matrix(64, "bogus")


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("name", list(MODELS))
def test_rotated_model_reproduces_logits_float64(name):
    model = MODELS[name]()
    rotated = copy.deepcopy(model)
    info = rotate_model(rotated, "hadamard")
    ids = _ids(model)
    _float64_norms(model)
    _float64_norms(rotated)
    want, got = _logits(model, ids), _logits(rotated, ids)
    assert info.norms_folded and info.r1 and info.r2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * want.abs().max().item())
    # the weights really changed (not an identity "rotation")
    assert not torch.allclose(rotated.model.layers[0].self_attn.q_proj.weight,
                              model.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("kind", ["kron", "block", "random"])
def test_every_kind_preserves_the_function_with_stock_norms(kind):
    model = _random_model("llama192")  # stock HF RMSNorm (float32 inside)
    ids = _ids(model)
    want = _logits(model, ids)
    rotated = copy.deepcopy(model)
    rotate_model(rotated, "random" if kind == "random" else "hadamard", seed=2, kind=kind)
    torch.testing.assert_close(_logits(rotated, ids), want, rtol=0, atol=1e-4)


def test_r2_alone_rotates_v_and_o_only():
    model = _random_model("qwen2")  # GQA (4 query heads, 2 kv heads) and a v bias
    rotated = copy.deepcopy(model)
    info = rotate_model(rotated, "hadamard", r1=False)
    assert info.r1 is None and info.r2 == "paley12xsylvester2"
    a, b = model.model.layers[1].self_attn, rotated.model.layers[1].self_attn
    assert torch.equal(a.q_proj.weight, b.q_proj.weight)
    for lin in ("v_proj", "o_proj"):
        assert not torch.allclose(getattr(a, lin).weight, getattr(b, lin).weight)
    assert not torch.allclose(a.v_proj.bias, b.v_proj.bias)
    ids = _ids(model)
    _float64_norms(model)
    _float64_norms(rotated)
    want = _logits(model, ids)
    torch.testing.assert_close(_logits(rotated, ids), want, rtol=0,
                               atol=1e-10 * want.abs().max().item())


def test_untie_only_when_needed():
    model = _random_model("llama192")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    info = rotate_model(copy.deepcopy(model), "hadamard")
    assert info.untied_lm_head  # random final norm scale: cannot stay tied
    with torch.no_grad():
        model.model.norm.weight.fill_(0.7)  # a scalar scale commutes with R1: stays tied
    rotated = copy.deepcopy(model)
    ids = _ids(model)
    info = rotate_model(rotated, "hadamard")
    assert not info.untied_lm_head and rotated.config.tie_word_embeddings
    assert rotated.lm_head.weight is rotated.model.embed_tokens.weight
    torch.testing.assert_close(_logits(rotated, ids), _logits(model, ids), rtol=0, atol=1e-4)
    with pytest.raises(DMXError, match="untied"):
        fold_norms(arch_of(_random_model("llama192")), untie=False)


def test_unsupported_model_is_refused():
    from transformers import AutoModelForCausalLM, GPT2Config
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2,
                                                        vocab_size=64, bos_token_id=None,
                                                        eos_token_id=None))
    with pytest.raises(DMXError, match="gpt2"):
        rotate_model(model, "hadamard")
    assert rotate_model(model, "none").mode == "none"  # "none" touches nothing


# ----------------------------------------------------------------------------- learned
def test_cayley_sgd_descends_and_stays_orthogonal():
    target = random_orthogonal(24, 1).float()
    x = torch.nn.Parameter(rotation_matrix(24)[0].float())
    opt = CayleySGD([x], lr=0.2, momentum=0.5)
    losses = []
    for _ in range(60):
        loss = (x - target).pow(2).sum()
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.05 * losses[0]
    assert is_orthogonal(x.detach(), atol=1e-5)


def _mxfp4_everywhere(model):
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    apply_formats(model, {n: "fp4_e2m1" for n in names}, {n: "fp4_e2m1" for n in names})


def _unwrap(model):
    """The float model inside MXLinear wrappers (the quantization bypassed)."""
    from dmx.nn.layers import set_submodule
    for name, m in list(model.named_modules()):
        if hasattr(m, "linear") and isinstance(m.linear, torch.nn.Linear) and name:
            set_submodule(model, name, m.linear)
    return model


def test_learned_rotations_stay_orthogonal_and_fold_exactly():
    float_model = _load(STORIES, torch.float32)
    ids = _ids(float_model)
    want = _logits(float_model, ids)
    model = copy.deepcopy(float_model)
    _mxfp4_everywhere(model)  # unquantized, the loss does not depend on the rotations
    rot = LearnedRotations(model, lr=1.5)
    start = [p.detach().clone() for p in rot.parameters()]
    assert len(start) == 1 + model.config.num_hidden_layers
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(
            model(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        losses.append(float(loss.detach()))
        loss.backward()
        rot.step()
        rot.zero_grad()
    assert rot.orthogonality_error() < 1e-5  # float32 masters, float64 Cayley solves
    assert all(not torch.allclose(a, b) for a, b in zip(start, rot.parameters()))
    quantized_before_fold = _logits(model, ids)
    info = rot.fold()
    assert info.mode == "learned" and info.learned_steps == 8
    # folded: the same quantized model, a plain nn.Linear inside every wrapper again
    assert type(model.model.layers[0].self_attn.q_proj.linear) is torch.nn.Linear
    torch.testing.assert_close(_logits(model, ids), quantized_before_fold, rtol=0, atol=2e-3)
    # and the float function is the original one
    torch.testing.assert_close(_logits(_unwrap(model), ids), want, rtol=0, atol=1e-4)


def test_learned_rotations_train_with_dmx_offsets():
    """The search's setting: DMXLinear layers (soft formats, learnable offsets) wrapped
    first, rotations on top; one backward feeds both, fold leaves the wrappers working."""
    from dmx.nn.layers import dmx_parameters, hard_assignment, wrap_model
    model = _load(STORIES, torch.float32)
    layers = wrap_model(model, "fp8-fp4")
    rot = LearnedRotations(model)
    offsets = torch.optim.SGD(dmx_parameters(model), lr=0.1)
    for layer in layers.values():
        layer.train()
    ids = _ids(model)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(
            model(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in rot.parameters())
        assert all(p.grad is not None for p in dmx_parameters(model))
        offsets.step()
        rot.step()
        offsets.zero_grad()
        rot.zero_grad()
    rot.fold()
    assert rot.orthogonality_error() < 1e-5
    assert set(hard_assignment(model)) == set(layers)
    model.eval()
    assert torch.isfinite(_logits(model, ids)).all()


def test_learned_state_round_trip():
    model = _load(STORIES, torch.float32)
    _mxfp4_everywhere(model)
    rot = LearnedRotations(model, momentum=0.9)
    ids = _ids(model)
    model(input_ids=ids).logits.pow(2).mean().backward()
    rot.step()
    state = rot.state_dict()
    other = _load(STORIES, torch.float32)
    _mxfp4_everywhere(other)
    rot2 = LearnedRotations(other, momentum=0.9)
    rot2.load_state_dict(state)
    assert rot2.steps == 1
    assert torch.equal(_logits(model, ids), _logits(other, ids))
    with pytest.raises(DMXError, match="already"):
        LearnedRotations(model)
    with pytest.raises(DMXError, match="do not fit"):
        LearnedRotations(_random_model("llama192")).load_state_dict(state)


# ----------------------------------------------------------------------------- MXFP4 error
def _block_linears(model):
    return [m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def _rel_error(tensors) -> float:
    """sum ||MXFP4(x) - x||^2 / sum ||x||^2 (blocks of 32 along the last dim)."""
    num = den = 0.0
    for x in tensors:
        x = x.detach().float()
        num += float((fake_quantize(x, "fp4_e2m1") - x).pow(2).sum())
        den += float(x.pow(2).sum())
    return num / den


def _input_error(model, ids) -> float:
    """Relative MXFP4 error of every block linear's input activations on ``ids``."""
    seen = []
    handles = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
               for m in _block_linears(model)]
    _logits(model, ids)
    for h in handles:
        h.remove()
    return _rel_error(seen)


def _text_ids(model_dir, n=256):
    from dmx.data import load_tokenizer, tokenize_whole
    text = (embedded_model_dir().parent / "wikitext-2-raw" / "wiki.test.raw").read_text()
    return tokenize_whole(load_tokenizer(model_dir), text[:20000])[:n].view(2, -1)


@pytest.mark.parametrize("name", ["tiny-qwen3", "stories260K"])
def test_hadamard_lowers_mxfp4_error(name):
    """The rotation lowers the MXFP4 error of the weights it rotates (the norm-folded ones)
    and of the linears' inputs (vs the untouched model). Numbers on 16 x 256 tokens:
    benchmarks/results/rotations.md (tiny-qwen3 weights 0.01315 -> 0.01309, inputs
    0.01398 -> 0.01363; stories260K inputs 0.0161 -> 0.0135)."""
    path = embedded_model_dir() if name == "tiny-qwen3" else STORIES
    base = _load(path, torch.float32)
    ids = _text_ids(path)
    folded = copy.deepcopy(base)
    fold_norms(arch_of(folded))  # the weights the rotation starts from
    rotated = copy.deepcopy(base)
    rotate_model(rotated, "hadamard")
    errors = {k: {"weights": _rel_error(m.weight for m in _block_linears(model)),
                  "inputs": _input_error(model, ids)}
              for k, model in (("untouched", base), ("folded", folded),
                               ("hadamard", rotated))}
    print(f"MXFP4 relative error on {name}:", errors)
    assert errors["hadamard"]["weights"] < errors["folded"]["weights"]
    assert errors["hadamard"]["inputs"] < errors["untouched"]["inputs"]
    if name == "stories260K":
        assert errors["hadamard"]["inputs"] < 0.9 * errors["untouched"]["inputs"]


# ----------------------------------------------------------------------------- export
def test_rotated_untied_model_exports_and_reads_back_bit_exact(tmp_path):
    src = STORIES  # tied embeddings, untied by the rotation
    model = _load(src, torch.float32)
    info = rotate_model(model, "hadamard")
    assert info.untied_lm_head
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    formats = {n: "fp4_e2m1" for n in names}
    config = patch_config(json.loads((src / "config.json").read_text()), info)
    outdir.write_out(tmp_path / "out", model, formats, formats, src,
                 {"method": "kl", "rotation": info.to_manifest()},
                 extra_files={"config.json": json.dumps(config)})
    apply_formats(model, formats, formats)
    loaded, _, manifest = outdir.load(tmp_path / "out")
    assert manifest["rotation"]["untied_lm_head"] is True
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    ids = _ids(model)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
