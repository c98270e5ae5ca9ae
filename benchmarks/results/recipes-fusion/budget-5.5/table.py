from pathlib import Path
import numpy as np
from dmx.outdir.evaljson import find_result, load_eval
from dmx.eval.paired import paired, paired_line
W = Path("/work/dmx_fuse55")
def r(o, f): return find_result(load_eval(W / o), f, 256, 40)
for f, name in (("wiki.test.raw", "WikiText"), ("eval.txt", "TinyStories")):
    kl = list(np.mean([r(f"kl55-s{s}", f)["window_nll"] for s in range(3)], 0))
    ppl = {o: round(r(o, f)["ppl"], 2) for o in ("kl55-s0", "kl55-s1", "kl55-s2", "comb55-fill", "fused55")}
    print(name, ppl)
    print("  fused - KL:", paired_line(paired(kl, r("fused55", f)["window_nll"])))
    print("  fused - comb:", paired_line(paired(r("comb55-fill", f)["window_nll"], r("fused55", f)["window_nll"])))
    print("  comb - KL:", paired_line(paired(kl, r("comb55-fill", f)["window_nll"])))
    for s in range(3):
        print(f"  fused - KL s{s}:", paired_line(paired(r(f"kl55-s{s}", f)["window_nll"], r("fused55", f)["window_nll"])))
