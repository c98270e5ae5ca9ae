"""How much is the ranking worth? Alternative picks of the same size, scored like the sweep.

For each budget of a finished `bench_search_sweep.py` work dir (two-rung ladder, every
linear its own unit), this scores on each text, with the sweep's protocol:

* ``random-rK``: K units in the high format drawn at random (seeds 0, 1, 2), K being the
  number the searches promoted (the same bits);
* ``reverse-kl``: the K units KL finds *least* sensitive (seed 0's sensitivities);
* ``kl-summed``: KL's ranking from the sensitivities of all the seeds summed (KL given the
  calibration of every seed: the counterpart of combining dMX seeds);
The searched, KL and combined (`dmx combine`, sweep `--combine`) OUTs are in the sweep's
table; this script only adds the picks no command writes. Results: <results>/headroom.json and headroom.md.

    python benchmarks/bench_pick_headroom.py --work /work/dmx_unrot2 --targets 4.5 5 6 \
        --seeds 0 1 2 --eval-also benchmarks/data/tinystories/eval.txt \
        --results benchmarks/results/recipes-ensemble
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmx import data  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling build_smollm2
from build_smollm2 import DEFAULT_OUT  # noqa: E402  (where the benchmarks' model is built)

DEFAULT_MODEL = DEFAULT_OUT.expanduser()


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--work", required=True, help="the sweep's work dir (its OUTs)")
    p.add_argument("--recipe", default="default")
    p.add_argument("--targets", type=float, nargs="+", default=[5.0, 6.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval", dest="eval_file", default=str(data.default_eval_file()))
    p.add_argument("--eval-also", nargs="*", default=[])
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", required=True)
    return p.parse_args(argv)


def _high_units(manifest: dict, high: str) -> set:
    return {n for n, e in manifest["layers"].items() if e["format"] == high}


def picks(work: Path, recipe: str, target: float, seeds: list) -> tuple[dict, list, str, str]:
    """({pick name: set of units in the high format}, units, low format, high format)."""
    from dmx.outdir import read_manifest
    from dmx.quant.ladders import get_ladder

    searches = [work / f"dmx-{recipe}-{target:g}-s{s}" for s in seeds]
    first = read_manifest(searches[0])
    lad = get_ladder(first["ladder"])
    if len(lad.rungs) != 2:
        raise SystemExit("bench_pick_headroom: two-rung ladders only (a pick is a set)")
    units = list(first["layers"])
    k = len(_high_units(first, lad.high.fmt))
    sens = [read_manifest(work / f"kl-{recipe}-{target:g}-s{s}")["baseline"]["sensitivity"]
            for s in seeds]
    if any("+" in key for key in sens[0]):
        raise SystemExit("bench_pick_headroom: KL units are fused groups; pass an untied sweep")

    def top(score: dict) -> set:
        return set(sorted(units, key=lambda n: -score[n])[:k])

    out = {f"random-r{r}": set(random.Random(r).sample(units, k)) for r in (0, 1, 2)}
    out["reverse-kl"] = set(sorted(units, key=lambda n: sens[0][n])[:k])
    out["kl-summed"] = top({n: sum(s[n] for s in sens) for n in units})
    return out, units, lad.low.fmt, lad.high.fmt


def main(argv=None) -> int:
    import torch

    from dmx.eval.command import evaluate
    from dmx.nn.layers import apply_formats
    from dmx.threads import set_threads

    args = _parse(argv)
    set_threads(args.threads)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / "headroom.json"
    scores = json.loads(path.read_text()) if path.is_file() else {}
    _, tok = data.load_model_and_tokenizer(args.model)
    texts = [args.eval_file, *args.eval_also]
    windows = {t: data.eval_windows(tok, Path(t), args.eval_seqlen, args.max_windows, "file")
               for t in texts}
    for target in args.targets:
        chosen, units, low, high = picks(Path(args.work), args.recipe, target, args.seeds)
        for name, high_units in chosen.items():
            key = f"{target:g}/{name}/seeds{'.'.join(map(str, args.seeds))}"
            if key in scores:
                continue
            model, _ = data.load_model_and_tokenizer(args.model)
            formats = {n: (high if n in high_units else low) for n in units}
            apply_formats(model, formats, formats)
            with torch.no_grad():
                scores[key] = {Path(t).name: evaluate(model, tok, windows=windows[t],
                                                      progress=False)["ppl"] for t in texts}
            print(f"[{time.strftime('%H:%M:%S')}] {key}: {scores[key]}", flush=True)
            path.write_text(json.dumps(scores, indent=1) + "\n")
    names = [Path(t).name for t in texts]
    lines = ["# Alternative picks at the searches' bits (bench_pick_headroom.py)", "",
             f"Command: `python benchmarks/bench_pick_headroom.py {' '.join(sys.argv[1:])}`",
             "", f"| budget | pick | {' | '.join(names)} |",
             "|---|---|" + "---|" * len(names)]
    for key, row in scores.items():
        target, name, seeds = key.split("/")
        lines.append(f"| {target} | {name} ({seeds}) | "
                     + " | ".join(f"{row[n]:.2f}" for n in names) + " |")
    (results / "headroom.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {results / 'headroom.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
