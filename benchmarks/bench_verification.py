"""Time mxverify: level-1 and level-2 generation + self-check, and the float32 sweep.

    python benchmarks/bench_verification.py [--format fp4_e2m1] [--slice-log2 28] [--full]

The float32 sweep runs all 2^32 inputs with --full; otherwise a 2^slice_log2 slice
(spread over the whole pattern range in equal strides) and extrapolates, saying so.
Prints a markdown table and a JSON line.
"""
import argparse
import json
import os
import tempfile
import time

from verification import check as C
from verification.exhaustive import run as sweep
from verification.vectors import build


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", default="fp4_e2m1")
    ap.add_argument("--slice-log2", type=int, default=28)
    ap.add_argument("--full", action="store_true")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for op in ("quantize", "dequantize", "dot", "convert"):
            for level in ("1", "2"):
                d = os.path.join(tmp, f"{op}{level}")
                t0 = time.perf_counter()
                m = build(d, op, a.format, level, seed=1)
                t1 = time.perf_counter()
                s = C.load_suite(d)
                r = C.compare(s, C.read_dut(os.path.join(d, "expected.bin"), s, None))
                t2 = time.perf_counter()
                assert r["verdict"] == "pass"
                rows.append({"what": f"gen+check {op} level {level}", "cases": m["n_vectors"],
                             "gen_s": round(t1 - t0, 2), "check_s": round(t2 - t1, 2)})
    n = 1 << 32 if a.full else 1 << a.slice_log2
    parts = 16
    t0 = time.perf_counter()
    mism = 0
    for k in range(parts):   # equal slices spread over the pattern space
        start = k * ((1 << 32) // parts)
        mism += sweep(a.format, "ocp", limit=n // parts, start=start, progress=False)["mismatches"]
    secs = time.perf_counter() - t0
    est = secs * (1 << 32) / n
    rows.append({"what": f"float32 sweep {'2^32' if a.full else f'2^{a.slice_log2} slice'}",
                 "cases": n, "gen_s": round(secs, 1), "check_s": None, "mismatches": mism,
                 "throughput_M_per_s": round(n / secs / 1e6, 2),
                 "full_2_32_s": round(est, 0), "extrapolated": not a.full})
    print(f"| what ({a.format}) | cases | generate s | check s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['cases']} | {r['gen_s']} | {'' if r['check_s'] is None else r['check_s']} |")
    sw = rows[-1]
    print(f"\nfloat32 sweep: {sw['throughput_M_per_s']} M inputs/s, {sw['mismatches']} mismatches; "
          f"full 2^32 {'took' if a.full else 'extrapolates to'} {sw['full_2_32_s']:.0f} s")
    print(json.dumps({"format": a.format, "rows": rows}))


if __name__ == "__main__":
    main()
