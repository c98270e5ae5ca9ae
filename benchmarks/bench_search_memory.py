"""Peak CPU memory of the dMX search step next to a plain float32 forward + backward.

Each configuration runs in its own Python process (a clean peak: nothing freed by an
earlier configuration is still held by the allocator), on the same model and batch:

* ``plain``          -- the unquantized float32 model, weights frozen, the embedding output
                        marked as needing a gradient so backward runs through every
                        activation (what a search step must do to reach the offsets).
* ``dmx``            -- the search step as ``dmx search`` runs it: the default recipe's
                        layers (SearchConfig: fp8-fp4, weights and inputs quantized),
                        weights frozen, dmx.search.train.train_offsets (loss, penalty, SGD step).
* ``dmx-reference``  -- the same with DMXLinear's soft mode through the reference graph
                        (dmx.quant.realfmt._real_format_linear_torch: every quantizer op recorded
                        by autograd), i.e. the search before the memory fix.

Measured: the peak resident set (VmHWM, reset through /proc/self/clear_refs after the model
is loaded, so it is the peak while the steps run), the peak above the resident set just
before the steps (weights, inputs, the runtime), and the bytes autograd saves for backward
in one forward pass (unique storages, parameters excluded: what the graph holds, free of
allocator effects). Resident memory is what a user sees (and what ran out), so the target
ratio (issue 11: <= 1.5x plain) is taken on the peak RSS.

Usage::

    nice -n 10 python benchmarks/bench_search_memory.py [--model DIR | --model smollm2-shape]
        [--batch-size 16] [--seqlen 256] [--steps 2] [--modes plain dmx dmx-reference]
        [--markdown FILE]

``--model smollm2-shape``: a LlamaForCausalLM with SmolLM2-135M's shape and random weights
(memory does not depend on the weight values); a directory: any local HF causal LM, loaded
in float32 (e.g. the float32 SmolLM2-135M dir from issue 11).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODES = ("plain", "dmx", "dmx-reference")


# ----------------------------------------------------------------------------- one process
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _load_model(spec: str):
    import torch
    if spec == "smollm2-shape":
        from transformers import LlamaConfig, LlamaForCausalLM

        from bench_search_step import SMOLLM2_135M
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    from dmx import data
    path = Path(spec)
    return data.load_model(path if path.is_absolute() or path.exists() else ROOT / path,
                           dtype=torch.float32)


def _saved_bytes(forward) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``forward()``
    (parameters excluded: they exist anyway)."""
    import torch
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if not isinstance(t, torch.nn.Parameter):
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def child(mode: str, model_spec: str, batch: int, seqlen: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from dmx.nn.layers import wrap_model
    from dmx.search.recipe import SearchConfig
    from dmx.search.train import train_offsets

    model = _load_model(model_spec).float()
    for p in model.parameters():
        p.requires_grad_(False)  # the search trains the offsets only
    model.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (batch, seqlen), generator=gen)

    def loss(logits):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    if mode == "plain":
        def forward():
            emb = model.get_input_embeddings()(ids).requires_grad_()
            return loss(model(inputs_embeds=emb, use_cache=False).logits)

        def run():
            for _ in range(steps):
                forward().backward()
    else:
        cfg = SearchConfig.from_recipe("default", target_bits=6.0, steps=steps,
                                       batch_size=batch, seqlen=seqlen)
        # as dmx search wraps (the start offset does not change the memory)
        layers = wrap_model(model, cfg.ladder, quantize_activations=not cfg.weights_only,
                            tie_fused=cfg.tie_fused, parameterization=cfg.parameterization)
        if mode == "dmx-reference":
            import dmx.nn.layers
            from dmx.quant import realfmt
            dmx.nn.layers.real_format_linear = realfmt._real_format_linear_torch

        def forward():
            return loss(model(input_ids=ids, use_cache=False).logits)

        def run():
            train_offsets(model, layers, ids, cfg, progress=False, checkpoint_every=0)

    import gc
    gc.collect()
    before = _status_kib("VmRSS") * 1024
    reset = _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    run()
    sec = (time.perf_counter() - t0) / steps
    cpu = (time.process_time() - c0) / steps  # less sensitive to other jobs than wall time
    peak = _status_kib("VmHWM") * 1024
    if mode != "plain":
        for layer in layers.values():
            layer.train()
    saved = _saved_bytes(forward)
    return {"mode": mode, "peak_rss": peak, "rss_before": before, "peak_above": peak - before,
            "saved_for_backward": saved, "sec_per_step": sec, "cpu_sec_per_step": cpu, "peak_reset": reset}


# ----------------------------------------------------------------------------- driver
def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def run_all(args) -> dict:
    import torch
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"),
                                           os.environ.get("PYTHONPATH", "")]))
    res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": _machine(), "torch": torch.__version__, "model": args.model,
           "batch": args.batch_size, "seqlen": args.seqlen, "steps": args.steps,
           "threads": args.threads, "load_before": os.getloadavg()[0], "modes": {}}
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--child", mode, "--model", args.model,
               "--batch-size", str(args.batch_size), "--seqlen", str(args.seqlen),
               "--steps", str(args.steps)]
        print(f"[{mode}] running ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            res["modes"][mode] = {"mode": mode, "error": proc.stderr.strip().splitlines()[-1]}
            continue
        res["modes"][mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    res["load_after"] = os.getloadavg()[0]
    base = res["modes"].get("plain", {})
    for r in res["modes"].values():
        if "error" not in r and "peak_rss" in base:
            r["ratio_peak"] = r["peak_rss"] / base["peak_rss"]
            r["ratio_above"] = r["peak_above"] / base["peak_above"]
            r["ratio_saved"] = r["saved_for_backward"] / base["saved_for_backward"]
    return res


def markdown(res: dict, command: str) -> str:
    mib = 2 ** 20
    lines = [f"### {res['date']}: {res['model']}, batch {res['batch']} x {res['seqlen']}",
             "", f"Command: `{command}`  ",
             f"Machine: {res['machine']}, torch {res['torch']}, {res['threads']} thread(s), "
             f"load average {res['load_before']:.2f} before / {res['load_after']:.2f} after; "
             f"{res['steps']} steps per configuration, each in its own process.", "",
             "| config | peak RSS (MiB) | x plain | peak above pre-step RSS (MiB) | x plain | "
             "saved for backward (MiB) | x plain | s / step | CPU s / step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, r in res["modes"].items():
        if "error" in r:
            lines.append(f"| {mode} | failed: {r['error'][:100]} | | | | | | | |")
            continue
        lines.append(
            f"| {mode} | {r['peak_rss'] / mib:.0f} | {r.get('ratio_peak', 1):.2f} | "
            f"{r['peak_above'] / mib:.0f} | {r.get('ratio_above', 1):.2f} | "
            f"{r['saved_for_backward'] / mib:.0f} | {r.get('ratio_saved', 1):.2f} | "
            f"{r['sec_per_step']:.2f} | {r['cpu_sec_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="HF causal-LM dir, or smollm2-shape (default: embedded tiny-qwen3)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--markdown", help="append the table to this file")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.model is None:
        args.model = "dmx/data/tiny-qwen3"  # the embedded model, relative to the repo root
    if args.child:
        print(json.dumps(child(args.child, args.model, args.batch_size, args.seqlen,
                               args.steps)))
        return
    res = run_all(args)
    command = "python benchmarks/bench_search_memory.py " + " ".join(argv or sys.argv[1:])
    md = markdown(res, command)
    print(md)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write("\n" + md)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
