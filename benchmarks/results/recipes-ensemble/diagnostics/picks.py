"""Offline alternative picks from a dMX run's logged offsets; scored in-sample and on wiki.test."""
import json, sys, torch, torch.nn.functional as F
from pathlib import Path
from dmx.data import calibration_windows, load_model_and_tokenizer, eval_windows
from dmx.nn.layers import apply_formats
from dmx.eval.command import evaluate
torch.set_num_threads(int(sys.argv[2]))
W, budget = sys.argv[1], sys.argv[3]
seeds = [int(s) for s in sys.argv[4].split(",")]
calib = "/work/main/dmx/data/wikitext-2-raw/wiki.valid.raw"
test = "/work/main/dmx/data/wikitext-2-raw/wiki.test.raw"
model_dir = str(Path.home() / ".cache/dmx/smollm2-135m-instruct-f32")
fm, tok = load_model_and_tokenizer(model_dir)
tw = eval_windows(tok, Path(test), 256, 40, "file")
def logits_of(m, win):  # per batch of 8, log-softmaxed (memory: one copy)
    with torch.no_grad():
        return [m(input_ids=win[i:i+8], use_cache=False).logits.float().log_softmax(-1) for i in range(0, win.shape[0], 8)]
def insample(m, ref, win):
    ce = kl = 0.0
    with torch.no_grad():
        for j, i in enumerate(range(0, win.shape[0], 8)):
            lg = m(input_ids=win[i:i+8], use_cache=False).logits.float().log_softmax(-1)
            ids = win[i:i+8]
            ce += F.nll_loss(lg[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            kl += F.kl_div(lg.flatten(0, 1), ref[j].flatten(0, 1), log_target=True, reduction="sum").item()
    n = win.shape[0]
    return ce / (n * (win.shape[1] - 1)), kl / (n * win.shape[1])
def model_with(fp8):
    m, _ = load_model_and_tokenizer(model_dir)
    f = {n: ("fp8_e4m3" if n in fp8 else "fp4_e2m1") for n in units}
    apply_formats(m, f, f)
    return m
out = {}
for s in seeds:
    run = f"{W}/dmx-default-{budget}-s{s}"
    recs = [json.loads(l) for l in open(f"{run}/search_log.jsonl")]
    units = recs[0]["units"]
    steps = [r for r in recs if r.get("type") == "step"]
    final = recs[-1]
    K = sum(v == "fp8_e4m3" for v in final["formats"].values())
    t0 = steps[0]["T"]
    anneal = [r for r in steps if r["T"] > t0]
    pre = [r for r in steps if r["T"] <= t0][-1]
    def top(score):
        order = sorted(range(len(units)), key=lambda i: -score[i])
        return {units[i] for i in order[:K]}
    picks = {
        "final": {n for n, v in final["formats"].items() if v == "fp8_e4m3"},
        "avg": top([sum(abs(r["offsets"][i]) for r in anneal) / len(anneal) for i in range(len(units))]),
        "pre": top([abs(pre["offsets"][i]) for i in range(len(units))]),
    }
    kl_m = json.load(open(f"{W}/kl-default-{budget}-s{s}/dmx_manifest.json"))["layers"]
    picks["kl"] = {n for n, v in kl_m.items() if (v if isinstance(v, str) else v.get("format", v.get("weight_format"))) == "fp8_e4m3"}
    win = calibration_windows(tok, [calib], 128, 96, s)
    ref = logits_of(fm, win)
    for name, fp8 in picks.items():
        m = model_with(fp8)
        r = {"insample": insample(m, ref, win), "common_final": len(fp8 & picks["final"]), "common_kl": len(fp8 & picks["kl"])}
        if name in ("avg", "pre"):
            r["wiki"] = evaluate(m, tok, windows=tw, progress=False)["ppl"]
        out[f"{budget}-s{s}-{name}"] = r
        print(budget, s, name, r, flush=True)
        json.dump(out, open(f"/work/exp/picks-{budget}-{sys.argv[4]}.json", "w"), indent=1)
