"""How good is the search's first signal? The offsets' gradients at the search's start
(every layer at the ladder's low rung, T = t_start; or at --offsets), per calibration
batch, for the two losses the search can train on -- the next-token cross-entropy (``ce``)
and the KL divergence from the unquantized model (``kl``, ``--distill``) -- against the KL
baseline's per-unit sensitivities (each unit alone at the low rung, a finite difference).

    python benchmarks/bench_gradient_signal.py --kl-out OUT_OF_DMX_BASELINE_KL \\
        [--model DIR] [--batches 8] [--seqlen 128] [--batch-size 4] [--seed 0] [--threads 1]

Reports, per loss: the Spearman correlation of the mean gradient (summed over a fused unit's
layers) with the KL sensitivities; the mean Spearman correlation between the gradients of
two batches (how stable one batch's ranking is); the median |mean| / standard error over
layers (signal to noise); and how many of KL's top-k units the gradient's top-k holds (k:
--top). The gradient is negated: larger = promoting the layer helps more. Calibration
windows are the search's (same text, seqlen, seed, batch order), so batch s is step s's.
``--eval-top K`` also scores, per loss, the one-shot assignment "the K layers with the
largest mean gradient in the high rung, the rest in the low one" (weights and inputs) on the
first --max-windows windows of --eval-seqlen tokens of --eval (the sweep's evaluation):
what the gradient alone would pick, without the search's dynamics. The KL OUT's own
perplexity (its eval.json, if `dmx eval --save` ran with the same protocol) is the row
to compare with. Writes a markdown table to --results (and prints it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling build_smollm2
from build_smollm2 import DEFAULT_OUT  # noqa: E402  (where the benchmarks' model is built)

DEFAULT_MODEL = DEFAULT_OUT.expanduser()


def signal_parser(description: str, kl_help: str, results_name: str):
    """The options every signal benchmark shares: the model, the KL OUT compared with, the
    search's calibration windows and the sweep's evaluation protocol."""
    from dmx import data

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--kl-out", required=True, help=kl_help)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--calib", default=str(data.DATA_DIR / "wikitext-2-raw" / "wiki.valid.raw"))
    p.add_argument("--ladder", default="fp8-fp4")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval", dest="eval_file",
                   default=str(data.DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"))
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"
                                            / "recipes" / results_name))
    return p


def _parse(argv=None):
    p = signal_parser(__doc__.split("\n\n")[0], "OUT of `dmx baseline --method kl` on the "
                      "same model (its manifest holds the sensitivities)", "gradient_signal.md")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--t-start", type=float, default=0.4)
    p.add_argument("--offsets", type=float, nargs="+", default=[0.0],
                   help="raw offsets every layer is set to, one row pair each (default 0: "
                        "the low rung, the search's start; 1: mid-ladder)")
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--eval-top", type=int, default=0,
                   help="score the one-shot top-K assignment of each loss (0: skip)")
    p.add_argument("--error-signs", choices=("fixed", "random"), default="fixed",
                   help="random: batch s applies each layer's quantization errors with the "
                        "signs `dmx search --error-signs random` draws at step s")
    return p.parse_args(argv)


def frozen_model(args):
    """(model, tokenizer) of --model with every weight frozen, in eval mode, on
    --threads threads: what the signal benchmarks wrap and score."""
    import torch

    from dmx import data

    torch.set_num_threads(args.threads)
    model, tok = data.load_model_and_tokenizer(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model, tok


def spearman(a, b) -> float:
    """Rank correlation (no ties among float gradients; numpy only)."""
    import numpy as np

    ra, rb = (np.argsort(np.argsort(np.asarray(x, dtype=float))) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def oneshot_ppl(args, picked: set, names: list, tok) -> float:
    """Perplexity of a fresh copy of the model with ``picked`` in the ladder's high rung
    and the other searched layers in its low one (weights and inputs)."""
    from dmx import data
    from dmx.eval.command import evaluate
    from dmx.nn.layers import apply_formats
    from dmx.quant.ladders import get_ladder

    lad = get_ladder(args.ladder)
    formats = {n: (lad.high.fmt if n in picked else lad.low.fmt) for n in names}
    model, _ = data.load_model_and_tokenizer(args.model)
    apply_formats(model, formats, dict(formats))
    windows = data.eval_windows(tok, args.eval_file, args.eval_seqlen, args.max_windows, "file")
    return evaluate(model, tok, windows=windows, progress=False)["ppl"]


def kl_scored(args) -> dict | None:
    """The KL OUT's saved result on the one-shot assignments' protocol (--eval,
    --eval-seqlen, --max-windows), or None: an OUT scored on several texts keeps them all."""
    from dmx.outdir.evaljson import find_result, load_eval
    return find_result(load_eval(args.kl_out), args.eval_file, args.eval_seqlen,
                       args.max_windows)


def kl_manifest(args) -> Path | None:
    """The KL OUT's manifest, or None after a one-line error (--model and --kl-out are
    the inputs every signal benchmark needs)."""
    manifest = Path(args.kl_out) / "dmx_manifest.json"
    if not Path(args.model).is_dir() or not manifest.is_file():
        print(f"error: need --model DIR (python benchmarks/build_smollm2.py) and a KL OUT "
              f"with dmx_manifest.json (dmx baseline --method kl); got {args.model}, "
              f"{args.kl_out}", file=sys.stderr)
        return None
    return manifest


def main(argv=None) -> int:
    args = _parse(argv)
    manifest = kl_manifest(args)
    if manifest is None:
        return 2
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from dmx import data
    from dmx.nn.layers import dmx_parameters, set_temperature, wrap_model
    from dmx.search.losses import distill_kl, next_token_ce
    from dmx.search.train import (batch_indices, error_signs, forward_logits,
                                  quantization_bypassed)

    sens = json.loads(manifest.read_text())["baseline"]["sensitivity"]
    model, tok = frozen_model(args)
    layers = wrap_model(model, args.ladder, tie_fused=False, parameterization="abs")
    names = list(layers)
    for layer in layers.values():
        layer.hard = False
        layer.train()
    set_temperature(model, args.t_start)
    params = dmx_parameters(model)
    windows = data.calibration_windows(tok, [args.calib], args.seqlen, args.samples, args.seed)
    grads = {(key, b): [] for b in args.offsets for key in ("ce", "kl")}
    t0 = time.time()
    for b in args.offsets:
        with torch.no_grad():
            for p in params:
                p.fill_(b)
        for step in tqdm(range(args.batches), desc=f"batches at offset {b:g}"):
            ids = windows[batch_indices(args.seed, step, windows.shape[0], args.batch_size)]
            with torch.no_grad(), quantization_bypassed(layers):
                ref = forward_logits(model, ids)
            if args.error_signs == "random":
                error_signs(layers, args.seed, step)
            for key in ("ce", "kl"):
                for p in params:
                    p.grad = None
                logits = forward_logits(model, ids)
                loss = next_token_ce(logits, ids) if key == "ce" else distill_kl(logits, ref)
                loss.backward()
                grads[key, b].append([-float(p.grad) for p in params])
    unit_of = {n: u for u in sens for n in u.split("+")}
    units = list(sens)
    missing = set(names) - set(unit_of)
    if missing:
        print(f"error: the KL OUT does not score {len(missing)} of the searched layers "
              f"(e.g. {sorted(missing)[0]}): run both on the same model and layers",
              file=sys.stderr)
        return 2
    kl_top = set(sorted(units, key=lambda u: -sens[u])[:args.top])
    rows = []
    for (key, b), per_batch in grads.items():
        g = np.array(per_batch)
        mean, se = g.mean(0), g.std(0, ddof=1) / np.sqrt(len(g))
        per_unit = {u: 0.0 for u in units}
        for n, v in zip(names, mean):
            per_unit[unit_of[n]] += v
        pairs = [spearman(g[i], g[j]) for i in range(len(g)) for j in range(i + 1, len(g))]
        top = set(sorted(units, key=lambda u: -per_unit[u])[:args.top])
        oneshot = "-"
        if args.eval_top:
            picked = {names[i] for i in np.argsort(-mean)[:args.eval_top]}
            oneshot = f"{oneshot_ppl(args, picked, names, tok):.2f}"
        rows.append(f"| {key} | {b:g} | {spearman([per_unit[u] for u in units], [sens[u] for u in units]):.3f} "
                    f"| {np.mean(pairs):.3f} | {np.median(np.abs(mean) / (se + 1e-30)):.2f} "
                    f"| {len(top & kl_top)} of {args.top} | {oneshot} |")
    kl_result = kl_scored(args)
    kl_ppl = kl_result["protocol"] if kl_result else "not scored on this protocol"
    text = "\n".join([
        "# The search's first signal: gradients at the start vs KL sensitivities", "",
        f"Command: `python benchmarks/bench_gradient_signal.py {' '.join(sys.argv[1:])}`  ",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.time() - t0:.0f} s. "
        f"Model `{args.model}`, {len(names)} layers (untied), {len(units)} KL units; "
        f"{args.batches} batches x {args.batch_size} windows x {args.seqlen} tokens of "
        f"{Path(args.calib).name} (seed {args.seed}); every layer's raw offset set to the "
        f"row's (0: the low rung, where the search starts), T = {args.t_start}.", "",
        "| loss | offset | Spearman(mean gradient, KL sensitivity) | batch-to-batch Spearman "
        f"| median abs(mean)/se | top-{args.top} units shared with KL "
        f"| ppl of the one-shot top-{args.eval_top or 'K'} layers |",
        "|---|---|---|---|---|---|---|", *rows, "",
        f"The KL baseline's own OUT: {kl_ppl}.", ""])
    write_atomically(Path(args.results), text)
    print(text)
    return 0


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path``, never half-written (dmx.outdir.atomic_write_text)."""
    from dmx.outdir import atomic_write_text
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


if __name__ == "__main__":
    sys.exit(main())
