"""Models, tokenizers and token windows for search, baselines and evaluation.

Public API (all errors are one-line :class:`dmx.errors.DMXError`):

* ``load_model_and_tokenizer(model_dir, device="cpu", dtype=None, device_map=None)
  -> (model, tokenizer)``: a local Hugging Face causal LM in eval mode (``dtype`` None =
  the checkpoint's dtype; ``device_map`` e.g. "auto": placed over the GPUs by accelerate).
* ``load_tokenizer(model_dir)`` / ``check_causal_lm_dir(model_dir, quantized_ok=False)
  -> config``: a dmx OUT directory is refused (transformers would load its packed layers
  as random weights), and so is an already quantized checkpoint unless ``quantized_ok``.
* ``calibration_windows(tokenizer, files, seqlen, samples, seed) -> LongTensor [n, seqlen]``:
  the files concatenated, tokenized whole, ``samples`` distinct non-overlapping windows
  drawn with ``seed`` (capped, with a note, at what the text holds).
* ``eval_windows(tokenizer, file, seqlen, max_windows=None) -> (LongTensor [n, seqlen], info)``:
  the GPTQ perplexity protocol (ecosystem.md 6.1): the text tokenized once, cut into
  non-overlapping ``seqlen`` windows, remainder dropped, all tokens scored.
* ``default_calibration_file()``, ``default_eval_file()``, ``embedded_model_dir()``: the
  assets shipped in ``dmx/data/`` (see dmx/data/README.md for their sources).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from dmx.errors import DMXError

__all__ = ["DATA_DIR", "embedded_model_dir", "default_calibration_file", "default_eval_file",
           "check_causal_lm_dir", "load_tokenizer", "load_model", "load_model_and_tokenizer", "read_text",
           "tokenize_whole", "calibration_windows", "eval_windows", "JOINS"]

# The embedded assets live in the dmx/data/ directory next to this module (package data).
DATA_DIR = Path(__file__).resolve().parent / "data"


def embedded_model_dir() -> Path:
    """The demo model shipped with dmx (tiny-qwen3, 5.8 M parameters)."""
    return DATA_DIR / "tiny-qwen3"


def default_calibration_file() -> Path:
    """WikiText-2 raw validation split: the default calibration text."""
    return DATA_DIR / "wikitext-2-raw" / "wiki.valid.raw"


def default_eval_file() -> Path:
    """WikiText-2 raw test split: the default evaluation text."""
    return DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"


def quiet_transformers() -> None:
    # transformers' info/warning chatter (e.g. "sequence longer than model_max_length"
    # when a whole text is tokenized on purpose) would bury dmx's own one-line messages.
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars: dmx prints its own progress


def _refuse_out_dir(path: Path) -> None:
    """A dmx OUT holds packed MX weights (``<layer>.weight_packed``) and no ``<layer>.weight``:
    transformers loads it without error, every quantized linear left at its random init
    (`dmx eval --model OUT` printed ppl ~9000; `dmx baseline --model OUT` wrote an OUT of
    random weights). Refuse it by its manifest, before loading. A `dmx export` checkpoint
    (compressed-tensors, Quark) carries the manifest too, but transformers reads it."""
    from dmx.outdir.layout import MANIFEST_NAME
    if not (path / MANIFEST_NAME).is_file() or (path / "model.safetensors.index.json").is_file():
        return
    try:
        source = json.loads((path / MANIFEST_NAME).read_text()).get("source_model")
    except (OSError, ValueError, AttributeError):
        source = None
    src = f" (this one was made from {source})" if isinstance(source, str) else ""
    raise DMXError(f"--model {path}: is a dmx OUT directory (packed MX weights, which "
                   f"transformers would load as random weights); evaluate it with `dmx eval "
                   f"{path}`, and give --model the unquantized source model{src}")


def check_causal_lm_dir(model_dir, quantized_ok: bool = False) -> dict:
    """The config.json of a local causal-LM directory; a clear error when it is not one.
    ``quantized_ok``: accept a checkpoint transformers dequantizes itself (a
    compressed-tensors or Quark export: `dmx eval --model`); search, baselines and
    --uniform need full-precision nn.Linear weights to quantize."""
    path = Path(model_dir)
    if not path.is_dir():
        raise DMXError(f"--model {model_dir}: no such directory; pass a local Hugging Face "
                       f"model directory or a .gguf file (no hub downloads)")
    _refuse_out_dir(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise DMXError(f"--model {model_dir}: no config.json; pass a Hugging Face model "
                       f"directory (save_pretrained output)")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as err:
        raise DMXError(f"{cfg_path}: unreadable JSON ({err})") from None
    archs = config.get("architectures") or []
    if archs and not any(str(a).endswith("ForCausalLM") for a in archs):
        raise DMXError(f"--model {model_dir}: architectures {archs} is not a causal LM; dmx "
                       f"needs a *ForCausalLM model (e.g. LlamaForCausalLM, Qwen3ForCausalLM)")
    qc = config.get("quantization_config")
    if qc and not quantized_ok:
        # its linears are packed (compressed-tensors) or not nn.Linear at all: dmx baseline
        # crashed with a traceback ("'Linear' object has no attribute 'weight'")
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise DMXError(f"--model {model_dir}: an already quantized checkpoint "
                       f"(quantization_config, quant_method {method}); dmx quantizes "
                       f"full-precision weights: pass the unquantized model it came from")
    return config


def load_tokenizer(model_dir):
    """AutoTokenizer of a local directory, or a clear error."""
    quiet_transformers()
    from transformers import AutoTokenizer
    hint = "the directory needs tokenizer.json or the tokenizer files of its model"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as err:  # transformers raises many types (OSError, ValueError, ...)
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DMXError(f"{model_dir}: the tokenizer does not load ({msg}); {hint}") from None
    # without tokenizer files transformers may build an empty one that encodes text to []
    if not tokenizer("hello world", add_special_tokens=False)["input_ids"]:
        raise DMXError(f"{model_dir}: no usable tokenizer (it encodes text to nothing); {hint}")
    return tokenizer


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _check_device_map(device_map) -> None:
    """accelerate must be there, and the map one of from_pretrained's names or a dict."""
    if not (isinstance(device_map, dict) or device_map in DEVICE_MAPS):
        raise DMXError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got "
                       f"{device_map!r}")
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise DMXError("--device-map needs the accelerate package: pip install accelerate "
                       "(or pip install 'dmx[multigpu]')") from None


def _check_no_offload(model, model_dir) -> None:
    """dmx reads every linear's weight directly (fake quantization), so accelerate's CPU or
    disk offload (weights on the meta device, loaded by hooks) cannot work: refuse it."""
    placed = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    if "disk" in placed or any(p.device.type == "meta" for p in model.parameters()) or (
            "cpu" in placed and len(placed) > 1):
        raise DMXError(f"--model {model_dir}: does not fit the GPUs (device map uses "
                       f"{', '.join(sorted(placed))}); dmx cannot work on weights offloaded "
                       f"to CPU or disk: use more or larger GPUs")


def load_model(model_dir, device="cpu", dtype=None, device_map=None, quantized_ok=False):
    """A local causal LM in eval mode on ``device`` (``dtype`` None = the checkpoint's).
    ``device_map`` (e.g. "auto"): placed by accelerate over the visible GPUs (the CPU when
    there are none) instead of moved to ``device``; CPU/disk offload is refused.
    ``quantized_ok``: see :func:`check_causal_lm_dir`."""
    check_causal_lm_dir(model_dir, quantized_ok)
    quiet_transformers()
    from transformers import AutoModelForCausalLM
    placement = {}
    if device_map is not None:
        _check_device_map(device_map)
        placement = {"device_map": device_map}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir),
                                                     dtype="auto" if dtype is None else dtype,
                                                     **placement)
    except Exception as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DMXError(f"--model {model_dir}: not loadable as a causal LM "
                       f"(AutoModelForCausalLM: {msg})") from None
    _check_finite(model, model_dir)
    if device_map is not None:
        _check_no_offload(model, model_dir)
        return model.eval()
    return model.to(device).eval()


def cap_seqlen(seqlen: int, positions, say) -> int:
    """``seqlen`` capped at the model's ``positions`` (max_position_embeddings; None =
    unknown): longer windows would run past what the model was built for. ``say`` gets
    the note when it caps."""
    if positions and int(seqlen) > int(positions):
        say(f"note: --seqlen {seqlen} is longer than the model's {positions} positions; "
            f"using {positions}")
        return int(positions)
    return int(seqlen)


def _check_finite(model, model_dir) -> None:
    """NaN/Inf in the source weights would surface much later as a NaN loss ("try a
    smaller --lr") or ppl inf: name the tensor now, before any work."""
    import torch
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or t.device.type == "meta":
                continue
            if t.element_size() == 1:
                # float8 (an MXFP8 layer of a compressed-tensors export, `dmx eval --model`):
                # torch has no isfinite for it, which was a traceback; float32 holds every value
                t = t.float()
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise DMXError(f"--model {model_dir}: weight {name} holds {bad} NaN/Inf "
                               f"value(s); the checkpoint is corrupted: re-download or "
                               f"re-convert it")


def load_model_and_tokenizer(model_dir, device="cpu", dtype=None, device_map=None,
                             quantized_ok=False):
    """(model in eval mode on ``device``, tokenizer) of a local causal-LM directory
    (the tokenizer first: it is quick, and a missing one fails before the weights load).
    ``quantized_ok``: see :func:`check_causal_lm_dir`."""
    check_causal_lm_dir(model_dir, quantized_ok)
    tokenizer = load_tokenizer(model_dir)
    return load_model(model_dir, device, dtype, device_map, quantized_ok), tokenizer


def check_text_files(flag: str, files) -> None:
    """Each of ``files`` is an existing file (checked before a model loads); a directory is
    named as one, not as missing."""
    for f in files or ():
        if Path(f).is_dir():
            raise DMXError(f"{flag} {f}: is a directory; pass a text file")
        if not Path(f).is_file():
            raise DMXError(f"{flag} {f}: no such file")


def read_text(files) -> str:
    """The files' text, concatenated with a newline between files (UTF-8)."""
    return "\n".join(_read_texts(files))


def _read_texts(files) -> list[str]:
    """Each file's text (UTF-8), checked to be a readable text file."""
    if isinstance(files, (str, Path)):
        files = [files]
    parts = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise DMXError(f"{f}: no such text file")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DMXError(f"{f}: not a readable UTF-8 text file ({err})") from None
        if "\x00" in text:   # valid UTF-8, but a binary file (20,000 NULs were accepted)
            raise DMXError(f"{f}: holds NUL bytes, so it is not a text file; pass plain text")
        parts.append(text)
    return parts


_TOKEN_CACHE: dict = {}  # (tokenizer identity, text digest) -> ids; a few entries only


def tokenize_whole(tokenizer, text: str):
    """The text as one LongTensor of ids [n] (special tokens as the tokenizer adds them,
    i.e. at most one BOS at the very start, as in GPTQ's tokenizer(text)).

    Results are cached per (tokenizer directory, class, vocab size, text): a demo or a
    baseline tokenizes the same 1 MB text several times otherwise.
    """
    import hashlib

    import torch
    quiet_transformers()
    key = (str(getattr(tokenizer, "name_or_path", id(tokenizer))), type(tokenizer).__name__,
           len(tokenizer), hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest())
    if key not in _TOKEN_CACHE:
        ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
        if len(_TOKEN_CACHE) >= 4:
            _TOKEN_CACHE.pop(next(iter(_TOKEN_CACHE)))
        _TOKEN_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    return _TOKEN_CACHE[key].clone()


def _check_positive(flag: str, value) -> int:
    if isinstance(value, bool) or value is None or int(value) != value or value < 1:
        raise DMXError(f"{flag} must be a positive integer, got {value!r}")
    return int(value)


def calibration_windows(tokenizer, files, seqlen: int, samples: int, seed: int = 0):
    """``samples`` token windows of ``seqlen`` from the files: LongTensor [samples, seqlen].

    The text is tokenized whole, cut into non-overlapping windows after a seeded random
    shift, and ``samples`` of them are drawn without replacement (seeded); the same
    (files, seqlen, samples, seed) always gives the same windows. If the text holds fewer
    windows, all of them are used and a note says so.
    """
    import torch
    seqlen = _check_positive("--seqlen", seqlen)
    samples = _check_positive("--samples", samples)
    files = [files] if isinstance(files, (str, Path)) else list(files)
    parts = _read_texts(files)
    text = "\n".join(parts)   # read_text's join
    names = ", ".join(str(f) for f in files)
    if not text.strip():
        raise DMXError(f"calibration text {names} is empty; pass a text file with content")
    empty = [str(f) for f, part in zip(files, parts) if not part.strip()]
    if empty:  # likely a slip (a truncated or wrong file); the others still calibrate
        print(f"dmx: note: calibration text {', '.join(empty)} is empty; the windows come "
              f"from the other file(s)", file=sys.stderr)
    ids = tokenize_whole(tokenizer, text)
    if ids.numel() < seqlen:
        raise DMXError(f"calibration text {names} has {ids.numel()} tokens, fewer than one "
                       f"window of --seqlen {seqlen}; pass more text or a smaller --seqlen")
    gen = torch.Generator().manual_seed(int(seed))
    n_avail = ids.numel() // seqlen
    spare = ids.numel() - n_avail * seqlen
    shift = int(torch.randint(0, spare + 1, (1,), generator=gen))
    windows = ids[shift:shift + n_avail * seqlen].view(n_avail, seqlen)
    if samples > n_avail:
        print(f"dmx: note: the calibration text holds {n_avail} windows of {seqlen} tokens; "
              f"using all {n_avail} instead of --samples {samples}", file=sys.stderr)
        samples = n_avail
    pick = torch.randperm(n_avail, generator=gen)[:samples]
    return windows[pick].contiguous()


JOINS = ("file", "rows")


def eval_windows(tokenizer, file, seqlen: int, max_windows: int | None = None,
                 join: str = "file"):
    """GPTQ-protocol windows of a text file: (LongTensor [n, seqlen], info dict).

    The text is tokenized once; windows are non-overlapping, the remainder is dropped,
    every token of a window is scored. ``join="file"``: the file's text as it is (the
    number dmx/data/README.md quotes for tiny-qwen3, 116.0, is measured this way);
    ``join="rows"``: GPTQ's ``"\\n\\n".join(dataset["text"])`` over the Hugging Face
    ``wikitext`` rows (every line a row, blank lines empty rows), which adds newlines.
    ``max_windows`` keeps the first N (a quick evaluation: the info says so).
    ``info``: file, join, n_tokens, windows_total, windows, seqlen.
    """
    seqlen = _check_positive("--seqlen", seqlen)
    if seqlen < 2:
        raise DMXError("--seqlen must be at least 2 (one next-token prediction)")
    if max_windows is not None:
        max_windows = _check_positive("--max-windows", max_windows)
    text = read_text([file])
    if not text.strip():
        raise DMXError(f"evaluation text {file} is empty; pass a text file with content")
    if join not in JOINS:
        raise DMXError(f"--join must be one of {', '.join(JOINS)}, got {join!r}")
    if join == "rows":
        text = "\n\n".join(line if line.strip() else ""
                            for line in text.splitlines(keepends=True))
    ids = tokenize_whole(tokenizer, text)
    total = ids.numel() // seqlen
    if total == 0:
        raise DMXError(f"evaluation text {file} has {ids.numel()} tokens, fewer than one "
                       f"window of --seqlen {seqlen}; pass more text or a smaller --seqlen")
    n = total if max_windows is None else min(total, max_windows)
    windows = ids[:n * seqlen].view(n, seqlen)
    info = {"file": str(file), "join": join, "n_tokens": int(ids.numel()),
            "windows_total": int(total),
            "windows": int(n), "seqlen": int(seqlen)}
    return windows, info
