"""The OUT directory: write a quantized model once, load it back bit-exactly.

Public API (layout and manifest fields: specs/out_layout.md, docs/CONTRACT.md):

* ``write_out(out_dir, model, formats, act_formats, source_model_dir, meta, force=False,
  extra_files=None) -> Path``
    - ``model``: the torch model (plain, or with MXLinear/DMXLinear wrappers: their inner
      nn.Linear weights are what gets quantized).
    - ``formats``: {module name: mxref format key} of every quantized linear;
      ``act_formats``: {module name: format key or None} (missing = unquantized inputs).
    - ``source_model_dir``: the Hugging Face directory the model came from (config,
      generation config and tokenizer files are copied from it).
    - ``meta``: "method" ("dmx" | "uniform" | "kl", required), "ladder", "target_bits",
      "seed", "profile" (name or mxref Profile, default "ocp"), "wall_time_s" (seconds the
      run took until write_out was called; the quantization here is added to it, and
      the report shows it), anything else method-specific (e.g. "search",
      "baseline": JSON-able dicts) goes into the manifest as is.
    - ``extra_files``: {file name: str | bytes} written into OUT too (e.g. a search log).
  Weights are quantized with mxref (numpy) along the input dim and packed with
  mxref.pack; the whole directory is built in a temp dir next to OUT and renamed into
  place (mxref.outputs), so OUT is either complete or absent. An existing OUT is refused
  unless ``force``, which replaces only an earlier OUT (one with dmx_manifest.json) and
  never the source model. The manifest seals every file (dmx.integrity).
* ``load(out_dir, device="cpu", dtype=torch.float32) -> (model, tokenizer, manifest)``:
  every file's and every layer's sha256 and the tensor shapes are checked first; the
  model is rebuilt from config.json, the packed weights decoded through mxref into
  :class:`DecodedMXLinear` layers (the stored values are used as they are), inputs
  quantized as the manifest says. ``tokenizer`` is
  None when OUT has no tokenizer files.
* ``read_manifest(out_dir, verify=True) -> dict`` (schema-validated; ``verify``: every
  file's sha256 too, dmx.integrity.verify_out), ``validate_manifest(dict)``,
  ``average_bits_of(formats, act_formats, shapes)`` (the manifest's avg_bits numbers).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

import mxref
from dmx.errors import DMXError
from dmx.integrity import validate_manifest  # the checks live in dmx.integrity

__all__ = ["MANIFEST_NAME", "WEIGHTS_NAME", "EVAL_NAME", "FORMAT_VERSION", "write_out", "load",
           "read_manifest", "validate_manifest", "average_bits_of", "all_linear_bits",
           "layer_sha256", "DecodedMXLinear", "atomic_write_text", "check_new_out"]

MANIFEST_NAME = "dmx_manifest.json"
WEIGHTS_NAME = "model.safetensors"
EVAL_NAME = "eval.json"
FORMAT_VERSION = 1
METHODS = ("dmx", "uniform", "kl")
# Files copied from the source model: everything a tokenizer or generate() needs, no weights.
_COPY_NAMES = {"config.json", "generation_config.json", "special_tokens_map.json",
               "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
               "chat_template.jinja", "chat_template.json", "spiece.model",
               "sentencepiece.bpe.model"}
# dmx/manifest.schema.json is a symlink to specs/manifest.schema.json in the repository
# (one source of truth); a built wheel carries it as a file (package data "*.json").


# ----------------------------------------------------------------------------- small helpers
def layer_sha256(packed: np.ndarray, scales: np.ndarray) -> str:
    """sha256 of a layer's weight_packed bytes followed by its weight_scale bytes."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(packed).tobytes())
    h.update(np.ascontiguousarray(scales).tobytes())
    return h.hexdigest()


def read_manifest(out_dir, verify: bool = True) -> dict:
    """The schema-validated dmx_manifest.json of an OUT directory; ``verify``: after
    checking the manifest's own hash and every file's (dmx.integrity.verify_out)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise DMXError(f"{out_dir}: no such directory; pass an OUT directory written by "
                       f"`dmx search` or `dmx baseline`")
    path = out / MANIFEST_NAME
    if not path.is_file():
        raise DMXError(f"{out_dir}: no {MANIFEST_NAME}; pass an OUT directory written by "
                       f"`dmx search` or `dmx baseline`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DMXError(f"{path}: unreadable JSON ({err}); rewrite OUT") from None
    if not isinstance(manifest, dict):
        raise DMXError(f"{path}: not a JSON object; rewrite OUT")
    validate_manifest(manifest, str(path))
    if verify:
        from dmx.integrity import verify_out
        verify_out(out, manifest)
    return manifest


def atomic_write_text(path, text: str) -> None:
    """Write (or replace) a file of OUT atomically, e.g. eval.json (mxref.outputs)."""
    from mxref.outputs import atomic_write
    atomic_write(path, lambda fh: fh.write(text), force=True, text=True, error=DMXError)


def check_new_out(out_dir, force: bool, inputs=()) -> Path:
    """Before any work: OUT may be written (mxref.outputs.check_output: absent, or
    ``force`` over an earlier OUT; never one of ``inputs``; a writable parent)."""
    from mxref.outputs import check_output
    return check_output(out_dir, is_dir=True, **_out_rules(force, inputs))


def _out_rules(force: bool, inputs) -> dict:
    return dict(force=force, marker=MANIFEST_NAME, inputs=inputs, what="-o/--out",
                tool="dmx search/baseline", error=DMXError)


# ----------------------------------------------------------------------------- bits
class _FixedBits:
    """A stand-in for DMXLinear with a fixed format, so that dmx.penalty.average_bits
    computes the manifest's averages by the very definition the search trains against."""

    def __init__(self, bits: int, in_features: int, out_features: int, quantize_input: bool):
        self.bits, self.in_features, self.out_features = bits, in_features, out_features
        self.quantize_input = quantize_input

    def current_bits(self):
        import torch
        return torch.tensor(float(self.bits))


def average_bits_of(formats: dict, act_formats: dict | None, shapes: dict) -> dict:
    """{"simple", "size_weighted"} element bits of a fixed assignment (dmx.penalty's
    definitions: mean of the weight and input-activation averages, each layer once or
    weighted by size). ``shapes``: {name: (out, in)}. A layer whose input format differs
    from its weight format is not expressible there and is refused."""
    from dmx.penalty import average_bits
    act_formats = act_formats or {}
    layers = {}
    for name, fmt in formats.items():
        act = act_formats.get(name)
        if act is not None and mxref.get_format(act).key != mxref.get_format(fmt).key:
            raise DMXError(f"{name}: input format {act} differs from weight format {fmt}; dmx "
                           f"ties a layer's input format to its weight format")
        out_f, in_f = shapes[name]
        layers[name] = _FixedBits(mxref.get_format(fmt).bits, in_f, out_f, act is not None)
    return {"simple": float(average_bits(layers, "simple")),
            "size_weighted": float(average_bits(layers, "size"))}


def all_linear_bits(model, formats: dict, act_formats: dict | None) -> dict:
    """The honest budget: averages over *every* linear of the model, a layer that is not
    in ``formats`` (lm_head, layers left out) counted at its stored dtype bits (32 for
    float32, 16 for bfloat16), weights and input activations alike; an unquantized input
    of a quantized layer likewise. Same definitions as dmx.penalty (``weights_*``: the
    weight average alone)."""
    import torch.nn as nn

    from dmx.penalty import average_bits
    act_formats = act_formats or {}
    weights, acts = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        owner = name[: -len(".linear")] if name.endswith(".linear") else name  # a wrapper's
        stored = module.weight.element_size() * 8
        out_f, in_f = module.out_features, module.in_features
        w_bits = mxref.get_format(formats[owner]).bits if owner in formats else stored
        act = act_formats.get(owner)
        a_bits = mxref.get_format(act).bits if act is not None else stored
        # quantize_input=False: average_bits returns the weight average alone, so the
        # activations go in as "weights" of size in_features (their per-token weighting)
        weights[owner] = _FixedBits(w_bits, in_f, out_f, False)
        acts[owner] = _FixedBits(a_bits, in_f, 1, False)
    if not weights:
        raise DMXError("the model has no nn.Linear layers")
    w_simple, w_size = (float(average_bits(weights, k)) for k in ("simple", "size"))
    a_simple, a_size = (float(average_bits(acts, k)) for k in ("simple", "size"))
    return {"simple": (w_simple + a_simple) / 2, "size_weighted": (w_size + a_size) / 2,
            "weights_simple": w_simple, "weights_size_weighted": w_size,
            "n_linears": len(weights), "n_quantized": sum(1 for n in weights if n in formats)}


# ----------------------------------------------------------------------------- write
def _linear_of(model, name: str):
    import torch.nn as nn
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise DMXError(f"formats names {name!r}, which is not a module of the model") from None
    linear = mod if isinstance(mod, nn.Linear) else getattr(mod, "linear", None)
    if not isinstance(linear, nn.Linear):
        raise DMXError(f"formats names {name!r}, a {type(mod).__name__}, not a linear layer")
    return linear


def _plain_state_dict(model) -> dict:
    """state_dict under the original (unwrapped) names, tied tensors once (as HF saves).

    A wrapper (MXLinear/DMXLinear) at ``n`` holds its nn.Linear at ``n.linear``: its
    tensors are renamed back to ``n.weight``/``n.bias``; the wrapper's own parameters
    (dMX offsets) are not part of the model and are dropped.
    """
    import torch.nn as nn
    wrappers = [n for n, m in model.named_modules()
                if n and isinstance(getattr(m, "linear", None), nn.Linear)
                and not isinstance(m, nn.Linear)]
    out, seen = {}, {}
    for key, tensor in model.state_dict(keep_vars=False).items():
        for w in wrappers:
            if key.startswith(w + "."):
                rest = key[len(w) + 1:]
                key = f"{w}.{rest[len('linear.'):]}" if rest.startswith("linear.") else None
                break
        if key is None:
            continue
        ident = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and ident in seen:
            continue  # tied to an earlier tensor (e.g. lm_head = embed_tokens): stored once
        seen[ident] = key
        out[key] = tensor
    return out


def _fused_groups(formats: dict, act_formats: dict) -> dict:
    """{name: group tag or None}: q/k/v and gate/up of a block form a group when they all
    deploy with one weight and input format (so a serving engine may fuse them)."""
    from dmx.layers import fused_key  # the one definition of which projections fuse
    members: dict[str, list[str]] = {}
    for name in formats:
        key = fused_key(name)
        if key:
            members.setdefault(key, []).append(name)
    groups = {}
    for name in formats:
        key = fused_key(name)
        names = members.get(key, [])
        same = len(names) > 1 and len({(formats[n], act_formats.get(n)) for n in names}) == 1
        groups[name] = key if same else None
    return groups


def _software() -> dict:
    import torch
    import transformers

    import dmx
    return {"dmx": dmx.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__}


def _copy_source_files(source: Path, dest: Path) -> None:
    for f in sorted(source.iterdir()):
        if f.is_file() and (f.name in _COPY_NAMES or f.name.startswith("tokenizer")):
            shutil.copy2(f, dest / f.name)


def write_out(out_dir, model, formats: dict, act_formats: dict | None, source_model_dir,
              meta: dict, force: bool = False, extra_files: dict | None = None) -> Path:
    """Write OUT (see the module docstring); returns its path."""
    from safetensors.torch import save_file
    import torch

    t_start = time.time()
    source = Path(source_model_dir)
    out = check_new_out(out_dir, force, [source])
    if not (source / "config.json").is_file():
        raise DMXError(f"{source_model_dir}: no config.json; pass the Hugging Face directory "
                       f"the model was loaded from")
    if not formats:
        raise DMXError("write_out needs at least one quantized layer in formats")
    meta = dict(meta or {})
    method = meta.pop("method", None)
    if method not in METHODS:
        raise DMXError(f"meta['method'] must be one of {', '.join(METHODS)}, got {method!r}")
    act_formats = {n: (None if f is None else mxref.get_format(f).key)
                   for n, f in (act_formats or {}).items()}
    unknown = set(act_formats) - set(formats)
    if unknown:
        raise DMXError(f"act_formats names layers without a weight format: {sorted(unknown)[:5]}")
    formats = {n: mxref.get_format(f).key for n, f in formats.items()}
    profile = mxref.get_profile(meta.pop("profile", "ocp"))
    block_size = int(meta.pop("block_size", 32))

    state = _plain_state_dict(model)
    tensors: dict = {}
    layers: dict = {}
    shapes = {}
    total_bytes = total_weights = 0
    for name in formats:
        _linear_of(model, name)
        key = f"{name}.weight"
        if key not in state:
            raise DMXError(f"{name}: its weight is tied to another tensor (e.g. lm_head to "
                           f"the embeddings); exclude tied layers from formats")
    fused = _fused_groups(formats, act_formats)
    for name, fmt in formats.items():
        w = state.pop(f"{name}.weight")
        info = mxref.get_format(fmt)
        w32 = w.detach().to(device="cpu", dtype=torch.float32).numpy()
        pmx = mxref.quantize_packed(w32, info, axis=-1, block_size=block_size, profile=profile)
        tensors[f"{name}.weight_packed"] = torch.from_numpy(pmx.packed)
        tensors[f"{name}.weight_scale"] = torch.from_numpy(pmx.scales)
        out_f, in_f = (int(d) for d in w.shape)
        shapes[name] = (out_f, in_f)
        total_bytes += pmx.packed.nbytes + pmx.scales.nbytes
        total_weights += out_f * in_f
        layers[name] = {
            "format": info.key, "bits": info.bits,
            "storage_bits": info.bits + 8 / block_size,
            "shape": [out_f, in_f], "block_size": block_size, "axis": 1,
            "packing": mxref.packing_name(info), "act_format": act_formats.get(name),
            "profile_hash": profile.hash, "sha256": layer_sha256(pmx.packed, pmx.scales),
            "fused_group": fused[name]}
    for key, t in state.items():
        tensors[key] = t.detach().to("cpu").contiguous()

    config = json.loads((source / "config.json").read_text())
    import dmx
    manifest = {
        "format_version": FORMAT_VERSION, "producer": f"dmx {dmx.__version__}",
        "method": method, "source_model": str(source.resolve()),
        "model_type": str(config.get("model_type", "")),
        "ladder": meta.pop("ladder", None), "target_bits": meta.pop("target_bits", None),
        "seed": int(meta.pop("seed", 0)), "profile": profile.to_dict(),
        "block_size": block_size,
        "avg_bits": {**average_bits_of(formats, act_formats, shapes),
                     # actual bytes (ragged rows pad) per weight: what the file costs
                     "storage_bits_per_weight": 8.0 * total_bytes / total_weights,
                     "all_linears": all_linear_bits(model, formats, act_formats)},
        "layers": layers, "wall_time_s": _wall_time(meta.pop("wall_time_s", None), t_start),
        "software": _software(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if manifest["target_bits"] is not None:
        manifest["target_bits"] = float(manifest["target_bits"])
    for k, v in meta.items():  # method-specific extras, kept as given
        if k in manifest:
            raise DMXError(f"meta[{k!r}] clashes with a manifest field")
        manifest[k] = v
    validate_manifest(manifest, "write_out manifest")
    try:
        manifest_text = json.dumps(manifest, indent=1, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:  # a meta extra that JSON cannot hold
        raise DMXError(f"write_out: meta is not JSON-serialisable ({err})") from None

    for fname in extra_files or {}:
        if Path(fname).name != fname or fname in (MANIFEST_NAME, WEIGHTS_NAME, EVAL_NAME):
            raise DMXError(f"extra file name {fname!r} must be a plain file name other "
                           f"than {MANIFEST_NAME} / {WEIGHTS_NAME} / {EVAL_NAME}")
    from mxref.outputs import output_dir

    from dmx.integrity import seal
    with output_dir(out, **_out_rules(force, [source])) as tmp:
        _copy_source_files(source, tmp)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for fname, content in (extra_files or {}).items():
            target = tmp / fname
            (target.write_bytes if isinstance(content, bytes) else target.write_text)(content)
        manifest = seal(tmp, json.loads(manifest_text))  # every file above, and itself
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def _wall_time(before_write, t_start: float):
    """The run's wall time: what the caller measured up to write_out, plus the weight
    quantization and packing done here (the file write itself is not counted)."""
    if before_write is None:
        return None
    return round(float(before_write) + time.time() - t_start, 3)


# ----------------------------------------------------------------------------- load
def _decoded_linear_class():
    import torch.nn.functional as F

    from dmx.layers import MXLinear
    from dmx.quant import fake_quantize

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


def __getattr__(name):  # DecodedMXLinear is built lazily: importing dmx.io stays torch-free
    if name == "DecodedMXLinear":
        cls = _decoded_linear_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module 'dmx.io' has no attribute {name!r}")


def _read_checked_layers(out: Path, manifest: dict):
    """{name: float32 decoded weight [out, in]} after checking every sha256 first."""
    from safetensors import safe_open
    wpath = out / WEIGHTS_NAME
    if not wpath.is_file():
        raise DMXError(f"{out}: no {WEIGHTS_NAME}; rewrite OUT with `dmx search`/`dmx baseline`")
    try:
        fh = safe_open(str(wpath), framework="pt")
    except Exception as err:  # truncated or not a safetensors file
        raise DMXError(f"{wpath}: unreadable safetensors ({type(err).__name__}: "
                       f"{str(err).splitlines()[0][:120] if str(err) else ''}); OUT is "
                       f"corrupted, rewrite it") from None
    with fh:
        keys = set(fh.keys())
        raw = {}
        for name, e in manifest["layers"].items():
            for suffix in ("weight_packed", "weight_scale"):
                if f"{name}.{suffix}" not in keys:
                    raise DMXError(f"{wpath}: no tensor {name}.{suffix} for a layer of the "
                                   f"manifest; OUT is corrupted, rewrite it")
            try:
                packed = fh.get_tensor(f"{name}.weight_packed").numpy()
                scales = fh.get_tensor(f"{name}.weight_scale").numpy()
            except Exception as err:
                raise DMXError(f"{wpath}: {name} unreadable ({type(err).__name__}); OUT is "
                               f"corrupted, rewrite it") from None
            if layer_sha256(packed, scales) != e["sha256"]:
                raise DMXError(f"{name}: weight bytes do not match the manifest sha256; OUT "
                               f"was modified or corrupted, rewrite it")
            raw[name] = (packed, scales)
        others = {k: fh.get_tensor(k) for k in sorted(keys)
                  if not k.endswith((".weight_packed", ".weight_scale"))}
    decoded = {}
    for name, (packed, scales) in raw.items():
        e = manifest["layers"][name]
        info = mxref.get_format(e["format"])
        out_f, in_f = e["shape"]
        codes = mxref.unpack_codes(packed, info, in_f)
        mx = mxref.MXArray(codes, scales, info, (out_f, in_f), 1, e["block_size"],
                           mxref.get_profile(manifest["profile"]))
        decoded[name] = mxref.dequantize(mx, np.float32)
    return decoded, others


def load(out_dir, device="cpu", dtype=None):
    """(model, tokenizer, manifest) of an OUT directory; see the module docstring.

    ``dtype`` None = float32. Every check (manifest schema, sha256 of every layer) runs
    before the model is built.
    """
    out = Path(out_dir)
    manifest = read_manifest(out)  # every hash, before the heavy imports: fails fast
    import torch
    _check_device(device)

    from dmx.data import _quiet_transformers
    from dmx.layers import _set_submodule

    dtype = torch.float32 if dtype is None else dtype
    profile = mxref.get_profile(manifest["profile"])
    decoded, others = _read_checked_layers(out, manifest)
    from dmx.integrity import check_shapes, tensor_shapes
    where = str(out / WEIGHTS_NAME)
    check_shapes(out, tensor_shapes(manifest, others, others, where), where)
    _quiet_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(str(out))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as err:
        raise DMXError(f"{out}/config.json: cannot rebuild the model ({type(err).__name__}: "
                       f"{str(err).splitlines()[0][:160] if str(err) else ''})") from None
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in others.items()}
    for name, w in decoded.items():
        state[f"{name}.weight"] = torch.from_numpy(w).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied tensors (lm_head = embed) are stored once: a key missing from OUT is fine only
    # when the model shares it with a tensor that was loaded
    missing = [k for k in missing if not _shares_storage(model, k, state)]
    if missing or unexpected:
        raise DMXError(f"{out}/{WEIGHTS_NAME} does not fit config.json (missing "
                       f"{missing[:3]}, unexpected {list(unexpected)[:3]}); rewrite OUT")
    cls = _decoded_linear_class()
    for name, e in manifest["layers"].items():
        linear = _linear_of(model, name)
        layer = cls(linear, e["format"], e["act_format"], e["block_size"], profile)
        _set_submodule(model, name, layer)
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
