"""What each deployment target can hold and serve: checked before a single byte is written."""
from __future__ import annotations

from mxref.formats import DEFAULT_BLOCK_SIZE

from dmx.errors import DMXError


def fused_groups(names) -> dict[str, list[str]]:
    """``{"<parent>.qkv": [names...], "<parent>.gate_up": [...]}``: the projections vLLM
    fuses into one matmul (qkv_proj, gate_up_proj) and loads with the first shard's scheme,
    so mixed formats inside a group crash at load (vllm ``_match_fused_layer``, Quark
    ``_find_matched_config``, intel/auto-round#2174). Which names fuse is dmx.nn.layers'
    one definition (the search ties the same groups)."""
    from dmx.nn.layers import fused_key

    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        key = fused_key(name)
        if key:
            groups.setdefault(key, []).append(name)
    return groups


def check_fused(layers, target: str, allow_unfused: bool, method: str = "dmx") -> None:
    """Refuse q/k/v or gate/up of one block in different (weight, activation) formats.
    ``method``: the manifest's, so the message names the command that wrote OUT (a KL
    baseline was told to rerun `dmx search`)."""
    if allow_unfused:
        return
    from dmx.outdir.layout import writer_of
    rerun = f"`{writer_of({'method': method})}`"
    for group, names in fused_groups(layers).items():
        kinds = {(layers[n].fmt, layers[n].act_format) for n in names}
        if len(kinds) > 1:
            desc = ", ".join(f"{n.rsplit('.', 1)[1]}={layers[n].fmt}" for n in names)
            raise DMXError(f"{group}: fused shards in different formats "
                           f"({desc}); vLLM ({target}) loads a fused layer with one scheme. "
                           f"Rerun {rerun} with --export-target {target} (it ties q/k/v and "
                           f"gate/up), or pass --allow-unfused for an engine that does not fuse")


def check_formats(layers, target: str, supported, alternative: str) -> None:
    """Refuse a layer whose weight or activation format the target cannot hold."""
    for name, layer in layers.items():
        for what, fmt in (("weight", layer.fmt), ("activation", layer.act_format)):
            if fmt is not None and fmt not in supported:
                raise DMXError(f"{name}: {what} format {fmt} cannot be stored in {target} "
                               f"(it holds {', '.join(sorted(supported))}); {alternative}")


def check_whole_blocks(layers, target: str) -> None:
    """The MX kernels of vLLM and llama.cpp read whole blocks (OCP's k) only."""
    for name, layer in layers.items():
        if layer.shape[1] % DEFAULT_BLOCK_SIZE:
            raise DMXError(f"{name}: in_features {layer.shape[1]} is not a multiple of "
                           f"{DEFAULT_BLOCK_SIZE}, "
                           f"which {target} needs for MX blocks; rerun `dmx search` with "
                           f"--include patterns that leave this layer in full precision")


def check_finite(layers, target: str) -> None:
    """MX NaN (scale 0xFF or a NaN element code) has no encoding in any engine: llama.cpp
    decodes the scale as a number, vLLM/compressed-tensors as 2^128. Refuse, don't ship it."""
    import numpy as np

    for name, layer in layers.items():
        if (layer.scales == 0xFF).any() or np.isnan(layer.values()).any():
            raise DMXError(f"{name}: has NaN MX blocks (scale 0xFF or NaN codes), which "
                           f"{target} cannot represent; the source weights contain NaN/Inf: "
                           f"fix them and rerun `dmx search`")


def check_vllm(src, target: str, supported, alternative: str, allow_unfused: bool) -> None:
    """Everything a vLLM checkpoint (compressed-tensors or Quark) must satisfy."""
    check_formats(src.layers, target, supported, alternative)
    check_fused(src.layers, target, allow_unfused, src.manifest.get("method", "dmx"))
    check_whole_blocks(src.layers, target)
    check_finite(src.layers, target)
