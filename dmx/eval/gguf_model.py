"""GGUF checkpoints as float32 Hugging Face directories (``--model some.gguf``).

dmx works on a local Hugging Face directory (config, safetensors, tokenizer): its search,
baselines and OUT directories copy config and tokenizer from there. A GGUF file is turned
into such a directory once, through transformers' own GGUF reader
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``, which dequantizes every
tensor), and cached:

* ``check_gguf_file(path) -> Path``: the file exists and starts with the GGUF magic, or a
  one-line :class:`dmx.errors.DMXError`.
* ``convert_gguf(gguf_file, out_dir, say=print) -> dict``: write the float32 directory
  atomically (temp dir + rename); when ``out_dir`` already holds a conversion of the same
  GGUF whose safetensors still hash to the recorded sha256, do nothing. Returns
  ``{"path", "sha256", "source_sha256", "cached"}``; ``sha256`` is that of the result's
  ``model.safetensors`` (also in ``out_dir/dmx_gguf.json``).
* ``gguf_cache_dir(gguf_file) -> Path``: where ``--model x.gguf`` caches its conversion
  (``~/.cache/dmx/gguf/<name>-<sha256[:12]>-f32``; ``XDG_CACHE_HOME`` moves ``~/.cache``).
* ``resolve_model_path(model) -> str``: a ``.gguf`` file -> its cached float32 directory;
  any other file a one-line error; directories unchanged (checked in dmx.data).

Why a copy into a fresh model: transformers marks a GGUF-loaded model as quantized
(``quantization_config``, quant_method gguf) and ``save_pretrained`` refuses it, although
its tensors are already plain float32. The copy is checked before the rename: tied
embeddings stay tied, and the saved directory's tensors, and its logits on a short input,
equal the GGUF-loaded model's bit for bit.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from mxref.outputs import output_dir, sha256_file

from dmx.errors import DMXError

__all__ = ["GGUF_MAGIC", "RECORD_NAME", "check_gguf_file", "convert_gguf", "gguf_cache_dir",
           "resolve_model_path", "sha256_file"]

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file (gguf spec, header)
RECORD_NAME = "dmx_gguf.json"  # the conversion record written into the directory
WEIGHTS_NAME = "model.safetensors"
# max_shard_size well above any model dmx runs on CPU: one file, so one sha256 names it
_ONE_SHARD = "1000GB"
_CHECK_TEXT = "The quick brown fox jumps over the lazy dog. 1 2 3"


def check_gguf_file(path) -> Path:
    """The path of an existing GGUF file, or a one-line error saying what is wrong."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DMXError(f"--model {path}: no such file; pass a .gguf file or a local Hugging "
                       f"Face model directory")
    with open(p, "rb") as fh:
        head = fh.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise DMXError(f"--model {path}: not a GGUF file (it does not start with "
                       f"{GGUF_MAGIC!r}); pass a llama.cpp .gguf file or a Hugging Face "
                       f"model directory")
    return p


def gguf_cache_dir(gguf_file) -> Path:
    """The cache directory of a GGUF file's float32 conversion (named by its content)."""
    p = check_gguf_file(gguf_file)
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dmx" / "gguf"
    return root / f"{p.stem}-{sha256_file(p)[:12]}-f32"


def _cached(out_dir: Path, source_sha: str) -> dict | None:
    """The record of a finished conversion of this GGUF in ``out_dir``, if still intact."""
    try:
        record = json.loads((out_dir / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    weights = out_dir / WEIGHTS_NAME
    if record.get("source_sha256") != source_sha or not weights.is_file():
        return None
    return record if sha256_file(weights) == record.get("sha256") else None


def _load_gguf(p: Path):
    """(model, tokenizer) from transformers' GGUF reader, dequantized to float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dmx.data import quiet_transformers
    quiet_transformers()  # its load report (a 13-line table) would bury dmx's one line
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                     dtype=torch.float32)
    except ImportError as err:
        raise DMXError(f"--model {p}: reading GGUF needs the gguf package ({err}); "
                       f"pip install gguf") from None
    except Exception as err:  # transformers raises many types for unsupported files
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "ignore_mismatched_sizes" in msg:  # its words point at the report quieted above
            msg = ("its tensor shapes differ from the model transformers builds from the "
                   "GGUF's metadata: its GGUF reader takes some settings from its own "
                   "defaults, e.g. Qwen3's head_dim 128 instead of the file's key_length; "
                   "llama.cpp runs it, or pass the Hugging Face directory")
        raise DMXError(f"--model {p}: transformers cannot load this GGUF ({msg})") from None
    return model.eval(), tokenizer


def _plain_copy(gguf_model):
    """The same weights in a fresh model of the same class, free of the GGUF marking."""
    import copy

    import torch
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = type(gguf_model)(config).to(torch.float32).eval()
    # strict: every tensor of the GGUF model lands in the copy, nothing left at its init
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    return model


def _tied(model) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight.data_ptr() == emb.weight.data_ptr()


def _bits(t):
    """Bit patterns of a float32 tensor (equal bits, not equal values: -0.0 vs 0.0, NaNs)."""
    import torch
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _check_saved(gguf_model, tokenizer, saved_dir: Path) -> None:
    """Before the rename: tying preserved, every tensor and the logits equal bit for bit."""
    import torch
    from transformers import AutoModelForCausalLM
    saved = AutoModelForCausalLM.from_pretrained(str(saved_dir), dtype=torch.float32).eval()
    if _tied(saved) != _tied(gguf_model):
        raise DMXError(f"GGUF conversion: lm_head/embedding tying changed (GGUF model tied: "
                       f"{_tied(gguf_model)}, saved: {_tied(saved)}); please report this")
    want_sd, got_sd = gguf_model.state_dict(), saved.state_dict()
    differ = [k for k, v in want_sd.items()
              if k not in got_sd or not torch.equal(_bits(got_sd[k]), _bits(v))]
    if differ or set(got_sd) != set(want_sd):
        raise DMXError(f"GGUF conversion: saved tensors differ from the GGUF-loaded model's "
                       f"({(differ or sorted(set(got_sd) ^ set(want_sd)))[:3]}); please report this")
    ids = tokenizer(_CHECK_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = gguf_model(ids).logits
        got = saved(ids).logits
    if got.dtype != torch.float32 or not torch.equal(_bits(got), _bits(want)):
        raise DMXError("GGUF conversion: the saved float32 model's logits differ from the "
                       "GGUF-loaded model's; please report this")


def convert_gguf(gguf_file, out_dir, say=print) -> dict:
    """Write (or reuse) the float32 Hugging Face directory of ``gguf_file`` at ``out_dir``."""
    p = check_gguf_file(gguf_file)
    out_dir = Path(out_dir).expanduser()
    source_sha = sha256_file(p)
    record = _cached(out_dir, source_sha)
    if record is not None:
        say(f"cached: {out_dir} (sha256 of {WEIGHTS_NAME} matches the record)")
        return {**record, "path": str(out_dir), "cached": True}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    say(f"reading {p.name} with transformers (dequantizing to float32) ...")
    gguf_model, tokenizer = _load_gguf(p)
    # a stale or damaged cache (with our record) is replaced; a directory without one is
    # refused; a twin a concurrent run (e.g. another torchrun rank) finished is used
    with output_dir(out_dir, force=True, marker=RECORD_NAME, inputs=[p],
                    what="the GGUF cache directory", tool="dmx's GGUF conversion",
                    error=DMXError,
                    twin_ok=lambda d: _cached(d, source_sha) is not None) as tmp:
        say("copying the weights into a plain float32 model and saving ...")
        _plain_copy(gguf_model).save_pretrained(str(tmp), max_shard_size=_ONE_SHARD)
        tokenizer.save_pretrained(str(tmp))
        if not (tmp / WEIGHTS_NAME).is_file():
            raise DMXError(f"GGUF conversion: save_pretrained wrote no single {WEIGHTS_NAME}; "
                           f"please report this")
        say("checking tying, bit-exact tensors and logits of the saved directory ...")
        _check_saved(gguf_model, tokenizer, tmp)
        record = {"source": p.name, "source_sha256": source_sha, "dtype": "float32",
                  "tied_embeddings": _tied(gguf_model), "sha256": sha256_file(tmp / WEIGHTS_NAME)}
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n")
    say(f"sha256 {record['sha256']}  {WEIGHTS_NAME}")
    return {**record, "path": str(out_dir), "cached": False}


def resolve_model_path(model) -> str:
    """``--model``: a ``.gguf`` file (or any file: a directory is what else is accepted)
    becomes its cached float32 directory, converted on first use; anything else is returned
    as given for dmx.data's directory checks."""
    if model is None or not (str(model).lower().endswith(".gguf") or Path(model).is_file()):
        return model
    import sys
    result = convert_gguf(model, gguf_cache_dir(model),
                          say=lambda msg: print(f"dmx: {msg}", file=sys.stderr))
    return result["path"]
