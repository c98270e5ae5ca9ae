"""The one reader of an OUT directory: `dmx.load`, `dmx eval`, `dmx report` and `dmx export`
all read OUT through here, and nothing of OUT is used before it is checked.

* ``read_manifest(out_dir, verify=True) -> dict``: schema-validated; ``verify``: the
  manifest's own hash and every file's sha256 too (dmx.outdir.integrity.verify_out).
* ``read_out(out_dir) -> OutModel``: the manifest, config.json, every quantized layer as
  element codes and E8M0 scales (:class:`QuantLayer`, each layer's sha256 and packed
  shapes checked) and the unquantized tensors. An export repacks the codes without
  requantizing; :func:`load` decodes them.
* ``check_config_fits(src)``: config.json describes the tensors of OUT.
* ``read_search_log(out_dir) -> dict``: the search log `dmx search` wrote into OUT.
* ``load(out_dir, device="cpu", dtype=torch.float32) -> (model, tokenizer, manifest)``:
  the model rebuilt from config.json, the packed weights decoded through mxref into
  :class:`DecodedMXLinear` layers (the stored values are used as they are), inputs
  quantized as the manifest says. ``tokenizer`` is None when OUT has no tokenizer files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import mxref
from dmx.errors import DMXError
from dmx.outdir.integrity import check_shapes, tensor_shapes, validate_manifest
from dmx.outdir.layout import MANIFEST_NAME, SEARCH_LOG_NAME, WEIGHTS_NAME, layer_sha256

__all__ = ["read_rotations", "read_manifest", "QuantLayer", "OutModel", "read_out",
           "check_config_fits", "load", "DecodedMXLinear", "read_search_log"]

_REWRITE = "rewrite OUT with `dmx search`/`dmx baseline`"
# what a sharded `dmx export` (compressed-tensors, Quark) writes; an OUT never has it
# (one model.safetensors). dmx.export.hfdir.INDEX, not imported: export imports this module
EXPORT_INDEX_NAME = "model.safetensors.index.json"


def read_manifest(out_dir, verify: bool = True) -> dict:
    """The schema-validated dmx_manifest.json of an OUT directory; ``verify``: after
    checking the manifest's own hash and every file's (dmx.outdir.integrity.verify_out)."""
    out = Path(out_dir)
    if not out.is_dir():
        what = "a file, not a directory" if Path(out_dir).exists() else "no such directory"
        raise DMXError(f"{out_dir}: {what}; pass an OUT directory written by "
                       f"`dmx search` or `dmx baseline`")
    path = out / MANIFEST_NAME
    if not path.is_file():
        raise DMXError(f"{out_dir}: no {MANIFEST_NAME}; pass an OUT directory written by "
                       f"`dmx search` or `dmx baseline`")
    if (out / EXPORT_INDEX_NAME).is_file():
        # a compressed-tensors/Quark export copies the manifest for provenance; its hash
        # check then failed on config.json with "OUT was modified or corrupted", which
        # sent the user to rewrite an OUT that was fine
        raise DMXError(f"{out_dir}: a `dmx export` checkpoint (sharded, with "
                       f"{EXPORT_INDEX_NAME}), not an OUT directory; pass the OUT it was "
                       f"exported from, or score it as a model with `dmx eval --model "
                       f"{out_dir}`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DMXError(f"{path}: unreadable JSON ({err}); rewrite OUT") from None
    if not isinstance(manifest, dict):
        raise DMXError(f"{path}: not a JSON object; rewrite OUT")
    validate_manifest(manifest, str(path))
    if verify:
        from dmx.outdir.integrity import verify_out
        verify_out(out, manifest)
    return manifest


@dataclass
class QuantLayer:
    """One quantized linear of OUT: element codes [out, in] and E8M0 scales [out, nblocks]."""

    name: str
    fmt: str
    act_format: str | None
    shape: tuple
    codes: np.ndarray
    scales: np.ndarray
    block_size: int
    profile: mxref.Profile

    def values(self) -> np.ndarray:
        """The weight as mxref decodes it (float32 [out, in]): the numbers every target
        must keep."""
        arr = mxref.MXArray(self.codes, self.scales, mxref.get_format(self.fmt),
                            tuple(self.shape), 1, self.block_size, self.profile)
        return mxref.dequantize(arr, np.float32)


@dataclass
class OutModel:
    """Everything read from OUT; tensors other than quantized weights stay torch."""

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
        raise DMXError(f"{path}: unreadable model config ({err}); {_REWRITE}") from None


def read_out(out_dir, manifest: dict | None = None) -> OutModel:
    """Read and check OUT; a one-line DMXError names the first problem found.
    ``manifest``: what :func:`read_manifest` already returned for OUT (not hashed again)."""
    from safetensors import safe_open

    out = Path(out_dir)
    if manifest is None:
        manifest = read_manifest(out)   # one-line errors for a bad manifest or any file's hash
    config = _load_config(out / "config.json")
    profile = mxref.get_profile(manifest["profile"])
    wpath = out / WEIGHTS_NAME
    if not wpath.is_file():
        raise DMXError(f"{out}: no {WEIGHTS_NAME}; {_REWRITE}")
    try:
        fh = safe_open(str(wpath), framework="pt")
    except Exception as err:  # truncated or not a safetensors file
        raise DMXError(f"{wpath}: unreadable safetensors ({type(err).__name__}: "
                       f"{str(err).splitlines()[0][:120] if str(err) else ''}); OUT is "
                       f"corrupted, {_REWRITE}") from None
    with fh:
        keys = set(fh.keys())
        layers = {name: _read_layer(fh, keys, name, e, wpath, profile)
                  for name, e in manifest["layers"].items()}
        own = {f"{n}.weight_packed" for n in layers} | {f"{n}.weight_scale" for n in layers}
        tensors = {k: fh.get_tensor(k) for k in sorted(keys - own)}
    return OutModel(out, config, manifest, layers, tensors)


def _read_layer(fh, keys, name, e, wpath, profile) -> QuantLayer:
    info = mxref.get_format(e["format"])   # the schema checked the entry's fields
    block_size = int(e["block_size"])
    for suffix in ("weight_packed", "weight_scale"):
        if f"{name}.{suffix}" not in keys:
            raise DMXError(f"{wpath}: no tensor {name}.{suffix} for a layer of the manifest; "
                           f"OUT is corrupted, {_REWRITE}")
    try:
        packed = fh.get_tensor(f"{name}.weight_packed").numpy()
        scales = fh.get_tensor(f"{name}.weight_scale").numpy()
    except Exception as err:
        raise DMXError(f"{wpath}: {name} unreadable ({type(err).__name__}); OUT is "
                       f"corrupted, {_REWRITE}") from None
    if layer_sha256(packed, scales) != e["sha256"]:
        raise DMXError(f"{name}: weight bytes do not match the manifest sha256; OUT was "
                       f"modified or corrupted, {_REWRITE}")
    out_f, in_f = (int(v) for v in e["shape"])
    if packed.shape != (out_f, mxref.packed_row_bytes(in_f, info)) \
            or scales.shape != (out_f, -(-in_f // block_size)):
        raise DMXError(f"{name}: packed {tuple(packed.shape)} / scales {tuple(scales.shape)} "
                       f"do not fit shape {[out_f, in_f]} in {info.key}; {_REWRITE}")
    codes = mxref.unpack_codes(packed, info, in_f)
    return QuantLayer(name, info.key, e.get("act_format"), (out_f, in_f), codes, scales,
                      block_size, profile)


def check_config_fits(src: OutModel) -> None:
    """config.json must describe the tensors of OUT (a model is rebuilt, and a GGUF's
    metadata written, from config.json): checked before anything is built or written."""
    where = str(src.path / WEIGHTS_NAME)
    check_shapes(src.path, tensor_shapes(src.manifest, src.tensors, src.tensors, where), where)


def read_search_log(out_dir) -> dict:
    """OUT's search_log.jsonl as {"config", "units", "steps": [...], and the final
    line's keys: "offsets", "raw_formats", "formats", ...}; a DMXError if absent."""
    path = Path(out_dir) / SEARCH_LOG_NAME
    if not path.is_file():
        raise DMXError(f"{out_dir}: no {SEARCH_LOG_NAME} (not a dmx search OUT, or one made "
                       f"before dmx wrote it)")
    result: dict = {"steps": []}
    for number, text in enumerate(path.read_text().splitlines(), 1):
        try:
            line = json.loads(text)
        except ValueError:
            raise DMXError(f"{path}:{number}: not JSON") from None
        kind = line.pop("type", None)
        if kind == "step":
            result["steps"].append(line)
        elif kind in ("header", "final"):
            result.update(line)
    return result


# ----------------------------------------------------------------------------- load
def _decoded_linear_class():
    import torch.nn.functional as F

    from dmx.nn.layers import MXLinear
    from dmx.quant.fakequant import fake_quantize

    class DecodedMXLinear(MXLinear):
        """An MXLinear whose weight already holds the decoded MX values (from OUT).

        The weight is used as stored (no re-quantization: that would cost time, and under
        a non-OCP profile need not be the identity); inputs are MX-quantized as MXLinear.
        """

        def forward(self, x):
            if self.act_fmt is not None:
                x = fake_quantize(x, self.act_fmt, -1, self.block_size, self.profile)
            return F.linear(x, self.linear.weight, self.linear.bias)

    return DecodedMXLinear


def __getattr__(name):  # DecodedMXLinear is built lazily: importing this module stays torch-free
    if name == "DecodedMXLinear":
        cls = _decoded_linear_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module 'dmx.outdir.read' has no attribute {name!r}")


def load(out_dir, device="cpu", dtype=None):
    """(model, tokenizer, manifest) of an OUT directory; see the module docstring.

    ``dtype`` None = float32. Every check (manifest schema, sha256 of every file and
    layer, tensor shapes) runs before the model is built.
    """
    out = Path(out_dir)
    manifest = read_manifest(out)  # every file's hash, before the heavy imports: fails fast
    import torch
    _check_device(device)

    from dmx.data import quiet_transformers
    from dmx.nn.layers import linear_of, set_submodule

    dtype = torch.float32 if dtype is None else dtype
    src = read_out(out, manifest)
    check_config_fits(src)
    quiet_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(str(out))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as err:
        raise DMXError(f"{out}/config.json: cannot rebuild the model ({type(err).__name__}: "
                       f"{str(err).splitlines()[0][:160] if str(err) else ''})") from None
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in src.tensors.items()}
    for name, layer in src.layers.items():
        state[f"{name}.weight"] = torch.from_numpy(layer.values()).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied tensors (lm_head = embed) are stored once: a key missing from OUT is fine only
    # when the model shares it with a tensor that was loaded
    missing = [k for k in missing if not _shares_storage(model, k, state)]
    if missing or unexpected:
        raise DMXError(f"{out}/{WEIGHTS_NAME} does not fit config.json (missing "
                       f"{missing[:3]}, unexpected {list(unexpected)[:3]}); rewrite OUT")
    cls = _decoded_linear_class()
    for name, layer in src.layers.items():
        mx = cls(linear_of(model, name), layer.fmt, layer.act_format, layer.block_size,
                 layer.profile)
        set_submodule(model, name, mx)
    from dmx.rotate.online import reattach_online
    reattach_online(model, manifest.get("rotation"))  # --rotate-online: R4 at run time
    model = model.to(device).eval()
    tokenizer = None
    if any(f.name.startswith("tokenizer") for f in out.iterdir()):
        from dmx.data import load_tokenizer
        tokenizer = load_tokenizer(out)
    return model, tokenizer, manifest


def _check_device(device) -> None:
    """A device torch knows and this machine has (a bare assert deep in torch otherwise)."""
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DMXError(f"device {device!r}: not a torch device ({err}); use cpu or cuda") \
            from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DMXError(f"device {device!r}: no CUDA device is available; use device='cpu'")


def _shares_storage(model, key: str, loaded: dict) -> bool:
    sd = model.state_dict()
    t = sd.get(key)
    if t is None:
        return False
    return any(k in loaded and sd[k].data_ptr() == t.data_ptr() for k in sd if k != key)


def read_rotations(out_dir) -> tuple[dict, dict]:
    """(matrices, the manifest's rotation record) of a search OUT made with learned rotations,
    after the manifest's seal is checked (the matrices file included); a one-line DMXError
    when OUT has none to give."""
    from safetensors.torch import load_file

    from dmx.rotate.saved import ROTATIONS_NAME  # (torch: imported here, as in load)
    out = Path(out_dir)
    record = read_manifest(out).get("rotation") or {}
    path = out / ROTATIONS_NAME
    if record.get("mode") != "learned" or not path.is_file():
        raise DMXError(f"--rotate-from {out}: OUT holds no learned rotations (rotation mode "
                       f"{record.get('mode', 'none')!r}; only dmx search --rotate learned "
                       f"writes {ROTATIONS_NAME}); use --rotate hadamard for fixed ones")
    return load_file(str(path)), record
