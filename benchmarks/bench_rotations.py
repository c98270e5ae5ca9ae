"""MXFP4 error with and without rotations: full (Kronecker) vs MX-block-diagonal Hadamard.

    nice -n 10 python benchmarks/bench_rotations.py [--windows 16] [--seqlen 256]
                                                    [--out benchmarks/results/rotations.md]

For each model (the embedded tiny-qwen3 and stories260K from tests/data) and each R1/R2
construction -- ``folded`` (norm scales folded, no rotation: the fair baseline, the same
weights the rotations start from), ``kron`` (full Hadamard: Sylvester, or Paley x
Sylvester), ``block`` (block-diagonal Sylvester of the 32-element MX block), ``random``
(seeded Haar) -- it reports:

``none`` (the untouched model: folding alone changes what MXFP4 does to the weights) and
``learned`` (R1/R2 trained from the block-diagonal Hadamard with Cayley SGD on the uniform
MXFP4 W+A model, ``--learned-steps`` steps of 4 calibration windows, then folded) too.

* weight error: sum ||Q(W) - W||^2 / sum ||W||^2 over the block linears (MXFP4, blocks
  along the input dim, :func:`dmx.fake_quantize`), and the same for their input activations
  on the evaluation windows;
* perplexity of the float model (a check: every rotation must leave it unchanged) and of
  uniform MXFP4 weights + inputs (:func:`dmx.nn.layers.apply_formats`) on the first
  ``--windows`` windows of the embedded wiki.test.raw (GPTQ protocol, dmx.eval.command).

Then the non-power-of-two widths on real data: the 768-wide input of tiny-qwen3's down_proj
(weights and their real input activations), and its first 576 columns (SmolLM2's hidden
width), rotated by Paley x Sylvester vs block-diagonal vs random.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a source checkout without installing

from dmx.data import (calibration_windows, default_calibration_file,  # noqa: E402
                      default_eval_file, embedded_model_dir, eval_windows,
                      load_model_and_tokenizer)
from dmx.eval.command import perplexity  # noqa: E402
from dmx.outdir import atomic_write_text  # noqa: E402
from dmx.nn.layers import MXLinear, set_submodule, apply_formats  # noqa: E402
from dmx.quant.fakequant import fake_quantize  # noqa: E402
from dmx.rotate import LearnedRotations, rotate_model, rotation_matrix  # noqa: E402
from dmx.rotate.fold import arch_of, fold_norms  # noqa: E402

FMT = "fp4_e2m1"
MODELS = {"tiny-qwen3": embedded_model_dir(),
          "stories260K": os.path.join(ROOT, "tests", "data", "stories260K-hf")}
VARIANTS = ("none", "folded", "kron", "block", "random", "learned")


def _wrapped(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, MXLinear)}


def _block_linears(model):
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def rel_error(x: torch.Tensor) -> tuple[float, float]:
    """(squared MXFP4 error, squared norm) of x, blocks along the last dim."""
    x = x.float()
    return float((fake_quantize(x, FMT) - x).pow(2).sum()), float(x.pow(2).sum())


def learned(model, calib, steps: int, lr: float):
    """Uniform MXFP4 W+A model with R1/R2 learned from the block-diagonal Hadamard (Cayley
    SGD, 4 calibration windows a step), folded."""
    m = copy.deepcopy(model)
    linears = list(_block_linears(m))
    apply_formats(m, {n: FMT for n in linears}, {n: FMT for n in linears})
    rot = LearnedRotations(m, lr=lr)
    for step in tqdm(range(steps), desc="learned rotations", leave=False):
        ids = calib[(4 * step) % len(calib):][:4]
        logits = m(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        rot.step()
        rot.zero_grad()
    rot.fold()
    return m


def variant(model, name: str):
    m = copy.deepcopy(model)
    if name == "none":
        pass
    elif name == "folded":
        fold_norms(arch_of(m))
    elif name == "random":
        rotate_model(m, "random", seed=0)
    else:
        rotate_model(m, "hadamard", kind=name)
    return m


def activation_error(model, windows) -> float:
    """Relative MXFP4 error of every block linear's input over the windows."""
    sums = [0.0, 0.0]

    def hook(_mod, args):
        e, n = rel_error(args[0])
        sums[0] += e
        sums[1] += n

    handles = [m.register_forward_pre_hook(hook) for m in _block_linears(model).values()]
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in handles:
        h.remove()
    return sums[0] / sums[1]


def weight_error(model) -> float:
    e = n = 0.0
    for m in _block_linears(model).values():
        a, b = rel_error(m.weight.detach())
        e, n = e + a, n + b
    return e / n


def down_inputs(model, windows) -> torch.Tensor:
    """tiny-qwen3's down_proj inputs (all layers), [tokens, 768]."""
    got = []
    handles = [b.mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: got.append(args[0].detach().flatten(0, 1))) for b in model.model.layers]
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in handles:
        h.remove()
    return torch.cat(got)


def wide_rows(model, windows) -> list[str]:
    """Paley x Sylvester vs block-diagonal on the 768- and 576-wide down_proj data."""
    acts = down_inputs(model, windows).double()
    weights = torch.cat([b.mlp.down_proj.weight.detach() for b in model.model.layers]).double()
    lines = ["| width | construction | weight rel. error | activation rel. error |",
             "|---|---|---|---|"]
    for width in (768, 576):
        w, x = weights[:, :width], acts[:, :width]
        for kind in ("none", "kron", "block", "random"):
            if kind == "none":
                q, label = torch.eye(width, dtype=torch.float64), "none"
            else:
                q, label = rotation_matrix(width, kind, seed=0)
            we, wn = rel_error(w @ q)  # a linear reading a rotated input: W @ Q
            ae, an = rel_error(x @ q)
            lines.append(f"| {width} | {kind}: {label} | {we / wn:.5f} | {ae / an:.5f} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--learned-steps", type=int, default=32)
    ap.add_argument("--learned-lr", type=float, default=0.3)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  "rotations.md"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    lines = ["# MXFP4 error with rotations (benchmarks/bench_rotations.py)", "",
             f"MXFP4 = {FMT}, blocks of 32, OCP profile; {args.windows} windows x "
             f"{args.seqlen} tokens of the embedded wiki.test.raw; relative errors are "
             f"sum of squared errors / sum of squares; float32 models on CPU.", "",
             "| model | R1 / R2 | weight rel. error | activation rel. error | float ppl | "
             "MXFP4 W+A ppl | rotate s |", "|---|---|---|---|---|---|---|"]
    lines.insert(3, "'rotate s': seconds to fold/rotate (learned: training included).")
    wide = []
    for model_name, path in MODELS.items():
        base, tok = load_model_and_tokenizer(path, dtype=torch.float32)
        for p in base.parameters():
            p.requires_grad_(False)
        windows, _ = eval_windows(tok, default_eval_file(), args.seqlen, args.windows)
        calib = calibration_windows(tok, default_calibration_file(), args.seqlen, 64, seed=0)
        for name in VARIANTS:
            t = time.perf_counter()
            if name == "learned":
                m = learned(base, calib, args.learned_steps, args.learned_lr)
            else:
                m = variant(base, name)
            seconds = time.perf_counter() - t
            a = arch_of(m)
            fixed = {"none": "untouched", "folded": "norms folded only",
                     "learned": f"{args.learned_steps} steps, lr {args.learned_lr:g}"}
            label = fixed[name] if name in fixed else (
                f"{rotation_matrix(a.hidden, name)[1]} / {rotation_matrix(a.head_dim, name)[1]}")
            if name == "learned":  # already quantized: unwrap for the float numbers
                float_m = copy.deepcopy(m)
                for n, layer in list(_wrapped(float_m).items()):
                    set_submodule(float_m, n, layer.linear)
            else:
                float_m = m
            we, ae = weight_error(float_m), activation_error(float_m, windows)
            fppl = perplexity(float_m, windows, progress=False)["ppl"]
            if name != "learned":
                linears = list(_block_linears(m))
                apply_formats(m, {n: FMT for n in linears}, {n: FMT for n in linears})
            qppl = perplexity(m, windows, progress=False)["ppl"]
            row = (f"| {model_name} | {name}: {label} | {we:.5f} | {ae:.5f} | {fppl:.3f} | "
                   f"{qppl:.3f} | {seconds:.2f} |")
            print(row, flush=True)
            lines.append(row)
        if model_name == "tiny-qwen3":
            wide = wide_rows(variant(base, "folded"), windows)
    lines += ["", "Non-power-of-two widths on real data: tiny-qwen3's down_proj weights "
              "(6 layers, [256, 768]) and their input activations, all 768 columns and "
              "the first 576 (SmolLM2-135M's hidden width).", ""] + wide
    text = "\n".join(lines) + "\n"
    print("\n".join(wide))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write_text(args.out, text)  # never half-written
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
