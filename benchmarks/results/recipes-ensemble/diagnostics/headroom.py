"""Headroom of the ranking: random, reverse-KL, and seed-ensembled picks, scored on wiki.test and TinyStories."""
import json, random, sys, torch
from pathlib import Path
from dmx.data import load_model_and_tokenizer, eval_windows
from dmx.nn.layers import apply_formats
from dmx.eval.command import evaluate
torch.set_num_threads(int(sys.argv[2]))
W, budget = sys.argv[1], sys.argv[3]
model_dir = str(Path.home() / ".cache/dmx/smollm2-135m-instruct-f32")
_, tok = load_model_and_tokenizer(model_dir)
texts = {"wiki": eval_windows(tok, Path("/work/main/dmx/data/wikitext-2-raw/wiki.test.raw"), 256, 40, "file"),
         "tinystories": eval_windows(tok, Path("/work/main/benchmarks/data/tinystories/eval.txt"), 256, 40, "file")}
def fmt_of(v): return v if isinstance(v, str) else v.get("format", v.get("weight_format"))
recs = {s: [json.loads(l) for l in open(f"{W}/dmx-default-{budget}-s{s}/search_log.jsonl")] for s in (0, 1, 2)}
units = recs[0][0]["units"]
K = sum(v == "fp8_e4m3" for v in recs[0][-1]["formats"].values())
sens = {s: json.load(open(f"{W}/kl-default-{budget}-s{s}/dmx_manifest.json"))["baseline"]["sensitivity"] for s in (0, 1, 2)}
def top(score): return set(sorted(units, key=lambda n: -score[n])[:K])
picks = {f"random-r{r}": set(random.Random(r).sample(units, K)) for r in (0, 1, 2)}
picks["reverse-kl-s0"] = set(sorted(units, key=lambda n: sens[0][n])[:K])
picks["ens-dmx"] = top({n: sum(abs(recs[s][-1]["offsets"][n]) for s in (0, 1, 2)) for n in units})
picks["ens-kl"] = top({n: sum(sens[s][n] for s in (0, 1, 2)) for n in units})
out = {}
for name, fp8 in picks.items():
    m, _ = load_model_and_tokenizer(model_dir)
    f = {n: ("fp8_e4m3" if n in fp8 else "fp4_e2m1") for n in units}
    apply_formats(m, f, f)
    out[name] = {t: evaluate(m, tok, windows=w, progress=False)["ppl"] for t, w in texts.items()}
    print(budget, name, out[name], flush=True)
    json.dump(out, open(f"/work/exp/headroom-{budget}.json", "w"), indent=1)
