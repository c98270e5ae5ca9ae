"""OUT -> compressed-tensors checkpoint (what vLLM serves with ``quant_method: compressed-tensors``).

Layout (compressed-tensors 0.20, checked against its compressors, not assumed):

* MXFP4 layers, format ``mxfp4-pack-quantized`` (``MXFP4PackedCompressor``):
  ``<name>.weight_packed`` uint8 [N, K/2], element 2i in the low nibble
  (``pack_fp4_to_uint8``) -- byte-identical to OUT's ``fp4-lo-first`` packing -- and
  ``<name>.weight_scale`` uint8 [N, K/32], E8M0 with bias 127 (``mx_utils.compress_mx_scale``;
  the pre-PR-#538 bias of 125 is gone).
* MXFP8 (E4M3) layers, format ``mxfp8-quantized`` (``MXFP8QuantizationCompressor``):
  ``<name>.weight`` float8_e4m3fn [N, K] (the OCP E4M3 codes, bit for bit) and the same
  uint8 ``weight_scale``.
* One config group per (weight format, activation format) pair whose ``targets`` are the
  exact module names; the model-level ``format`` is ``mixed-precision`` when both kinds occur.

compressed-tensors 0.20 also has an ``mxfp6-pack-quantized`` compressor (E2M3 only), but
vLLM has no compressed-tensors MXFP6 scheme to serve it, so MXFP6 layers are refused here
with ``--to quark`` named as the alternative.
"""
from __future__ import annotations

import numpy as np

import mxref
from mxref.formats import DEFAULT_BLOCK_SIZE

from dmx.export import hfdir, rules
from dmx.export.verify import compare

TARGET = "compressed-tensors"
FORMAT_OF = {"fp4_e2m1": "mxfp4-pack-quantized", "fp8_e4m3": "mxfp8-quantized"}
# Quark holds MXFP4 and MXFP6 weights; it refuses MXFP8 ones (dmx/export/quark.py)
ALTERNATIVE = ("use --to quark (MXFP4/MXFP6 weights) or rerun `dmx search` with the "
               "fp8-fp4 ladder")


def _args(fmt: str, dynamic: bool):
    from compressed_tensors.quantization import QuantizationArgs
    import torch

    bits = mxref.get_format(fmt).bits
    return QuantizationArgs(num_bits=bits, type="float", strategy="group",
                            group_size=DEFAULT_BLOCK_SIZE,
                            symmetric=True, dynamic=dynamic, scale_dtype=torch.uint8,
                            zp_dtype=torch.uint8)


def quantization_config(layers, ignore=("lm_head",)) -> dict:
    """The ``quantization_config`` block of config.json, serialised as compressed-tensors does."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    pairs: dict[tuple, list[str]] = {}
    for name, layer in sorted(layers.items()):
        pairs.setdefault((layer.fmt, layer.act_format), []).append(name)
    groups = {}
    for i, ((fmt, act), names) in enumerate(sorted(pairs.items(), key=lambda kv: str(kv[0]))):
        groups[f"group_{i}"] = QuantizationScheme(
            targets=names, weights=_args(fmt, dynamic=False),
            input_activations=None if act is None else _args(act, dynamic=True),
            format=FORMAT_OF[fmt])
    formats = {FORMAT_OF[f] for f, _ in pairs}
    cfg = QuantizationConfig(config_groups=groups, quantization_status="compressed",
                             format=formats.pop() if len(formats) == 1 else "mixed-precision",
                             ignore=[n for n in ignore if n not in layers])
    # the keys ModelCompressor.update_config writes, in the same order
    return {"version": compressed_tensors.__version__, "quant_method": TARGET,
            "sparsity_config": {}, "transform_config": {},
            **cfg.model_dump(mode="json", exclude=["quant_method"])}


def check(src, allow_unfused: bool) -> None:
    rules.check_vllm(src, TARGET, FORMAT_OF, ALTERNATIVE, allow_unfused)


def layer_tensors(layer) -> dict:
    """The tensors one quantized linear becomes in the checkpoint (without the name prefix)."""
    scale = hfdir.uint8_tensor(layer.scales)
    if layer.fmt == "fp4_e2m1":
        return {"weight_packed": hfdir.uint8_tensor(mxref.pack_codes(layer.codes, layer.fmt)),
                "weight_scale": scale}
    return {"weight": hfdir.float8_e4m3_tensor(layer.codes), "weight_scale": scale}


def loader_dtype(src_config: dict) -> dict:
    """config.json entries that make ``from_pretrained(DIR)`` run in bfloat16.

    compressed-tensors (0.20) decompresses MX weights to bfloat16 whatever the model dtype
    (``unpack_fp4_from_uint8``, ``decompress_mx_scale``), so a float32 model stops at its first
    ``F.linear`` ("expected m1 and m2 to have the same dtype"). transformers >= 5 loads in
    the config's ``dtype`` by default (``dtype="auto"``), and vLLM's ``--dtype auto`` reads it
    too. bfloat16 holds every MXFP4/MXFP8 weight value exactly (bar blocks scaled below
    2^-120), so the weights lose nothing."""
    updates = {"dtype": "bfloat16"}
    if "torch_dtype" in src_config:  # the key transformers 4.x writes and reads
        updates["torch_dtype"] = "bfloat16"
    return updates


def write(src, dest, max_shard_bytes: int = hfdir.DEFAULT_SHARD_BYTES) -> None:
    hfdir.write_checkpoint(src, dest, layer_tensors,
                           quantization_config(src.layers, src.unquantized_modules()),
                           max_shard_bytes, config_updates=loader_dtype(src.config))


def read_back(src, dest) -> list:
    """Decode every quantized layer with compressed-tensors' own config parser and compressors."""
    import json

    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = json.loads((dest / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qc)
    tensors = hfdir.read_tensors(dest)
    checks, seen = [], set()
    for scheme in config.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        for name in scheme.targets:
            seen.add(name)
            layer = src.layers[name]
            params = [p for p in compressor.compression_param_names(scheme)
                      if f"{name}.{p}" in tensors]
            state = {p: tensors[f"{name}.{p}"] for p in params}
            weight = compressor.decompress(state, scheme)["weight"].to(torch.float32).numpy()
            checks.append(compare(name, scheme.format, layer.values(), weight,
                                  bytes_equal=_bytes_equal(layer, state)))
    missing = set(src.layers) - seen
    if missing:
        raise ValueError(f"layers missing from the config groups: {sorted(missing)[:3]}")
    return checks


def _bytes_equal(layer, state) -> bool:
    import torch

    if "weight_packed" in state:
        codes = mxref.unpack_codes(state["weight_packed"].numpy(), layer.fmt, layer.shape[1])
    else:
        codes = state["weight"].view(torch.uint8).numpy()
    return (np.array_equal(codes, layer.codes)
            and np.array_equal(state["weight_scale"].numpy(), layer.scales))
