"""Helpers shared by the runtime tests (fixtures live in conftest.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STORIES = REPO / "tests" / "data" / "stories260K-hf"
THREADS = str(max(1, min(4, os.cpu_count() or 1)))


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
def run_tool(tool: str, *args) -> str:
    """Run a llama.cpp binary of the cached build; its whole log (stdout + stderr)."""
    bin_dir = build_script().bin_dir()
    r = subprocess.run([str(bin_dir / tool), *map(str, args)], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"{tool} exited {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout + r.stderr


def llama_perplexity(gguf, text_file, ctx: int, chunks: int) -> float:
    """``llama-perplexity``'s final estimate (it scores the second half of each window)."""
    log = run_tool("llama-perplexity", "-m", gguf, "-f", text_file, "-c", ctx, "-b", ctx,
                   "--chunks", chunks, "-t", THREADS)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    if not m:
        raise RuntimeError(f"no final estimate in llama-perplexity's log: {log[-2000:]}")
    return float(m.group(1))


def llama_greedy(gguf, prompt: str, n: int) -> str:
    """The text ``llama-completion`` generates greedily after ``prompt`` (the whole log)."""
    return run_tool("llama-completion", "-m", gguf, "-p", prompt, "-n", n, "--temp", 0,
                    "-s", 0, "-no-cnv", "-t", THREADS)


def dmx_perplexity(out, text_file, ctx: int, chunks: int) -> float:
    """`dmx eval OUT --data text_file --seqlen ctx --max-windows chunks` (all tokens scored)."""
    import dmx
    from dmx.evaluate import evaluate

    model, tok, _ = dmx.load(out)
    return evaluate(model, tok, text_file, seqlen=ctx, max_windows=chunks, progress=False)["ppl"]
