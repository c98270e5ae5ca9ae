"""``dmx search --seeds ... --jobs N``: the seeds' searches N at a time, each in a process
of its own (spawned: a fresh interpreter, so torch and Numba start their own thread pools),
with ``threads`` CPU threads each.

Why processes: the searches are independent and a search of a small model does not keep
several cores busy (benchmarks/bench_seed_jobs.py: 1.15x for SmolLM2-135M on 2 idle cores
with `--jobs 2 --threads 1` against `--threads 2`, 2.9x for tiny-qwen3 on a loaded box);
threads in one process would share torch's and Numba's pools and serialize on the GIL
between kernels.

Ctrl-C reaches every process of the terminal's group. An idle worker ignores it (it would
otherwise die and break the pool); a running search saves its checkpoint and returns where
it stopped, the searches not yet started are cancelled, and :func:`run_seed_searches`
raises :class:`dmx.search.train.SearchInterrupted` naming each seed's step and checkpoint,
so ``--resume`` continues every seed where it was.

The search function is passed in (``fn``), not imported, so this module depends on nothing
of the search's (no import circle with dmx.search.command).

Memory: every process holds its own copy of the model and its search. Each worker reports
its peak resident memory with its result (``peak_rss_bytes``), printed with the seed's line,
so the next choice of ``--jobs`` rests on a measured number; a worker the kernel kills (out
of memory) ends the command with one line naming that number and the memory available.

Public API: ``run_seed_searches(fn, tasks, jobs, threads, steps, progress, report)``,
``peak_rss_bytes()``, ``available_memory_bytes()``, ``gib(n)``.
"""
from __future__ import annotations

import multiprocessing
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed, wait
from concurrent.futures.process import BrokenProcessPool

from dmx.errors import DMXError
from dmx.search.train import SearchInterrupted

__all__ = ["run_seed_searches", "SUMMARY_KEYS", "peak_rss_bytes", "available_memory_bytes",
           "gib"]

# what a worker sends back of a search's result (the model and its log stay in the worker)
SUMMARY_KEYS = ("out", "raw_bits", "achieved_bits", "wall_seconds")

_steps_done = None  # the worker's queue to the parent's progress bar


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory so far (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux counts KiB


def available_memory_bytes() -> int | None:
    """Memory the kernel can give without swapping (Linux MemAvailable; None elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gib(n: int | None) -> str:
    """Bytes as "1.2 GiB" ("?" for None): how the memory lines say it."""
    return "?" if n is None else f"{n / 2 ** 30:.1f} GiB"


def _start_worker(threads: int, queue) -> None:
    """Pool initializer: ignore Ctrl-C while idle (a running task turns it back on)."""
    global _steps_done
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _steps_done = queue
    from dmx.threads import set_threads
    set_threads(threads)


def _search_one(fn, seed: int, kwargs: dict) -> dict:
    """One seed's search in a worker: its summary, or where Ctrl-C stopped it."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = fn(callback=lambda step, record: _steps_done.put(1),
                    say=lambda msg: print(f"dmx search: seed {seed}: {msg}", flush=True,
                                          file=sys.stderr),
                    **kwargs)
    except SearchInterrupted as stop:
        return {"interrupted": True, "step": stop.step, "checkpoint": str(stop.checkpoint)}
    except KeyboardInterrupt:  # before the first step: no checkpoint yet
        return {"interrupted": True, "step": 0, "checkpoint": None}
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the process's peak so far: with more seeds than --jobs a worker runs several searches
    return {**{k: result[k] for k in SUMMARY_KEYS}, "peak_rss_bytes": peak_rss_bytes()}


def _count_steps(queue, bar) -> None:
    while queue.get() is not None:
        bar.update(1)


def run_seed_searches(fn, tasks: list[tuple[int, dict]], jobs: int, threads: int,
                      steps: int, progress: bool = True, report=None) -> dict:
    """Run ``fn(**kwargs)`` for every ``(seed, kwargs)`` of ``tasks``, ``jobs`` at a time in
    spawned processes of ``threads`` CPU threads each; ``report(seed, summary)`` as each
    finishes. Returns {seed: summary} (:data:`SUMMARY_KEYS`). Errors in a search (DMXError)
    are raised here once the running searches are done; Ctrl-C raises SearchInterrupted.
    Each summary also has ``peak_rss_bytes``, its worker's peak resident memory."""
    from tqdm.auto import tqdm

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    bar = tqdm(total=steps * len(tasks), desc=f"dmx search: {len(tasks)} seeds, {jobs} at a "
               f"time", unit="step", disable=not progress, dynamic_ncols=True)
    counter = threading.Thread(target=_count_steps, args=(queue, bar), daemon=True)
    counter.start()
    done, stops = {}, {}
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx,
                               initializer=_start_worker, initargs=(threads, queue))
    futures = {pool.submit(_search_one, fn, seed, kwargs): seed for seed, kwargs in tasks}
    try:
        try:
            for fut in as_completed(futures):
                seed, result = futures[fut], fut.result()
                if result.get("interrupted"):  # Ctrl-C reached the worker first
                    stops[seed] = result
                    raise KeyboardInterrupt
                done[seed] = result
                if report:
                    report(seed, result)
        except KeyboardInterrupt:
            # the running searches got the same SIGINT: they save a checkpoint and return
            for fut in futures:
                fut.cancel()
            wait(futures)
            for fut, seed in futures.items():
                if not fut.cancelled() and fut.exception() is None:
                    result = fut.result()
                    (stops if result.get("interrupted") else done)[seed] = result
            where = "; ".join(
                f"seed {s} after step {r['step']}" + (f" (checkpoint {r['checkpoint']})"
                                                      if r["checkpoint"] else "")
                for s, r in sorted(stops.items()))
            finished = f"; seeds {', '.join(map(str, sorted(done)))} finished" if done else ""
            raise SearchInterrupted(
                min((r["step"] for r in stops.values()), default=0), None,
                f"interrupted: {where or 'before any search started'}{finished}") from None
        except BrokenProcessPool:
            peaks = [r["peak_rss_bytes"] for r in done.values() if r.get("peak_rss_bytes")]
            held = (f"a finished search held up to {gib(max(peaks))}; " if peaks else "")
            raise DMXError(f"a search process died (out of memory? each of the {jobs} holds "
                           f"the model and its search; {held}{gib(available_memory_bytes())} "
                           f"available now); rerun with fewer --jobs: the seeds finished "
                           f"({', '.join(map(str, sorted(done))) or 'none'}) are kept") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        queue.put(None)
        counter.join(timeout=5)
        bar.close()
    return done
