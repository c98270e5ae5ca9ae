"""dMX's combined offsets fused with KL's sensitivities (`dmx combine --kl`), against KL,
KL's own combination of seeds and the dMX combination, on a sweep's work dir.

    python benchmarks/bench_rank_fusion.py --work /work/dmx_unrot2 --targets 4.5 5 6 \\
        --sets 0.1.2 3.4.5 6.7.8 [--threads 1] [--jobs 2] [--results DIR]

The work dir holds what `bench_search_sweep.py --combine --eval-also ...` left there:
``dmx-default-<bits>-s<seed>`` searches, ``dmx-default-<bits>-comb<set>`` combinations and
``kl-default-<bits>-s<seed>`` KL baselines, each scored with `dmx eval --save` on the
texts below. Per budget and seed set this runs the product commands

    dmx combine dmx-default-<bits>-s<a> ... --kl kl-default-<bits>-s<a> ... -o fused-<bits>-<set>
    dmx eval fused-<bits>-<set> --data <text> --seqlen 256 --max-windows 40 --save

(skipped when fused-<bits>-<set> is already scored: rerunning continues), and scores KL's
own combination of the same seeds -- KL's greedy promotion by the summed sensitivities,
at the KL OUTs' budget -- fake-quantized (dmx.nn.layers.apply_formats; no
command writes it), cached in --results/klsum/. Every comparison is paired window by
window (dmx.eval.paired): against KL, each side's window losses averaged over its OUTs
(the sweep's rule), so "fused - KL" of one set is against its 3 KL seeds together. The
pooled row averages the fused OUTs of every set against every KL seed.
``--kl-count N`` fuses with the first N KL seeds of each set only (the cheaper recipe).
A set of one seed (``--sets 0 1 2``) is one search fused with one KL baseline; its "dMX
comb" is then that search itself and its "KL summed" that KL baseline.
Writes --results/rank_fusion.md (rank_fusion-klN.md) and prints it; the commands' logs go
to --results/runs/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling build_smollm2
from build_smollm2 import DEFAULT_OUT  # noqa: E402  (where the benchmarks' model is built)

MODEL = DEFAULT_OUT.expanduser()
TEXTS = {"WikiText": ROOT / "dmx" / "data" / "wikitext-2-raw" / "wiki.test.raw",
         "TinyStories": ROOT / "benchmarks" / "data" / "tinystories" / "eval.txt"}
SEQLEN, WINDOWS = 256, 40


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--targets", nargs="+", default=["4.5", "5", "6"])
    p.add_argument("--sets", nargs="+", default=["0.1.2", "3.4.5", "6.7.8"])
    p.add_argument("--kl-count", type=int, default=None,
                   help="fuse with the first N of each set's KL baselines only (default: "
                        "all); the fused OUTs are then fused-<bits>-<set>-kl<N>")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--results", type=Path,
                   default=ROOT / "benchmarks" / "results" / "recipes-fusion")
    return p.parse_args(argv)


RAN = []  # what this run computed (dmx commands, KL sums); the rest was read from earlier runs


def _dmx(args, name: str, argv: list) -> None:
    """One `dmx` command in its own process, logged to --results/runs/<name>.log."""
    RAN.append(name)
    logs = args.results / "runs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{v: str(args.threads) for v in
                            ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "dmx", *map(str, argv)], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    with open(logs / f"{name}.log", "a") as f:
        f.write(f"$ dmx {' '.join(map(str, argv))}\n{proc.stdout}{proc.stderr}"
                f"[exit {proc.returncode}, {time.time() - t0:.0f} s]\n")
    if proc.returncode:
        raise SystemExit(f"dmx {argv[0]} failed ({name}): {proc.stderr.strip()[-300:]}")


def _result(out: Path, text: Path) -> dict | None:
    from dmx.outdir.evaljson import find_result, load_eval
    return find_result(load_eval(out), text, SEQLEN, WINDOWS)


def fuse(args, bits: str, seeds: list) -> Path:
    """`dmx combine --kl` of one budget and seed set, scored on both texts."""
    w, tag = args.work, ".".join(seeds)
    kl_seeds = seeds[:args.kl_count] if args.kl_count else seeds
    suffix = f"-kl{args.kl_count}" if args.kl_count else ""
    out = w / f"fused-{bits}-{tag}{suffix}"
    if not (out / "dmx_manifest.json").is_file():
        _dmx(args, out.name,
             ["combine", *[w / f"dmx-default-{bits}-s{s}" for s in seeds], "--kl",
              *[w / f"kl-default-{bits}-s{s}" for s in kl_seeds], "-o", out, "--force",
              "--threads", args.threads])
    for name, text in TEXTS.items():
        if _result(out, text) is None:
            _dmx(args, f"eval-{out.name}-{name}",
                 ["eval", out, "--data", text, "--seqlen", SEQLEN, "--max-windows", WINDOWS,
                  "--save", "--no-progress", "--threads", args.threads])
    return out


def score_on_texts(model, tok, windows: int, first: int = 0) -> dict:
    """{text name: {"ppl", "window_nll"}} of a (fake-quantized) model on ``windows``
    windows of SEQLEN tokens of each of TEXTS, from window ``first`` on (0: the first
    ones, as `dmx eval --max-windows` scores them)."""
    import torch

    from dmx import data
    from dmx.eval.command import evaluate

    results = {}
    with torch.no_grad():
        for name, text in TEXTS.items():
            ids, info = data.eval_windows(tok, text, SEQLEN, first + windows, "file")
            if len(ids) < first + windows:
                raise SystemExit(f"{text}: {len(ids)} windows, fewer than {first + windows}")
            r = evaluate(model, tok, windows=(ids[first:], {**info, "windows": windows}),
                         progress=False)
            results[name] = {"ppl": r["ppl"], "window_nll": r["window_nll"]}
    return results


def kl_summed(args, bits: str, seeds: list) -> dict:
    """{text: {"ppl", "window_nll"}} of KL's own combination of ``seeds`` (cached)."""
    from dmx import data
    from dmx.nn.layers import apply_formats
    from dmx.outdir import read_manifest
    from dmx.quant.ladders import get_ladder
    from dmx.search.baseline import greedy_promote
    from dmx.threads import set_threads

    if len(seeds) == 1:  # one seed's own combination is that KL OUT: already scored
        out = args.work / f"kl-default-{bits}-s{seeds[0]}"
        return {name: {k: _result(out, text)[k] for k in ("ppl", "window_nll")}
                for name, text in TEXTS.items()}
    cache = args.results / "klsum" / f"{bits}-{'.'.join(seeds)}.json"
    if cache.is_file():
        return json.loads(cache.read_text())["results"]
    set_threads(args.threads)
    RAN.append(cache.name)
    kls = [read_manifest(args.work / f"kl-default-{bits}-s{s}") for s in seeds]
    names = sorted(kls[0]["layers"])
    total = {(n,): sum(m["baseline"]["sensitivity"][n] for m in kls) for n in names}
    shapes = {n: tuple(e["shape"]) for n, e in kls[0]["layers"].items()}
    # KL's own rule on the summed sensitivities, at the budget the KL OUTs were made for
    formats = greedy_promote(list(total), total, shapes, get_ladder(kls[0]["ladder"]),
                             kls[0]["target_bits"])
    picks = {n for n, f in formats.items() if f != get_ladder(kls[0]["ladder"]).low.fmt}
    model, tok = data.load_model_and_tokenizer(MODEL)
    apply_formats(model, formats, formats)
    results = score_on_texts(model, tok, WINDOWS)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"picks": sorted(picks), "results": results}))
    return results


def _comb(args, bits: str, tag: str) -> Path:
    """The dMX combination of a seed set (of one seed: that search)."""
    one = "." not in tag
    return args.work / f"dmx-default-{bits}-{'s' if one else 'comb'}{tag}"


def _nll(outs: list, text: Path) -> list:
    """The window losses of ``outs`` averaged window by window (the sweep's pooling)."""
    return list(np.mean([_result(o, text)["window_nll"] for o in outs], axis=0))


def main(argv=None) -> int:
    args = _parse(argv)
    from dmx.eval.paired import paired, paired_line

    t0 = time.time()
    jobs = [(b, s.split(".")) for b in args.targets for s in args.sets]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        fused = dict(zip([(b, ".".join(s)) for b, s in jobs],
                         pool.map(lambda j: fuse(args, *j), jobs)))
    summed = {(b, ".".join(s)): kl_summed(args, b, s) for b, s in jobs}
    rows = []
    for b in args.targets:
        for name, text in TEXTS.items():
            every_kl = []
            for tag in args.sets:
                seeds = tag.split(".")
                kls = [args.work / f"kl-default-{b}-s{s}" for s in seeds]
                every_kl += kls
                comb = _comb(args, b, tag)
                f = _nll([fused[b, tag]], text)
                cells = [paired_line(paired(_nll(kls, text), f)),
                         paired_line(paired(summed[b, tag][name]["window_nll"], f)),
                         paired_line(paired(_nll([comb], text), f)),
                         paired_line(paired(_nll(kls, text), _nll([comb], text)))]
                ppl = (f"{_result(fused[b, tag], text)['ppl']:.2f} | "
                       f"{np.mean([_result(k, text)['ppl'] for k in kls]):.2f} | "
                       f"{summed[b, tag][name]['ppl']:.2f} | {_result(comb, text)['ppl']:.2f}")
                rows.append(f"| {b} | {name} | {tag} | {ppl} | " + " | ".join(cells) + " |")
            pooled_f = _nll([fused[b, t] for t in args.sets], text)
            pooled_c = _nll([_comb(args, b, t) for t in args.sets], text)
            pooled_s = list(np.mean([summed[b, t][name]["window_nll"] for t in args.sets],
                                    axis=0))
            rows.append(f"| {b} | {name} | pooled | - | - | - | - | "
                        f"{paired_line(paired(_nll(every_kl, text), pooled_f))} | "
                        f"{paired_line(paired(pooled_s, pooled_f))} | "
                        f"{paired_line(paired(pooled_c, pooled_f))} | "
                        f"{paired_line(paired(_nll(every_kl, text), pooled_c))} |")
    only = f" (the first {args.kl_count} only)" if args.kl_count else ""
    text = "\n".join([
        "# dMX combined and fused with KL (`dmx combine --kl`) against KL", "",
        f"Command: `python benchmarks/bench_rank_fusion.py {' '.join(sys.argv[1:])}`  ",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.time() - t0:.0f} s"
        f"{'' if RAN else ' (every result read from earlier runs: their time is in runs/)'}. "
        f"Work dir `{args.work}`; evaluation: the first {WINDOWS} windows x {SEQLEN} of each "
        f"text, every token scored. fused = `dmx combine` of the set's searches `--kl` the "
        f"set's KL baselines{only}; KL = the set's KL seeds (ppl: their mean; paired: "
        f"their window losses averaged); KL summed = KL's own combination of the set's seeds "
        f"(fake-quantized); dMX comb = `dmx combine` of the set's searches alone. Paired "
        f"differences (95 % interval over the windows; tie when it includes 0): the first "
        f"minus the second.", "",
        "| bits | text | seeds | fused ppl | KL ppl (mean) | KL summed ppl | dMX comb ppl "
        "| fused − KL | fused − KL summed | fused − dMX comb | dMX comb − KL |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""])
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"rank_fusion{'-kl%d' % args.kl_count if args.kl_count else ''}.md"
     ).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
