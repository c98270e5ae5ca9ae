"""`dmx search --gradient-checkpointing`: the same offsets' gradients, less stored activation.

Recomputing a block in backward repeats the same computation (same temperature, same
offsets, deterministic kernels), so the gradients must be equal bit for bit, and a search
with it must end where a search without it ends.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import transformers  # a hard dependency: a broken install fails, never skips

from dmx.errors import DMXError  # noqa: E402
from dmx.nn.layers import dmx_parameters, set_temperature, wrap_model  # noqa: E402
from dmx.search import read_search_log, search  # noqa: E402
from dmx.search.train import checkpoint_blocks  # noqa: E402

MODEL = Path(__file__).resolve().parent / "data" / "stories260K-hf"
WIKI = Path(__file__).resolve().parents[1] / "dmx" / "data" / "wikitext-2-raw" / "wiki.valid.raw"


def _offset_grads(checkpointed: bool) -> tuple[list[torch.Tensor], int]:
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=80,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    layers = wrap_model(model, "fp8-fp4")
    with torch.no_grad():  # offsets spread over the ladder: every layer gets a soft format
        for i, p in enumerate(dmx_parameters(model)):
            p.fill_(0.3 + 0.1 * i)
    for layer in layers.values():
        layer.train()
    set_temperature(model, 0.4)
    if checkpointed:
        assert checkpoint_blocks(model) == 3
    calls = []
    next(iter(layers.values())).register_forward_pre_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return [p.grad.clone() for p in dmx_parameters(model)], len(calls)


def test_checkpointed_gradients_equal_bit_for_bit():
    (plain, calls_plain), (ckpt, calls_ckpt) = _offset_grads(False), _offset_grads(True)
    assert (calls_plain, calls_ckpt) == (1, 2)  # the block really was recomputed in backward
    assert len(plain) == len(ckpt) > 0
    assert any(float(g.abs()) > 0 for g in plain)  # the comparison is not vacuous
    for a, b in zip(plain, ckpt):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("rotate", ["none", "learned"])
def test_search_with_checkpointing_ends_where_search_without_does(tmp_path, rotate):
    """Also with learned rotations: the recomputed block recomputes the rotated weights."""
    calib = tmp_path / "calib.txt"
    calib.write_text(WIKI.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    kwargs = dict(calib=[calib], steps=4, batch_size=2, seqlen=48, samples=8, progress=False,
                  export_target="none", rotate=rotate)
    a = search(MODEL, 5.0, out=tmp_path / "plain", **kwargs)
    b = search(MODEL, 5.0, out=tmp_path / "ckpt", gradient_checkpointing=True, **kwargs)
    assert a["formats"] == b["formats"]
    log_a = read_search_log(tmp_path / "plain")
    log_b = read_search_log(tmp_path / "ckpt")
    assert [s["loss"] for s in log_a["steps"]] == [s["loss"] for s in log_b["steps"]]
    want, have = a["model"].state_dict(), b["model"].state_dict()
    assert all(torch.equal(want[k], have[k]) for k in want)  # the folded rotations too


def test_model_without_decoder_block_list_is_refused():
    class NoBlocks(torch.nn.Module):
        config = type("C", (), {"num_hidden_layers": 2})()

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(DMXError, match="gradient-checkpointing"):
        checkpoint_blocks(NoBlocks())
