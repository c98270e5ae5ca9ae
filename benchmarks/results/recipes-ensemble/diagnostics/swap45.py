"""Which of the picks carry the 4.5-bit TinyStories gap? (throwaway diagnostic, 2026-12-06)

The nine-seed combination (W/dmx-default-4.5-comb0.1.2.3.4.5.6.7.8) and the 26 units KL's
nine seeds promote most often share 17 of their 26 MXFP8 layers. This scores, on both texts
(40 x 256, the sweep's protocol), the combination with its other 9 swapped for KL's in two
halves: A = its 5 late v_proj for KL's 4 k_proj + layer 2's v_proj; B = its 4 MLP picks
(gate 9, 10; layer 20 down, up) for KL's 4 (layer 3 v_proj; 23, 24 down; 28 gate). Both
halves keep 26 units in MXFP8 (the same bits). Fake-quantized with apply_formats, as
bench_pick_headroom.py does.

    python benchmarks/results/recipes-ensemble/diagnostics/swap45.py /work/dmx_unrot2
"""
import collections
import json
import sys
from pathlib import Path

import torch

from dmx import data
from dmx.eval.command import evaluate
from dmx.eval.paired import paired, paired_line
from dmx.nn.layers import apply_formats
from dmx.threads import set_threads

W = Path(sys.argv[1])
MODEL = Path.home() / ".cache" / "dmx" / "smollm2-135m-instruct-f32"
TEXTS = ["dmx/data/wikitext-2-raw/wiki.test.raw", "benchmarks/data/tinystories/eval.txt"]


def high(out):
    m = json.loads((out / "dmx_manifest.json").read_text())
    return {n for n, e in m["layers"].items() if e["format"] == "fp8_e4m3"}, sorted(m["layers"])


set_threads(1)
comb, units = high(W / "dmx-default-4.5-comb0.1.2.3.4.5.6.7.8")
votes = collections.Counter(n for s in range(9) for n in high(W / f"kl-default-4.5-s{s}")[0])
kl = {n for n, _ in sorted(votes.items(), key=lambda kv: (-kv[1], kv[0]))[:26]}
ours, theirs = sorted(comb - kl), sorted(kl - comb)
kind = lambda n: n.rsplit(".", 1)[1]  # noqa: E731
a_out = [n for n in ours if kind(n) == "v_proj"]
a_in = [n for n in theirs if kind(n) == "k_proj" or n == "model.layers.2.self_attn.v_proj"]
b_out, b_in = [n for n in ours if n not in a_out], [n for n in theirs if n not in a_in]
print("dMX only:", ours, "\nKL only:", theirs, flush=True)
variants = {"combined (nine seeds)": comb, "KL's 26 most voted": kl,
            "A: late v_proj -> KL's k_proj": (comb - set(a_out)) | set(a_in),
            "B: MLP picks -> KL's": (comb - set(b_out)) | set(b_in)}
_, tok = data.load_model_and_tokenizer(MODEL)
windows = {t: data.eval_windows(tok, Path(t), 256, 40, "file") for t in TEXTS}
scored = {}
for name, picks in variants.items():
    assert len(picks) == 26, (name, len(picks))
    model, _ = data.load_model_and_tokenizer(MODEL)
    formats = {n: ("fp8_e4m3" if n in picks else "fp4_e2m1") for n in units}
    apply_formats(model, formats, formats)
    with torch.no_grad():
        scored[name] = [evaluate(model, tok, windows=windows[t], progress=False) for t in TEXTS]
    print(f"{name}: {scored[name][0]['ppl']:.2f} / {scored[name][1]['ppl']:.2f}", flush=True)
# each variant against KL's most voted, window by window (dmx.eval.paired)
for name in variants:
    cells = [paired_line(paired(scored["KL's 26 most voted"][i]["window_nll"],
                                scored[name][i]["window_nll"])) for i in range(len(TEXTS))]
    print(f"{name} - KL's 26 most voted: WikiText {cells[0]}; TinyStories {cells[1]}")
