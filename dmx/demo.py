"""`dmx demo [--out runs/demo] [--quick]`: the whole pipeline on the embedded model, on CPU.

On tiny-qwen3 (shipped in dmx/data/) with WikiText-2 raw (valid split to calibrate, test
split to evaluate): a dMX search at one budget, the uniform MXFP4 and MXFP8 baselines,
the KL-selection baseline at the same budget, the search fused with KL's sensitivities
(`dmx combine --kl`, as `dmx search --fuse-kl`), the perplexity of each (and of the
unquantized model) with one protocol, and the report (report.md, pareto.png). Everything
is built in a temp dir next to --out and renamed into place at the end.

Public API: ``demo_settings(quick) -> dict``, ``set_threads(n)``, ``run_demo(out,
quick=False, force=False, target_bits=6.0, progress=True, threads=1) -> list[dict]`` (the
report rows), ``add_demo_parser``.
"""
from __future__ import annotations

import time
from pathlib import Path

from dmx.errors import DMXError
from dmx.threads import set_threads

__all__ = ["demo_settings", "set_threads", "run_demo", "add_demo_parser", "run_demo_cli"]


def demo_settings(quick: bool = False) -> dict:
    """Sizes chosen so the demo takes about 2-3 minutes on 2 CPU cores, 1 thread (80 steps
    took 62 s there; --quick: well under a minute). Evaluation uses the first windows of
    wiki.test.raw: enough to rank the runs, not the full-text number."""
    if quick:
        return {"search_steps": 16, "search_batch": 2, "calib_seqlen": 128,
                "kl_samples": 2, "eval_seqlen": 256, "eval_windows": 8}
    return {"search_steps": 120, "search_batch": 4, "calib_seqlen": 128,
            "kl_samples": 16, "eval_seqlen": 256, "eval_windows": 96}


def _say(msg: str) -> None:
    print(f"dmx demo: {msg}", flush=True)


def _evaluate_out(out: Path, windows, progress: bool) -> dict:
    from dmx.eval.command import evaluate
    from dmx.outdir.evaljson import save_eval
    from dmx.outdir.read import load
    model, tok, _ = load(out)
    res = evaluate(model, tok, progress=progress, windows=windows)
    save_eval(out, res)
    _say(f"{out.name}: {res['protocol']}")
    return res


def _search(tmp: Path, name: str, target: float, s: dict, progress: bool) -> bool:
    """The dMX search, if dmx.search is in this build; False (and a note) if not."""
    from dmx import data
    try:
        from dmx.search import search
    except ImportError as err:
        _say(f"dMX search is not available in this build ({err}); continuing with the "
             f"baselines only")
        return False
    search(str(data.embedded_model_dir()), target, ladder="fp8-fp4",
           calib=[str(data.default_calibration_file())], seqlen=s["calib_seqlen"],
           samples=s["search_steps"] * s["search_batch"], steps=s["search_steps"],
           batch_size=s["search_batch"], out=str(tmp / name), checkpoint_every=0,
           progress=progress)
    return True


def run_demo(out="runs/demo", quick: bool = False, force: bool = False,
             target_bits: float = 6.0, progress: bool = True, threads: int = 1) -> list[dict]:
    from dmx import data
    from dmx.search import baseline
    from dmx.eval import report
    from dmx.eval.command import evaluate
    from dmx.quant.ladders import get_ladder

    t0 = time.time()
    from mxref.outputs import check_output, output_dir
    dest = Path(out)
    rules = dict(force=force, marker="report/report.json", what="--out", tool="dmx demo",
                 error=DMXError)
    dest.parent.mkdir(parents=True, exist_ok=True)
    check_output(dest, is_dir=True, **rules)   # before the work
    baseline.check_target_bits(target_bits, get_ladder("fp8-fp4"))
    set_threads(threads)
    s = demo_settings(quick)
    model_dir = data.embedded_model_dir()
    _say(f"model {model_dir.name}, calibration {data.default_calibration_file().name}, "
         f"evaluation {data.default_eval_file().name}, target {target_bits:g} bits "
         f"(ladder fp8-fp4)")
    _say(f"settings{' (--quick)' if quick else ''}: search {s['search_steps']} steps x "
         f"{s['search_batch']} windows of {s['calib_seqlen']} tokens (recipe default); "
         f"KL baseline "
         f"{s['kl_samples']} windows of {s['calib_seqlen']}; evaluation: first "
         f"{s['eval_windows']} windows of {s['eval_seqlen']} tokens; {threads} CPU "
         f"thread(s)")
    with output_dir(dest, **rules) as tmp:
        model, tok = data.load_model_and_tokenizer(model_dir)
        # one tokenization of the evaluation text for every model (same tokenizer files)
        windows = data.eval_windows(tok, data.default_eval_file(), s["eval_seqlen"],
                                    s["eval_windows"])
        ref = evaluate(model, tok, progress=progress, windows=windows)
        _say(f"unquantized: {ref['protocol']}")
        del model
        tag = f"{target_bits:g}"
        runs = []
        step_t = time.time()
        if _search(tmp, f"dmx-{tag}", target_bits, s, progress):
            runs.append(f"dmx-{tag}")
            _say(f"search done in {time.time() - step_t:.0f} s")
        for fmt, name in (("fp4_e2m1", "uniform-mxfp4"), ("fp8_e4m3", "uniform-mxfp8")):
            baseline.uniform_baseline(model_dir, fmt, tmp / name)
            runs.append(name)
        step_t = time.time()
        baseline.kl_baseline(model_dir, target_bits, tmp / f"kl-{tag}", samples=s["kl_samples"],
                             seqlen=s["calib_seqlen"], progress=progress)
        runs.append(f"kl-{tag}")
        _say(f"KL baseline done in {time.time() - step_t:.0f} s")
        if f"dmx-{tag}" in runs:
            # the search fused with KL's sensitivities (same calibration text and seed):
            # what the README advises after one search (`dmx search --fuse-kl`), seconds here
            from dmx.search.combine import combine_searches
            combine_searches([tmp / f"dmx-{tag}"], tmp / f"fused-{tag}", kl=[tmp / f"kl-{tag}"])
            runs.append(f"fused-{tag}")
        for name in runs:
            _evaluate_out(tmp / name, windows, progress)
        rows = report.collect([tmp / name for name in runs])
        for r in rows:
            r["path"] = str(dest / r["run"])  # where it will be once renamed
        reference = {"label": model_dir.name, "ppl": ref["ppl"], "protocol": ref["protocol"]}
        # every run against KL, window by window: is the search's lead beyond the noise?
        kl_row = next(r for r in rows if r["run"] == f"kl-{tag}")
        report.compare_against(rows, kl_row)
        report.write_report(rows, tmp / "report", reference,
                            title=f"dmx demo: {model_dir.name}, target {tag} bits",
                            against=kl_row)
    print()
    print(f"{'run':>16}  {'method':<8} {'avg bits':>8}  {'ppl':>8}")
    print(f"{'unquantized':>16}  {'-':<8} {'32':>8}  {ref['ppl']:8.2f}")
    for r in rows:
        print(f"{r['run']:>16}  {r['method']:<8} {r['avg_bits']:8.3f}  {r['ppl']:8.2f}")
    from dmx.eval.paired import paired_line
    for r in rows:
        if r["method"] in ("dmx", "dmx+kl") and r.get("paired"):
            _say(f"{r['run']} vs {kl_row['run']}: {paired_line(r['paired'])}")
    _say(f"wrote {dest}/ (OUT dirs + report/report.md, report/pareto.png, "
         f"report/dynamics.png) in {time.time() - t0:.0f} s")
    return rows


def add_demo_parser(subparsers):
    p = subparsers.add_parser(
        "demo", help="end-to-end demo on the embedded model (search, baselines, eval, report)",
        description="Run dMX search, the uniform MXFP4/MXFP8 and KL baselines, evaluation and "
                    "the report on the embedded tiny-qwen3 model, on CPU, in a few minutes.")
    p.add_argument("--out", "-o", default="runs/demo", help="directory to create (runs/demo)")
    p.add_argument("--quick", action="store_true", help="smaller settings (about a minute)")
    p.add_argument("--target-bits", type=float, default=6.0,
                   help="budget of the search and the KL baseline (default 6.0)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch and mxref (default 1: fastest for these small "
                        "tensors on a shared machine)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_demo_cli)
    return p


def run_demo_cli(args) -> int:
    run_demo(args.out, args.quick, args.force, args.target_bits, not args.no_progress,
             args.threads)
    return 0
