"""Search sweep (issues 5 and 11): dMX recipes x targets x seeds vs the KL heuristic at the
same achieved bits and uniform MXFP4/MXFP8, one evaluation protocol for all.

    python benchmarks/build_smollm2.py                     # the model (once, cached)
    python benchmarks/bench_search_sweep.py --recipes default paper --targets 4.5 5 6 \\
        --seeds 0 1 --steps 24 --seqlen 128 --batch-size 4 --kl-samples 4 --max-windows 40 \\
        --threads 1 --reuse                                # the SmolLM2-135M protocol

The model is SmolLM2-135M-Instruct in float32 (~/.cache/dmx/smollm2-135m-instruct-f32, built
by benchmarks/build_smollm2.py); ``--model embedded`` takes the tiny-qwen3 shipped in
dmx/data/ instead, ``--model DIR`` (or a .gguf file) any other. Every search runs with
``--no-fill-budget`` unless ``--extra`` says otherwise: what is evaluated is what the method
found (a search that ends over the target is still demoted to fit, and the table says how
many units that moved). KL runs at each search's achieved bits with the search's seed (its
calibration windows). Each command's line and output are kept under ``--results``
(``runs/<name>.log``), so a sweep can be spread over several sittings (``--reuse`` keeps
finished OUTs); ``--stages`` picks search, baseline, eval, table. ``--jobs N`` runs N
independent chains at a time (an anchor: the unquantized model, uniform MXFP4, uniform
MXFP8; or a search with its evaluation and its KL pair), each command in its own process;
a sweep stopped by SIGTERM or SIGINT ends the commands it started (a search saves its
checkpoint), and ``--reuse`` continues. The table (recipes.md) gives the mean and the
spread (min..max) over seeds, the fraction of KL's remaining distance to MXFP8 that each
recipe closes, the raw bits each recipe landed on, the Pareto plot, and dynamics.png (the
seed-0 runs) from `dmx report`.

The tiny-qwen3 sweep of issue 5 (benchmarks/results/search_sweep.md) ran an earlier version
of this script as ``--targets 4.5 5 6 7 --steps 200 --batch-size 4 --init target --lam 0.1
--kl-samples 16 --threads 1 --jobs 2`` (seed 0, calibration and evaluation windows of 256
tokens, the full wiki.test.raw). Its search settings are today's ``--recipe paper`` with
overrides, so the same sweep is now

    python benchmarks/bench_search_sweep.py --model embedded --recipes paper \\
        --extra "--parameterization clamp --tie-fused --grad-norm none --fill-budget \\
        --init target --lam 0.1" --targets 4.5 5 6 7 --seeds 0 --steps 200 --batch-size 4 \\
        --seqlen 256 --max-windows 0 --kl-samples 16 --threads 1 --jobs 2 \\
        --work /tmp/dmx_search_sweep --results benchmarks/results/search_sweep

(its OUTs are named dmx-paper-T-s0 / kl-paper-T-s0 where they were dmx-T / kl-T;
``--fill-budget`` in --extra wins over the script's ``--no-fill-budget``, and the table's
header says which ran).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmx import data  # noqa: E402  (light: no torch; the paths of the embedded assets)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling build_smollm2
from build_smollm2 import DEFAULT_OUT  # noqa: E402  (where the benchmarks' model is built)

DEFAULT_MODEL = DEFAULT_OUT.expanduser()
STAGES = ("search", "baseline", "eval", "table")
# set when a command fails under --jobs: the other chains start no new command
_STOP = threading.Event()
# the table is rewritten by whichever chain finishes a pair: one writer at a time
_TABLE_LOCK = threading.Lock()
# set by every command that ran since the table was last written (and at the start, so a
# --stages table invocation writes it)
_TABLE_STALE = threading.Event()
_TABLE_STALE.set()
# one lock per seed: that seed's KL pairs run one at a time (see _pair_chain)
_SEED_LOCKS: dict[int, threading.Lock] = {}
_SEED_LOCKS_LOCK = threading.Lock()


# the `dmx` processes running now: a sweep that is stopped (SIGTERM, or SIGINT sent to it
# alone) ends them, which would otherwise keep computing for an hour with nobody to read them
_DMX_COMMAND = [sys.executable, "-m", "dmx"]
_CHILDREN: set = set()
_CHILDREN_LOCK = threading.Lock()


def _stop_children(signum, frame):
    _STOP.set()
    with _CHILDREN_LOCK:
        for proc in _CHILDREN:
            proc.terminate()   # dmx search saves its checkpoint on SIGTERM, then exits
    raise SystemExit(f"bench_search_sweep: stopped by {signal.Signals(signum).name}; "
                     f"the running dmx commands were ended (--reuse continues)")


def _seed_lock(seed: int) -> threading.Lock:
    with _SEED_LOCKS_LOCK:
        return _SEED_LOCKS.setdefault(seed, threading.Lock())


def _stages(text: str) -> set[str]:
    chosen = set(text.split(","))
    unknown = chosen - set(STAGES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {','.join(sorted(unknown))}; "
                                         f"pick from {','.join(STAGES)}")
    return chosen


def _parse(argv=None):
    intro, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=intro, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="model directory or .gguf file; `embedded` = the tiny-qwen3 in "
                        "dmx/data/ (default: SmolLM2-135M from benchmarks/build_smollm2.py)")
    p.add_argument("--calib", nargs="+", metavar="FILE",
                   default=[str(data.default_calibration_file())],
                   help="calibration text(s) of every search and KL baseline (several: "
                        "windows drawn from their concatenation, a mix by their sizes)")
    p.add_argument("--eval", dest="eval_file", default=str(data.default_eval_file()))
    p.add_argument("--eval-also", nargs="+", default=[], metavar="FILE",
                   help="held-out texts every OUT is scored on too (same --eval-seqlen and "
                        "--max-windows), each with a table of its own: e.g. "
                        "benchmarks/data/tinystories/eval.txt, out of the calibration's domain")
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=64,
                   help="evaluate on the first N windows of the test text (0 = all)")
    p.add_argument("--recipes", nargs="+", default=["default", "paper"])
    p.add_argument("--targets", type=float, nargs="+", default=[5.0, 6.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--seqlen", type=int, default=128, help="calibration window length")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--kl-samples", type=int, default=4)
    p.add_argument("--ladder", default=None,
                   help="formats a layer can take, for the searches and the KL baselines "
                        "alike (default: dmx's, fp8-fp4)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each command")
    p.add_argument("--jobs", type=int, default=1,
                   help="independent chains (anchor, or search + eval + KL pair) run at a "
                        "time, each command in its own process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rotate", default="none", choices=("none", "hadamard", "learned"),
                   help="rotation for every run (issue 12): searches get --rotate; uniform and "
                        "KL baselines get hadamard too; with learned, each KL pair folds its "
                        "search's learned rotations (--rotate-from), so the two assignments "
                        "are compared on one rotated model, and the uniform anchors run "
                        "unrotated (each search learns its own rotation)")
    p.add_argument("--extra", default="",
                   help="more `dmx search` flags, one string; they come last, so they "
                        "override the script's (a single flag: --extra=--fill-budget)")
    p.add_argument("--stages", type=_stages, default=set(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    p.add_argument("--combine", action="store_true",
                   help="also `dmx combine` every recipe x target's seeds (--fill-budget: "
                        "the same bits as the searches; raw bits and fill moves are shown) "
                        "and score the combination against the seeds' KL pairs")
    p.add_argument("--reuse", action="store_true", help="keep finished OUT dirs")
    p.add_argument("--work", default="/tmp/dmx_recipes", help="where the OUT dirs go")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "recipes"),
                   help="directory for recipes.md, the logs and the plots")
    args = p.parse_args(argv)
    if args.model == "embedded":
        args.model = str(data.embedded_model_dir())
    return args


# ----------------------------------------------------------------------------- commands
class _Stopped(Exception):
    """A command not started because another chain failed (--jobs)."""


def _dmx(args, name: str, argv: list[str]) -> None:
    """One `dmx` command in its own process; its command line and output go to
    results/runs/<name>.log (appended: a rerun adds to the record)."""
    if _STOP.is_set():
        raise _Stopped(name)
    logs = Path(args.results) / "runs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(args.threads)
    line = "dmx " + shlex.join(argv)
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen([*_DMX_COMMAND, *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with _CHILDREN_LOCK:
        _CHILDREN.add(proc)
        if _STOP.is_set():  # stopped between the check above and the start
            proc.terminate()
    try:
        stdout, stderr = proc.communicate()
    finally:
        with _CHILDREN_LOCK:
            _CHILDREN.discard(proc)
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    wall = time.time() - t0
    _TABLE_STALE.set()
    # progress bars would bury the log; --no-progress does not silence every library's
    err = "\n".join(ln for ln in proc.stderr.splitlines() if "it/s]" not in ln
                    and "step/s]" not in ln and "s/step]" not in ln)
    with open(logs / f"{name}.log", "a") as fh:
        fh.write(f"$ {line}\n{proc.stdout}{err}\n# exit {proc.returncode}, {wall:.1f} s, "
                 f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n")
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SystemExit(f"bench_search_sweep: `{line}` failed with exit {proc.returncode}: "
                         f"{last}")


def _eval_flags(args, text: str | None = None) -> list[str]:
    flags = ["--data", text or args.eval_file, "--seqlen", str(args.eval_seqlen), "--device",
             args.device, "--no-progress"]
    if args.max_windows:
        flags += ["--max-windows", str(args.max_windows)]
    return flags


def _baseline_rotate(args, search_out: Path | None = None) -> list[str]:
    # a learned rotation is the search's own: a KL pair takes it from its search's OUT
    if args.rotate == "learned" and search_out is not None:
        return ["--rotate-from", str(search_out)]
    return ["--rotate", "hadamard"] if args.rotate == "hadamard" else []


def _ladder(args) -> list[str]:
    # only when given, so that the logged command lines of older sweeps stay as they were
    return ["--ladder", args.ladder] if args.ladder else []


def _uniform_argv(args, fmt: str, out: Path) -> list[str]:
    return ["baseline", "--model", args.model, "--method", "uniform", "--format", fmt,
            "--device", args.device, "--no-progress", "--force", "-o", str(out),
            *_baseline_rotate(args)]


def _search_argv(args, recipe: str, target: float, seed: int, out: Path) -> list[str]:
    return ["search", "--model", args.model, "--recipe", recipe, "--target-bits",
            repr(target), "--calib", *args.calib, "--seqlen", str(args.seqlen), "--steps",
            str(args.steps), "--batch-size", str(args.batch_size), "--seed", str(seed),
            "--device", args.device, "--no-fill-budget", "--checkpoint-every", "0",
            "--no-progress", "--force", "-o", str(out), "--rotate", args.rotate,
            *_ladder(args), *shlex.split(args.extra)]


# a manifest's averages by --weighting
_BITS_KEY = {"simple": "simple", "size": "size_weighted"}


def _search_budget(manifest: dict) -> tuple[float, str, bool, str, bool]:
    """What the KL pair must match: the search's achieved bits under the average it
    trained against (--weighting), whether it left the inputs unquantized, the layers it
    could quantize (--export-target) and whether q/k/v and gate/up shared a format."""
    config = manifest["search"]["config"]
    weighting = config.get("weighting", "simple")
    return (manifest["avg_bits"][_BITS_KEY[weighting]], weighting,
            bool(config.get("weights_only", False)), config.get("export_target", "any"),
            bool(config.get("tie_fused", False)))


def _kl_argv(args, seed: int, out: Path, bits: float, weighting: str = "simple",
             weights_only: bool = False, export_target: str = "any",
             tie_fused: bool = False, search_out: Path | None = None) -> list[str]:
    return ["baseline", "--model", args.model, "--method", "kl", "--target-bits", repr(bits),
            "--weighting", weighting, *(["--weights-only"] if weights_only else []),
            "--export-target", export_target,
            "--tie-fused" if tie_fused else "--no-tie-fused",
            "--calib", *args.calib, "--seqlen", str(args.seqlen), "--samples",
            str(args.kl_samples), "--seed", str(seed), "--device", args.device,
            "--no-progress", "--force", "-o", str(out), *_ladder(args),
            *_baseline_rotate(args, search_out)]


def _sensitivity_source(args, work: Path, seed: int, weights_only: bool, export_target: str,
                        tie_fused: bool) -> Path | None:
    """A finished KL OUT of this sweep whose sensitivities a new KL pair can reuse
    (`dmx baseline --sensitivities-from`, which checks every setting again): same seed
    (calibration windows) and the same layers, units and inputs; only the budget differs.
    None under ``--rotate learned``: each search learns its own rotation."""
    if args.rotate == "learned":
        return None
    want = {"weights_only": weights_only, "export_target": export_target,
            "tie_fused": tie_fused, "samples": args.kl_samples, "seqlen": args.seqlen}
    for kl in sorted(work.glob(f"kl-*-s{seed}")):
        if not _done(kl):
            continue
        m = _manifest(kl)
        got = m.get("baseline") or {}
        if (m.get("seed") == seed and "sensitivity" in got and "sensitivities_from" not in got
                and all(got.get(k) == v for k, v in want.items())):
            return kl
    return None


def _done(out: Path, need_eval: bool = False, args=None, text: str | None = None) -> bool:
    """OUT is written (and, with ``need_eval``, scored on ``text``: default --eval)."""
    if not (out / "dmx_manifest.json").is_file():
        return False
    return not need_eval or _scored(args, out, text) is not None


def _manifest(out: Path) -> dict:
    return json.loads((out / "dmx_manifest.json").read_text())


def _texts(args) -> list[str]:
    """The evaluation texts: --eval (the main table) first, then --eval-also."""
    return [args.eval_file, *args.eval_also]


def _scored(args, out: Path, text: str | None = None) -> dict | None:
    """OUT's perplexity result on ``text`` (default --eval) under this sweep's protocol."""
    from dmx.outdir.evaljson import find_result, load_eval
    return find_result(load_eval(out), text or args.eval_file, args.eval_seqlen,
                       args.max_windows)


def _ppl(args, out: Path, text: str | None = None) -> float:
    return _scored(args, out, text)["ppl"]


def _window_nll(args, out: Path, text: str | None = None) -> list | None:
    """OUT's per-window losses on the text (None: scored before dmx eval recorded them)."""
    return _scored(args, out, text).get("window_nll")


def _window_cell(ours: list, theirs: list) -> str:
    """Window noise of "dMX - KL": the per-window losses of each side averaged over its
    OUTs (seeds), then compared window by window (dmx.eval.paired): the difference of the
    two mean-loss perplexities with its 95 % interval, and the verdict. "-" when an OUT was
    scored before per-window losses were recorded (rerun `dmx eval OUT --save`)."""
    from dmx.eval.paired import paired, paired_cell
    if not ours or not theirs or any(w is None for w in ours + theirs):
        return "-"
    mean = lambda runs: [sum(col) / len(col) for col in zip(*runs)]  # noqa: E731
    return paired_cell(paired(mean(theirs), mean(ours)))


# ----------------------------------------------------------------------------- chains
# A chain is the commands that must run in order (an OUT, then its evaluation, then the KL
# pair at its bits); chains are independent of each other, which is what --jobs spreads.
# Each step returns whether it ran a command, so a chain that only reused OUTs does not
# rewrite the table.
def _evaluate(args, out: Path) -> bool:
    """Score OUT on every evaluation text it lacks (all of them without --reuse); each
    result is kept in OUT/eval.json under its own protocol. A result saved before `dmx
    eval` recorded per-window losses is scored again, so the window-noise cells fill."""
    ran = False
    for text in _texts(args):
        if "eval" in args.stages and _done(out) and not (
                args.reuse and (_scored(args, out, text) or {}).get("window_nll") is not None):
            _dmx(args, f"eval-{out.name}", ["eval", str(out), *_eval_flags(args, text),
                                            "--save"])
            ran = True
    return ran


def _unquantized_json(args, text: str) -> Path:
    """Where the unquantized model's protocol line on ``text`` is kept: unquantized.json
    for --eval, unquantized-<file name>.json for each --eval-also text."""
    name = "" if text == args.eval_file else f"-{Path(text).name}"
    return Path(args.results) / f"unquantized{name}.json"


def _unquantized_chain(args) -> bool:
    """The unquantized model's perplexity on each text, kept as its protocol line."""
    ran = False
    for text in _texts(args):
        ref = _unquantized_json(args, text)
        if "eval" not in args.stages or (args.reuse and ref.is_file()):
            continue
        _dmx(args, "eval-unquantized", ["eval", "--model", args.model,
                                        *_eval_flags(args, text)])
        log = (Path(args.results) / "runs" / "eval-unquantized.log").read_text()
        ppl = [ln for ln in log.splitlines() if "ppl" in ln][-1]
        ref.write_text(json.dumps({"protocol": ppl.strip()}) + "\n")
        ran = True
    return ran


def _uniform_chain(args, work: Path, fmt: str) -> bool:
    out = work / f"uniform-{fmt}"
    ran = False
    if "baseline" in args.stages and not (args.reuse and _done(out)):
        _dmx(args, out.name, _uniform_argv(args, fmt, out))
        ran = True
    return _evaluate(args, out) or ran


def _pair_chain(args, work: Path, recipe: str, target: float, seed: int,
                t_start: float) -> bool:
    """One search, its evaluation, KL at the bits it achieved and KL's evaluation; then the
    table, so that it is always current."""
    out = work / f"dmx-{recipe}-{target:g}-s{seed}"
    kl = work / f"kl-{recipe}-{target:g}-s{seed}"
    ran = False
    if "search" in args.stages and not (args.reuse and _done(out)):
        _dmx(args, out.name, _search_argv(args, recipe, target, seed, out))
        ran = True
    ran = _evaluate(args, out) or ran
    if "baseline" in args.stages and _done(out) and not (args.reuse and _done(kl)):
        budget = _search_budget(_manifest(out))
        argv = _kl_argv(args, seed, kl, *budget, search_out=out)
        # one seed's KL pairs one at a time: a second budget's pair waits for the first's
        # sensitivities instead of measuring them again beside it (--jobs)
        with _seed_lock(seed):
            source = _sensitivity_source(args, work, seed, *budget[2:])
            if source is not None and source != kl:  # measured once per seed, not per budget
                argv += ["--sensitivities-from", str(source)]
            _dmx(args, kl.name, argv)
        ran = True
    ran = _evaluate(args, kl) or ran
    if ran and "table" in args.stages:
        _write_table(args, work, time.time() - t_start)
    return ran


def _combined_name(args, recipe: str, target: float) -> str:
    return f"dmx-{recipe}-{target:g}-comb{'.'.join(map(str, args.seeds))}"


def _combine_chain(args, work: Path, recipe: str, target: float, t_start: float) -> bool:
    """`dmx combine` of the seeds' searches of one recipe and target, then its evaluation
    (after every pair chain: it needs all the seeds)."""
    out = work / _combined_name(args, recipe, target)
    searches = [work / f"dmx-{recipe}-{target:g}-s{seed}" for seed in args.seeds]
    ran = False
    if not all(_done(s) for s in searches):
        return False
    if "search" in args.stages and not (args.reuse and _done(out)):
        _dmx(args, out.name, ["combine", *map(str, searches), "-o", str(out),
                              "--fill-budget", "--force"])
        ran = True
    ran = _evaluate(args, out) or ran
    if ran and "table" in args.stages:
        _write_table(args, work, time.time() - t_start)
    return ran


def _stop_on_failure(chain):
    """``chain``, setting _STOP when it fails: in the worker itself, before the pool hands
    that worker the next chain."""
    def run():
        try:
            return chain()
        except BaseException:
            _STOP.set()
            raise
    return run


def _run_chains(chains: list, jobs: int) -> None:
    """Run the no-argument callables ``chains``, ``jobs`` at a time, in their order. The
    first failure stops the sweep: chains not started are dropped, running ones start no
    further command; once they are done, the first failure (in chain order) is raised."""
    if jobs <= 1:
        for chain in chains:
            chain()
        return
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_stop_on_failure(chain)) for chain in chains]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # Ctrl-C in this thread: the chains stop too
            _STOP.set()
            raise
        finally:
            if _STOP.is_set():  # drop the chains not started yet
                for f in futures:
                    f.cancel()
    failures = [f.exception() for f in futures if not f.cancelled()]
    failures = [e for e in failures if e is not None and not isinstance(e, _Stopped)]
    if failures:
        raise failures[0]


def main(argv=None) -> int:
    args = _parse(argv)
    if args.stages & {"search", "baseline", "eval"} and not Path(args.model).exists():
        print(f"bench_search_sweep: no model at {args.model}; build SmolLM2-135M with "
              f"`python benchmarks/build_smollm2.py` (or pass --model embedded)",
              file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_children)
    _record_invocation(args)
    t_start = time.time()
    # the anchors first (cheap): unquantized, uniform MXFP4 and MXFP8
    chains = [lambda: _unquantized_chain(args)]
    chains += [(lambda fmt=fmt: _uniform_chain(args, work, fmt))
               for fmt in ("fp4_e2m1", "fp8_e4m3")]
    # seed-major: every recipe and target gets its first seed before any gets a second;
    # each search is evaluated, then KL at its achieved bits, so a cut-short sweep still
    # leaves complete pairs
    chains += [(lambda r=r, t=t, s=s: _pair_chain(args, work, r, t, s, t_start))
               for s in args.seeds for t in args.targets for r in args.recipes]
    _run_chains(chains, args.jobs)
    if args.combine and len(args.seeds) > 1:
        _run_chains([(lambda r=r, t=t: _combine_chain(args, work, r, t, t_start))
                     for t in args.targets for r in args.recipes], args.jobs)
    # once more at the end if anything ran since: with --jobs an anchor may finish after
    # the last pair; a --stages table (or a fully reused) sweep wrote no table yet
    if "table" in args.stages and _TABLE_STALE.is_set():
        _write_table(args, work, time.time() - t_start)
    return 0


# ----------------------------------------------------------------------------- table
_INVOCATIONS = "invocations.log"


def _record_invocation(args) -> None:
    """Append this command line to results/invocations.log: a sweep spread over sittings
    (or a later --stages eval,table) keeps every command that made its table."""
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    with open(results / _INVOCATIONS, "a") as fh:
        fh.write(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  python "
                 f"benchmarks/bench_search_sweep.py {shlex.join(sys.argv[1:])}\n")


def _invocations(args) -> list[str]:
    path = Path(args.results) / _INVOCATIONS
    return path.read_text().splitlines() if path.is_file() else []


def _spread(values, spec: str = ".2f") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{spec}} (1 seed)"
    return (f"{statistics.mean(values):{spec}} ({min(values):{spec}}..{max(values):{spec}}, "
            f"{len(values)} seeds)")


def _machine(args) -> str:
    cpu = f"CPU, {os.cpu_count()} cores ({platform.machine()})"
    if args.device.startswith("cuda"):
        import torch  # only here: the table of a CPU sweep needs no torch

        cpu = f"{torch.cuda.get_device_name(0)} (--device {args.device}); host {cpu}"
    jobs = f", {args.jobs} commands at a time" if args.jobs > 1 else ""
    return f"Machine: {cpu}, {args.threads} thread(s) per command{jobs}"


def _header(args, wall: float) -> list[str]:
    ladder = f"; ladder {args.ladder}" if args.ladder else ""
    title = ("# Search recipes on the embedded tiny-qwen3" if args.model == str(data.embedded_model_dir())
             else f"# Search recipes on {Path(args.model).name}")
    fill = ("Searches ran with --fill-budget (from --extra: the table gives the repaired "
            "assignment; the raw bits column is what the method found)"
            if "--fill-budget" in shlex.split(args.extra) else
            "Searches ran with --no-fill-budget (what the method found; a search over the "
            "target is demoted to fit)")
    made = [f"- {line}" for line in _invocations(args)]
    also = (f" Held out (tables below): {', '.join(Path(t).name for t in args.eval_also)}."
            if args.eval_also else "")
    return [title, "",
            f"Command: `python benchmarks/bench_search_sweep.py {shlex.join(sys.argv[1:])}`  ",
            f"{_machine(args)}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
            f"this invocation {wall / 60:.1f} min.", "",
            *(["Every invocation that wrote into this results directory (invocations.log; "
               "`--reuse` keeps what earlier ones made):", "", *made, ""] if made else []),
            f"Model `{args.model}`{ladder}; calibration "
            f"{' + '.join(Path(c).name for c in args.calib)} (windows of "
            f"{args.seqlen} tokens, {args.steps} steps x {args.batch_size}); evaluation: "
            f"{Path(args.eval_file).name}, first {args.max_windows or 'all'} windows of "
            f"{args.eval_seqlen} tokens.{also} {fill}. KL: "
            f"{args.kl_samples} calibration windows, at each search's achieved bits.",
            "", f"Rotation: searches `--rotate {args.rotate}`; " + _rotation_note(args), ""]


def _rotation_note(args) -> str:
    if args.rotate == "hadamard":
        return "baselines (uniform, KL) `--rotate hadamard`."
    if args.rotate == "learned":
        return ("each KL pair `--rotate-from` its search's OUT (the same learned R1/R2, so "
                "the two assignments share one rotated model); uniform anchors unrotated, "
                "and the column of KL's gap to MXFP8 closed uses them, though under a "
                "learned rotation uniform MXFP8 itself scores lower: read it as an upper "
                "bound.")
    return "baselines (uniform, KL) unrotated."


def _row(args, evaluated: dict, recipe: str, target: float, fp8,
         text: str | None = None) -> str | None:
    """One recipe at one target over the seeds, scored on ``text`` (default --eval); None
    when no seed has been evaluated."""
    raw, achieved, fits, ours, kls, closed = [], [], [], [], [], []
    our_w, kl_w = [], []
    for seed in args.seeds:
        d = evaluated.get(f"dmx-{recipe}-{target:g}-s{seed}")
        k = evaluated.get(f"kl-{recipe}-{target:g}-s{seed}")
        if d is None:
            continue
        m = _manifest(d)
        bits, weighting, *_ = _search_budget(m)  # under the average the search trained for
        raw.append(m["search"]["raw_bits"][_BITS_KEY[weighting]])
        achieved.append(bits)
        fits.append(_moves(m, "fit"))
        ours.append(_ppl(args, d, text))
        if k is not None:
            kls.append(_ppl(args, k, text))
            our_w.append(_window_nll(args, d, text))
            kl_w.append(_window_nll(args, k, text))
            if fp8 is not None and kls[-1] > fp8:
                closed.append((kls[-1] - ours[-1]) / (kls[-1] - fp8))
    if not ours:
        return None
    diff = [a - b for a, b in zip(ours, kls)] if len(kls) == len(ours) else []
    return (f"| {recipe} | {target:g} | {_spread(raw, '.3f')} | {_spread(achieved, '.3f')} | "
            f"{sum(fits)} | {_spread(ours)} | {_spread(kls)} | {_vs_kl(diff, closed)} "
            f"{_window_cell(our_w, kl_w)} |")


def _moves(manifest: dict, step: str) -> int:
    """How many units the budget repair moved in ``step`` ("fit" or "fill")."""
    return sum(mv["step"] == step for mv in manifest["search"]["budget_repair"]["moves"])


def _vs_kl(diff: list, closed: list) -> str:
    """The last cells of a row: dMX - KL, the seeds ahead, the share of KL's gap closed."""
    ahead = f"{sum(x < 0 for x in diff)} of {len(diff)}" if diff else "-"
    gap = (f"{100 * statistics.mean(closed):.0f}% ({100 * min(closed):.0f}.."
           f"{100 * max(closed):.0f}%)" if closed else "-")
    return f"{_spread(diff)} | {ahead} | {gap} |"


def _combined_row(args, evaluated: dict, recipe: str, target: float, fp8,
                  text: str | None = None) -> str | None:
    """The seeds' combination (`dmx combine`) against the seeds' KL pairs; None if not
    evaluated. Raw bits: the mean offsets' nearest rungs; the fill moves are counted."""
    d = evaluated.get(_combined_name(args, recipe, target))
    if d is None:
        return None
    m = _manifest(d)
    bits, weighting, *_ = _search_budget(m)
    raw = m["search"]["raw_bits"][_BITS_KEY[weighting]]
    ours = _ppl(args, d, text)
    kl_outs = [evaluated[k] for k in (f"kl-{recipe}-{target:g}-s{seed}" for seed in args.seeds)
               if k in evaluated]
    kls = [_ppl(args, k, text) for k in kl_outs]
    diff = [ours - k for k in kls]
    closed = [(k - ours) / (k - fp8) for k in kls if fp8 is not None and k > fp8]
    seeds = ",".join(map(str, args.seeds))
    return (f"| {recipe}, seeds {seeds} combined | {target:g} | {raw:.3f} "
            f"(+{_moves(m, 'fill')} fill) | {bits:.3f} | {_moves(m, 'fit')} | "
            f"{ours:.2f} (one OUT) | {_spread(kls)} | {_vs_kl(diff, closed)} "
            f"{_window_cell([_window_nll(args, d, text)], [_window_nll(args, k, text) for k in kl_outs])} |")


def _report(args, work: Path, evaluated: dict, results: Path, text: str) -> str:
    """`dmx report --data text` of every evaluated OUT (the seed-0 searches first:
    dynamics.png draws them); its plots are copied into ``results`` (pareto.png for --eval,
    pareto-<file name>.png for an --eval-also text); the report's markdown less its title."""
    main = text == args.eval_file
    report = work / ("report" if main else f"report-{Path(text).name}")
    order = sorted(evaluated)
    dyn = [evaluated[n] for n in order if n.startswith("dmx-") and n.endswith("-s0")]
    others = [evaluated[n] for n in order if not (n.startswith("dmx-") and n.endswith("-s0"))]
    subprocess.run([sys.executable, "-m", "dmx", "report", *map(str, dyn + others),
                    "--data", text, "--force", "-o", str(report)],
                   check=True, capture_output=True)
    copies = {"pareto.png": _pareto_name(args, text)}
    if main:
        copies["dynamics.png"] = "dynamics.png"
    for png, dest in copies.items():
        if (report / png).is_file():
            shutil.copyfile(report / png, results / dest)
    # the report links its own pareto.png: here that is the copy named for this text
    md = (report / "report.md").read_text().split("\n", 1)[1]
    return md.replace("](pareto.png)", f"]({copies['pareto.png']})")


def _pareto_name(args, text: str) -> str:
    return "pareto.png" if text == args.eval_file else f"pareto-{Path(text).name}.png"


def _text_table(args, work: Path, results: Path, text: str, mine: set) -> list[str]:
    """The anchors and the dMX-vs-KL table of one evaluation text."""
    evaluated = {p.name: p for p in work.iterdir()
                 if p.name in mine and _done(p, True, args, text)}
    fp8 = _ppl(args, evaluated["uniform-fp8_e4m3"], text) \
        if "uniform-fp8_e4m3" in evaluated else None
    fp4 = _ppl(args, evaluated["uniform-fp4_e2m1"], text) \
        if "uniform-fp4_e2m1" in evaluated else None
    lines = []
    unq = _unquantized_json(args, text)
    if unq.is_file():
        lines += [f"Unquantized: {json.loads(unq.read_text())['protocol']}", ""]
    lines += [f"Uniform MXFP4: {fp4 if fp4 is None else f'{fp4:.2f}'}; uniform MXFP8: "
              f"{fp8 if fp8 is None else f'{fp8:.2f}'}.", "",
              "| recipe | target | raw bits (found) | achieved bits | fit moves | dMX ppl "
              "| KL ppl (same bits) | dMX - KL | dMX ahead (seeds) "
              "| closed of KL's gap to MXFP8 | window noise of dMX - KL |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = (row(args, evaluated, r, t, fp8, text) for t in args.targets for r in args.recipes
            for row in (_row, _combined_row))
    lines += [row for row in rows if row is not None]
    lines += ["", "Window noise: each side's per-window losses averaged over its OUTs, then "
              "compared window by window (dmx.eval.paired; the difference of the two mean-loss "
              "perplexities with its 95 % interval over the scored windows, \"tie\" when it "
              "includes 0). It is the evaluation's own noise only; the seeds' spread is the "
              "dMX - KL column. \"-\": scored before per-window losses were recorded.", "",
              f"![perplexity vs average bits]({_pareto_name(args, text)})", ""]
    if evaluated:
        lines += ["<details><summary><code>dmx report</code> of these runs on "
                  f"{Path(text).name}</summary>", "",
                  _report(args, work, evaluated, results, text), "</details>", ""]
    return lines


def _write_table(args, work: Path, wall: float) -> None:
    with _TABLE_LOCK:
        _TABLE_STALE.clear()  # before reading: a command that ends meanwhile sets it again
        results = Path(args.results)
        results.mkdir(parents=True, exist_ok=True)
        # this sweep's runs only (the work dir may hold other sweeps' and variants' OUTs)
        mine = {"uniform-fp4_e2m1", "uniform-fp8_e4m3"} | {
            f"{kind}-{r}-{t:g}-s{seed}" for kind in ("dmx", "kl") for r in args.recipes
            for t in args.targets for seed in args.seeds}
        mine |= {_combined_name(args, r, t) for r in args.recipes for t in args.targets}
        lines = _header(args, wall) + _text_table(args, work, results, args.eval_file, mine)
        lines += ["Offset trajectories and soft vs hard bits of the seed-0 runs:", "",
                  "![dynamics](dynamics.png)", ""]
        for text in args.eval_also:
            lines += [f"## Held out: {'/'.join(Path(text).parts[-2:])}", "",
                      "The same OUTs scored on a text no search or baseline calibrated on, "
                      f"first {args.max_windows or 'all'} windows of {args.eval_seqlen} "
                      "tokens.", ""]
            lines += _text_table(args, work, results, text, mine)
        (results / "recipes.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {results / 'recipes.md'}")


if __name__ == "__main__":
    raise SystemExit(main())
