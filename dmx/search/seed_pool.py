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

Memory: every process holds its own copy of the model and its search, so ``--jobs`` is an
upper bound: one search starts alone, and after its first step (its peak memory measured)
only as many more start as the memory available then holds (:func:`jobs_that_fit`; the
command says so when that is fewer). Each worker also reports its peak resident memory with
its result (``peak_rss_bytes``), printed with the seed's line; a worker the kernel kills
anyway (out of memory) ends the command with one line naming the peak and the memory
available.

Other work of the same command can share the pool (``side_tasks``: the KL baselines of
``--fuse-kl``, each as long as a third of a search on SmolLM2-135M): it is queued after the
searches, reports no steps, and a Ctrl-C stops it with nothing kept (it starts over on a
rerun; a finished one is kept by its caller).

Public API: ``run_seed_searches(fn, tasks, jobs, threads, steps, progress, report, say,
memory, side_tasks)``, ``jobs_that_fit(jobs, peak, available)``, ``peak_rss_bytes()``,
``available_memory_bytes()``, ``gib(n)``.
"""
from __future__ import annotations

import multiprocessing
import signal
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from dmx.errors import DMXError
from dmx.search.train import SearchInterrupted

__all__ = ["run_seed_searches", "SUMMARY_KEYS", "peak_rss_bytes", "available_memory_bytes",
           "gib", "jobs_that_fit", "MEMORY_SHARE"]

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
    """One seed's search in a worker: its summary, or where Ctrl-C stopped it. After each
    step it sends the parent the worker's peak memory so far (the progress bar's tick and
    the measurement :func:`run_seed_searches` sizes the pool by)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = fn(callback=lambda step, record: _steps_done.put(peak_rss_bytes() or 0),
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


def _side_one(fn, label: str, kwargs: dict) -> dict:
    """One side task in a worker (``fn(**kwargs)``, its result left there): its wall time
    and the worker's peak memory, or that Ctrl-C stopped it."""
    import time

    signal.signal(signal.SIGINT, signal.default_int_handler)
    t0 = time.time()
    try:
        fn(**kwargs)
    except KeyboardInterrupt:
        return {"interrupted": True, "step": None, "checkpoint": None}
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return {"wall_seconds": time.time() - t0, "peak_rss_bytes": peak_rss_bytes()}


def _where_stopped(key, result: dict) -> str:
    """How the Ctrl-C message names one stopped task: a search by its seed and step, a
    side task by its label."""
    if isinstance(key, str):
        return f"{key} (it starts over on a rerun)"
    ckpt = f" (checkpoint {result['checkpoint']})" if result["checkpoint"] else ""
    return f"seed {key} after step {result['step']}{ckpt}"


def _side_tasks_text(running: dict, waiting: list) -> str:
    """The side tasks running and queued, shown after the progress bar: the bar counts the
    searches' steps only, so it would otherwise sit full while a KL baseline runs after
    the last search."""
    busy = [k for k in running.values() if isinstance(k, str)]
    queued = [k for k, _, _ in waiting if isinstance(k, str)]
    return "; ".join(part for part in (f"running {', '.join(busy)}" if busy else "",
                                       f"queued {', '.join(queued)}" if queued else "")
                     if part)


class _StepCounter:
    """The parent's end of the workers' queue: ticks the progress bar and keeps the largest
    peak memory a worker has reported after a step (``first_peak`` is set once one has)."""

    def __init__(self, queue, bar):
        self.queue, self.bar, self.peak = queue, bar, 0
        self.first_peak = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (peak := self.queue.get()) is not None:
            self.bar.update(1)
            if peak:
                self.peak = max(self.peak, peak)
                self.first_peak.set()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=5)


# share of the memory available after the first search's first step that further searches
# may take: the rest is headroom for the page cache, the parent and the peaks' spread
MEMORY_SHARE = 0.9


def jobs_that_fit(jobs: int, peak: int, available: int | None) -> int:
    """How many searches may run at once, at most ``jobs``: the one measured (its peak
    ``peak`` bytes, already outside ``available``) and as many more as fit in
    :data:`MEMORY_SHARE` of ``available`` (all ``jobs`` where the OS does not say)."""
    if available is None or peak <= 0:
        return jobs
    return max(1, min(jobs, 1 + int(MEMORY_SHARE * available // peak)))


def run_seed_searches(fn, tasks: list[tuple[int, dict]], jobs: int, threads: int,
                      steps: int, progress: bool = True, report=None, say=None,
                      memory=available_memory_bytes, side_tasks=()) -> dict:
    """Run ``fn(**kwargs)`` for every ``(seed, kwargs)`` of ``tasks``, at most ``jobs`` at a
    time in spawned processes of ``threads`` CPU threads each; ``report(seed, summary)`` as
    each finishes. Returns {seed: summary} (:data:`SUMMARY_KEYS`). Errors in a search
    (DMXError) are raised here once the running searches are done; Ctrl-C raises
    SearchInterrupted. Each summary also has ``peak_rss_bytes``, its worker's peak memory.

    Memory: ``jobs`` is an upper bound. Where the OS says how much memory is available
    (``memory()``), one search starts alone; after its first step the pool starts only as
    many more as fit (:func:`jobs_that_fit`), and ``say``s so when that is fewer than
    ``jobs``. The others start one step later for it, instead of a worker dying of memory
    mid-search.

    ``side_tasks``: ``(label, fn, kwargs)`` run in the same pool after the searches are
    queued (``fn(**kwargs)``, result not returned; ``say``s "<label>: done" with its wall
    time). Their errors pass on as a search's; Ctrl-C names each one stopped by its label."""
    from tqdm.auto import tqdm

    side_tasks = list(side_tasks)
    n_tasks = len(tasks) + len(side_tasks)
    staged = jobs > 1 and n_tasks > 1 and memory() is not None  # one alone, then sized
    limit = 1 if staged else jobs
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    # the bar counts the searches' steps (the caller says what else runs beside them)
    seeds = f"{len(tasks)} seed{'s' if len(tasks) != 1 else ''}"
    bar = tqdm(total=steps * len(tasks), desc=f"dmx search: {seeds}, up to {jobs} at a time",
               unit="step", disable=not progress, dynamic_ncols=True)
    counter = _StepCounter(queue, bar)
    done, stops, running = {}, {}, {}
    shown = ""   # what the bar says of the side tasks
    waiting = [(seed, _search_one, (fn, seed, kwargs)) for seed, kwargs in tasks] + \
        [(label, _side_one, (side_fn, label, kwargs)) for label, side_fn, kwargs in side_tasks]
    pool = ProcessPoolExecutor(max_workers=min(jobs, n_tasks), mp_context=ctx,
                               initializer=_start_worker, initargs=(threads, queue))

    def size_the_pool(peak: int) -> int:
        nonlocal staged
        staged, available = False, memory()
        fit = jobs_that_fit(jobs, peak, available)
        if fit < jobs and say:
            say(f"--jobs {jobs}: one search holds {gib(peak)} after its first step and "
                f"{gib(available)} is available: running {fit} at a time")
        return fit

    try:
        try:
            while waiting or running:
                while waiting and len(running) < limit:
                    key, worker, args = waiting.pop(0)
                    running[pool.submit(worker, *args)] = key
                if (text := _side_tasks_text(running, waiting)) != shown:
                    bar.set_postfix_str(shown := text)
                finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                if staged and counter.first_peak.is_set():
                    limit = size_the_pool(counter.peak)
                for fut in finished:
                    key, result = running.pop(fut), fut.result()
                    if result.get("interrupted"):  # Ctrl-C reached the worker first
                        stops[key] = result
                        raise KeyboardInterrupt
                    if staged:  # it ended with no step reported (e.g. resumed at its end)
                        limit = size_the_pool(result.get("peak_rss_bytes") or 0)
                    if isinstance(key, str):  # a side task
                        if say:
                            say(f"{key}: done ({result['wall_seconds'] / 60:.1f} min)")
                        continue
                    done[key] = result
                    if report:
                        report(key, result)
        except KeyboardInterrupt:
            # the running searches got the same SIGINT: they save a checkpoint and return
            wait(running)
            for fut, key in running.items():
                if fut.exception() is None:
                    result = fut.result()
                    if result.get("interrupted"):
                        stops[key] = result
                    elif not isinstance(key, str):
                        done[key] = result
            # seeds (ints) in order, then side tasks (labels): never an int against a str
            searches_first = sorted(stops, key=lambda k: (isinstance(k, str), k))
            where = "; ".join(_where_stopped(k, stops[k]) for k in searches_first)
            finished = f"; seeds {', '.join(map(str, sorted(done)))} finished" if done else ""
            raise SearchInterrupted(
                min((r["step"] for r in stops.values() if r["step"] is not None),
                    default=0), None,
                f"interrupted: {where or 'before any search started'}{finished}") from None
        except BrokenProcessPool:
            peaks = [r["peak_rss_bytes"] for r in done.values() if r.get("peak_rss_bytes")]
            peaks += [counter.peak] if counter.peak else []
            held = (f"a search held up to {gib(max(peaks))}; " if peaks else "")
            raise DMXError(f"a search process died (out of memory? each of the {limit} holds "
                           f"the model and its search; {held}{gib(available_memory_bytes())} "
                           f"available now); rerun with fewer --jobs: the seeds finished "
                           f"({', '.join(map(str, sorted(done))) or 'none'}) are kept") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        counter.stop()
        bar.close()
    return done
