"""OUT integrity: the manifest seals every file of OUT, and nothing is used unchecked.

``dmx_manifest.json`` records ``files`` ({name: {"sha256", "bytes"}} of every file of OUT
but itself and eval.json: safetensors shards, config, generation config, tokenizer, search
log, anything else written) and ``manifest_sha256``, the sha256 of its own canonical form
(mxref.outputs.canonical_sha256 of the manifest without that key). :func:`verify_out`
checks both before `dmx.load`, `dmx eval`, `dmx export` and `dmx report` use OUT; the
first problem is a one-line DMXError naming the file.

eval.json is not sealed: `dmx eval --save` adds results to a finished OUT (it holds
numbers about the model, never anything the model is built from).

Public API: ``seal(dir, manifest) -> manifest`` (while writing OUT), ``verify_out(dir,
manifest)``, ``reseal(dir)`` (after a deliberate hand edit: re-records the hashes),
``check_shapes(config_dir, tensor_shapes, where)`` (config.json vs the tensors).
"""
from __future__ import annotations

import json
from pathlib import Path

from mxref.outputs import canonical_sha256, sha256_file

from dmx.errors import DMXError
from dmx.outdir.layout import EVAL_NAME, MANIFEST_NAME as MANIFEST

_SCHEMA_PATH = Path(__file__).parent / "manifest.schema.json"


def _schema() -> dict:
    return json.loads(_SCHEMA_PATH.read_text())


def validate_manifest(manifest: dict, where: str = "manifest") -> None:
    """Raise a one-line DMXError naming the first field that breaks the schema."""
    import jsonschema
    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        field = "/".join(str(p) for p in err.path) or "(top level)"
        raise DMXError(f"{where}: field {field}: {err.message.splitlines()[0][:200]}")

__all__ = ["FILES_KEY", "SELF_HASH_KEY", "UNSEALED", "seal", "verify_out", "reseal",
           "tensor_shapes", "check_shapes"]

FILES_KEY = "files"
SELF_HASH_KEY = "manifest_sha256"
UNSEALED = (EVAL_NAME,)   # written into a finished OUT by `dmx eval --save`


def _sealed_files(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name != MANIFEST and p.name not in UNSEALED)


def seal(out_dir, manifest: dict) -> dict:
    """``manifest`` plus the hashes of every file now in ``out_dir`` and its own hash."""
    out = Path(out_dir)
    m = {k: v for k, v in manifest.items() if k not in (FILES_KEY, SELF_HASH_KEY)}
    m[FILES_KEY] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                    for p in _sealed_files(out)}
    m[SELF_HASH_KEY] = canonical_sha256(m)
    return m


def _edited(path: Path, what: str) -> DMXError:
    return DMXError(f"{path}: {what}; OUT was modified or corrupted after it was written: "
                    f"rewrite it (`dmx search`/`dmx baseline`), or after a deliberate edit "
                    f"re-record its hashes with dmx.outdir.integrity.reseal(OUT)")


def verify_out(out_dir, manifest: dict) -> None:
    """Refuse OUT unless the manifest and every file match the recorded hashes."""
    out = Path(out_dir)
    mpath = out / MANIFEST
    if SELF_HASH_KEY not in manifest or FILES_KEY not in manifest:
        raise DMXError(f"{mpath}: records no file hashes (written by an older dmx, or "
                       f"edited); rewrite OUT with this dmx")
    rest = {k: v for k, v in manifest.items() if k != SELF_HASH_KEY}
    try:
        ok = canonical_sha256(rest) == manifest[SELF_HASH_KEY]
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise _edited(mpath, f"its content does not match its {SELF_HASH_KEY}")
    files = manifest[FILES_KEY]
    if not isinstance(files, dict):
        raise _edited(mpath, f"{FILES_KEY} is not a mapping")
    for name, info in sorted(files.items()):
        p = out / name
        if Path(name).name != name or not p.is_file():
            raise _edited(p, "listed in the manifest but missing")
        if not isinstance(info, dict) or p.stat().st_size != info.get("bytes") \
                or sha256_file(p) != info.get("sha256"):
            raise _edited(p, "sha256 does not match the manifest")
    extra = [p.name for p in _sealed_files(out) if p.name not in files]
    if extra:
        raise _edited(out / extra[0], "not listed in the manifest (a file added to OUT "
                                      "would be read by the loaders unchecked)")


def reseal(out_dir) -> dict:
    """Re-record the hashes of OUT after a deliberate edit (tests, hand repairs); the
    manifest is schema-checked first. Returns the new manifest."""
    from mxref.outputs import atomic_write

    out = Path(out_dir)
    manifest = json.loads((out / MANIFEST).read_text())
    validate_manifest(manifest, str(out / MANIFEST))
    sealed = seal(out, manifest)
    text = json.dumps(sealed, indent=1, allow_nan=False) + "\n"
    atomic_write(out / MANIFEST, lambda fh: fh.write(text), force=True, text=True)
    return sealed


def tensor_shapes(manifest: dict, others: dict, all_keys, where: str) -> dict:
    """{state-dict key: shape} of OUT: quantized layers as ``.weight`` with the manifest's
    [out, in], ``others`` ({key: tensor}) as stored. ``all_keys``: every tensor name of
    the weights file; packed weights of a layer the manifest does not list are refused."""
    for key in sorted(all_keys):
        for suffix in (".weight_packed", ".weight_scale"):
            if key.endswith(suffix) and key[:-len(suffix)] not in manifest["layers"]:
                raise DMXError(f"{where}: holds {key}, a quantized layer the manifest does "
                               f"not list; the manifest and the weights do not belong "
                               f"together: rewrite OUT")
    shapes = {f"{n}.weight": tuple(e["shape"]) for n, e in manifest["layers"].items()}
    shapes.update({k: tuple(t.shape) for k, t in others.items()})
    return shapes


def check_shapes(config_dir, tensor_shapes: dict, where: str) -> None:
    """Every tensor of OUT (``tensor_shapes``: {state-dict key: shape}, quantized layers by
    their ``.weight`` and logical [out, in]) must have the shape config.json gives it, and
    exist in the model config.json describes; checked on the meta device (no memory)."""
    import torch

    from dmx.data import quiet_transformers
    quiet_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(str(config_dir))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as err:
        first = str(err).splitlines()[0][:160] if str(err) else ""
        raise DMXError(f"{config_dir}/config.json: cannot build the model it describes "
                       f"({type(err).__name__}: {first}); rewrite OUT") from None
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in sorted(tensor_shapes.items()):
        if key not in want:
            raise DMXError(f"{where}: tensor {key} is not part of the model config.json "
                           f"describes; config.json and the weights do not belong together")
        if tuple(shape) != want[key]:
            raise DMXError(f"{where}: tensor {key} has shape {list(shape)}, config.json "
                           f"implies {list(want[key])}; config.json and the weights do not "
                           f"belong together")
