"""OUT -> one GGUF file for llama.cpp (Llama and Qwen3 architectures), via the ``gguf`` package.

What goes where, following llama.cpp's ``convert_hf_to_gguf.py``:

* MXFP4 linears -> GGML type MXFP4 (39): the OUT codes and scale bytes repacked, not
  requantized, into llama.cpp's 17-byte blocks (``mxref.pack_llamacpp_mxfp4``). ggml
  decodes ``kvalues_mxfp4`` (2x E2M1) times 2^(e-128): the same numbers as OCP, except
  that it has no -0 (counted in the read-back table) and no NaN scale.
* 8-bit MX linears (FP8 E4M3/E5M2, INT8) -> Q8_0: llama.cpp has no MXFP8 type. Q8_0
  re-quantizes the MX-decoded weight (int8 with an fp16 scale per 32): NOT lossless; the
  read-back reports the max abs error against the MX weight.
* MXFP6 linears -> refused: no GGML MXFP6 type exists, and silently storing them as Q8_0
  would ship numbers the search never measured (alternatives in the message).
* Llama's q_proj/k_proj rows are permuted as ``LlamaModel.permute`` does (llama.cpp's
  rope is the interleaved variant); Qwen3 uses NEOX rope and is written unpermuted.
* Norms and biases F32, token embeddings (and an untied lm_head) F16 as the converter's
  default ``--outtype``; a tied lm_head is not written (llama.cpp reuses token_embd).
* Tokenizer: byte-level BPE (``tokenizer.ggml.model = gpt2``, with merges) or
  SentencePiece-style BPE with byte fallback (``llama``), read with ``gguf.vocab``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import mxref
from dmx.errors import DMXError
from dmx.export import rules
from dmx.export.verify import compare

TARGET = "gguf"
GGUF_NAME = "model.gguf"
ARCHS = ("llama", "qwen3")
EIGHT_BIT = ("fp8_e4m3", "fp8_e5m2", "int8")


def _gguf():
    import gguf
    return gguf


def check(src, allow_unfused: bool) -> None:
    """llama.cpp loads every tensor with its own type: no fused-shard rule applies."""
    if src.model_type not in ARCHS:
        raise DMXError(f"GGUF export supports model_type {' and '.join(ARCHS)}, not "
                       f"{src.model_type!r}; use --to compressed-tensors or --to quark")
    rules.check_formats(
        src.layers, TARGET, ("fp4_e2m1",) + EIGHT_BIT,
        "llama.cpp has no MXFP6 type: use --to quark, or rerun `dmx search` with the "
        "fp8-fp4 ladder")
    rules.check_whole_blocks(src.layers, TARGET)
    rules.check_finite(src.layers, TARGET)
    if _tokenizer_kind(src.path) is None:
        raise DMXError(f"{src.path}: no byte-level or SentencePiece-style BPE tokenizer.json "
                       f"for GGUF; copy the source model's tokenizer files into OUT")


# ------------------------------------------------------------------- names
def _tensor_map(src):
    gguf = _gguf()
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3}[src.model_type]
    return arch, gguf.get_tensor_name_map(arch, int(src.config["num_hidden_layers"]))


def _gguf_name(tmap, hf_name: str) -> str:
    name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise DMXError(f"{hf_name}: no llama.cpp tensor name for it; GGUF export covers "
                       f"standard Llama/Qwen3 checkpoints only (use --to compressed-tensors)")
    return name


def _head_dim(cfg) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _rope_rows(src, hf_name: str):
    """Row order llama.cpp needs for Llama q/k (``LlamaModel.permute``), else None."""
    if src.model_type != "llama":
        return None
    cfg = src.config
    base = hf_name.rsplit(".", 1)[0] if hf_name.endswith((".weight", ".bias")) else hf_name
    if base.endswith("q_proj"):
        n_head = int(cfg["num_attention_heads"])
    elif base.endswith("k_proj"):
        n_head = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    else:
        return None
    rows = n_head * _head_dim(cfg)
    # permute(w) = w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2).reshape(w.shape)
    return np.arange(rows).reshape(n_head, 2, -1).swapaxes(1, 2).reshape(-1)


def _permuted(src, hf_name, arr):
    rows = _rope_rows(src, hf_name)
    return arr if rows is None else np.ascontiguousarray(arr[rows])


# ------------------------------------------------------------------- write
def _rope_theta(cfg) -> float:
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return float(cfg.get("rope_theta") or rp.get("rope_theta") or 10000.0)


def _add_hparams(w, cfg) -> None:
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_key_length(_head_dim(cfg))
    w.add_value_length(_head_dim(cfg))
    w.add_rope_dimension_count(_head_dim(cfg))
    w.add_vocab_size(int(cfg["vocab_size"]))


def _tokenizer_kind(path: Path):
    try:
        tok = json.loads((path / "tokenizer.json").read_text())
        model, decoder = tok["model"], tok.get("decoder") or {}
    except (OSError, ValueError, KeyError):
        return None
    if model.get("type") != "BPE":
        return None
    if decoder.get("type") == "ByteLevel" and not model.get("byte_fallback", False):
        return "gpt2"
    if model.get("byte_fallback", False) and decoder.get("type") == "Sequence":
        return "llama"
    return None


def _pre_tokenizer(src) -> str:
    """llama.cpp's pre-tokenizer name; convert_hf_to_gguf picks it by a tokenizer hash, so
    for a plain ByteLevel regex (GPT-2's) we say gpt-2, else the architecture's own."""
    tok = json.loads((src.path / "tokenizer.json").read_text())
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return {"qwen3": "qwen2", "llama": "llama-bpe"}[src.model_type]


def _add_tokenizer(w, src) -> None:
    gguf = _gguf()
    kind = _tokenizer_kind(src.path)
    vocab = (gguf.vocab.BpeVocab if kind == "gpt2" else gguf.vocab.LlamaHfVocab)(src.path)
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    if kind == "gpt2":   # as convert_hf_to_gguf: added tokens are CONTROL if special
        added = json.loads((src.path / "tokenizer.json").read_text()).get("added_tokens") or []
        for tok in added:
            if 0 <= tok["id"] < len(types):
                types[tok["id"]] = (gguf.TokenType.CONTROL if tok.get("special")
                                    else gguf.TokenType.USER_DEFINED)
    n_vocab = int(src.config["vocab_size"])
    for i in range(len(tokens), n_vocab):   # HF pads the embedding past the tokenizer
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model(kind)
    w.add_tokenizer_pre(_pre_tokenizer(src) if kind == "gpt2" else "default")
    w.add_token_list(tokens)
    if kind == "llama":
        w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.vocab.SpecialVocab(src.path, load_merges=(kind == "gpt2"),
                            n_vocab=n_vocab).add_to_gguf(w, quiet=True)


def _keeps_f32(name: str, ndim: int) -> bool:
    """Norms and biases stay F32; other unquantized tensors are written F16."""
    return ndim == 1 or name.endswith(".bias")


def narrowed_to_f16(src) -> list[str]:
    """The float32 tensors of OUT that :func:`write` stores as F16 (said in the export
    log: their values are rounded, unlike the MX layers)."""
    import torch
    tied = bool(src.config.get("tie_word_embeddings", False))
    return [n for n, t in sorted(src.tensors.items())
            if t.dtype == torch.float32 and not _keeps_f32(n, t.dim())
            and not (tied and n == "lm_head.weight")]


def write(src, dest) -> None:
    gguf = _gguf()
    arch, tmap = _tensor_map(src)
    w = gguf.GGUFWriter(str(dest / GGUF_NAME), gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(Path(str(src.manifest.get("source_model") or src.path)).name)
    _add_hparams(w, src.config)
    _add_tokenizer(w, src)
    for name, layer in sorted(src.layers.items()):
        gname = _gguf_name(tmap, name + ".weight")
        if layer.fmt == "fp4_e2m1":
            blocks = mxref.pack_llamacpp_mxfp4(_permuted(src, name, layer.codes),
                                               _permuted(src, name, layer.scales))
            w.add_tensor(gname, blocks, raw_dtype=gguf.GGMLQuantizationType.MXFP4)
        else:
            q = gguf.quants.quantize(_permuted(src, name, layer.values()),
                                     gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    tied = bool(src.config.get("tie_word_embeddings", False))
    for name, t in sorted(src.tensors.items()):
        if tied and name == "lm_head.weight":
            continue
        arr = _permuted(src, name, t.float().numpy())
        keep_f32 = _keeps_f32(name, arr.ndim)
        w.add_tensor(_gguf_name(tmap, name), arr.astype(np.float32 if keep_f32 else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ------------------------------------------------------------------- read back
def read_back(src, dest) -> list:
    """Decode every quantized linear with gguf.GGUFReader + gguf.quants.dequantize."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(dest / GGUF_NAME))
    arch = reader.get_field("general.architecture")
    if arch is None or arch.contents() != src.model_type:
        raise ValueError("general.architecture missing or wrong in the written GGUF")
    by_name = {t.name: t for t in reader.tensors}
    _, tmap = _tensor_map(src)
    checks = []
    for name, layer in sorted(src.layers.items()):
        t = by_name[_gguf_name(tmap, name + ".weight")]
        data = np.asarray(t.data)
        got = gguf.quants.dequantize(data, t.tensor_type).reshape(layer.shape)
        ref = _permuted(src, name, layer.values())
        if t.tensor_type == gguf.GGMLQuantizationType.MXFP4:
            codes, scales = mxref.unpack_llamacpp_mxfp4(data.reshape(layer.shape[0], -1),
                                                        layer.shape[1])
            same = (np.array_equal(codes, _permuted(src, name, layer.codes))
                    and np.array_equal(scales, _permuted(src, name, layer.scales)))
            checks.append(compare(name, "MXFP4", ref, got, zero_sign_free=True,
                                  bytes_equal=same))
        else:
            checks.append(compare(name, t.tensor_type.name, ref, got))
    return checks
