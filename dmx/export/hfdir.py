"""Hugging Face style output directories (compressed-tensors and Quark share this).

Weights go into ``model-0000i-of-0000n.safetensors`` shards plus
``model.safetensors.index.json`` (the layout transformers and vLLM read); every
other file of OUT (tokenizer, generation config, the dmx manifest for provenance)
is copied unchanged, and config.json gets the target's ``quantization_config``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

INDEX = "model.safetensors.index.json"
SKIP = {"model.safetensors", "config.json", INDEX}
DEFAULT_SHARD_BYTES = 2 * 1024 ** 3


def copy_side_files(src: Path, dest: Path) -> None:
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in SKIP and not p.name.startswith("."):
            shutil.copy2(p, dest / p.name)


def write_config(src_config: dict, dest: Path, quantization_config: dict,
                 updates: dict | None = None) -> None:
    config = {**src_config, **(updates or {})}
    config["quantization_config"] = quantization_config
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def uint8_tensor(a):
    import numpy as np
    import torch
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint8))


def float8_e4m3_tensor(codes):
    """OCP E4M3 codes are float8_e4m3fn bit patterns: a view, no conversion."""
    import torch
    return uint8_tensor(codes).view(torch.float8_e4m3fn)


def write_checkpoint(src, dest: Path, layer_tensors, quantization_config: dict,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     config_updates: dict | None = None) -> None:
    """OUT's unquantized tensors + ``layer_tensors(layer)`` per quantized linear, sharded,
    with OUT's side files and config.json carrying ``quantization_config`` (and
    ``config_updates``, e.g. the dtype the target's loader must run in)."""
    tensors = dict(src.tensors)
    for name, layer in src.layers.items():
        tensors.update({f"{name}.{k}": v for k, v in layer_tensors(layer).items()})
    write_shards(tensors, dest, max_shard_bytes)
    copy_side_files(src.path, dest)
    write_config(src.config, dest, quantization_config, config_updates)


def write_shards(tensors: dict, dest: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write torch tensors in name order into shards of at most ``max_shard_bytes``."""
    from safetensors.torch import save_file

    shards: list[dict] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(dest / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dest / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                          "weight_map": weight_map}, indent=2) + "\n")


def read_tensors(dest: Path) -> dict:
    """All tensors of a sharded directory, through its index (as loaders do)."""
    from safetensors.torch import load_file

    index = json.loads((dest / INDEX).read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(dest / fname)))
    missing = set(index["weight_map"]) - set(out)
    if missing:
        raise ValueError(f"index lists tensors not in the shards: {sorted(missing)[:3]}")
    return out
