"""Diagnostic: exact one-layer swaps in an assignment's own context (2026-12-06).

For an OUT's assignment A (two rungs): cost_j = KL(A with j demoted) - KL(A) for every
promoted j, gain_i = KL(A) - KL(A with i promoted) for every other i (mean per-token KL
from the unquantized model on the first --windows calibration windows of --seed). Greedy
swaps (best gain for cheapest cost while gain > cost) keep the bits. Scores A and the
polished assignment on 40 x 256 of both texts, paired window by window.

    PYTHONPATH=. python benchmarks/results/recipes-ensemble/diagnostics/polish_in_context.py OUT TAG [--seed S] [--windows 8]
"""
import argparse, json, sys, time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dmx import data
from dmx.eval.command import evaluate
from dmx.eval.paired import paired, paired_line
from dmx.nn.layers import apply_formats, wrap_model
from dmx.quant.ladders import get_ladder
from dmx.search.losses import distill_kl
from dmx.search.train import forward_logits

p = argparse.ArgumentParser()
p.add_argument("out"); p.add_argument("tag")
p.add_argument("--seed", type=int, default=0); p.add_argument("--windows", type=int, default=8)
p.add_argument("--threads", type=int, default=1)
a = p.parse_args()
torch.set_num_threads(a.threads)
MODEL = Path.home() / ".cache/dmx/smollm2-135m-instruct-f32"
TEXTS = ["/work/bg/dmx/data/wikitext-2-raw/wiki.test.raw", "/work/bg/benchmarks/data/tinystories/eval.txt"]
CALIB = "/work/bg/dmx/data/wikitext-2-raw/wiki.valid.raw"
lad = get_ladder("fp8-fp4")
man = json.loads((Path(a.out) / "dmx_manifest.json").read_text())
names = sorted(man["layers"])
A = {n for n in names if man["layers"][n]["format"] == lad.high.fmt}
print(a.tag, "promoted", len(A), flush=True)

model, tok = data.load_model_and_tokenizer(MODEL)
for q in model.parameters(): q.requires_grad_(False)
model.eval()
layers = wrap_model(model, lad, tie_fused=False, parameterization="abs")
for l in layers.values(): l.hard = True; l.eval()
win = data.calibration_windows(tok, [CALIB], 128, 96, a.seed)[:a.windows]
starts = range(0, a.windows, 4)
def bypass(l): l.forward = l.linear.forward
def restore(l): l.__dict__.pop("forward", None)
def kl_now():
    return sum(float(distill_kl(forward_logits(model, win[i:i+4]), refs[i])) for i in starts) / len(starts)
def set_assign(S):
    for n, l in layers.items(): l.offset.fill_(lad.high.position if n in S else lad.low.position)
t0 = time.time()
with torch.no_grad():
    for l in layers.values(): bypass(l)
    refs = {i: forward_logits(model, win[i:i+4]) for i in starts}
    for l in layers.values(): restore(l)
    set_assign(A); base = kl_now()
    delta = {}
    for n in tqdm(names, desc=a.tag):
        hi = n in A
        layers[n].offset.fill_(lad.low.position if hi else lad.high.position)
        k = kl_now()
        delta[n] = (k - base) if hi else (base - k)  # cost if promoted, gain if not
        layers[n].offset.fill_(lad.high.position if hi else lad.low.position)
print(f"{a.tag}: base KL {base:.4f}, {time.time()-t0:.0f} s", flush=True)
gains = sorted((n for n in names if n not in A), key=lambda n: -delta[n])
costs = sorted(A, key=lambda n: delta[n])
swaps = []
for gi, cj in zip(gains, costs):
    if delta[gi] <= delta[cj]: break
    swaps.append((cj, gi))
P = (A - {c for c, _ in swaps}) | {g for _, g in swaps}
print("swaps (out -> in, cost, gain):")
for c, g in swaps: print(f"  {c} ({delta[c]:.4f}) -> {g} ({delta[g]:.4f})")
print("top gains:", [(n, round(delta[n], 4)) for n in gains[:12]])
print("lowest costs:", [(n, round(delta[n], 4)) for n in costs[:12]])
res = {"tag": a.tag, "base": base, "delta": delta, "A": sorted(A), "P": sorted(P), "swaps": swaps}
wins = {t: data.eval_windows(tok, Path(t), 256, 40, "file") for t in TEXTS}
sc = {}
for lab, S in (("orig", A), ("polished", P)):
    m2, _ = data.load_model_and_tokenizer(MODEL)
    f = {n: (lad.high.fmt if n in S else lad.low.fmt) for n in names}
    apply_formats(m2, f, f)
    with torch.no_grad():
        sc[lab] = [evaluate(m2, tok, windows=wins[t], progress=False) for t in TEXTS]
    print(f"{a.tag} {lab}: {sc[lab][0]['ppl']:.2f} / {sc[lab][1]['ppl']:.2f}", flush=True)
    res[lab] = [{"ppl": s["ppl"], "window_nll": s["window_nll"]} for s in sc[lab]]
print(a.tag, "polished - orig:", "; ".join(paired_line(paired(sc["orig"][i]["window_nll"], sc["polished"][i]["window_nll"])) for i in range(2)))
Path(f"/work/exp/polish/{a.tag}.json").write_text(json.dumps(res))
