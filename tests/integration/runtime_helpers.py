"""Helpers shared by the runtime tests (fixtures live in conftest.py)."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STORIES = REPO / "tests" / "data" / "stories260K-hf"
# tiny models: one thread is plenty and leaves the other core to the test runner
THREADS = "1"


def build_script():
    """scripts/build_llama_cpp.py as a module: the one place that knows where the binaries are."""
    spec = importlib.util.spec_from_file_location("build_llama_cpp",
                                                  REPO / "scripts" / "build_llama_cpp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def formats_of(out: Path) -> set:
    return {v["format"] for v in json.loads((out / "dmx_manifest.json").read_text())
            ["layers"].values()}


# ------------------------------------------------------------------ llama.cpp
def run_tool(tool: str, *args) -> tuple[str, str]:
    """Run a llama.cpp binary of the cached build; (stdout, stderr)."""
    bin_dir = build_script().bin_dir()
    r = subprocess.run([str(bin_dir / tool), *map(str, args)], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"{tool} exited {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout, r.stderr


def llama_perplexity(gguf, text_file, ctx: int, chunks: int) -> float:
    """``llama-perplexity``'s final estimate (it scores the second half of each window)."""
    log = "".join(run_tool("llama-perplexity", "-m", gguf, "-f", text_file, "-c", ctx,
                           "-b", ctx, "--chunks", chunks, "-t", THREADS))
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    if not m:
        raise RuntimeError(f"no final estimate in llama-perplexity's log: {log[-2000:]}")
    return float(m.group(1))


def llama_greedy(gguf, prompt: str, n: int) -> tuple[str, int]:
    """(text after ``prompt``, tokens generated) of ``llama-completion`` at temperature 0."""
    out, log = run_tool("llama-completion", "-m", gguf, "-p", prompt, "-n", n, "--temp", 0,
                        "-s", 0, "-no-cnv", "-t", THREADS)
    text = re.match(r"\s*" + re.escape(prompt) + r"(.*)", out, re.S)   # stdout: prompt + text
    runs = re.search(r"common_perf_print: +eval time = .*?/ +(\d+) runs", log)
    if not (text and runs):
        raise RuntimeError(f"llama-completion printed no completion and timings: "
                           f"{out[-500:]!r} {log[-1500:]}")
    return text.group(1), int(runs.group(1)) + 1   # the first token comes from the prompt pass


def dmx_greedy(out, prompt: str, n: int) -> str:
    """The text `dmx.load(OUT)` generates greedily after ``prompt`` (BOS first, as llama.cpp
    does, where the tokenizer has one and the model is a Llama)."""
    import torch
    import dmx

    model, tok, _ = dmx.load(out)
    ids = tok(prompt, return_tensors="pt").input_ids
    if model.config.model_type == "llama" and tok.bos_token_id is not None \
            and int(ids[0, 0]) != tok.bos_token_id:
        ids = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], dim=1)
    gen = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(gen[0, ids.shape[1]:])


def dmx_perplexity(out, text_file, ctx: int, chunks: int) -> float:
    """`dmx eval OUT --data text_file --seqlen ctx --max-windows chunks` (all tokens scored)."""
    import dmx
    from dmx.eval.command import evaluate

    model, tok, _ = dmx.load(out)
    return evaluate(model, tok, text_file, seqlen=ctx, max_windows=chunks, progress=False)["ppl"]
