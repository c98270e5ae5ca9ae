import json, sys, numpy as np
from pathlib import Path
from dmx.outdir.evaljson import find_result, load_eval
from dmx.eval.paired import paired, paired_cell
T={"WikiText": Path("/work/main/dmx/data/wikitext-2-raw/wiki.test.raw"), "TinyStories": Path("/work/main/benchmarks/data/tinystories/eval.txt")}
C=Path("/work/main/benchmarks/results/recipes-trajectory/cache")
W=Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/work/dmx_s4")
for B in ("4.5","5","6"):
  for name,t in T.items():
    S, A, K = [], [], []
    for s in (0,1,2):
      o=W/f"dmx-default-{B}-s{s}"
      r=find_result(load_eval(o), t, 256, 40) if (o/"eval.json").is_file() else None
      if r is None: continue
      S.append(r["window_nll"])
      A.append(json.load(open(C/f"dmx-default-{B}-s{s}-f0.5-w40.json"))["results"][name]["window_nll"])
      K.append(find_result(load_eval(Path(f"/work/fuse1/kl-{B}-s{s}")), t, 256, 40)["window_nll"])
      print(f"  {B} {name} s{s}: new {np.exp(np.mean(S[-1])):.2f} - default {paired_cell(paired(A[-1], S[-1]))}; - KL {paired_cell(paired(K[-1], S[-1]))}")
    if len(S) > 1:
      m=lambda x: list(np.mean(x,0))
      print(f"{B} {name} pooled {len(S)}: new - default {paired_cell(paired(m(A), m(S)))}; new - KL {paired_cell(paired(m(K), m(S)))}")
