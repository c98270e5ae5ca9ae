"""Export a tiny mixed MXFP4/MXFP8 (+MXFP6 for Quark) OUT to every target and read it back.

The exporter's own read-back runs in every export; these tests additionally check the
written files with code that does not come from the exporter (raw safetensors bytes,
compressed-tensors' config parser, gguf.GGUFReader fields, an independent Llama q/k
permutation), so a bug shared by writer and checker cannot pass.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import mxref
from tiny_out import MIXED, WITH_FP6, build_out


@pytest.fixture(scope="module")
def outs(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return {"qwen3": build_out(root, "qwen3"), "llama": build_out(root, "llama"),
            "llama-fp6": build_out(root / "fp6", "llama", WITH_FP6,
                                   act_formats={"q_proj": "fp4_e2m1", "k_proj": "fp4_e2m1",
                                                "v_proj": "fp4_e2m1"})}


def _export(src, to, dest, **kw):
    from dmx.export import export
    lines = []
    checks = export(src, to, dest, log=lines.append, **kw)
    return checks, "\n".join(lines)


def _out_tensors(src):
    from safetensors.numpy import load_file
    return load_file(str(src / "model.safetensors"))


def _manifest(src):
    return json.loads((src / "dmx_manifest.json").read_text())["layers"]


# ------------------------------------------------------------ compressed-tensors
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_compressed_tensors_round_trip(outs, tmp_path, arch):
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open

    src, dest = outs[arch], tmp_path / "ct"
    checks, log = _export(src, "compressed-tensors", dest, max_shard_bytes=150_000)
    assert len(checks) == 14 and all(c.exact and c.bytes_equal for c in checks)
    assert "mxfp4-pack-quantized" in log and "mxfp8-quantized" in log

    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2          # really sharded
    qc = json.loads((dest / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "mixed-precision"
    cfg = QuantizationConfig.model_validate(qc)
    manifest = _manifest(src)
    for scheme in cfg.config_groups.values():
        want = "fp4_e2m1" if scheme.format == "mxfp4-pack-quantized" else "fp8_e4m3"
        assert {manifest[n]["format"] for n in scheme.targets} == {want}
        assert scheme.weights.group_size == 32 and scheme.input_activations is None
    assert sum(len(s.targets) for s in cfg.config_groups.values()) == len(manifest)
    assert ("lm_head" in qc["ignore"]) == (arch == "qwen3" or "lm_head" not in manifest)

    # raw bytes: FP4 packing and E8M0 scales are OUT's bytes; FP8 weights are OUT's codes
    raw = _out_tensors(src)
    for name, entry in manifest.items():
        fname = index["weight_map"][f"{name}.weight_scale"]
        with safe_open(str(dest / fname), "np") as fh:
            assert np.array_equal(fh.get_tensor(f"{name}.weight_scale"),
                                  raw[f"{name}.weight_scale"])
        if entry["format"] == "fp4_e2m1":
            with safe_open(str(dest / index["weight_map"][f"{name}.weight_packed"]), "np") as fh:
                assert np.array_equal(fh.get_tensor(f"{name}.weight_packed"),
                                      raw[f"{name}.weight_packed"])


def test_compressed_tensors_activation_groups(outs, tmp_path):
    """One config group per (weight, activation) pair: q/k/v carry dynamic MXFP8 inputs."""
    from dmx.export.compressed_tensors import quantization_config
    from dmx.outdir.read import read_out

    src = read_out(outs["qwen3"])
    for n in src.layers:
        if n.endswith(("q_proj", "k_proj", "v_proj")):
            src.layers[n].act_format = "fp8_e4m3"
    groups = quantization_config(src.layers)["config_groups"].values()
    acts = sorted((g["format"], (g["input_activations"] or {}).get("num_bits", 0),
                   len(g["targets"])) for g in groups)
    assert acts == [("mxfp4-pack-quantized", 0, 6), ("mxfp8-quantized", 0, 2),
                    ("mxfp8-quantized", 8, 6)]
    # each group is exactly the compressed-tensors preset llm-compressor would write
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    for g in groups:
        preset = {("mxfp4-pack-quantized", False): "MXFP4A16", ("mxfp8-quantized", False):
                  "MXFP8A16", ("mxfp8-quantized", True): "MXFP8"}[
                      (g["format"], g["input_activations"] is not None)]
        want = QuantizationScheme(targets=g["targets"], format=g["format"],
                                  **PRESET_SCHEMES[preset]).model_dump(mode="json")
        assert g == want          # as it appears in config.json


# ------------------------------------------------------------ Quark
def test_quark_round_trip_with_mxfp6(outs, tmp_path):
    src, dest = outs["llama-fp6"], tmp_path / "quark"
    checks, log = _export(src, "quark", dest)
    assert len(checks) == 14 and all(c.exact and c.bytes_equal for c in checks)
    qc = json.loads((dest / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "quark" and qc["export"]["kv_cache_group"] == []
    lqc = qc["layer_quant_config"]
    assert lqc["model.layers.0.self_attn.o_proj"]["weight"]["dtype"] == "fp6_e2m3"
    assert lqc["model.layers.1.mlp.down_proj"]["weight"]["dtype"] == "fp6_e3m2"
    assert lqc["model.layers.0.mlp.up_proj"]["weight"]["dtype"] == "fp4"
    assert lqc["model.layers.0.self_attn.q_proj"]["input_tensors"]["dtype"] == "fp4"
    assert lqc["model.layers.0.mlp.up_proj"]["input_tensors"] is None
    assert all(v["weight"]["scale_format"] == "e8m0" and v["weight"]["group_size"] == 32
               for v in lqc.values())

    # Quark Pack_fp6, re-derived here from its source comments: byte0 = v0 | v1<<6 ...
    from safetensors.torch import load_file
    tensors = {}
    for f in dest.glob("model-*.safetensors"):
        tensors.update(load_file(str(f)))
    name = "model.layers.1.mlp.down_proj"
    packed = tensors[f"{name}.weight"].numpy()
    codes = mxref.unpack_codes(_out_tensors(src)[f"{name}.weight_packed"], "fp6_e3m2", 128)
    v = codes.reshape(64, -1, 4).astype(np.uint32)
    word = v[..., 0] | v[..., 1] << 6 | v[..., 2] << 12 | v[..., 3] << 18
    expect = np.stack([word & 0xFF, (word >> 8) & 0xFF, word >> 16], -1).reshape(64, 96)
    assert np.array_equal(packed, expect.astype(np.uint8))


# ------------------------------------------------------------ GGUF
def _permute(w, n_head):
    """llama.cpp convert_hf_to_gguf LlamaModel.permute, as written there."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_gguf_round_trip(outs, tmp_path, arch):
    import gguf
    from dmx.outdir.read import read_out

    src, dest = outs[arch], tmp_path / "gguf"
    checks, log = _export(src, "gguf", dest)
    mx = [c for c in checks if c.stored_as == "MXFP4"]
    q8 = [c for c in checks if c.stored_as == "Q8_0"]
    assert len(mx) == 6 and len(q8) == 8
    assert all(c.exact and c.bytes_equal for c in mx)
    assert all(0 < c.max_abs_err < 1e-3 for c in q8)      # Q8_0 is lossy, and reported
    assert "Q8_0" in log and "max abs error" in log

    r = gguf.GGUFReader(str(dest / "model.gguf"))
    f = lambda k: r.get_field(k).contents()                              # noqa: E731
    assert f("general.architecture") == arch
    assert f(f"{arch}.block_count") == 2 and f(f"{arch}.context_length") == 128
    assert f(f"{arch}.embedding_length") == 64 and f(f"{arch}.feed_forward_length") == 128
    assert f(f"{arch}.attention.head_count") == 4 and f(f"{arch}.attention.head_count_kv") == 2
    assert f(f"{arch}.rope.freq_base") == 10000.0
    assert np.isclose(f(f"{arch}.attention.layer_norm_rms_epsilon"), 1e-5)
    vocab = 4096 if arch == "qwen3" else 512
    assert len(f("tokenizer.ggml.tokens")) == vocab
    assert f("tokenizer.ggml.model") == ("gpt2" if arch == "qwen3" else "llama")
    if arch == "qwen3":
        assert len(f("tokenizer.ggml.merges")) > 1000
        assert f("tokenizer.ggml.tokens")[0] == "<|endoftext|>"
        assert f("tokenizer.ggml.token_type")[0] == gguf.TokenType.CONTROL
        assert f("tokenizer.ggml.eos_token_id") == 0
    else:
        assert f("tokenizer.ggml.tokens")[1] == "<s>" and f("tokenizer.ggml.bos_token_id") == 1
        assert f("tokenizer.ggml.token_type")[1] == gguf.TokenType.CONTROL

    types = {t.name: t.tensor_type for t in r.tensors}
    T = gguf.GGMLQuantizationType
    assert types["token_embd.weight"] == T.F16 and types["output_norm.weight"] == T.F32
    assert types["blk.0.ffn_up.weight"] == T.MXFP4 and types["blk.1.attn_v.weight"] == T.Q8_0
    assert ("output.weight" in types) == (arch == "llama")        # qwen3 is tied
    assert ("blk.0.attn_q_norm.weight" in types) == (arch == "qwen3")

    # attn_output is MXFP4: decode with gguf and compare to mxref; Llama's attn_q/attn_k are
    # Q8_0 here, so check their row order against the converter's permute within Q8_0 error
    layers = read_out(src).layers
    t = {x.name: x for x in r.tensors}
    got = gguf.quants.dequantize(np.asarray(t["blk.1.attn_output.weight"].data), T.MXFP4)
    ref = layers["model.layers.1.self_attn.o_proj"].values()
    assert np.array_equal(got.reshape(ref.shape), ref + 0.0)      # +0.0: ggml has no -0
    for proj, gname, heads in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2)):
        ref = layers[f"model.layers.0.self_attn.{proj}"].values()
        if arch == "llama":
            ref = _permute(ref, heads)
        got = gguf.quants.dequantize(np.asarray(t[f"blk.0.{gname}.weight"].data), T.Q8_0)
        assert np.abs(got.reshape(ref.shape) - ref).max() < 1e-3


def test_gguf_llama_mxfp4_attention_is_permuted(tmp_path):
    """MXFP4 q/k: the permuted rows keep their own codes and scales (whole rows move)."""
    import gguf
    from dmx.outdir.read import read_out

    src = build_out(tmp_path, "llama", dict(MIXED, q_proj="fp4_e2m1", k_proj="fp4_e2m1",
                                            v_proj="fp4_e2m1"))
    _export(src, "gguf", tmp_path / "g")
    r = gguf.GGUFReader(str(tmp_path / "g" / "model.gguf"))
    t = {x.name: x for x in r.tensors}
    layer = read_out(src).layers["model.layers.1.self_attn.k_proj"]
    blocks = np.asarray(t["blk.1.attn_k.weight"].data).reshape(layer.shape[0], -1)
    codes, scales = mxref.unpack_llamacpp_mxfp4(blocks, layer.shape[1])
    assert np.array_equal(codes, _permute(layer.codes, 2))
    assert np.array_equal(scales, _permute(layer.scales, 2))
    assert not np.array_equal(codes, layer.codes)     # the permutation really moved rows


def test_full_precision_linears_are_skipped_by_vllm_configs(tmp_path):
    """A linear left unquantized must be in compressed-tensors' ignore and Quark's exclude
    (Quark would otherwise give it global_quant_config) and keep its original weight."""
    import torch
    from safetensors.torch import load_file

    keep = "model.layers.1.mlp.down_proj"
    for to, key, formats in (("compressed-tensors", "ignore", MIXED),
                             ("quark", "exclude", WITH_FP6)):
        src = build_out(tmp_path / f"src-{to}", "llama", dict(formats, **{keep: None}))
        _export(src, to, tmp_path / to)
        qc = json.loads((tmp_path / to / "config.json").read_text())["quantization_config"]
        assert keep in qc[key] and "lm_head" in qc[key]
        assert "model.layers.0.mlp.down_proj" not in qc[key]
        tensors = {}
        for f in (tmp_path / to).glob("model-*.safetensors"):
            tensors.update(load_file(str(f)))
        original = load_file(str(src / "model.safetensors"))[keep + ".weight"]
        assert tensors[keep + ".weight"].dtype == torch.float32
        assert torch.equal(tensors[keep + ".weight"], original)


def _rope_hf(x, pos, theta=10000.0):
    """transformers' rotate_half RoPE on [T, heads, d]."""
    d = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, d, 2) / d)          # [T, d/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


def _rope_ggml_norm(x, pos, theta=10000.0):
    """ggml's LLAMA (NORM) RoPE: rotates adjacent pairs (2i, 2i+1)."""
    d = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def test_gguf_llama_attention_scores_match_hf(tmp_path):
    """The permuted GGUF q/k under llama.cpp's pair-wise RoPE give the attention scores that
    HF's rotate_half RoPE gives with the unpermuted weights: the permutation is the right one."""
    import gguf
    from dmx.outdir.read import read_out

    fp4_attn = dict(MIXED, q_proj="fp4_e2m1", k_proj="fp4_e2m1", v_proj="fp4_e2m1")
    src = build_out(tmp_path, "llama", fp4_attn, seed=3)
    _export(src, "gguf", tmp_path / "g")
    t = {x.name: x for x in gguf.GGUFReader(str(tmp_path / "g" / "model.gguf")).tensors}
    layers = read_out(src).layers
    x = np.random.default_rng(0).standard_normal((5, 64))
    pos = np.arange(5, dtype=np.float64)

    def scores(wq, wk, rope):
        q = rope((x @ wq.T).reshape(5, 4, 16), pos)
        k = rope((x @ wk.T).reshape(5, 2, 16), pos)
        k = np.repeat(k, 2, axis=1)                       # GQA: 4 query heads, 2 kv heads
        return np.einsum("thd,shd->hts", q, k)

    hf = scores(layers["model.layers.0.self_attn.q_proj"].values().astype(np.float64),
                layers["model.layers.0.self_attn.k_proj"].values().astype(np.float64), _rope_hf)
    dq = lambda n: gguf.quants.dequantize(np.asarray(t[n].data), t[n].tensor_type)  # noqa
    gg = scores(dq("blk.0.attn_q.weight").reshape(64, 64).astype(np.float64),
                dq("blk.0.attn_k.weight").reshape(32, 64).astype(np.float64), _rope_ggml_norm)
    assert np.allclose(gg, hf, rtol=1e-9, atol=1e-12)
    assert not np.allclose(scores(dq("blk.0.attn_q.weight").reshape(64, 64),
                                  dq("blk.0.attn_k.weight").reshape(32, 64), _rope_hf), hf)


def test_transformers_loads_the_compressed_tensors_export(outs, tmp_path):
    """transformers' own compressed-tensors loader (an independent consumer of the files)
    loads the export, decompresses it on the first forward, and every quantized weight is
    mxref's decode of OUT, bit for bit. (bf16: compressed-tensors 0.20 decompresses MX
    weights to bf16, so a float32 load fails in F.linear with a dtype mismatch.)"""
    import torch
    from transformers import AutoModelForCausalLM
    from dmx.outdir.read import read_out

    src, dest = outs["qwen3"], tmp_path / "ct"
    _export(src, "compressed-tensors", dest)
    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.arange(8)[None]).logits
    assert torch.isfinite(logits).all()
    for name, layer in read_out(src).layers.items():
        got = model.get_submodule(name).weight.detach().float().numpy()
        assert np.array_equal(got.view(np.uint32), layer.values().view(np.uint32)), name


def test_quark_own_packers_agree(outs, tmp_path):
    """With amd-quark installed, its own Pack_fp4/Pack_fp6 (what Quark's HF export calls for
    per-group OCP MX weights) unpack the exported weights to mxref's element values."""
    pack = pytest.importorskip(
        "quark.torch.utils.pack",
        reason="amd-quark is not installed here; test_quark_round_trip_with_mxfp6 checks the "
               "layout re-derived from Quark's source instead")
    import torch
    from safetensors.torch import load_file
    from dmx.outdir.read import read_out

    src, dest = outs["llama-fp6"], tmp_path / "quark"
    _export(src, "quark", dest)
    tensors = {}
    for f in dest.glob("model-*.safetensors"):
        tensors.update(load_file(str(f)))
    for name, layer in read_out(src).layers.items():
        if layer.fmt == "fp8_e4m3":
            continue
        dtype = {"fp4_e2m1": "fp4"}.get(layer.fmt, layer.fmt)
        elems = pack.create_pack_method("per_group", dtype).unpack(tensors[f"{name}.weight"],
                                                                   reorder=False)
        want = mxref.decode(layer.codes, layer.fmt)
        assert np.array_equal(elems.to(torch.float32).numpy().view(np.uint32),
                              want.view(np.uint32)), name
