"""dmx.outdir: OUT written once, loaded back bit-exactly; byte counts, schema, corruption.

The tiny source models come from tests/tiny_models.py (shared with the eval / baseline /
CLI tests).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mxref
from dmx import outdir
from dmx.errors import DMXError
from dmx.outdir.integrity import reseal
from dmx.nn.layers import apply_formats, wrap_model

from tiny_models import tiny_model_dir, tiny_root

pytestmark = pytest.mark.usefixtures("single_threaded")  # tests/conftest.py

FORMATS = ["fp4_e2m1", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2"]


def _load_plain(d):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def _mixed(names):
    """Every format, cycling, inputs quantized on two of three layers."""
    formats = {n: FORMATS[i % len(FORMATS)] for i, n in enumerate(names)}
    acts = {n: (f if i % 3 else None) for i, (n, f) in enumerate(formats.items())}
    return formats, acts


def _linear_names(model):
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in n]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tiny_root(tmp_path_factory)
    return {"llama": tiny_model_dir(root, "llama", intermediate=80),
            "qwen3": tiny_model_dir(root, "qwen3", intermediate=81),  # odd K: FP4/FP6 padding
            "even": tiny_model_dir(root, "qwen3", hidden=64, intermediate=128)}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_write_load_logits_bit_exact(src, tmp_path, arch):
    model = _load_plain(src[arch])
    formats, acts = _mixed(_linear_names(model))
    outdir.write_out(tmp_path / "out", model, formats, acts, src[arch], {"method": "kl"})
    apply_formats(model, formats, acts)
    ids = torch.randint(0, 4096, (2, 37), generator=torch.Generator().manual_seed(1))
    loaded, tok, manifest = outdir.load(tmp_path / "out")
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert torch.equal(want, got)
    assert tok is not None and manifest["method"] == "kl"
    for name, fmt in formats.items():
        layer = loaded.get_submodule(name)
        assert (layer.weight_fmt, layer.act_fmt) == (fmt, acts[name])


def test_weights_are_mxref_codes(src, tmp_path):
    """The stored bytes are mxref's codes/scales of the weight along the input dim."""
    from safetensors.numpy import load_file
    model = _load_plain(src["qwen3"])
    formats, acts = _mixed(_linear_names(model))
    outdir.write_out(tmp_path / "out", model, formats, acts, src["qwen3"], {"method": "kl"})
    stored = load_file(tmp_path / "out" / outdir.WEIGHTS_NAME)
    manifest = outdir.read_manifest(tmp_path / "out")
    for name, fmt in formats.items():
        w = model.get_submodule(name).weight.detach().numpy()
        mx = mxref.quantize(w, fmt, axis=1)
        np.testing.assert_array_equal(stored[f"{name}.weight_packed"],
                                      mxref.pack_codes(mx.codes, fmt))
        np.testing.assert_array_equal(stored[f"{name}.weight_scale"], mx.scales)
        entry = manifest["layers"][name]
        assert entry["shape"] == list(w.shape) and entry["packing"] == mxref.packing_name(fmt)
        assert f"{name}.weight" not in stored
    # tied embeddings are stored once, unquantized tensors unchanged
    assert "lm_head.weight" not in stored
    assert np.array_equal(stored["model.embed_tokens.weight"],
                          model.model.embed_tokens.weight.detach().numpy())


def test_wrapped_model_written_under_plain_names(src, tmp_path):
    """A model still wrapped in DMXLinear (as the search leaves it) writes the same OUT."""
    from safetensors.numpy import load_file
    plain = _load_plain(src["llama"])
    formats, acts = _mixed(_linear_names(plain))
    outdir.write_out(tmp_path / "a", plain, formats, acts, src["llama"], {"method": "dmx"})
    wrapped = _load_plain(src["llama"])
    wrap_model(wrapped)
    outdir.write_out(tmp_path / "b", wrapped, formats, acts, src["llama"], {"method": "dmx"})
    a, b = (load_file(tmp_path / d / outdir.WEIGHTS_NAME) for d in "ab")
    assert sorted(a) == sorted(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert outdir.read_manifest(tmp_path / "a")["layers"] == outdir.read_manifest(tmp_path / "b")["layers"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_storage_bits_equal_bytes_when_k_multiple_of_32(src, tmp_path, fmt):
    model = _load_plain(src["even"])
    names = _linear_names(model)
    outdir.write_out(tmp_path / "out", model, {n: fmt for n in names}, None, src["even"],
                 {"method": "uniform"})
    from safetensors.numpy import load_file
    stored = load_file(tmp_path / "out" / outdir.WEIGHTS_NAME)
    m = outdir.read_manifest(tmp_path / "out")
    nbytes = sum(stored[f"{n}.weight_packed"].nbytes + stored[f"{n}.weight_scale"].nbytes
                 for n in names)
    weights = sum(e["shape"][0] * e["shape"][1] for e in m["layers"].values())
    declared = sum(e["storage_bits"] * e["shape"][0] * e["shape"][1] for e in m["layers"].values())
    assert 8 * nbytes == declared
    assert m["avg_bits"]["storage_bits_per_weight"] == 8 * nbytes / weights
    bits = mxref.get_format(fmt).bits
    assert m["avg_bits"]["simple"] == m["avg_bits"]["size_weighted"] == bits  # weights only


def test_ragged_storage_counts_padding(src, tmp_path):
    model = _load_plain(src["qwen3"])
    names = _linear_names(model)
    outdir.write_out(tmp_path / "out", model, {n: "fp6_e2m3" for n in names}, None, src["qwen3"],
                 {"method": "uniform"})
    m = outdir.read_manifest(tmp_path / "out")
    down = next(n for n in names if n.endswith("down_proj"))
    assert m["layers"][down]["shape"][1] == 81
    weights = sum(e["shape"][0] * e["shape"][1] for e in m["layers"].values())
    want = sum(e["shape"][0] * (mxref.packed_row_bytes(e["shape"][1], "fp6_e2m3")
                                + -(-e["shape"][1] // 32)) for e in m["layers"].values())
    assert m["avg_bits"]["storage_bits_per_weight"] == 8 * want / weights > 6.25


def test_avg_bits_follow_search_definition(src, tmp_path):
    """simple = (mean weight bits + mean input bits) / 2 over layers, as dmx.search.penalty."""
    model = _load_plain(src["llama"])
    names = _linear_names(model)
    formats = {n: ("fp8_e4m3" if i < 3 else "fp4_e2m1") for i, n in enumerate(names)}
    acts = {n: (f if i % 2 else None) for i, (n, f) in enumerate(formats.items())}
    outdir.write_out(tmp_path / "out", model, formats, acts, src["llama"], {"method": "kl"})
    m = outdir.read_manifest(tmp_path / "out")
    wbits = [mxref.get_format(f).bits for f in formats.values()]
    abits = [mxref.get_format(f).bits for f in acts.values() if f]
    assert m["avg_bits"]["simple"] == pytest.approx((np.mean(wbits) + np.mean(abits)) / 2,
                                                    rel=1e-6)


def test_manifest_schema_and_fields(src, tmp_path):
    model = _load_plain(src["qwen3"])
    formats, acts = _mixed(_linear_names(model))
    outdir.write_out(tmp_path / "out", model, formats, acts, src["qwen3"],
                 {"method": "dmx", "ladder": "fp8-fp4", "target_bits": 6, "seed": 3,
                  "wall_time_s": 1.5, "search": {"steps": 2}})
    m = outdir.read_manifest(tmp_path / "out")
    assert m["format_version"] == 1 and m["seed"] == 3 and m["target_bits"] == 6.0
    assert m["profile"]["hash"] == mxref.get_profile("ocp").hash
    assert m["search"] == {"steps": 2} and m["wall_time_s"] >= 1.5  # + quantization time
    assert set(m["software"]) == {"dmx", "torch", "transformers", "numpy", "torch_threads"}
    assert m["software"]["torch_threads"] == torch.get_num_threads()
    bad = json.loads(json.dumps(m))
    name = next(iter(bad["layers"]))
    bad["layers"][name]["bits"] = 5
    with pytest.raises(DMXError, match=f"layers/{name}/bits"):
        outdir.validate_manifest(bad)
    bad = dict(m, method="gptq")
    with pytest.raises(DMXError, match="method"):
        outdir.validate_manifest(bad)


def test_fused_groups_recorded_when_tied(src, tmp_path):
    model = _load_plain(src["llama"])
    names = _linear_names(model)
    formats = {n: "fp8_e4m3" for n in names}
    formats["model.layers.1.self_attn.k_proj"] = "fp4_e2m1"  # breaks block 1's q/k/v group
    outdir.write_out(tmp_path / "out", model, formats, None, src["llama"], {"method": "kl"})
    layers = outdir.read_manifest(tmp_path / "out")["layers"]
    assert layers["model.layers.0.self_attn.q_proj"]["fused_group"] == "model.layers.0.self_attn.qkv"
    assert layers["model.layers.0.mlp.up_proj"]["fused_group"] == "model.layers.0.mlp.gate_up"
    assert layers["model.layers.1.self_attn.q_proj"]["fused_group"] is None
    assert layers["model.layers.0.self_attn.o_proj"]["fused_group"] is None


def _written(src, tmp_path):
    model = _load_plain(src["llama"])
    formats, acts = _mixed(_linear_names(model))
    out = outdir.write_out(tmp_path / "out", model, formats, acts, src["llama"], {"method": "kl"})
    return out, formats


def test_corrupted_weights_refused(src, tmp_path):
    from safetensors.numpy import load_file, save_file
    out, formats = _written(src, tmp_path)
    tensors = load_file(out / outdir.WEIGHTS_NAME)
    name = next(iter(formats))
    tensors[f"{name}.weight_packed"][0, 0] ^= 1
    save_file(tensors, out / outdir.WEIGHTS_NAME)
    with pytest.raises(DMXError, match="model.safetensors: sha256 does not match the manifest"):
        outdir.load(out)
    reseal(out)   # the file hashes re-recorded: each layer's own sha256 still catches it
    with pytest.raises(DMXError, match=f"{name}: weight bytes do not match the manifest sha256"):
        outdir.load(out)


def test_manifest_hash_mismatch_refused(src, tmp_path):
    out, formats = _written(src, tmp_path)
    m = json.loads((out / outdir.MANIFEST_NAME).read_text())
    name = list(formats)[2]
    m["layers"][name]["sha256"] = "0" * 64
    (out / outdir.MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(DMXError, match="dmx_manifest.json: its content does not match its "
                                       "manifest_sha256"):
        outdir.load(out)
    reseal(out)
    with pytest.raises(DMXError, match=f"{name}: weight bytes do not match"):
        outdir.load(out)


def test_truncated_safetensors_refused(src, tmp_path):
    out, _ = _written(src, tmp_path)
    data = (out / outdir.WEIGHTS_NAME).read_bytes()
    (out / outdir.WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(DMXError, match="corrupted"):
        outdir.load(out)


def test_existing_out_refused_and_force_replaces(src, tmp_path):
    out, formats = _written(src, tmp_path)
    before = (out / outdir.MANIFEST_NAME).read_text()
    model = _load_plain(src["llama"])
    with pytest.raises(DMXError, match="already exists; pass --force"):
        outdir.write_out(out, model, formats, None, src["llama"], {"method": "uniform"})
    assert (out / outdir.MANIFEST_NAME).read_text() == before
    outdir.write_out(out, model, formats, None, src["llama"], {"method": "uniform"}, force=True)
    assert outdir.read_manifest(out)["method"] == "uniform"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left


def test_failed_write_leaves_nothing(src, tmp_path):
    model = _load_plain(src["llama"])
    formats, _ = _mixed(_linear_names(model))
    with pytest.raises(DMXError, match="plain file name"):
        outdir.write_out(tmp_path / "out", model, formats, None, src["llama"], {"method": "kl"},
                     extra_files={"../escape.txt": "x"})
    with pytest.raises(DMXError, match="not a module"):
        outdir.write_out(tmp_path / "out", model, {"nope": "fp4_e2m1"}, None, src["llama"],
                     {"method": "kl"})
    with pytest.raises(DMXError, match="method"):
        outdir.write_out(tmp_path / "out", model, formats, None, src["llama"], {"method": "awq"})
    assert list(tmp_path.iterdir()) == []


def test_unserialisable_meta_refused(src, tmp_path):
    model = _load_plain(src["llama"])
    formats, _ = _mixed(_linear_names(model))
    with pytest.raises(DMXError, match="JSON"):
        outdir.write_out(tmp_path / "out", model, formats, None, src["llama"],
                     {"method": "kl", "search": {"loss": float("nan")}})
    assert list(tmp_path.iterdir()) == []
