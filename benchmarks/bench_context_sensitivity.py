"""Which context ranks the layers right at a low budget? Two exact finite differences per
linear (untied), on the first --windows calibration windows of the search (same text,
seqlen, seed), both as the mean per-token KL from the unquantized model:

* in context: ``gain_i = KL(all layers low) - KL(all low but layer i high)``: the benefit
  of promoting layer i in the model the search starts from (every layer at the low rung).
  dMX's gradient at the start is the first-order estimate of exactly this.
* isolated: ``sens_i = KL(only layer i low, the rest unquantized)``: the KL baseline's
  measure (per layer here, where the baseline scores fused units).

Then scores the one-shot assignment "the --top K layers of each score in the high rung,
the rest in the low one" (weights and inputs) on the first --max-windows windows of
--eval-seqlen tokens of --eval (the recipe sweep's evaluation), and says how many of its
layers the KL baseline's own assignment (--kl-out) shares.

    python benchmarks/bench_context_sensitivity.py --kl-out OUT_OF_DMX_BASELINE_KL \\
        [--model DIR] [--seed 0] [--top 26] [--windows 8] [--threads 1]

One forward pass per layer and score: 2 x layers x windows/4 passes of the quantized model
(about 30 min for SmolLM2-135M's 210 linears on one CPU thread). Writes a markdown table to
--results (and prints it) and the raw scores next to it (.json).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gradient_signal import (frozen_model, kl_manifest, kl_scored,  # noqa: E402
                                   oneshot_ppl, signal_parser, spearman, write_atomically)

BATCH = 4


def _parse(argv=None):
    p = signal_parser(__doc__.split("\n\n")[0], "OUT of `dmx baseline --method kl` at the "
                      "budget compared (its assignment is the reference; its eval.json, if "
                      "saved, its ppl)", "context_sensitivity.md")
    p.add_argument("--windows", type=int, default=8, help="calibration windows scored (a "
                   "multiple of 4)")
    p.add_argument("--top", type=int, default=0, help="layers promoted in the one-shot "
                   "assignments (default: as many as the KL OUT promotes, its budget)")
    p.add_argument("--scores", help="the .json an earlier run wrote: reuse its scores "
                   "(same model, windows, seed) and only score the one-shot assignments, "
                   "e.g. at another budget's --kl-out")
    args = p.parse_args(argv)
    if args.windows <= 0 or args.windows % BATCH:
        p.error(f"--windows must be a positive multiple of {BATCH}, got {args.windows}")
    return args


def _score_layers(args, lad, model, tok):
    """(names, base, in_context, isolated): the two finite differences of every linear."""
    import torch
    from tqdm.auto import tqdm

    from dmx import data
    from dmx.nn.layers import wrap_model
    from dmx.search.losses import distill_kl
    from dmx.search.train import forward_logits

    layers = wrap_model(model, lad, tie_fused=False, parameterization="abs")
    names = list(layers)
    for layer in layers.values():
        layer.hard = True  # every layer on its rung: raw offset 0 = low, high.position = high
        layer.eval()
    low, high = lad.low.position, lad.high.position
    windows = data.calibration_windows(tok, [args.calib], args.seqlen, args.samples,
                                       args.seed)[:args.windows]
    starts = range(0, args.windows, BATCH)

    def bypass(layer):
        layer.forward = layer.linear.forward  # instance attribute: the plain nn.Linear

    def restore(layer):
        layer.__dict__.pop("forward", None)

    def kl_now() -> float:
        return sum(float(distill_kl(forward_logits(model, windows[i:i + BATCH]), refs[i]))
                   for i in starts) / len(starts)

    with torch.no_grad():
        for layer in layers.values():
            bypass(layer)
        refs = {i: forward_logits(model, windows[i:i + BATCH]) for i in starts}
        isolated = {}
        for n in tqdm(names, desc="isolated (one layer low)"):
            restore(layers[n])
            layers[n].offset.fill_(low)
            isolated[n] = kl_now()
            bypass(layers[n])
        for layer in layers.values():
            restore(layer)
            layer.offset.fill_(low)
        base = kl_now()
        in_context = {}
        for n in tqdm(names, desc="in context (all low, one high)"):
            layers[n].offset.fill_(high)
            in_context[n] = base - kl_now()
            layers[n].offset.fill_(low)
    return names, base, in_context, isolated


def main(argv=None) -> int:
    args = _parse(argv)
    manifest = kl_manifest(args)
    if manifest is None:
        return 2
    from dmx.quant.ladders import get_ladder

    lad = get_ladder(args.ladder)
    kl_layers = json.loads(manifest.read_text())["layers"]
    kl_set = {n for n, v in kl_layers.items() if v["format"] != lad.low.fmt}
    top = args.top or len(kl_set)
    if args.scores:
        import torch

        from dmx.data import load_tokenizer
        torch.set_num_threads(args.threads)
        tok = load_tokenizer(args.model)  # the one-shot scores load their own models
        try:
            saved = json.loads(Path(args.scores).read_text())
            base, in_context, isolated = (saved["base_kl"], saved["in_context_gain"],
                                          saved["isolated_kl"])
        except (OSError, ValueError, KeyError) as e:
            print(f"error: --scores {args.scores}: not the .json of an earlier run ({e})",
                  file=sys.stderr)
            return 2
        if saved.get("seed") != args.seed:
            print(f"error: --scores {args.scores} holds seed {saved.get('seed')}'s scores; "
                  f"pass --seed {saved.get('seed')}", file=sys.stderr)
            return 2
        names, scored = list(isolated), f"scores from {args.scores}"
    else:
        model, tok = frozen_model(args)
        t0 = time.time()
        names, base, in_context, isolated = _score_layers(args, lad, model, tok)
        scored = f"{time.time() - t0:.0f} s to score"
    rows = []
    for label, score in (("in context: all low, one layer promoted", in_context),
                         ("isolated: one layer low, the rest unquantized", isolated)):
        picked = set(sorted(names, key=lambda n: -score[n])[:top])
        ppl = oneshot_ppl(args, picked, names, tok)
        rows.append(f"| {label} | {ppl:.2f} | {len(picked & kl_set)} of {len(kl_set)} |")
    kl_result = kl_scored(args)
    kl_ppl = f"{kl_result['ppl']:.2f}" if kl_result else "not scored on this protocol"
    rows.append(f"| the KL baseline's assignment (fused units, greedy to the budget) | "
                f"{kl_ppl} | {len(kl_set)} of {len(kl_set)} |")
    text = "\n".join([
        "# Which context ranks the layers right? In-context vs isolated finite differences",
        "", f"Command: `python benchmarks/bench_context_sensitivity.py "
        f"{' '.join(sys.argv[1:])}`  ",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {scored}. "
        f"Model `{args.model}`, {len(names)} linears (untied), ladder {lad.name}; "
        f"{args.windows} windows x {args.seqlen} tokens of {Path(args.calib).name} "
        f"(seed {args.seed}). KL(unquantized || all layers low) = {base:.4f}. "
        f"Spearman(in-context gain, isolated sensitivity) = "
        f"{spearman([in_context[n] for n in names], [isolated[n] for n in names]):.3f}.",
        "", f"One-shot assignments: the top {top} layers of each score in "
        f"{lad.high.fmt}, the rest in {lad.low.fmt} (weights and inputs); ppl on the first "
        f"{args.max_windows} windows x {args.eval_seqlen} of {Path(args.eval_file).name}.", "",
        "| layers ranked by | ppl | layers shared with KL's assignment |",
        "|---|---|---|", *rows, ""])
    out = Path(args.results)
    write_atomically(out.with_suffix(".json"), json.dumps(
        {"seed": args.seed, "base_kl": base, "in_context_gain": in_context,
         "isolated_kl": isolated}, indent=1))
    write_atomically(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
