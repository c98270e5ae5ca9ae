"""Rotations wired into `dmx search` and `dmx baseline` (issue 12), end to end on tiny-qwen3.

tiny-qwen3 (hidden 256, head_dim 64, tied lm_head): every rotated OUT unties lm_head, so
these also check the patched config.json. Checked: a search with --rotate hadamard and
--rotate learned writes an OUT that dmx.load()s with logits equal bit for bit to the
searched model; the manifest records the rotation; learned rotations move, stay orthogonal
and are folded; `dmx baseline --rotate hadamard` rotates exactly as dmx.rotate does; a
rotated OUT exports to compressed-tensors and GGUF (with the export's own read-back) and
its untied lm_head goes along; bad rotation flags fail in one line with exit 2.
Resume with learned rotations: tests/test_dmx_search.py (the resume test, parametrized).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dmx import outdir
from dmx.cli import main as dmx_main
from dmx.data import load_model
from dmx.nn.layers import apply_formats
from dmx.rotate import rotate_model
from dmx.search import read_search_log, search

pytestmark = pytest.mark.usefixtures("single_threaded")  # tests/conftest.py

EMBEDDED = Path(__file__).resolve().parents[1] / "dmx" / "data"
MODEL = EMBEDDED / "tiny-qwen3"
# 3 short steps: enough for the rotations to move, cheap on a shared CPU
KW = dict(steps=3, batch_size=2, seqlen=32, samples=4, progress=False)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, calib):
    """One OUT per search rotation: {"hadamard": (out, result), "learned": (out, result)}."""
    root = tmp_path_factory.mktemp("rotated")
    runs = {}
    for mode, steps in (("hadamard", 2), ("learned", KW["steps"])):
        out = root / mode
        # planned for vLLM (q/k/v and gate/up tied): the OUTs are exported there below
        runs[mode] = out, search(MODEL, 5.0, calib=[calib], out=out, rotate=mode,
                                 export_target="compressed-tensors", **{**KW, "steps": steps})
    return runs


def _ids():
    return torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(3))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=_ids(), use_cache=False).logits


def _assert_loads_bit_for_bit(out, model) -> dict:
    loaded, _, manifest = outdir.load(out)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight  # stayed untied
    got, want = _logits(loaded), _logits(model)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    return manifest


@pytest.mark.parametrize("mode", ["hadamard", "learned"])
def test_rotated_search_out_loads_bit_for_bit(searched, mode):
    out, result = searched[mode]
    manifest = _assert_loads_bit_for_bit(out, result["model"])
    rot = manifest["rotation"]
    assert rot["mode"] == mode and rot["untied_lm_head"] and rot["norms_folded"]
    assert (rot["hidden_size"], rot["head_dim"], rot["online"]) == (256, 64, [])
    start = "blockdiag8xsylvester32"  # auto: one H32 per MX block of the 256 residual
    assert rot["r1"] == (start if mode == "hadamard" else f"learned from {start}")
    assert manifest["search"]["config"]["rotate"] == mode
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert json.loads((MODEL / "config.json").read_text())["tie_word_embeddings"] is True
    assert read_search_log(out)["rotation"] == rot


def test_learned_rotations_move_stay_orthogonal_and_fold(searched):
    out, result = searched["learned"]
    rot = result["rotation"]
    assert rot["learned_steps"] == KW["steps"]
    assert 0.0 <= rot["orthogonality_error"] < 1e-5
    steps = read_search_log(out)["steps"]
    assert len(steps) == KW["steps"] and all(s["rotation_grad_norm"] > 0 for s in steps)
    # same seed and kind: the learned run started from the hadamard run's rotations, so
    # its unquantized tensors differ only because the rotations moved
    had = load_file(str(searched["hadamard"][0] / "model.safetensors"))
    lrn = load_file(str(out / "model.safetensors"))
    assert not torch.equal(had["model.embed_tokens.weight"], lrn["model.embed_tokens.weight"])
    # folded: a plain model, no parametrization left in OUT or on the searched model
    assert not any("parametrizations" in k for k in lrn)
    assert not any("parametrizations" in k for k in result["model"].state_dict())


@pytest.mark.parametrize("to", ["compressed-tensors", "gguf"])
def test_rotated_out_exports_and_reads_back(searched, tmp_path, to, capsys):
    out, _ = searched["learned"]
    dest = tmp_path / "exported"
    assert dmx_main(["export", str(out), "--to", to, "-o", str(dest)]) == 0  # read-back on
    assert f"wrote {dest}" in capsys.readouterr().out
    lm_head = load_file(str(out / "model.safetensors"))["lm_head.weight"]
    if to == "compressed-tensors":
        assert json.loads((dest / "config.json").read_text())["tie_word_embeddings"] is False
        tensors = {}
        for f in dest.glob("*.safetensors"):
            tensors.update(load_file(str(f)))
        assert torch.equal(tensors["lm_head.weight"], lm_head)  # the untied, rotated head
    else:
        import gguf
        reader = gguf.GGUFReader(str(dest / "model.gguf"))
        t = {x.name: x for x in reader.tensors}
        assert "output.weight" in t  # untied: llama.cpp must not reuse token_embd
        got = np.asarray(t["output.weight"].data).reshape(lm_head.shape)
        assert np.array_equal(got, lm_head.numpy().astype(got.dtype))


def test_baseline_rotate_hadamard_is_the_search_rotation(tmp_path, calib, capsys):
    out = tmp_path / "u4"
    assert dmx_main(["baseline", "--model", str(MODEL), "--method", "uniform", "--format",
                     "fp4_e2m1", "--rotate", "hadamard", "-o", str(out)]) == 0
    manifest = json.loads((out / "dmx_manifest.json").read_text())
    assert manifest["rotation"]["mode"] == "hadamard"
    assert manifest["rotation"]["r1"] == "blockdiag8xsylvester32"
    # built independently: load, rotate with dmx.rotate, quantize every layer like OUT
    model = load_model(MODEL, dtype=torch.float32)
    rotate_model(model, "hadamard", seed=0)
    formats = {n: "fp4_e2m1" for n in manifest["layers"]}
    apply_formats(model, formats, formats)
    _assert_loads_bit_for_bit(out, model)

    kl = tmp_path / "kl"
    assert dmx_main(["baseline", "--model", str(MODEL), "--method", "kl", "--target-bits",
                     "5", "--rotate", "hadamard", "--calib", str(calib), "--samples", "2",
                     "--seqlen", "32", "--no-progress", "-o", str(kl)]) == 0
    assert json.loads((kl / "dmx_manifest.json").read_text())["rotation"]["mode"] == "hadamard"
    assert json.loads((kl / "config.json").read_text())["tie_word_embeddings"] is False
    capsys.readouterr()


def test_baseline_rotate_from_quantizes_the_search_rotated_weights(searched, tmp_path, capsys):
    """`dmx baseline --rotate-from OUT` folds the matrices the learned search kept: every
    tensor it leaves in full precision equals the search OUT's bit for bit, and every layer
    both put in MXFP4 has the same packed codes and scales."""
    src, result = searched["learned"]
    saved = load_file(str(src / "rotations.safetensors"))
    assert sorted(saved) == ["r1"] + sorted(f"r2.{i}" for i in range(len(saved) - 1))
    out = tmp_path / "u4"
    assert dmx_main(["baseline", "--model", str(MODEL), "--method", "uniform", "--format",
                     "fp4_e2m1", "--rotate-from", str(src), "--export-target",
                     "compressed-tensors", "-o", str(out)]) == 0
    manifest = json.loads((out / "dmx_manifest.json").read_text())
    assert manifest["rotation"]["mode"] == "learned"
    assert manifest["rotation"]["from"] == str(src)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    mine = load_file(str(out / "model.safetensors"))
    theirs = load_file(str(src / "model.safetensors"))
    fp4 = [n for n, f in result["formats"].items() if f == "fp4_e2m1"]
    assert fp4  # a 5-bit search leaves some layers in MXFP4
    same = [k for k in theirs if not any(k.startswith(n + ".") for n in result["formats"])]
    same += [k for k in theirs for n in fp4 if k.startswith(n + ".")]
    assert "lm_head.weight" in same and "model.embed_tokens.weight" in same
    for key in same:  # bit patterns, whatever the dtype
        assert torch.equal(mine[key].flatten().view(torch.uint8),
                           theirs[key].flatten().view(torch.uint8)), key
    capsys.readouterr()


def test_baseline_rotate_from_refuses_what_it_cannot_use(searched, tmp_path, capsys):
    learned, _ = searched["learned"]
    cases = [(["--rotate-from", str(searched["hadamard"][0])], "no learned rotations"),
             (["--rotate-from", str(tmp_path)], "no dmx_manifest.json"),
             (["--rotate-from", str(learned), "--rotate", "hadamard"], "drop --rotate")]
    for extra, message in cases:
        out = tmp_path / "out"
        code = dmx_main(["baseline", "--model", str(MODEL), "--method", "uniform", "--format",
                         "fp4_e2m1", *extra, "-o", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
        assert len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["search", "--target-bits", "5", "--rotation-lr", "0.3"], "--rotate learned"),
    (["search", "--target-bits", "5", "--rotate", "spin"], "--rotate"),
    (["search", "--target-bits", "5", "--rotate", "hadamard", "--rotate-kind", "x"],
     "--rotate-kind"),
    (["baseline", "--method", "uniform", "--format", "fp4_e2m1", "--rotate-kind", "block"],
     "--rotate hadamard"),
])
def test_bad_rotation_flags_fail_in_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code = dmx_main([argv[0], "--model", str(MODEL), *argv[1:], "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_resume_command_carries_the_rotation_flags():
    from dmx.search.recipe import SearchConfig
    from dmx.search.command import _resume_command

    cfg = SearchConfig.from_recipe("paper", target_bits=5.0, rotate="learned",
                                   rotate_kind="kron", rotation_lr=0.3)
    cmd = _resume_command(cfg, "m", "out", "out.partial", False, {})
    assert "--rotate learned --rotate-kind kron --rotation-lr 0.3" in cmd
