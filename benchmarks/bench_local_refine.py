"""Is there room above a finished assignment? An in-context local search, as a probe.

Every assignment method here ranks the layers in a context other than the final one: KL
scores each layer alone in the unquantized model, dMX's gradients are mostly taken while
every layer is still MXFP4. This probe measures, *around the finished assignment* of
``--start`` (an OUT of the fp8-fp4 ladder, weights and inputs quantized, untied), the exact
effect of flipping each layer alone: the harm of demoting each MXFP8 layer and the gain of
promoting each of the ``--candidates`` MXFP4 layers the start ranked highest (a fused OUT's
recorded scores, else all of them), as the mean per-token KL from the unquantized model on
``--windows`` calibration windows (the search's text, seqlen and seed). It then swaps the
best promotion with the cheapest demotion, the second with the second, ... while the
swap's gain beats its harm by more than ``--min-t`` paired standard errors (over the
windows) and at most ``--max-swaps`` times: the budget (simple average) is unchanged.
With ``--rounds`` > 1 it measures again around the swapped assignment.

Both assignments are then scored on the sweep's evaluations (the first --max-windows
windows of --eval-seqlen tokens of each --eval), paired window by window: what a
context-aware pick could add to the start, on data the probe never saw.

    python benchmarks/bench_local_refine.py --start OUT [--start OUT ...] [--model DIR]
        [--windows 16] [--candidates 40] [--max-swaps 8] [--min-t 2] [--rounds 1]

Cost: (MXFP8 layers + candidates) x windows / 4 forward passes of 4 x 128 tokens per round
(about 10-20 min for SmolLM2-135M on one CPU thread), plus two evaluations per text.
Writes a markdown table to --results (and prints it) and the swaps next to it (.json).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gradient_signal import DEFAULT_MODEL, write_atomically  # noqa: E402

BATCH = 4
REPO = Path(__file__).resolve().parents[1]


def _parse(argv=None):
    from dmx import data
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--start", action="append", required=True,
                   help="OUT whose assignment is refined (repeatable)")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--windows", type=int, default=16,
                   help="calibration windows measured (a multiple of 4)")
    p.add_argument("--candidates", type=int, default=40,
                   help="MXFP4 layers probed for promotion (0: all)")
    p.add_argument("--max-swaps", type=int, default=8)
    p.add_argument("--min-t", type=float, default=2.0,
                   help="a swap needs gain - harm > min_t x its paired standard error")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval", dest="eval_files", action="append",
                   help="held-out texts (default: wiki.test.raw and TinyStories eval.txt)")
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "local_refine"
                                            / "local_refine.md"))
    args = p.parse_args(argv)
    if args.windows <= 0 or args.windows % BATCH:
        p.error(f"--windows must be a positive multiple of {BATCH}, got {args.windows}")
    if args.eval_files is None:
        args.eval_files = [str(data.DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"),
                           str(REPO / "benchmarks" / "data" / "tinystories" / "eval.txt")]
    return args


def _start_of(out: Path, lad) -> tuple[dict, dict, list]:
    """(formats, config, probe order of the low layers) of a finished OUT."""
    m = json.loads((out / "dmx_manifest.json").read_text())
    if m["ladder"] != lad.name:
        raise SystemExit(f"error: {out} is on ladder {m['ladder']}; this probe needs "
                         f"{lad.name}")
    formats = {n: v["format"] for n, v in m["layers"].items()}
    if any(v.get("act_format") != v["format"] for v in m["layers"].values()):
        raise SystemExit(f"error: {out} leaves some inputs unquantized or in another "
                         "format; this probe flips weights and inputs together")
    search = m.get("search") or {}
    cfg = search.get("config") or {}
    scores = ((search.get("combined") or {}).get("kl") or {}).get("scores")
    low = [n for n, f in formats.items() if f == lad.low.fmt]
    if scores:  # a fused OUT: its own ranking says which low layers were near the cut
        low.sort(key=lambda n: -scores[n])
    return formats, cfg, low


def _kl_per_window(logits, ref_logp):
    """Mean per-token KL(reference || quantized) of each window: a [batch] tensor."""
    import torch.nn.functional as F
    log_q = F.log_softmax(logits.float(), dim=-1)
    return F.kl_div(log_q, ref_logp, log_target=True, reduction="none").sum(-1).mean(-1)


def _measure(model, layers, windows, refs, names, lad, desc):
    """{name: per-window KL change of flipping that layer alone} around the current
    assignment (positive = the model gets worse), and the current per-window KL."""
    import torch
    from tqdm.auto import tqdm

    from dmx.search.train import forward_logits

    def kl_now():
        return torch.cat([_kl_per_window(forward_logits(model, windows[i:i + BATCH]), refs[i])
                          for i in range(0, len(windows), BATCH)])

    other = {lad.low.fmt: lad.high.fmt, lad.high.fmt: lad.low.fmt}
    with torch.no_grad():
        base = kl_now()
        delta = {}
        for n in tqdm(names, desc=desc):
            layer, was = layers[n], layers[n].weight_fmt
            layer.weight_fmt = layer.act_fmt = other[was]
            delta[n] = (kl_now() - base).tolist()
            layer.weight_fmt = layer.act_fmt = was
    return delta, base.tolist()


def _mean_se(d: list) -> tuple[float, float]:
    n = len(d)
    mean = math.fsum(d) / n
    var = math.fsum((x - mean) ** 2 for x in d) / (n - 1)
    return mean, math.sqrt(var / n)


def choose_swaps(harm: dict, gain: dict, max_swaps: int, min_t: float) -> list:
    """[(demoted, promoted, mean, se)]: the k-th best promotion paired with the k-th
    cheapest demotion while gain - harm (per window) exceeds min_t standard errors.
    ``harm``: {high layer: per-window KL increase when demoted}; ``gain``: {low layer:
    per-window KL decrease when promoted}. Assumes the flips add up (few swaps)."""
    demote = sorted(harm, key=lambda n: math.fsum(harm[n]))
    promote = sorted(gain, key=lambda n: -math.fsum(gain[n]))
    swaps = []
    for d, p in zip(demote, promote):
        if len(swaps) >= max_swaps:
            break
        mean, se = _mean_se([g - h for g, h in zip(gain[p], harm[d])])
        if mean <= min_t * se:
            break
        swaps.append((d, p, mean, se))
    return swaps


def _ppl_with(args, formats, tok, eval_file):
    from dmx import data
    from dmx.eval.command import evaluate
    from dmx.nn.layers import apply_formats

    model, _ = data.load_model_and_tokenizer(args.model)
    apply_formats(model, formats, dict(formats))
    windows = data.eval_windows(tok, eval_file, args.eval_seqlen, args.max_windows, "file")
    return evaluate(model, tok, windows=windows, progress=False)


def refine(args, out: Path, lad, model, tok) -> dict:
    import torch
    import torch.nn.functional as F

    from dmx import data
    from dmx.nn.layers import apply_formats
    from dmx.search.train import forward_logits

    formats, cfg, low_order = _start_of(out, lad)
    calib = cfg.get("calib") or [str(data.DATA_DIR / "wikitext-2-raw" / "wiki.valid.raw")]
    seqlen, samples, seed = cfg.get("seqlen", 128), cfg.get("samples", 96), cfg.get("seed", 0)
    windows = data.calibration_windows(tok, calib, seqlen, samples, seed)[:args.windows]
    with torch.no_grad():
        refs = {i: F.log_softmax(forward_logits(model, windows[i:i + BATCH]).float(), -1)
                for i in range(0, len(windows), BATCH)}
    layers = apply_formats(model, formats, dict(formats))
    current, rounds = dict(formats), []
    for r in range(args.rounds):
        high = [n for n, f in current.items() if f == lad.high.fmt]
        low = [n for n in low_order if current[n] == lad.low.fmt]
        low += [n for n, f in current.items() if f == lad.low.fmt and n not in low]
        if args.candidates:
            low = low[:args.candidates]
        harm, base = _measure(model, layers, windows, refs, high, lad,
                              f"{out.name} round {r + 1}: demote")
        inc, _ = _measure(model, layers, windows, refs, low, lad,
                          f"{out.name} round {r + 1}: promote")
        gain = {n: [-x for x in v] for n, v in inc.items()}
        swaps = choose_swaps(harm, gain, args.max_swaps, args.min_t)
        for d, p, _, _ in swaps:
            current[d], current[p] = lad.low.fmt, lad.high.fmt
            layers[d].weight_fmt = layers[d].act_fmt = lad.low.fmt
            layers[p].weight_fmt = layers[p].act_fmt = lad.high.fmt
        rounds.append({"base_kl": math.fsum(base) / len(base), "measured_high": len(high),
                       "measured_low": len(low),
                       "swaps": [{"demoted": d, "promoted": p, "kl_gain": m, "se": s}
                                 for d, p, m, s in swaps]})
        if not swaps:
            break
    return {"start": str(out), "calib": calib, "seqlen": seqlen, "seed": seed,
            "formats": current, "start_formats": formats, "rounds": rounds}


def main(argv=None) -> int:
    args = _parse(argv)
    import torch

    from dmx import data
    from dmx.eval.paired import paired, paired_cell
    from dmx.quant.ladders import get_ladder

    torch.set_num_threads(args.threads)
    lad = get_ladder("fp8-fp4")
    t0 = time.time()
    rows, records = [], []
    for start in map(Path, args.start):
        if not (start / "dmx_manifest.json").is_file():
            print(f"error: --start {start}: no dmx_manifest.json (an OUT of dmx search, "
                  "combine or baseline)", file=sys.stderr)
            return 2
        model, tok = data.load_model_and_tokenizer(args.model)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        rec = refine(args, start, lad, model, tok)
        del model
        swaps = sum(len(r["swaps"]) for r in rec["rounds"])
        cells = []
        for eval_file in args.eval_files:
            if swaps:
                a = _ppl_with(args, rec["start_formats"], tok, eval_file)
                b = _ppl_with(args, rec["formats"], tok, eval_file)
                pr = paired(a["window_nll"], b["window_nll"])
                cells.append(f"{pr['ppl_a']:.2f} -> {pr['ppl_b']:.2f}, {paired_cell(pr)}")
                rec.setdefault("eval", {})[Path(eval_file).name] = pr
            else:
                cells.append("no swap passed")
        r0 = rec["rounds"][0]
        rows.append(f"| {start.name} | {r0['measured_high']} + {r0['measured_low']} | "
                    f"{swaps} | {' | '.join(cells)} |")
        records.append(rec)
        print(rows[-1], flush=True)
    texts = " | ".join(Path(f).name for f in args.eval_files)
    text = "\n".join([
        "# In-context local search around finished assignments (a probe)", "",
        f"Command: `python benchmarks/bench_local_refine.py {' '.join(sys.argv[1:])}`  ",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.time() - t0:.0f} s. "
        f"Model `{args.model}`; flips measured on the first {args.windows} calibration "
        f"windows of each start's search (its text, seqlen, seed) as the mean per-token KL "
        f"from the unquantized model; swaps need gain - harm > {args.min_t} paired SE, at "
        f"most {args.max_swaps} per round, {args.rounds} round(s). Scored on the first "
        f"{args.max_windows} windows x {args.eval_seqlen} of each text: start -> refined, "
        "refined - start (paired 95 %).", "",
        f"| start | layers measured (high + low) | swaps | {texts} |",
        "|---|---|---|" + "---|" * len(args.eval_files), *rows, ""])
    out = Path(args.results)
    write_atomically(out.with_suffix(".json"), json.dumps(records, indent=1))
    write_atomically(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
