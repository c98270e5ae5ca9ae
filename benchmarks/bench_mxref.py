"""Throughput of the mxref golden model next to numpy.copyto and torchao (CPU), same data.

    python benchmarks/bench_mxref.py                      # 4096 x 8192 float32, 1 and 2 threads
    python benchmarks/bench_mxref.py --sweep              # also the 2^32 float32 sweep (FP4)
    python benchmarks/bench_mxref.py --rows 512 --quick   # a fast smoke run

Prints a table, writes benchmarks/results/mxref.json (and, with --markdown, the table
to benchmarks/results/mxref.md). Every rate is G elements/s of wall time, best of
``--repeats``; ``cpu`` columns divide by process CPU time instead, which is what to
read on a shared machine (the load average is recorded). torchao runs through
``to_mx`` (FLOOR scale, the same rule as mxref's ``ocp`` profile) and ``to_dtype``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numba
import numpy as np

import mxref
from mxref.outputs import atomic_write

FORMATS = {"MXFP4": "fp4_e2m1", "MXFP6": "fp6_e2m3", "MXFP8": "fp8_e4m3"}
HERE = os.path.dirname(os.path.abspath(__file__))


def best_rate(fn, n_elements: int, repeats: int) -> tuple[float, float]:
    """(wall G el/s, CPU-time G el/s), best of ``repeats`` after one warm-up call."""
    fn()
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return n_elements / wall / 1e9, n_elements / max(cpu, 1e-9) / 1e9


def load_torchao():
    try:
        import torch
        from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
    except Exception as e:  # noqa: BLE001 - any import failure is reported, not fatal
        return None, f"torchao import failed: {type(e).__name__}: {e}"
    dtypes = {"fp4_e2m1": torch.float4_e2m1fn_x2, "fp6_e2m3": "fp6_e2m3",
              "fp8_e4m3": torch.float8_e4m3fn}
    return (torch, to_mx, to_dtype, dtypes), None


def torchao_agrees(ao, xt, key, mx) -> bool:
    """Do torchao's scales and element bytes equal mxref's on this data (FLOOR = ocp)?"""
    torch, to_mx, _, dtypes = ao
    scale, data = to_mx(xt, dtypes[key], 32)
    ours_scales = mx.scales.reshape(scale.shape)
    if not np.array_equal(scale.view(torch.uint8).numpy(), ours_scales):
        return False
    ours = mxref.pack_codes(mx.codes, key) if key == "fp4_e2m1" else mx.codes
    return np.array_equal(data.view(torch.uint8).numpy().reshape(ours.shape), ours)


def bench(rows: int, cols: int, threads: list[int], repeats: int) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, cols), dtype=np.float32)
    dst = np.empty_like(x)
    n = x.size
    ao, ao_error = load_torchao()
    out = {"rows": rows, "cols": cols, "repeats": repeats, "torchao": ao_error or "ok",
           "runs": []}
    for t in threads:
        numba.set_num_threads(t)
        if ao:
            ao[0].set_num_threads(t)
            xt = ao[0].from_numpy(x)
        copy_w, copy_c = best_rate(lambda: np.copyto(dst, x), n, repeats)
        for label, key in FORMATS.items():
            mx = mxref.quantize(x, key)
            r = {"threads": t, "format": label, "key": key, "copyto": copy_w,
                 "copyto_cpu": copy_c}
            r["quantize_packed"], r["quantize_packed_cpu"] = best_rate(
                lambda: mxref.quantize_packed(x, key), n, repeats)
            r["quantize"], r["quantize_cpu"] = best_rate(lambda: mxref.quantize(x, key), n,
                                                         repeats)
            r["dequantize"], r["dequantize_cpu"] = best_rate(lambda: mxref.dequantize(mx), n,
                                                             repeats)
            r["pack"], r["pack_cpu"] = best_rate(lambda: mxref.pack_codes(mx.codes, key), n,
                                                 repeats)
            if ao:
                torch, to_mx, to_dtype, dtypes = ao
                d = dtypes[key]
                r["torchao_to_mx"], r["torchao_to_mx_cpu"] = best_rate(
                    lambda: to_mx(xt, d, 32), n, repeats)
                scale, data = to_mx(xt, d, 32)
                r["torchao_to_dtype"], r["torchao_to_dtype_cpu"] = best_rate(
                    lambda: to_dtype(data, scale, d, 32, torch.float32), n, repeats)
                r["bit_identical_to_torchao"] = torchao_agrees(ao, xt, key, mx)
            out["runs"].append(r)
            print(f"  {t} thread(s) {label}: quantize->packed {r['quantize_packed']:.3f} G/s",
                  file=sys.stderr)
    return out


def sweep(fmt: str, profile: str) -> dict:
    from mxref.sweep import sweep_format
    res = sweep_format(fmt, profile, progress=True)
    print(res.summary(), file=sys.stderr)
    return {"format": fmt, "profile": profile, "inputs": res.n_inputs, "seconds": res.seconds,
            "elements_per_s": res.rate, "ok": res.ok, "violations": res.violations,
            "threads": numba.get_num_threads()}


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def table(res: dict) -> str:
    head = ("threads", "format", "copyto", "quantize->packed", "quantize", "dequantize",
            "pack", "torchao to_mx", "torchao to_dtype", "q->packed / copyto",
            "q->packed / to_mx", "dequant / to_dtype", "q->packed (cpu)", "copyto (cpu)",
            "same bits as torchao")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["runs"]:
        g = lambda k: f"{r[k]:.3f}" if k in r else "n/a"
        lines.append("| " + " | ".join([
            str(r["threads"]), r["format"], g("copyto"), g("quantize_packed"), g("quantize"),
            g("dequantize"), g("pack"), g("torchao_to_mx"), g("torchao_to_dtype"),
            ratio(r["quantize_packed"], r["copyto"]),
            ratio(r["quantize_packed"], r.get("torchao_to_mx")),
            ratio(r["dequantize"], r.get("torchao_to_dtype")), g("quantize_packed_cpu"),
            g("copyto_cpu"), str(r.get("bit_identical_to_torchao", "n/a"))]) + " |")
    if res["torchao"] != "ok":
        lines.append(f"\ntorchao: {res['torchao']}")
    for s in res.get("sweeps", []):
        lines.append(f"\nsweep {s['format']} / {s['profile']}: {s['inputs']:,} float32 inputs "
                     f"in {s['seconds']:.1f} s = {s['elements_per_s'] / 1e6:.1f} M elements/s "
                     f"({s['threads']} threads), {'all checks pass' if s['ok'] else 'FAILED'}")
    return "\n".join(lines)


def markdown(res: dict, text: str) -> str:
    m = res["machine"]
    return "\n".join([
        "# mxref throughput", "",
        f"Command: `{m['command']}` ({res['rows']} x {res['cols']} float32, block 32, best of "
        f"{res['repeats']}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", "",
        f"Machine: {m['cpus']} CPUs, load average {m['load_avg_before'][0]:.2f} before / "
        f"{m['load_avg'][0]:.2f} after (a shared box: wall-clock rates move with other "
        f"users' load; the `(cpu)` columns divide by process CPU time instead), numpy "
        f"{m['numpy']}, numba {m['numba']}, torchao: {res['torchao']}.", "",
        "Rates are G elements/s. `quantize->packed` = `mxref.quantize_packed` (codes packed as "
        "in specs/layouts.md, scales separate); `pack` = `mxref.pack_codes` alone; torchao = "
        "`to_mx` (FLOOR) and `to_dtype`, same data, same thread count; `same bits as torchao` "
        "compares scales and element bytes.", "", text, ""])


def write_atomic(path: str, text: str) -> None:
    """``text`` into ``path``, never half-written (mxref.outputs: the project's one writer)."""
    atomic_write(path, lambda fh: fh.write(text), force=True, text=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=8192)
    p.add_argument("--threads", default="1,2", help="comma-separated numba/torch thread counts")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sweep", action="store_true", help="also time the 2^32 FP4 sweep")
    p.add_argument("--quick", action="store_true", help="2 repeats, no sweep")
    p.add_argument("--json", default=os.path.join(HERE, "results", "mxref.json"))
    p.add_argument("--markdown", default=None, help="also write the table to this .md file")
    a = p.parse_args(argv)
    if a.cols % 32:
        p.error("--cols must be a multiple of 32 (torchao's to_mx needs whole blocks)")
    threads = [int(t) for t in a.threads.split(",")]
    threads = [t for t in threads if t <= numba.config.NUMBA_NUM_THREADS]
    load_before = os.getloadavg()
    res = bench(a.rows, a.cols, threads, 2 if a.quick else a.repeats)
    if a.sweep and not a.quick:
        numba.set_num_threads(max(threads))
        res["sweeps"] = [sweep("fp4_e2m1", "ocp")]
    res["machine"] = {"cpus": os.cpu_count(), "load_avg": os.getloadavg(),
                      "load_avg_before": load_before,
                      "python": platform.python_version(), "numpy": np.__version__,
                      "numba": numba.__version__, "mxref": mxref.__version__,
                      "command": "python benchmarks/bench_mxref.py " + " ".join(argv or sys.argv[1:])}
    text = table(res)
    print(text)
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    write_atomic(a.json, json.dumps(res, indent=1, default=str) + "\n")
    if a.markdown:
        write_atomic(a.markdown, markdown(res, text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
