"""Does the search lose to KL because it optimizes badly or because it optimizes the wrong
thing? Scores pairs of OUT dirs (a dMX search and the KL baseline at the same bits) on the
search's own calibration windows (its manifest's text, seqlen, samples and seed: what its
loss saw), on held-out windows of the calibration text, and reads their saved evaluation.

* The search's pick worse than KL's on its own windows: an optimization failure (its
  objective prefers KL's pick and it did not find it).
* Better on its own windows but worse held out: its windows cannot tell the two apart
  (too few tokens for the differences at stake).

    python benchmarks/bench_calib_fit.py --pairs DMX_OUT:KL_OUT [DMX_OUT:KL_OUT ...] \\
        [--held-out-windows 40] [--held-out-seqlen 256] [--threads 1] [--results FILE.md]

Held out: the first --held-out-windows windows of --held-out-seqlen tokens of the search's calibration
file (wiki.valid.raw by default: the sweep's searches drew 96 of its ~1,700 windows of 128
at random, so about 6 % of these tokens were seen). Each OUT is loaded as `dmx eval` loads
it (packed weights decoded by mxref). Writes a markdown table to --results
(and prints it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gradient_signal import write_atomically  # noqa: E402

HELD_OUT_SEQLEN = 256


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", nargs="+", required=True, metavar="DMX_OUT:KL_OUT")
    p.add_argument("--held-out-windows", type=int, default=40)
    p.add_argument("--held-out-seqlen", type=int, default=HELD_OUT_SEQLEN)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"
                                            / "recipes" / "calib_fit.md"))
    args = p.parse_args(argv)
    pairs = []
    for spec in args.pairs:
        dmx_out, sep, kl_out = spec.partition(":")
        if not sep or not dmx_out or not kl_out:
            p.error(f"--pairs takes DMX_OUT:KL_OUT, got {spec!r}")
        pairs.append((Path(dmx_out), Path(kl_out)))
    args.pairs = pairs
    return args


def search_windows(dmx_out: Path, tokenizer):
    """The calibration windows the search in ``dmx_out`` trained on (its manifest's
    config: text, seqlen, samples, seed) -- dmx.data.calibration_windows, as the search."""
    from dmx import data
    cfg = json.loads((dmx_out / "dmx_manifest.json").read_text())["search"]["config"]
    files = cfg.get("calib") or [str(data.default_calibration_file())]
    samples = cfg.get("samples") or cfg["steps"] * cfg["batch_size"]
    return data.calibration_windows(tokenizer, files, cfg["seqlen"], samples,
                                    cfg["seed"]), files[0]


def _saved_ppl(out: Path):
    from dmx.outdir.evaljson import latest_eval
    result = latest_eval(out)
    return None if result is None else result["ppl"]


def main(argv=None) -> int:
    args = _parse(argv)
    import torch

    from dmx import data
    from dmx.eval.command import perplexity
    from dmx.outdir.read import load

    torch.set_num_threads(args.threads)
    rows = []
    for dmx_out, kl_out in args.pairs:
        for out in (dmx_out, kl_out):
            if not (out / "dmx_manifest.json").is_file():
                print(f"error: {out} is not an OUT directory (no dmx_manifest.json)",
                      file=sys.stderr)
                return 2
        tok = data.load_tokenizer(dmx_out)
        calib, calib_file = search_windows(dmx_out, tok)
        held, _ = data.eval_windows(tok, calib_file, args.held_out_seqlen,
                                    args.held_out_windows)
        scores = []
        for out in (dmx_out, kl_out):
            model, _, _ = load(out, device="cpu")
            scores.append({"calib": perplexity(model, calib, progress=False)["ppl"],
                           "held": perplexity(model, held, progress=False)["ppl"],
                           "eval": _saved_ppl(out)})
            del model
        d, k = scores
        verdict = ("search's pick worse on its own windows (optimization)"
                   if d["calib"] > k["calib"] else
                   "better on its own windows, worse held out (too few tokens)"
                   if d["held"] > k["held"] else "better on both")
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        rows.append(f"| {dmx_out.name} | {kl_out.name} | {d['calib']:.2f} | {k['calib']:.2f} "
                    f"| {d['held']:.2f} | {k['held']:.2f} | {fmt(d['eval'])} | {fmt(k['eval'])} "
                    f"| {verdict} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        "# The search's pick and KL's on the search's own calibration windows", "",
        f"Command: `python benchmarks/bench_calib_fit.py {' '.join(sys.argv[1:])}`", "",
        f"Own windows: the search's calibration windows (its manifest's text, seqlen, "
        f"samples, seed). Held out: the first {args.held_out_windows} windows of "
        f"{args.held_out_seqlen} tokens of the same file (the search drew its windows at random "
        f"from the whole file, so a few of them overlap). Eval: each OUT's saved eval.json.", "",
        "| dMX OUT | KL OUT | dMX own windows | KL own windows | dMX held out | KL held out "
        "| dMX eval | KL eval | reading |",
        "|---|---|---|---|---|---|---|---|---|", *rows, ""])
    write_atomically(Path(args.results), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
