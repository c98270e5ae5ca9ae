"""GPU check and benchmark in one run: exactness against mxref, then throughput, the
search step and a short real search; one summary table at the end.

Sections (each in its own try/except, results written to JSON as they come; pick a subset
with --sections, in any order: they run in the order below):
  1. env       -- torch / triton / device.
  2. exact     -- dmx.quant.fakequant's torch path on the GPU and the Triton kernel against mxref
                  (computed on the CPU from the same data): every element format, float32 /
                  bfloat16 / float16, random wide-range and adversarial tensors, ragged rows.
                  Non-NaN elements: equal bit patterns; NaN: same positions (payloads are
                  counted separately: torch's own casts disagree on them).
  3. realfmt   -- Triton real-format forward/backward against dmx.quant.realfmt on the GPU.
  4. speed     -- G elements/s, bf16 in/out: device copy, plain-PyTorch MX fake-quant
                  (eager, torch.compile), dmx.quant.fakequant torch path (eager, compiled), Triton
                  kernel, dmx.quant.fakequant.fake_quantize with the Triton backend.
  5. step      -- benchmarks/bench_search_step.py's CUDA path (batch 8 x 2048): time and
                  peak memory of the dMX search step next to the bf16 step.
  6. search    -- `dmx search --model DIR` (default recipe, target 6, --search-steps steps
                  of 8 x 2048) through the CLI in this process: time per step (median after
                  the first, which compiles), peak memory, bits, calibration perplexity,
                  and the projected time of the paper protocol's 400 steps. Needs --model
                  (a Hugging Face directory, e.g. SmolLM2-135M from build_smollm2.py).
  7. realfmt_speed, 8. torchao -- optional extras (torchao from DMX_EXTRA_SITE), last.

--cpu-dry-run runs the same code paths on tiny CPU tensors (Triton through its
interpreter when triton is installed; without it the Triton rows say "skipped"), the
search section on the embedded tiny-qwen3 when no --model is given: it checks the script,
it measures nothing.

Usage: python benchmarks/bench_gpu.py [--out DIR] [--budget SECONDS] [--sections LIST]
       [--model DIR] [--search-steps N] [--lean] [--cpu-dry-run]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import mxref  # noqa: E402

T0 = time.time()
RESULTS: dict = {"sections": {}}
OUT: Path | None = None
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def save():
    if OUT is not None:
        (OUT / "gpu_raw.json").write_text(json.dumps(RESULTS, indent=2, default=str))


def section(name, budget_needed, deadline):
    """Decorator-free section runner: skips when the time budget is short."""
    def runner(fn, *args):
        left = deadline - time.time()
        if left < budget_needed:
            RESULTS["sections"][name] = {"skipped": f"{left:.0f}s left < {budget_needed}s"}
            log(f"== {name}: skipped ({left:.0f}s left)")
            save()
            return
        log(f"== {name}")
        try:
            RESULTS["sections"][name] = fn(*args)
        except Exception as err:
            traceback.print_exc()
            RESULTS["sections"][name] = {"error": f"{type(err).__name__}: {err}"}
        save()
    return runner


# ----------------------------------------------------------------------------- data
def adversarial(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 75, generator=g) * torch.exp(3 * torch.randn(6, 75, generator=g))
    base[0, :7] = 0.0
    base[1, 3] = float("nan")
    base[2, 40] = -float("inf")
    base[3] = -0.0
    base[4, ::3] *= 1e-6
    base[5, :32] = torch.finfo(dtype).tiny * torch.arange(32) / 8  # subnormal block
    return base.to(dtype)


def wide_random(dtype, rows=512, cols=4096, seed=1):
    """Wide dynamic range per block, ties, NaN/Inf blocks, subnormals, ragged rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    span = 10 if dtype == torch.float16 else 30  # float16 would overflow beyond that
    x *= torch.exp2(torch.randint(-span, span, (rows, cols // 32 + 1), generator=g)
                    .float()).repeat_interleave(32, 1)[:, :cols]
    fi = torch.finfo(dtype)
    x[::7, ::5] = torch.round(x[::7, ::5] * 4) / 4  # exact grid points and ties
    x[3, 100] = float("nan")
    x[5, 200] = float("inf")
    x[9, :64] = fi.tiny * torch.randn(64, generator=g)  # subnormal inputs
    x[11, :64] = fi.max * (1 - torch.rand(64, generator=g) / 100)  # near overflow
    return x.to(dtype)


def native_numpy(x: torch.Tensor) -> np.ndarray:
    """x as a numpy array of its own dtype (bfloat16 through ml_dtypes)."""
    t = x.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def mxref_ref(x, fmt, profile="ocp", axis=-1):
    arr = native_numpy(x)  # the input dtype itself (ftz profiles read its subnormals)
    ref = mxref.dequantize(mxref.quantize(arr, fmt, axis, 32, profile), np.float32)
    return torch.from_numpy(np.ascontiguousarray(ref)).to(x.dtype)


def compare(y, ref):
    """{mismatch: non-NaN elements with other bits, nan_pos: NaN position mismatches,
    nan_payload: NaN elements with other payload bits}."""
    y, ref = y.detach().cpu(), ref.detach().cpu()
    iv = INT_VIEW[y.dtype]
    ny, nr = torch.isnan(y), torch.isnan(ref)
    bits_differ = y.view(iv) != ref.view(iv)
    return {"mismatch": int((bits_differ & ~nr & ~ny).sum()),
            "nan_pos": int((ny != nr).sum()),
            "nan_payload": int((bits_differ & nr & ny).sum())}


# ----------------------------------------------------------------------------- sections
def sec_env():
    info = {"torch": torch.__version__, "python": sys.version.split()[0],
            "cuda": torch.cuda.is_available()}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as err:
        info["triton"] = f"unavailable: {err}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, sms=p.multi_processor_count,
                    mem_gib=round(p.total_memory / 2**30, 1))
    else:
        info["device"] = "cpu"
    log(info)
    return info


def sec_exact(device, quick, dry=False, lean=False):
    from dmx.quant import triton_kernels as tk
    from dmx.quant.fakequant import fake_quantize_torch, fake_quantize
    cases = []
    total = {"torch": [0, 0], "triton": [0, 0], "public": [0, 0]}
    combos = [(f, p) for f in sorted(mxref.FORMATS) for p in ("ocp",)]
    combos += [("fp8_e4m3", "rceil"), ("fp4_e2m1", "rceil"), ("fp8_e4m3", "microxcaling"),
               ("fp4_e2m1", "microxcaling"), ("fp6_e3m2", "ocp_ftz"), ("fp8_e5m2", "ocp_ovf")]
    triton_ok = (device.type == "cuda" or dry) and tk.available()
    for fmt, prof in combos:
        for dname, dtype in DTYPES.items():
            if prof != "ocp" and dtype != torch.bfloat16:
                continue  # other profiles: bf16 only (each combination is a Triton compile)
            if lean and (prof != "ocp" or (dtype != torch.bfloat16
                                           and fmt not in ("fp8_e4m3", "fp4_e2m1"))):
                continue
            tensors = [("adversarial", adversarial(dtype, 3))]
            if not lean:
                tensors.append(("adversarial_T", adversarial(dtype, 4).T))
            if not quick:  # whole blocks per row (the fast path) and a ragged row end
                tensors.append(("wide_random_even", wide_random(dtype, 512, 4096)))
                tensors.append(("wide_random_ragged", wide_random(dtype, 64, 4096 + 19)))
            for tname, x in tensors:
                ref = mxref_ref(x, fmt, prof)
                xd = x.to(device)
                row = {"fmt": fmt, "profile": prof, "dtype": dname, "tensor": tname,
                       "numel": x.numel()}
                impls = {"torch": lambda: fake_quantize_torch(xd, fmt, -1, 32, prof)}
                if triton_ok:
                    f, p = mxref.get_format(fmt), mxref.get_profile(prof)
                    if tk.supports(xd, f, -1, 32, p):
                        impls["triton"] = lambda: tk.mx_fake_quantize(xd, f, -1, 32, p)
                    impls["public"] = lambda: fake_quantize(xd, fmt, -1, 32, prof)
                for name, fn in impls.items():
                    try:
                        c = compare(fn(), ref)
                        ok = c["mismatch"] == 0 and c["nan_pos"] == 0
                    except Exception as err:
                        c, ok = {"error": f"{type(err).__name__}: {err}"}, False
                    row[name] = c
                    total[name][0] += 1
                    total[name][1] += ok
                    if not ok:
                        log(f"MISMATCH {name} {fmt}/{prof}/{dname}/{tname}: {c}")
                cases.append(row)
    summary = {k: {"cases": v[0], "exact": v[1]} for k, v in total.items() if v[0]}
    nan_payload = {k: sum(r.get(k, {}).get("nan_payload", 0) for r in cases) for k in summary}
    log("exact summary:", summary, "nan payload diffs:", nan_payload)
    return {"summary": summary, "nan_payload_elements": nan_payload, "cases": cases}


def triton_missing() -> dict | None:
    """{"skipped": why} when the Triton kernels cannot run in this process (a CPU dry run
    without triton installed), else None."""
    from dmx.quant import triton_kernels as tk
    return None if tk.available() else {"skipped": "triton is not installed here"}


def sec_realfmt(device, lean=False):
    if triton_missing():
        return triton_missing()
    from dmx.quant import triton_ops
    out = []
    g = torch.Generator().manual_seed(5)
    points = {1024: [(2.0, 1.0), (3.0, 2.0), (4.0, 3.0), (2.6, 1.6), (3.5, 2.5)],
              1031: [(3.0, 2.0), (2.6, 1.6)]}  # whole blocks / ragged row end
    dtypes = (torch.float32, torch.bfloat16)
    if lean:
        points = {1024: [(3.0, 2.0), (2.6, 1.6)], 1031: [(3.0, 2.0)]}
        dtypes = (torch.bfloat16,)
    for dtype, cols in [(d, c) for d in dtypes for c in points]:
        x = (torch.randn(256, cols, generator=g)
             * torch.exp2(torch.randint(-10, 10, (256, 1), generator=g).float()))
        x = x.to(dtype).to(device)
        gy = torch.randn(x.shape, generator=g).to(dtype).to(device)
        for eb, mb in points[cols]:
            res = []
            for backend in ("torch", "triton"):
                xi = x.clone().requires_grad_()
                e = torch.tensor(eb, device=device, requires_grad=True)
                m = torch.tensor(mb, device=device, requires_grad=True)
                y = triton_ops.real_format_quantize(xi, e, m, -1, 32, 448.0, backend=backend)
                y.backward(gy)
                res.append((y.detach(), xi.grad, float(e.grad), float(m.grad)))
            (y0, dx0, de0, dm0), (y1, dx1, de1, dm1) = res
            row = {"dtype": str(dtype), "cols": cols, "e": eb, "m": mb, "fwd": compare(y1, y0),
                   "dx": compare(dx1, dx0),
                   "fwd_max_rel": float(((y1.float() - y0.float()).abs()
                                         / y0.float().abs().clamp_min(1e-30)).max()),
                   "de": [de0, de1], "dm": [dm0, dm1]}
            out.append(row)
            log("realfmt", row)
    return {"cases": out}


def cuda_time(fn, min_time=0.2, warmup=3):
    """Median seconds per call (CUDA events), repeated until ~min_time is spent."""
    if not torch.cuda.is_available():  # --cpu-dry-run: the code path, not a measurement
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = max(time.perf_counter() - t, 1e-6)
    reps = int(min(200, max(5, min_time / one)))
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def plain_mx_fake_quant(x, ebits_emax, mbits, emin, max_norm, block=32):
    """MX fake quantization written the usual way in PyTorch (microxcaling-style):
    log2/floor for the shared and private exponents, exp2 scales, round, clamp."""
    shape = x.shape
    xb = x.reshape(-1, block).float()
    amax = xb.abs().amax(dim=-1, keepdim=True)
    shared = torch.floor(torch.log2(amax + (amax == 0).float())) - ebits_emax
    shared = shared.clamp(-127, 127)
    xs = xb / torch.exp2(shared)
    private = torch.floor(torch.log2(xs.abs() + (xs == 0).float())).clamp(min=emin)
    step = torch.exp2(private - mbits)
    q = (torch.round(xs / step) * step).clamp(-max_norm, max_norm)
    return (q * torch.exp2(shared)).reshape(shape).to(x.dtype)


def sec_speed(device, shapes, deadline, lean=False):
    from dmx.quant import triton_kernels as tk
    from dmx.quant.fakequant import fake_quantize_torch, fake_quantize
    rows = []
    compile_ = torch.compile if device.type == "cuda" else (lambda f: f)  # dry run: eager
    plain_c = compile_(plain_mx_fake_quant)
    dmx_c = compile_(fake_quantize_torch)
    prof = mxref.get_profile("ocp")

    # kernel configuration sweep on the first shape (elements per program, warps)
    x0 = torch.randn(*shapes[0], device=device, dtype=torch.bfloat16)
    f8 = mxref.get_format("fp8_e4m3")
    sweep = {}
    have_triton = triton_missing() is None
    for epp in ((4096, 8192) if lean else (2048, 4096, 8192, 16384)) if have_triton else ():
        for nw in ((4, 8) if lean else (4, 8)):
            tk.CONFIG.update(elems_per_prog=epp, num_warps=nw)
            try:
                sweep[f"{epp}/{nw}"] = x0.numel() / cuda_time(
                    lambda: tk.mx_fake_quantize(x0, f8, -1, 32, prof)) / 1e9
            except Exception as err:
                sweep[f"{epp}/{nw}"] = f"{type(err).__name__}: {err}"
    good = {k: v for k, v in sweep.items() if isinstance(v, float)}
    best = max(good, key=good.get) if good else "4096/4"
    epp, nw = map(int, best.split("/"))
    tk.CONFIG.update(elems_per_prog=epp, num_warps=nw)
    log("triton config sweep (G elem/s):", {k: round(v, 1) if isinstance(v, float) else v
                                            for k, v in sweep.items()}, "best", best)
    del x0

    for shape in shapes:
        x = torch.randn(*shape, device=device, dtype=torch.bfloat16)
        n = x.numel()
        impls = [("device copy (x.clone())", None, lambda: x.clone())]
        for fmt in ("fp8_e4m3", "fp4_e2m1"):
            f = mxref.get_format(fmt)
            args = (f.emax, f.man_bits, f.emin, f.max_normal)
            # most important first: the time budget may cut the tail of the list
            impls += [
                ("dmx Triton kernel", fmt, lambda fi=f: tk.mx_fake_quantize(x, fi, -1, 32, prof)),
                ("plain PyTorch torch.compile", fmt, lambda a=args: plain_c(x, *a)),
                ("dmx.quant.fakequant.fake_quantize (Triton backend)", fmt,
                 lambda fm=fmt: fake_quantize(x, fm)),
            ][0 if have_triton else 1:]  # without triton the public API is the torch path
            if not lean:
                impls.append(("plain PyTorch eager", fmt,
                              lambda a=args: plain_mx_fake_quant(x, *a)))
            impls += [] if lean else [
                ("dmx.quant.fakequant torch path eager", fmt,
                 lambda fm=fmt: fake_quantize_torch(x, fm, -1, 32, "ocp")),
                ("dmx.quant.fakequant torch path torch.compile", fmt,
                 lambda fm=fmt: dmx_c(x, fm, -1, 32, "ocp")),
            ]
        for name, fmt, fn in impls:
            if time.time() > deadline:
                log("speed: out of time budget")
                break
            row = {"shape": list(shape), "impl": name, "fmt": fmt}
            try:
                sec = cuda_time(fn)
                row.update(sec=sec, gelem_s=n / sec / 1e9)
                if fmt is None:
                    row["tb_s_rw"] = 2 * x.element_size() * n / sec / 1e12
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            rows.append(row)
            log("speed", row)
            save()
        del x
        torch.cuda.empty_cache()
    add_ratios(rows)
    return {"config_sweep_gelem_s": sweep, "config": best, "rows": rows}


def add_ratios(rows):
    """Speed-up over the compiled plain PyTorch of the same shape and format."""
    for r in rows:
        base = [b for b in rows if b["shape"] == r["shape"] and b["fmt"] == r["fmt"]
                and b["impl"] == "plain PyTorch torch.compile" and "sec" in b]
        if base and "sec" in r:
            r["x_compiled_plain"] = base[0]["sec"] / r["sec"]


def sec_torchao(device, shapes):
    """torchao's to_mx (eager), run last: importing torchao can change what other
    libraries (transformers) import, so nothing else runs after it. Its wheel may be
    carried in and installed to DMX_EXTRA_SITE (appended to sys.path, lowest priority)."""
    extra = os.environ.get("DMX_EXTRA_SITE")
    if extra and extra not in sys.path:
        sys.path.append(extra)
    import torchao
    from torchao.prototype.mx_formats.mx_tensor import to_mx
    log("torchao", torchao.__version__)
    speed = RESULTS["sections"].get("speed", {})
    rows = speed.get("rows", [])
    dts = {"fp8_e4m3": torch.float8_e4m3fn, "fp4_e2m1": getattr(torch, "float4_e2m1fn_x2", None)}
    for shape in shapes:
        x = torch.randn(*shape, device=device, dtype=torch.bfloat16)
        for fmt, dt in dts.items():
            row = {"shape": list(shape), "impl": f"torchao {torchao.__version__} to_mx eager",
                   "fmt": fmt}
            try:
                if dt is None:
                    raise RuntimeError("this torch has no float4_e2m1fn_x2")
                sec = cuda_time(lambda: to_mx(x, dt, 32))
                row.update(sec=sec, gelem_s=x.numel() / sec / 1e9)
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            rows.append(row)
            log("speed", row)
        del x
        torch.cuda.empty_cache()
    add_ratios(rows)
    return {"torchao": torchao.__version__, "rows_added_to_speed": True}


def sec_realfmt_speed(device):
    from dmx.quant import triton_ops
    from dmx.quant.realfmt import real_format_quantize
    rows = []
    shape = (16384, 1536) if device.type == "cuda" else (64, 96)
    x = torch.randn(*shape, device=device, dtype=torch.bfloat16)
    gy = torch.randn_like(x)
    e = torch.tensor(3.3, device=device, requires_grad=True)
    m = torch.tensor(2.3, device=device, requires_grad=True)
    impls = [("dmx.quant.realfmt torch", real_format_quantize)]
    if triton_missing() is None:
        impls.append(("dmx Triton (dmx.quant.triton_ops)",
                      lambda *a: triton_ops.real_format_quantize(*a, backend="triton")))
    for name, fn in impls:
        def fwd():
            with torch.no_grad():
                return fn(x, e, m, -1, 32, 448.0)

        def fwdbwd():
            xi = x.detach().requires_grad_()
            fn(xi, e, m, -1, 32, 448.0).backward(gy)
        for what, f in (("forward", fwd), ("forward+backward", fwdbwd)):
            try:
                sec = cuda_time(f)
                rows.append({"impl": name, "pass": what, "sec": sec,
                             "gelem_s": x.numel() / sec / 1e9})
            except Exception as err:
                rows.append({"impl": name, "pass": what, "error": str(err)[:300]})
            log("realfmt speed", rows[-1])
    return {"shape": list(x.shape), "rows": rows}


def sec_step(device, grad_ckpt=False, lean=False):
    import bench_search_step as bss
    small = {} if device.type == "cuda" else dict(batch=1, seq=64, layers=1, steps=1)
    if lean:
        small.update(steps=3, warmup=1)
    modes = ["bf16", "dmx-fused"] + ([] if lean else ["dmx"])
    res = bss.run(device.type, modes=modes, grad_ckpt=grad_ckpt, log=log, **small)
    res["markdown"] = bss.markdown(res)
    return res


PAPER_STEPS = 400  # the paper protocol's steps (batch 8 x 2048): what the projection is for


def _timed_train_steps(times: list, device):
    """dmx.search.train._train_step wrapped to append each step's wall seconds to ``times``
    (synchronized on CUDA). The CLI below calls train_offsets, which looks the step
    function up in its module, so the search runs unchanged, only timed."""
    import dmx.search.train as train
    inner = train._train_step

    def timed(*args, **kwargs):
        _sync(device)
        t = time.perf_counter()
        record = inner(*args, **kwargs)
        _sync(device)
        times.append(time.perf_counter() - t)
        return record
    return train, inner, timed


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def sec_search(device, model_dir, steps, dry=False):
    """A short `dmx search` (default recipe) on a real model through the CLI, in this
    process so that the step times and the peak memory can be read."""
    import shutil
    import tempfile

    from dmx import data
    from dmx.cli import main as dmx_main
    if model_dir is None:
        if not dry:
            return {"skipped": "no --model DIR (see docs/gpu_runbook.md)"}
        model_dir = data.embedded_model_dir()  # the dry run: the embedded 5.8 M Qwen3
    cuda = device.type == "cuda"
    seqlen, batch = (2048, 8) if cuda else (32, 2)
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_search_"))
    argv = ["search", "--model", str(model_dir), "--target-bits", "6", "--recipe", "default",
            "--steps", str(steps), "--batch-size", str(batch), "--seqlen", str(seqlen),
            "--device", device.type, "--checkpoint-every", "0", "--no-progress",
            "-o", str(work / "out")]
    times: list = []
    train, inner, timed = _timed_train_steps(times, device)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    log("dmx " + " ".join(argv))
    t0 = time.perf_counter()
    train._train_step = timed
    try:
        rc = dmx_main(argv)
    finally:
        train._train_step = inner
    wall = time.perf_counter() - t0
    try:
        res = {"argv": argv, "exit_code": rc, "wall_s": wall, "step_s": times}
        if rc != 0:
            res["error"] = f"dmx search exited {rc} (its message is in the log above)"
            return res
        manifest = json.loads((work / "out" / "dmx_manifest.json").read_text())
        meta = manifest["search"]
        steady = times[1:] or times
        res.update(model=str(model_dir), steps=steps, batch=batch, seqlen=seqlen,
                   first_step_s=times[0] if times else None,
                   median_step_s=statistics.median(steady) if steady else None,
                   achieved_bits=meta.get("achieved_bits"), end_ppl=meta.get("end_ppl"))
        if res["median_step_s"]:
            res["projected_paper_steps_s"] = PAPER_STEPS * res["median_step_s"]
        if cuda:
            res["peak_bytes"] = torch.cuda.max_memory_allocated()
        gguf_record = Path(model_dir) / "dmx_gguf.json"  # a build_smollm2.py conversion
        if gguf_record.is_file():
            res["model_sha256"] = json.loads(gguf_record.read_text()).get("sha256")
        log("search", {k: v for k, v in res.items() if k not in ("argv", "step_s")})
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summary_rows() -> list[tuple[str, str, str, str]]:
    """(check, measured, target, status) for each section that ran: the one table."""
    s = RESULTS["sections"]
    dry = s.get("env", {}).get("dry_run", False)

    def timed(ok: bool) -> str:  # a dry run's timings are no measurement: no verdict
        return "dry run" if dry else ("met" if ok else "**not met**")
    rows = []
    for name, v in s.items():
        if isinstance(v, dict) and ("skipped" in v or "error" in v) and name != "env":
            rows.append((name, v.get("error") or "skipped: " + v["skipped"], "", "not run"
                         if "skipped" in v else "error"))
    ex = s.get("exact", {})
    for impl, v in ex.get("summary", {}).items():
        rows.append((f"bit-exact vs mxref: {impl}", f"{v['exact']} / {v['cases']} cases",
                     "all", "met" if v["exact"] == v["cases"] else "**not met**"))
    rf = s.get("realfmt", {})
    if "cases" in rf:
        bad = sum(r["fwd"]["mismatch"] + r["dx"]["mismatch"] for r in rf["cases"])
        rows.append(("Triton real format vs dmx.quant.realfmt (fwd + dx bits)",
                     f"{bad} mismatching elements in {len(rf['cases'])} cases", "0",
                     "met" if bad == 0 else "**not met**"))
    for r in s.get("speed", {}).get("rows", []):
        if r["impl"] in ("dmx Triton kernel", "dmx.quant.fakequant.fake_quantize (Triton backend)") \
                and "x_compiled_plain" in r:
            rows.append((f"fake-quant {r['fmt']} {r['shape'][0]}x{r['shape'][1]}: {r['impl']}",
                         f"{r['gelem_s']:.1f} G elem/s, {r['x_compiled_plain']:.2f}x compiled "
                         f"plain", ">= 2.5x", timed(r["x_compiled_plain"] >= 2.5)))
    st = s.get("step", {})
    for mode, r in st.get("modes", {}).items():
        if mode == "bf16" or "time_ratio" not in r:
            continue
        ms = r["sec_per_step"] * 1e3
        rows.append((f"search step {mode} vs bf16 ({st['batch']}x{st['seq']}, "
                     f"{st['layers']} layers): time", f"{ms:.1f} ms, {r['time_ratio']:.2f}x",
                     "<= 1.3x", timed(r["time_ratio"] <= 1.3)))
        if "memory_ratio" in r:
            rows.append((f"search step {mode} vs bf16: peak memory",
                         f"{r['peak_bytes'] / 2**30:.2f} GiB, {r['memory_ratio']:.2f}x",
                         "<= 1.2x", timed(r["memory_ratio"] <= 1.2)))
    se = s.get("search", {})
    if "median_step_s" in se:
        peak = f", peak {se['peak_bytes'] / 2**30:.2f} GiB" if "peak_bytes" in se else ""
        rows.append((f"dmx search {Path(se['model']).name}, {se['steps']} steps x "
                     f"{se['batch']}x{se['seqlen']}",
                     f"{se['median_step_s']:.3f} s/step (first {se['first_step_s']:.1f} s)"
                     f"{peak}; {PAPER_STEPS} steps ~ {se['projected_paper_steps_s'] / 60:.1f} "
                     f"min; bits {se['achieved_bits']['simple']:.3f}; calib ppl hard "
                     f"{se['end_ppl']['hard_repaired']:.3f}", "runs", "ran"))
    return rows


def summary_markdown() -> str:
    lines = ["| check | measured | target | status |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- report
def markdown() -> str:
    s = RESULTS["sections"]
    env = s.get("env", {})
    lines = ["# GPU benchmark (benchmarks/bench_gpu.py)", "",
             f"Device: {env.get('device', '?')}, torch {env.get('torch')}, "
             f"triton {env.get('triton')}, python {env.get('python')}"
             + (" (--cpu-dry-run: code paths only, no measurement)" if env.get("dry_run")
                else "") + ".", "", "## Summary", "", summary_markdown()]
    ex = s.get("exact", {})
    if "summary" in ex:
        lines += ["## Bit-exactness against mxref (on the GPU)", "",
                  "| implementation | cases | exact (non-NaN bits equal, NaN positions equal) |",
                  "| --- | ---: | ---: |"]
        for k, v in ex["summary"].items():
            lines.append(f"| {k} | {v['cases']} | {v['exact']} |")
        lines += ["", f"NaN elements with another payload than mxref's CPU cast: "
                  f"{ex.get('nan_payload_elements')}", ""]
    elif ex:
        lines += [f"exact: {ex}", ""]
    sp = s.get("speed", {})
    if "rows" in sp:
        lines += ["## Throughput, bf16 in / bf16 out (G elements/s; median, CUDA events)", "",
                  f"Triton config (elements per program / warps): {sp.get('config')}; sweep: "
                  f"{ {k: round(v, 1) if isinstance(v, float) else v for k, v in sp.get('config_sweep_gelem_s', {}).items()} }",
                  "", "| shape | format | implementation | G elem/s | x compiled plain PyTorch |",
                  "| --- | --- | --- | ---: | ---: |"]
        for r in sp["rows"]:
            val = f"{r['gelem_s']:.1f}" if "gelem_s" in r else "error: " + r.get("error", "")[:60]
            if "tb_s_rw" in r:
                val += f" ({r['tb_s_rw']:.2f} TB/s r+w)"
            ratio = f"{r['x_compiled_plain']:.2f}" if "x_compiled_plain" in r else ""
            lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['fmt'] or '-'} | {r['impl']} "
                         f"| {val} | {ratio} |")
        lines.append("")
    rs = s.get("realfmt_speed", {})
    if "rows" in rs:
        lines += [f"## Real-valued format quantizer, bf16 {rs['shape']}, e=3.3 m=2.3", "",
                  "| implementation | pass | ms | G elem/s |", "| --- | --- | ---: | ---: |"]
        for r in rs["rows"]:
            if "sec" in r:
                lines.append(f"| {r['impl']} | {r['pass']} | {r['sec'] * 1e3:.3f} | "
                             f"{r['gelem_s']:.1f} |")
            else:
                lines.append(f"| {r['impl']} | {r['pass']} | error | {r['error'][:60]} |")
        lines.append("")
    rf = s.get("realfmt", {})
    if "cases" in rf:
        lines += ["## Triton real-format quantizer vs dmx.quant.realfmt (GPU)", "",
                  "| dtype | shape | e | m | fwd mismatches | fwd max rel | dx mismatches | "
                  "de torch / triton | dm torch / triton |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for r in rf["cases"]:
            lines.append(f"| {r['dtype']} | 256x{r['cols']} | {r['e']} | {r['m']} | "
                         f"{r['fwd']['mismatch']} | "
                         f"{r['fwd_max_rel']:.2e} | {r['dx']['mismatch']} | "
                         f"{r['de'][0]:.5g} / {r['de'][1]:.5g} | "
                         f"{r['dm'][0]:.5g} / {r['dm'][1]:.5g} |")
        lines.append("")
    st = s.get("step", {})
    if "markdown" in st:
        lines += ["## Search step", "", st["markdown"]]
    for name, v in s.items():
        if isinstance(v, dict) and ("error" in v or "skipped" in v):
            lines.append(f"- section {name}: {v.get('error') or v.get('skipped')}")
    return "\n".join(lines) + "\n"


SECTIONS = ("exact", "realfmt", "speed", "step", "search", "realfmt_speed", "torchao")
LEAN_SECTIONS = ("exact", "realfmt", "speed", "step", "search")


def main(argv=None):
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks/results"))
    ap.add_argument("--budget", type=float, default=420.0,
                    help="seconds for the whole run (default 420: inside an 8-minute call)")
    ap.add_argument("--quick", action="store_true", help="fewer exactness tensors")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--lean", action="store_true",
                    help="a shorter run: fewer exactness cases, one speed shape, no torch "
                         "dMX step, no realfmt_speed/torchao")
    ap.add_argument("--sections", default=None,
                    help=f"comma-separated subset of: {','.join(SECTIONS)} (default: all; "
                         f"with --lean: {','.join(LEAN_SECTIONS)})")
    ap.add_argument("--model", default=None,
                    help="Hugging Face model directory for the search section (e.g. the "
                         "SmolLM2-135M built by benchmarks/build_smollm2.py)")
    ap.add_argument("--search-steps", type=int, default=6,
                    help="steps of the search section (default 6: the first compiles)")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run every section on tiny CPU tensors (Triton through its "
                         "interpreter if installed): checks the script, measures nothing")
    args = ap.parse_args(argv)
    want = (args.sections or ",".join(LEAN_SECTIONS if args.lean else SECTIONS)).split(",")
    unknown = sorted(set(want) - set(SECTIONS))
    if unknown:
        print(f"bench_gpu: error: unknown section(s) {', '.join(unknown)}; choose from "
              f"{', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.model is not None and not Path(args.model).is_dir():
        print(f"bench_gpu: error: --model {args.model}: no such directory; build it with "
              f"benchmarks/build_smollm2.py (docs/gpu_runbook.md)", file=sys.stderr)
        return 2
    if args.search_steps < 2:
        print("bench_gpu: error: --search-steps must be at least 2 (the first step "
              "compiles; the median is taken over the others)", file=sys.stderr)
        return 2
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    deadline = T0 + args.budget
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dry = args.cpu_dry_run and not cuda
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"
    section("env", 0, deadline)(sec_env)
    RESULTS["sections"]["env"]["dry_run"] = dry
    lean = args.lean
    # seconds each section needs at least to start (else it is skipped, saying so); the
    # search is reserved its share before the speed section may use the rest
    # (the search: model load, Triton compile, the steps, packing OUT: about 60 s)
    search_need = 60 + 2 * args.search_steps if cuda else 10
    if "exact" in want:
        section("exact", 30, deadline)(sec_exact, device, args.quick or not cuda, dry, lean)
    if cuda or dry:
        shapes = [(4096, 8192), (16384, 16384)] if cuda else [(64, 256)]
        reserve = (search_need if "search" in want else 0) + (40 if "step" in want else 0)
        if "realfmt" in want:
            section("realfmt", 20, deadline)(sec_realfmt, device, lean)
        if "speed" in want:
            section("speed", 60, deadline - reserve)(sec_speed, device, shapes,
                                                     deadline - reserve - 30, lean)
        if "step" in want:
            section("step", 40, deadline - (search_need if "search" in want else 0))(
                sec_step, device, args.grad_checkpointing, lean)
        if "search" in want:
            section("search", search_need, deadline)(sec_search, device, args.model,
                                                      args.search_steps, dry)
        if "realfmt_speed" in want:
            section("realfmt_speed", 15, deadline)(sec_realfmt_speed, device)
        if "torchao" in want:
            section("torchao", 10, deadline + 20)(sec_torchao, device, shapes)
    else:
        log("no CUDA device: only the CPU-safe sections ran (use --cpu-dry-run for all)")
    md = markdown()
    (OUT / "gpu.md").write_text(md)
    save()
    print(md, flush=True)
    print("== summary (bench_gpu.py)\n" + summary_markdown(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
