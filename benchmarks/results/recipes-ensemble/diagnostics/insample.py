"""In-sample diagnostic: CE and KL-to-float of dMX vs KL hard models on each seed's calibration windows."""
import json, sys, torch, torch.nn.functional as F
from dmx.outdir.read import load
from dmx.data import calibration_windows, load_model_and_tokenizer
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
W = sys.argv[1]
calib = "/work/main/dmx/data/wikitext-2-raw/wiki.valid.raw"
model_dir = str(__import__('pathlib').Path.home() / ".cache/dmx/smollm2-135m-instruct-f32")
budgets = sys.argv[3].split(",") if len(sys.argv) > 3 else ["4.5", "5", "6"]
seeds = [0, 1, 2]
fm, tok = load_model_and_tokenizer(model_dir)
def logits_of(m, win):
    out = []
    with torch.no_grad():
        for i in range(0, win.shape[0], 8):
            out.append(m(input_ids=win[i:i+8], use_cache=False).logits.float())
    return torch.cat(out)
def scores(lg, ref, win):
    ce = F.cross_entropy(lg[:, :-1].flatten(0, 1), win[:, 1:].flatten()).item()
    kl = F.kl_div(lg.log_softmax(-1).flatten(0,1), ref.log_softmax(-1).flatten(0,1), log_target=True, reduction="batchmean").item()
    return ce, kl
res = {}
for s in seeds:
    win = calibration_windows(tok, [calib], 128, 96, s)
    ref = logits_of(fm, win)
    res[f"float-s{s}"] = scores(ref, ref, win)
    for b in budgets:
        for meth in ("dmx", "kl"):
            name = f"{meth}-default-{b}-s{s}"
            m, _, _ = load(f"{W}/{name}")
            res[name] = scores(logits_of(m, win), ref, win)
            print(name, res[name], flush=True)
            del m
json.dump(res, open(f"/work/exp/insample-{W.strip('/').split('/')[-1]}.json", "w"), indent=1)
