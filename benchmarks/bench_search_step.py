"""The dMX search step next to the unquantized bf16 step, same run, same model shape.

One step = forward + backward of the causal-LM loss (no optimizer) on a Llama with the
SmolLM2-135M shape and random weights, bf16 parameters. Modes:

* ``bf16``        -- plain model (the anchor).
* ``dmx``         -- wrap_model(fp8-fp4 ladder, backend "torch"): weights and activations
                     quantized by DMXLinear with dmx.quant.realfmt's torch code, float32
                     offsets, soft (training) mode.
* ``dmx-fused``   -- the same layers on backend "triton" (dmx.quant.triton_ops: Triton
                     kernels, quantized copies recomputed in backward). CUDA + Triton only.

Reports time per step (median of timed steps after warm-up) and peak memory, and each
mode's ratio to bf16. CPU: batch 1 x 128 and 2 decoder layers so it finishes in well
under a minute; CUDA: batch 8 x 2048, all 30 layers. Usage: ``python benchmarks/bench_search_step.py [--out DIR] [--json F]``.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    tie_word_embeddings=True)


def build_model(device, layers=None, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(SMOLLM2_135M)
    if layers:
        cfg["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    return model.to(device=device, dtype=torch.bfloat16).train()


def prepare(base, mode):
    """A fresh copy of the base model set up for ``mode``."""
    model = copy.deepcopy(base)
    if mode == "bf16":
        return model
    from dmx.nn.layers import wrap_model
    wrap_model(model, ladder="fp8-fp4", quantize_activations=True,
               backend="triton" if mode == "dmx-fused" else "torch")
    return model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, ids, steps, warmup, device):
    """(median seconds per step, {peak_bytes: total peak, peak_extra_bytes: peak above
    what was allocated before the step (weights, inputs)}, empty on CPU)."""
    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        for p in model.parameters():
            p.grad = None
        return float(out.loss.detach()) if device.type == "cpu" else None

    for _ in range(warmup):
        step()
    _sync(device)
    peak = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        top = torch.cuda.max_memory_allocated()
        peak = {"peak_bytes": top, "peak_extra_bytes": top - base}
    return statistics.median(times), peak


def run(device="cpu", batch=None, seq=None, steps=None, warmup=None, layers=None,
        modes=None, grad_ckpt=False, log=print):
    device = torch.device(device)
    cuda = device.type == "cuda"
    batch = batch or (8 if cuda else 1)
    seq = seq or (2048 if cuda else 128)
    steps = steps or (5 if cuda else 1)
    warmup = warmup if warmup is not None else (2 if cuda else 1)
    # CPU: 2 decoder layers (the full 30 take minutes in CPU bf16); the numbers only
    # show the script works, the real measurement is the CUDA run
    layers = layers or (None if cuda else 2)
    from dmx.quant import triton_kernels as tk
    if modes is None:
        modes = ["bf16", "dmx"] + (["dmx-fused"] if cuda and tk.available() else [])
    base = build_model(device, layers)
    if grad_ckpt:
        base.gradient_checkpointing_enable()
    n_layers = base.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=g).to(device)
    results = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
               "batch": batch, "seq": seq, "layers": n_layers, "steps": steps,
               "warmup": warmup, "grad_checkpointing": grad_ckpt, "modes": {}}
    for mode in modes:
        try:
            model = prepare(base, mode)
            if grad_ckpt:
                model.gradient_checkpointing_enable()
            sec, peak = time_steps(model, ids, steps, warmup, device)
            results["modes"][mode] = {"sec_per_step": sec, **peak}
            log(f"[search_step] {mode}: {sec * 1e3:.1f} ms/step"
                + (f", peak {peak['peak_bytes'] / 2**30:.2f} GiB" if peak else ""))
        except Exception as err:  # keep going: one failing mode must not hide the others
            results["modes"][mode] = {"error": f"{type(err).__name__}: {err}"}
            log(f"[search_step] {mode}: FAILED {type(err).__name__}: {err}")
        finally:
            model = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    ref = results["modes"].get("bf16", {})
    for mode, r in results["modes"].items():
        if "sec_per_step" in r and "sec_per_step" in ref:
            r["time_ratio"] = r["sec_per_step"] / ref["sec_per_step"]
            if r.get("peak_bytes") and ref.get("peak_bytes"):
                r["memory_ratio"] = r["peak_bytes"] / ref["peak_bytes"]
                r["extra_memory_ratio"] = r["peak_extra_bytes"] / ref["peak_extra_bytes"]
    return results


def markdown(res) -> str:
    lines = [f"Search step (fwd+bwd, no optimizer), SmolLM2-135M shape ({res['layers']} layers), "
             f"random weights, bf16, batch {res['batch']} x {res['seq']} tokens, "
             f"device: {res['device']}, median of {res['steps']} steps after "
             f"{res['warmup']} warm-up" + (", gradient checkpointing" if
                                            res["grad_checkpointing"] else "") + ".",
             "", "| mode | ms / step | x bf16 | peak memory (GiB) | x bf16 | peak above "
             "weights+inputs (GiB) | x bf16 |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mode, r in res["modes"].items():
        if "error" in r:
            lines.append(f"| {mode} | failed: {r['error'][:80]} | | | | | |")
            continue
        def gib(key):
            return f"{r[key] / 2**30:.2f}" if key in r else ""

        def ratio(key):
            return f"{r[key]:.2f}" if key in r else ""
        lines.append(f"| {mode} | {r['sec_per_step'] * 1e3:.1f} | {r.get('time_ratio', 1):.2f} | "
                     f"{gib('peak_bytes')} | {ratio('memory_ratio')} | "
                     f"{gib('peak_extra_bytes')} | {ratio('extra_memory_ratio')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--layers", type=int, help="override the 30 decoder layers")
    ap.add_argument("--modes", nargs="+", help="subset of: bf16 dmx dmx-fused")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="directory for json + md")
    args = ap.parse_args(argv)
    res = run(args.device, args.batch, args.seq, args.steps, args.warmup, args.layers,
              args.modes, args.grad_checkpointing)
    md = markdown(res)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "search_step.json").write_text(json.dumps(res, indent=2))
        (out / "search_step.md").write_text(md)


if __name__ == "__main__":
    main()
