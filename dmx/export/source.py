"""Read a dmx OUT directory (docs/CONTRACT.md) for export, checking it before anything is written.

An export must never ship weights that differ from what the search measured, so every
quantized layer's bytes are checked against the manifest's sha256 here, and every
packed tensor is checked against the shape its format implies.

The manifest (schema-validated) and the hash come from ``dmx.io``; ``dmx.io.load`` returns
a decoded torch model, while an export needs the element codes and scale bytes themselves
(to repack them without requantizing), hence this reader of the packed tensors.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import mxref
from dmx.errors import DMXError
from dmx.integrity import check_shapes, tensor_shapes
from dmx.io import MANIFEST_NAME as MANIFEST, WEIGHTS_NAME as WEIGHTS, layer_sha256, \
    read_manifest


@dataclass
class QuantLayer:
    """One quantized linear of OUT: element codes [out, in] and E8M0 scales [out, nblocks]."""

    name: str
    fmt: str
    act_format: str | None
    shape: tuple
    codes: np.ndarray
    scales: np.ndarray

    def values(self) -> np.ndarray:
        """The weight as mxref decodes it (float32 [out, in]): the numbers every target must keep."""
        fmt = mxref.get_format(self.fmt)
        arr = mxref.MXArray(self.codes, self.scales, fmt, tuple(self.shape), 1, 32,
                            mxref.get_profile("ocp"))
        return mxref.dequantize(arr, np.float32)


@dataclass
class OutModel:
    """Everything an exporter needs from OUT; tensors other than quantized weights stay torch."""

    path: Path
    config: dict
    manifest: dict
    layers: dict[str, QuantLayer]
    tensors: dict = field(default_factory=dict)   # name -> torch.Tensor (unquantized tensors)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", self.manifest.get("model_type", "")))

    def unquantized_modules(self) -> list[str]:
        """Modules with a 2-D weight left in full precision (lm_head, excluded linears,
        embeddings): vLLM must be told to skip them, or it applies a default scheme."""
        names = {k[:-len(".weight")] for k, t in self.tensors.items()
                 if k.endswith(".weight") and t.dim() == 2}
        names.add("lm_head")            # present as a module even when tied to the embedding
        return sorted(names - set(self.layers))


def _load_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DMXError(f"{path.parent}: no config.json; pass an OUT directory written by "
                       f"`dmx search` or `dmx baseline`") from None
    except (OSError, ValueError) as err:
        raise DMXError(f"{path}: unreadable model config ({err}); rerun `dmx search` to "
                       f"rewrite OUT") from None


def load_out(out_dir) -> OutModel:
    """Read and check OUT; a one-line DMXError names the first problem found."""
    from safetensors import safe_open

    out = Path(out_dir)
    manifest = read_manifest(out)   # one-line errors for a bad manifest or any file's hash
    config = _load_config(out / "config.json")
    entries = manifest["layers"]
    wpath = out / WEIGHTS
    if not wpath.is_file():
        raise DMXError(f"{out}: no {WEIGHTS}; rerun `dmx search` to rewrite OUT")
    try:
        fh = safe_open(str(wpath), framework="pt")
    except Exception as err:  # truncated or foreign file
        raise DMXError(f"{wpath}: unreadable safetensors ({type(err).__name__}); rerun "
                       f"`dmx search` to rewrite OUT") from None
    with fh:
        keys = set(fh.keys())
        layers = {}
        for name, e in entries.items():
            layers[name] = _read_layer(fh, keys, name, e, wpath)
        own = {f"{n}.weight_packed" for n in layers} | {f"{n}.weight_scale" for n in layers}
        tensors = {k: fh.get_tensor(k) for k in sorted(keys - own)}
    return OutModel(out, config, manifest, layers, tensors)


def check_config_fits(src: OutModel) -> None:
    """config.json must describe the tensors of OUT (a GGUF's metadata comes from
    config.json, its tensors from the weights): checked before anything is written."""
    where = str(src.path / WEIGHTS)
    check_shapes(src.path, tensor_shapes(src.manifest, src.tensors, src.tensors, where), where)


def _read_layer(fh, keys, name, e, wpath) -> QuantLayer:
    fmt = e.get("format")
    try:
        info = mxref.get_format(fmt)
    except Exception:
        raise DMXError(f"{wpath.parent / MANIFEST}: layer {name} has unknown format {fmt!r}; "
                       f"known: {', '.join(sorted(mxref.FORMATS))}") from None
    if int(e.get("block_size", 32)) != 32 or int(e.get("axis", 1)) != 1:
        raise DMXError(f"{name}: block_size {e.get('block_size')} / axis {e.get('axis')} "
                       f"unsupported; export needs 32-element blocks along the input dim")
    for suffix in ("weight_packed", "weight_scale"):
        if f"{name}.{suffix}" not in keys:
            raise DMXError(f"{wpath}: missing {name}.{suffix} listed in the manifest; rerun "
                           f"`dmx search` to rewrite OUT")
    packed = fh.get_tensor(f"{name}.weight_packed").numpy()
    scales = fh.get_tensor(f"{name}.weight_scale").numpy()
    if layer_sha256(packed, scales) != e.get("sha256"):
        raise DMXError(f"{name}: weight bytes do not match the manifest sha256 (OUT was "
                       f"modified or corrupted); rerun `dmx search` to rewrite OUT")
    out_f, in_f = (int(v) for v in e["shape"])
    if packed.shape != (out_f, mxref.packed_row_bytes(in_f, info)) \
            or scales.shape != (out_f, -(-in_f // 32)):
        raise DMXError(f"{name}: packed {tuple(packed.shape)} / scales {tuple(scales.shape)} "
                       f"do not fit shape {[out_f, in_f]} in {fmt}; rerun `dmx search`")
    codes = mxref.unpack_codes(packed, info, in_f)
    return QuantLayer(name, info.key, e.get("act_format"), (out_f, in_f), codes, scales)
