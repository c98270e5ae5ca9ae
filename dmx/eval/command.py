"""Perplexity with the GPTQ protocol, and the `dmx eval` command.

Public API:

* ``perplexity(model, windows, batch_size=8, progress=True) -> {"ppl", "nll", "scored",
  "nll_se", "ppl_ci95", "window_nll"}``: every next-token prediction of every window scored
  (seqlen - 1 per window), float32 cross-entropy, ppl = exp(mean). ``window_nll`` is each
  window's mean NLL (recorded in eval.json, so that two runs scored on the same windows
  can be compared window by window: :mod:`dmx.eval.paired`); ``nll_se`` and ``ppl_ci95``
  are the sampling error over windows.
* ``evaluate(model, tokenizer, data_file=None, seqlen=256, max_windows=None, join="file",
  batch_size=8, progress=True) -> dict``: windows from :func:`dmx.data.eval_windows`
  (default text: the embedded wiki.test.raw) and their perplexity; ``result["protocol"]``
  is the one-line description printed with the number.
* ``protocol_line(result) -> str``, e.g. "wiki.test.raw: 396,958 tokens, 1,550 windows x
  256, all tokens scored, ppl 116.01".
* Results go into OUT/eval.json through :mod:`dmx.outdir.evaljson` (``save_eval``,
  ``save_task_results``; the OUT weights and manifest stay untouched).
* ``add_eval_parser(subparsers)`` / ``run_eval(args)``: the CLI.

Zero-shot tasks (lm-evaluation-harness, `dmx eval --tasks`) run in dmx.eval.zeroshot; the
harness is the optional extra ``eval``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from dmx.errors import DMXError
from dmx.eval.paired import nll_summary

__all__ = ["perplexity", "evaluate", "protocol_line", "add_eval_parser", "run_eval",
           "DEFAULT_SEQLEN"]

DEFAULT_SEQLEN = 256


def perplexity(model, windows, batch_size: int = 8, progress: bool = True) -> dict:
    """Perplexity of ``model`` over LongTensor ``windows`` [n, seqlen] (all tokens scored)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise DMXError(f"--batch-size must be a positive integer, got {batch_size}")
    device = next(model.parameters()).device
    window_nll = []  # each window's mean next-token NLL: the unit of dmx.eval.paired
    with torch.no_grad():
        for i in tqdm(range(0, windows.shape[0], batch_size), desc="dmx eval", unit="batch",
                      disable=not progress, dynamic_ncols=True):
            ids = windows[i:i + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            # float32 softmax whatever the model dtype; each window summed in float64
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                   reduction="none").view(ids.shape[0], -1)
            window_nll += (loss.double().sum(1) / loss.shape[1]).tolist()
    return {**nll_summary(window_nll, windows.shape[1] - 1), "window_nll": window_nll}


def evaluate(model, tokenizer, data_file=None, seqlen: int = DEFAULT_SEQLEN,
             max_windows: int | None = None, join: str = "file", batch_size: int = 8,
             progress: bool = True, windows=None) -> dict:
    """GPTQ-protocol perplexity of ``model`` on a text file (see the module docstring).

    ``windows``: the ``(LongTensor, info)`` of an earlier :func:`dmx.data.eval_windows`
    call, to score several models on one tokenization (the other text arguments are
    then ignored)."""
    from dmx.data import cap_seqlen, default_eval_file, eval_windows

    t0 = time.time()
    if windows is None:   # windows beyond the model's positions: capped, with a note
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        seqlen = cap_seqlen(seqlen, positions,
                            lambda msg: print(f"dmx eval: {msg}", file=sys.stderr))
        if tokenizer is None:
            raise DMXError("no tokenizer: the model directory has no tokenizer files; copy "
                           "them from the source model")
        data_file = default_eval_file() if data_file is None else Path(data_file)
        windows = eval_windows(tokenizer, data_file, seqlen, max_windows, join)
    windows, info = windows
    result = {**info, **perplexity(model, windows, batch_size, progress),
              "seconds": round(time.time() - t0, 3)}
    result["protocol"] = protocol_line(result)
    return result


def protocol_line(r: dict) -> str:
    """The number with the protocol that produced it (never a bare perplexity)."""
    part = "" if r["windows"] == r["windows_total"] else f" (first {r['windows']:,} of " \
                                                          f"{r['windows_total']:,})"
    join = "" if r.get("join", "file") == "file" else ", rows joined with \\n\\n"
    return (f"{Path(r['file']).name}: {r['n_tokens']:,} tokens{join}, {r['windows']:,} windows"
            f" x {r['seqlen']}{part}, all tokens scored, ppl {r['ppl']:.2f}")


# ----------------------------------------------------------------------------- CLI
def add_eval_parser(subparsers):
    from dmx.data import JOINS
    from dmx.eval.zeroshot import add_task_args
    p = subparsers.add_parser(
        "eval", help="perplexity of an OUT directory or a model (GPTQ protocol)",
        description="Perplexity on a text file, GPTQ protocol: the text tokenized once, "
                    "non-overlapping windows of --seqlen tokens, remainder dropped, every "
                    "token scored. Pass an OUT directory, or --model DIR (optionally with "
                    "--uniform FMT for a uniform MX quantization on the fly). With --tasks: "
                    "lm-evaluation-harness task accuracy instead (docs/zero_shot.md).")
    p.add_argument("out", nargs="?", help="OUT directory written by `dmx search`/`dmx baseline`")
    from dmx.threads import add_threads_arg
    add_threads_arg(p)
    p.add_argument("--model", help="a local Hugging Face causal LM (or a .gguf file) "
                   "instead of OUT")
    p.add_argument("--uniform", metavar="FMT",
                   help="with --model: quantize every linear (not lm_head/embeddings), "
                        "weights and inputs, to FMT (e.g. fp4_e2m1, fp8_e4m3)")
    p.add_argument("--weights-only", action="store_true",
                   help="with --uniform: leave the inputs unquantized")
    p.add_argument("--data", help="text file (default: the embedded wiki.test.raw)")
    p.add_argument("--seqlen", type=int, default=None,
                   help=f"tokens per window (default {DEFAULT_SEQLEN})")
    p.add_argument("--max-windows", type=int, default=None,
                   help="score only the first N windows (quick look; printed with the number)")
    p.add_argument("--join", choices=JOINS, default="file",
                   help="file: the text as it is (default); rows: GPTQ's \\n\\n join of the "
                        "Hugging Face wikitext rows")
    p.add_argument("--batch-size", type=int, default=8,
                   help="windows (with --tasks: lm-eval requests) per forward (default 8)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--save", action="store_true",
                   help="record the result in OUT/eval.json (read by `dmx report`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_task_args(p)
    p.set_defaults(func=run_eval)
    return p


def _model_for_args(args):
    """(model, tokenizer, label) for `dmx eval`, after the cheap checks."""
    from dmx.data import load_model_and_tokenizer
    if args.out is not None and args.model is not None:
        raise DMXError("pass either an OUT directory or --model DIR (not both)")
    if args.out is None and args.model is None:   # said "(not both)" when neither was given
        raise DMXError("nothing to evaluate: pass either an OUT directory or --model DIR")
    if args.out is not None:
        if args.uniform:
            raise DMXError("--uniform goes with --model; an OUT directory has its own formats")
        from dmx.outdir.read import load
        model, tok, _ = load(args.out, device=args.device)
        return model, tok, str(args.out)
    if args.save:
        raise DMXError("--save records into an OUT directory; it does not go with --model")
    fmt = None
    if args.uniform:
        import mxref
        fmt = mxref.get_format(args.uniform).key
    # a compressed-tensors/Quark export loads through transformers, which dequantizes it
    # itself; --uniform needs full-precision nn.Linear weights to quantize
    model, tok = load_model_and_tokenizer(args.model, device=args.device,
                                          quantized_ok=not fmt)
    label = str(args.model)
    if fmt:
        from dmx.search.baseline import quantizable_layers
        from dmx.nn.layers import apply_formats
        names = quantizable_layers(model)
        apply_formats(model, {n: fmt for n in names},
                      {n: None if args.weights_only else fmt for n in names})
        label += f" (uniform {fmt}{', weights only' if args.weights_only else ''})"
    return model, tok, label


def run_eval(args) -> int:
    t0 = time.time()
    from dmx.threads import apply_threads
    apply_threads(args)
    from dmx.eval.zeroshot import check_task_args, run_task_eval
    check_task_args(args)
    if args.data is not None:
        from dmx.data import check_text_files
        check_text_files("--data", [args.data])
    model, tok, label = _model_for_args(args)
    if args.save:   # a damaged eval.json is refused before the evaluation, not after it
        from dmx.outdir.evaljson import load_eval
        load_eval(args.out)
    if args.tasks is not None:
        return run_task_eval(args, model, tok, label)
    seqlen = DEFAULT_SEQLEN if args.seqlen is None else args.seqlen
    result = evaluate(model, tok, args.data, seqlen, args.max_windows, args.join,
                      args.batch_size, progress=not args.no_progress)
    result["model"] = label
    result["wall_time_s"] = round(time.time() - t0, 3)
    ci = result.get("ppl_ci95")
    print(f"{label}: {result['protocol']}"
          + (f" (95 % interval over the windows {ci[0]:.2f}-{ci[1]:.2f})" if ci else ""))
    if args.save:
        from dmx.outdir.evaljson import save_eval
        print(f"dmx eval: recorded in {save_eval(args.out, result)}")
    return 0
