"""Throughput of dmx.fake_quantize vs a plain-PyTorch MX fake-quant, eager and compiled.

    python benchmarks/bench_fakequant.py [--size 4096] [--reps 5] [--fmt fp4_e2m1 fp8_e4m3]
                                         [--no-compile] [--out benchmarks/results/fakequant.md]

"plain" is MX fake quantization written the usual way (float log2 for the scale and
the element exponent, divide, round, clamp, multiply), as in most research code. It
is not bit-exact: the table reports how many of its outputs differ from mxref's on
the same input (random normal weights, plus one adversarial block set where amax sits
just below a power of two). dmx.fake_quantize is checked bit for bit against mxref.
Device time is measured with wall clock after a warm-up call (median of --reps).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a source checkout without installing

import mxref  # noqa: E402
from dmx.quant.fakequant import fake_quantize  # noqa: E402


def plain_fake_quantize(x: torch.Tensor, fmt: str, block_size: int = 32) -> torch.Tensor:
    """MX fake quant the usual way: blocks along the last dim (K % block_size == 0)."""
    f = mxref.get_format(fmt)
    xb = x.float().reshape(-1, block_size)
    amax = xb.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    scale = torch.exp2(torch.floor(torch.log2(amax)) - f.emax)
    u = xb / scale
    e = torch.floor(torch.log2(u.abs().clamp_min(2.0 ** f.emin))).clamp_min(f.emin)
    step = torch.exp2(e - f.man_bits)
    q = (torch.round(u / step) * step).clamp(-f.max_normal, f.max_normal)
    return (q * scale).reshape(x.shape).to(x.dtype)


def timeit(fn, x, reps: int) -> float:
    fn(x)  # warm-up (and compilation)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32).numpy()


def mxref_value(x: torch.Tensor, fmt: str) -> torch.Tensor:
    import ml_dtypes
    xc = x.detach().cpu().contiguous()
    arr = (xc.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if xc.dtype == torch.bfloat16
           else xc.numpy())
    return torch.from_numpy(mxref.quantize_dequantize(arr, fmt)).to(x.dtype)


def adversarial(n_rows: int, fmt: str) -> torch.Tensor:
    """Blocks whose max is the float32 just below 2^(emax+1): float log2 rounds it up."""
    f = mxref.get_format(fmt)
    x = torch.randn(n_rows, 1024) * 0.5
    x[:, ::32] = float(np.nextafter(np.float32(2.0 ** (f.emax + 1)), np.float32(0)))
    return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="weight is size x size")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--fmt", nargs="+", default=["fp4_e2m1", "fp8_e4m3"])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", nargs="+", default=None, help="cpu and/or cuda (default: all)")
    ap.add_argument("--out", default=None, help="write a markdown report here")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        # mxref's first Numba call starts the OpenMP pool, which resets torch's thread
        # count: start it first, then set the threads
        mxref.quantize(np.zeros(32, np.float32), "fp4_e2m1")
        torch.set_num_threads(args.threads)

    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    compile_note = ""
    impls = {"dmx eager": fake_quantize, "plain eager": plain_fake_quantize}
    if not args.no_compile:
        try:
            impls["dmx compiled"] = torch.compile(fake_quantize, dynamic=False)
            impls["plain compiled"] = torch.compile(plain_fake_quantize, dynamic=False)
            impls["dmx compiled"](torch.randn(4, 64), "fp4_e2m1")
        except Exception as err:  # report, don't hide: the table says why it is missing
            compile_note = f"torch.compile failed: {type(err).__name__}: {str(err)[:200]}"
            impls.pop("dmx compiled", None)
            impls.pop("plain compiled", None)

    rows = []
    for dev in devices:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(args.size, args.size, generator=g) * 0.02).to(dtype).to(dev)
            for fmt in args.fmt:
                ref = bits(mxref_value(x, fmt))
                adv = adversarial(64, fmt).to(dtype).to(dev)
                adv_ref = bits(mxref_value(adv, fmt))
                base = None
                for name, fn in impls.items():
                    t = timeit(lambda v: fn(v, fmt), x, args.reps)
                    gel = x.numel() / t / 1e9
                    base = base or t
                    diff = int((bits(fn(x, fmt)) != ref).sum())
                    adv_diff = int((bits(fn(adv, fmt)) != adv_ref).sum())
                    rows.append((dev, str(dtype).replace("torch.", ""), fmt, name, t * 1e3, gel,
                                 base / t, diff, adv_diff))
                    print(f"{dev:4} {rows[-1][1]:8} {fmt:9} {name:15} {t * 1e3:9.1f} ms "
                          f"{gel:7.3f} Gel/s  x{base / t:5.2f}  mismatches {diff}/{x.numel()} "
                          f"adversarial {adv_diff}/{adv.numel()}", flush=True)

    if args.out:
        write_report(args, rows, compile_note, devices)
    return 0


def write_report(args, rows, compile_note, devices) -> None:
    cmd = "python benchmarks/bench_fakequant.py " + " ".join(sys.argv[1:])
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Fake-quantization throughput: dmx.fake_quantize vs plain PyTorch",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, devices: {', '.join(devices)}; "
        f"load average at the end {os.getloadavg()[0]:.1f} (a shared machine: timings are noisy).",
        "",
        f"Tensor: {args.size}x{args.size} weight, N(0, 0.02^2), blocks of 32 along the last dim; "
        f"median of {args.reps} calls after a warm-up. `x` = speed relative to `dmx eager` "
        "in the same row group. Mismatches = elements whose bits differ from mxref "
        "(random tensor / adversarial blocks with amax just below a power of two).",
        "",
        "| device | dtype | format | implementation | ms | G elem/s | x vs dmx eager | "
        "mismatches (random) | mismatches (adversarial) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for dev, dt, fmt, name, ms, gel, rel, diff, adv in rows:
        lines.append(f"| {dev} | {dt} | {fmt} | {name} | {ms:.2f} | {gel:.3f} | {rel:.2f} | "
                     f"{diff} | {adv} |")
    if compile_note:
        lines += ["", compile_note]
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    sys.exit(main())
