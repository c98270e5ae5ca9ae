"""The one writer of an OUT directory (and of files added to a finished OUT, e.g. eval.json).

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
  never the source model. The manifest seals every file (dmx.outdir.integrity).

Reading OUT back is :mod:`dmx.outdir.read`; the bit averages come from :mod:`dmx.nn.bits`.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

import mxref
from mxref.formats import DEFAULT_BLOCK_SIZE
from dmx.errors import DMXError
from dmx.outdir.integrity import seal, validate_manifest
from dmx.outdir.layout import (EVAL_NAME, FORMAT_VERSION, MANIFEST_NAME, METHODS, WEIGHTS_NAME,
                               layer_sha256)

__all__ = ["write_out", "atomic_write_text", "check_new_out", "parents_made", "refuse_inside",
           "dirs_to_make", "is_inside"]

# Files copied from the source model: everything a tokenizer or generate() needs, no weights.
_COPY_NAMES = {"config.json", "generation_config.json", "special_tokens_map.json",
               "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
               "chat_template.jinja", "chat_template.json", "spiece.model",
               "sentencepiece.bpe.model"}


def atomic_write_text(path, text: str) -> None:
    """Write (or replace) a file of OUT atomically, e.g. eval.json (mxref.outputs)."""
    from mxref.outputs import atomic_write
    atomic_write(path, lambda fh: fh.write(text), force=True, text=True, error=DMXError)


def check_new_out(out_dir, force: bool, inputs=()) -> Path:
    """Before any work: OUT may be written (mxref.outputs.check_output: absent, or
    ``force`` over an earlier OUT; never one of ``inputs``; a writable parent)."""
    from mxref.outputs import check_output
    return check_output(out_dir, is_dir=True, **_out_rules(force, inputs))


@contextlib.contextmanager
def parents_made(dest, what: str):
    """Create the missing parent directories of ``dest`` (`dmx export` and `dmx report`
    create them; search and baseline refuse a missing parent) for the ``with`` body; if the
    body fails, remove those it created (if still empty), so a refused command leaves
    nothing behind. A parent that cannot be made (a file in the way, no permission) is a
    one-line DMXError: ``mkdir(parents=True)`` raised "[Errno 17] File exists", exit 1,
    and left the directories it had made after a later error."""
    parent = Path(dest).parent
    made = dirs_to_make(parent, f"{what} {dest}", f"choose another {what}")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _remove_empty(made)
        raise DMXError(f"{parent}: cannot create the parent directory of {what} {dest} "
                       f"({err.strerror or err}); choose another {what}") from None
    try:
        yield parent
    except BaseException:
        _remove_empty(made)
        raise


def _remove_empty(dirs) -> None:
    for d in dirs:   # deepest first
        try:
            d.rmdir()
        except OSError:   # not empty (something else wrote there) or already gone
            return


def dirs_to_make(path, what: str, fix: str) -> list[Path]:
    """The directories ``path`` needs created (itself and missing parents), deepest first;
    a one-line DMXError when a non-directory stands in the way (mkdir would fail with
    "[Errno 17] File exists", exit 1). ``what`` names the path, ``fix`` what to do."""
    missing = []
    for d in (Path(path), *Path(path).parents):
        if d.is_dir():
            break
        if d.exists() or d.is_symlink():
            raise DMXError(f"{d}: not a directory, so {what} cannot be created under it; "
                           f"{fix}")
        missing.append(d)
    return missing


def is_inside(path, directory) -> bool:
    """``path`` is ``directory`` or lies under it (links resolved)."""
    p, d = os.path.realpath(path), os.path.realpath(directory)
    return p == d or p.startswith(d.rstrip(os.sep) + os.sep)


def refuse_inside(what: str, path, inputs) -> None:
    """``path`` must not lie inside one of the ``inputs`` directories (a model, a search
    OUT): a command writes next to its inputs, never into them (``path`` equal to an
    input is check_new_out's refusal)."""
    for inp in inputs:
        if Path(inp).is_dir() and is_inside(path, inp) and not is_inside(inp, path):
            raise DMXError(f"{what} {path} is inside the input directory {inp}; choose a "
                           f"path outside it")


def _out_rules(force: bool, inputs) -> dict:
    return dict(force=force, marker=MANIFEST_NAME, inputs=inputs, what="-o/--out",
                tool="dmx search/baseline", error=DMXError)


# ----------------------------------------------------------------------------- write
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
    from dmx.nn.layers import fused_key  # the one definition of which projections fuse
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
    # the thread count too: a search's and KL's float sums (so their picks) depend on it
    return {"dmx": dmx.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "torch_threads": torch.get_num_threads()}


def _copy_source_files(source: Path, dest: Path) -> None:
    for f in sorted(source.iterdir()):
        if f.is_file() and (f.name in _COPY_NAMES or f.name.startswith("tokenizer")):
            shutil.copy2(f, dest / f.name)


def write_out(out_dir, model, formats: dict, act_formats: dict | None, source_model_dir,
              meta: dict, force: bool = False, extra_files: dict | None = None) -> Path:
    """Write OUT (see the module docstring); returns its path."""
    from safetensors.torch import save_file
    import torch

    from dmx.nn.bits import all_linear_bits, average_bits_of
    from dmx.nn.layers import linear_of   # (torch: imported here, so dmx.outdir stays light)

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
    block_size = int(meta.pop("block_size", DEFAULT_BLOCK_SIZE))

    state = _plain_state_dict(model)
    tensors: dict = {}
    layers: dict = {}
    shapes = {}
    total_bytes = total_weights = 0
    for name in formats:
        linear_of(model, name)
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
