"""Task accuracy through lm-evaluation-harness: `dmx eval OUT --tasks arc_easy,piqa,...`.

The OUT's model (``dmx.load``: the exact MX weight values, inputs quantized as the manifest
says) or ``--model DIR [--uniform FMT]`` is wrapped in lm-eval's own Hugging Face class
(``HFLM(pretrained=model, tokenizer=tokenizer)``) and scored by ``simple_evaluate``, so the
task names, prompts and numbers are lm-eval's. lm-eval (0.4.x) is the optional extra
``eval``; nothing here imports it until a task runs.

Datasets: hub tasks (arc_easy, hellaswag, ...) download through lm-eval/datasets and need
the Hugging Face hub; offline, ``--include-path DIR`` adds task YAMLs that point at local
jsonl files (docs/zero_shot.md).

Public API:

* ``run_tasks(model, tokenizer, tasks, limit=None, num_fewshot=None, batch_size=8,
  include_path=None, log_samples=False) -> dict``: lm-eval's ``simple_evaluate`` result.
* ``task_entries(result, model_label, limit, batch_size, seconds) -> {key: entry}``: the
  eval.json records, one per task/group, keyed ``<task>|fewshot=<n>|limit=<l>``.
* ``task_protocol_line(entry) -> str``, e.g. "piqa: 1,838 of 1,838 items, 0-shot,
  lm-eval 0.4.13, acc 0.6100".
* ``results_table(result) -> str``: lm-eval's own markdown table.
* ``add_task_args(parser)`` / ``run_task_eval(args, model, tokenizer, label)``: the
  `dmx eval --tasks` flags and their run.
"""
from __future__ import annotations

import logging
import time
from argparse import ArgumentTypeError  # argparse's own "argument --x: ..." message
from pathlib import Path

from dmx.errors import DMXError

__all__ = ["run_tasks", "task_entries", "task_protocol_line", "primary_metric", "results_table",
           "add_task_args", "run_task_eval", "install_command"]


def install_command() -> str:
    """The pip command for the ``eval`` extra, its requirements read from dmx's metadata
    (so the version range is written once, in pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError, requires
    try:
        reqs = [r.split(";")[0].strip() for r in requires("dmx") or ()
                if "extra ==" in r and r.split("extra ==")[1].strip(" \"'") == "eval"]
    except PackageNotFoundError:
        reqs = []
    direct = " ".join(f'"{r}"' for r in reqs) if reqs else '"lm-eval>=0.4,<0.5"'
    return f'pip install -e ".[eval]" in the dmx checkout (or: pip install {direct})'


def _require_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 (needs accelerate too)
    except ImportError as err:
        raise DMXError(f"--tasks needs lm-evaluation-harness, which is not installed ({err});"
                       f" install it: {install_command()}") from None
    return lm_eval


def _task_manager(tasks, include_path):
    """lm-eval's TaskManager; without the built-in tasks when --include-path has them all
    (indexing lm-eval's ~15k built-in YAMLs takes seconds to minutes)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise DMXError(f"--include-path {include_path}: no such directory (it holds your "
                           f"task YAML files)")
        include_path = str(Path(include_path).resolve())  # recorded as the task's source
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    tm = TaskManager(include_path=include_path)
    names = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in names and not Path(t).is_file()]
    if unknown:
        where = "" if include_path is None else f" nor in --include-path {include_path}"
        raise DMXError(f"unknown lm-eval task {', '.join(unknown)}: not a built-in task, group"
                       f" or tag{where}; `lm-eval ls tasks` lists the names")
    return tm


def _not_for_a_built_model(record) -> bool:
    """HFLM warns whenever it is handed a built model (meant for its own CLI's users: "many
    other model arguments may be ignored"); dmx passes none of those arguments."""
    return "is not of type `str`" not in record.getMessage()


def run_tasks(model, tokenizer, tasks, limit=None, num_fewshot=None, batch_size: int = 8,
              include_path=None, log_samples: bool = False) -> dict:
    """lm-eval's ``simple_evaluate`` of ``model`` on ``tasks`` (names, comma list split)."""
    lm_eval = _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    tasks = list(tasks)
    if not tasks:
        raise DMXError("--tasks is empty; name at least one lm-eval task (e.g. arc_easy)")
    if tokenizer is None:
        raise DMXError("no tokenizer: the model directory has no tokenizer files; copy them "
                       "from the source model")
    if batch_size < 1:
        raise DMXError(f"--batch-size must be a positive integer, got {batch_size}")
    tm = _task_manager(tasks, include_path)
    logging.getLogger("lm_eval.models.huggingface").addFilter(_not_for_a_built_model)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        return lm_eval.simple_evaluate(lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                       task_manager=tm, log_samples=log_samples)
    except ConnectionError as err:  # datasets' "Couldn't reach ... on the Hub"
        raise DMXError(f"a task's dataset could not be downloaded ({err}); hub tasks need the "
                       f"Hugging Face hub; offline, write a task YAML over local jsonl files "
                       f"and pass --include-path DIR (docs/zero_shot.md)") from None
    except FileNotFoundError as err:
        raise DMXError(f"a task's data file is missing ({err}); check the paths in its YAML "
                       f"(data_files are read relative to the current directory)") from None


def task_entries(result: dict, model_label: str, limit, batch_size: int,
                 seconds: float) -> dict:
    """eval.json records of one ``simple_evaluate`` result, keyed by task and protocol."""
    version = result["lm_eval_version"]
    entries = {}
    for section in ("results", "groups"):
        for task, values in (result.get(section) or {}).items():
            if section == "groups" and task in entries:
                continue
            metrics = {}
            for name, v in values.items():
                if "," not in name:
                    continue  # "alias", "name", "sample_len": not metrics
                metric, filt = name.split(",", 1)
                metrics[metric if filt == "none" else name] = v
            shots = result.get("n-shot", {}).get(task)
            cfg = result.get("configs", {}).get(task, {})
            entry = {
                "task": task, "metrics": metrics, "num_fewshot": shots, "limit": limit,
                "n_samples": result.get("n-samples", {}).get(task),
                "task_version": result.get("versions", {}).get(task),
                "source": (cfg.get("metadata") or {}).get("config_source")
                or cfg.get("dataset_path"),
                "lm_eval_version": version, "model": model_label, "batch_size": batch_size,
                "seconds": round(seconds, 3),
            }
            entry["protocol"] = task_protocol_line(entry)
            entries[f"{task}|fewshot={shots}|limit={limit}"] = entry
    return entries


def primary_metric(metrics: dict):
    """(name, value) shown for a task: acc when it has one, else its first number."""
    if isinstance(metrics.get("acc"), (int, float)):
        return "acc", metrics["acc"]
    for name, v in metrics.items():
        if "_stderr" not in name and isinstance(v, (int, float)):
            return name, v
    return None, None


def task_protocol_line(e: dict) -> str:
    """The number with how it was obtained (items, shots, lm-eval version)."""
    n = e.get("n_samples") or {}
    items = (f"{n['effective']:,} of {n['original']:,} items, " if n else "")
    name, value = primary_metric(e["metrics"])
    score = f", {name} {value:.4f}" if name else ""
    return f"{e['task']}: {items}{e['num_fewshot']}-shot, lm-eval {e['lm_eval_version']}{score}"


def results_table(result: dict) -> str:
    """lm-eval's table (and its groups table), as its own CLI prints them."""
    from lm_eval.utils import make_table
    text = make_table(result)
    if result.get("groups"):
        text += "\n" + make_table(result, "groups")
    return text


# ----------------------------------------------------------------------------- CLI
def _tasks_arg(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ArgumentTypeError("is empty; name at least one lm-eval task (e.g. arc_easy)")
    return names


def _limit_arg(text: str):
    """lm-eval's --limit: N items per task, or a fraction < 1 of each task."""
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise ArgumentTypeError(f"must be a positive number of items (or a fraction < 1), "
                                f"got {text!r}")
    return int(v) if v >= 1 and v == int(v) else v


def _nonnegative_int(text: str) -> int:
    if not text.isdigit():
        raise ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return int(text)


def add_task_args(p) -> None:
    """The lm-eval flags of `dmx eval` (with --tasks, perplexity is not computed)."""
    g = p.add_argument_group(
        "zero-shot tasks (lm-evaluation-harness, optional extra `eval`; docs/zero_shot.md)")
    g.add_argument("--tasks", type=_tasks_arg, metavar="T1,T2,...",
                   help="run these lm-eval tasks instead of perplexity, e.g. arc_easy,"
                        "arc_challenge,hellaswag,piqa,winogrande (hub datasets) or tasks "
                        "from --include-path")
    g.add_argument("--limit", type=_limit_arg, default=None,
                   help="only the first N items of each task (a fraction < 1: that share); "
                        "for quick looks, not for reported numbers")
    g.add_argument("--num-fewshot", type=_nonnegative_int, default=None,
                   help="examples in each prompt (default: the task's own, 0 when it names "
                        "none)")
    g.add_argument("--include-path", metavar="DIR",
                   help="a directory of lm-eval task YAMLs (e.g. local jsonl data, offline)")


def check_task_args(args) -> None:
    """Flags that belong to one mode only, before anything loads."""
    if args.tasks is None:
        extra = [f for f, v in (("--limit", args.limit), ("--num-fewshot", args.num_fewshot),
                                ("--include-path", args.include_path)) if v is not None]
        if extra:
            raise DMXError(f"{', '.join(extra)} {'go' if len(extra) > 1 else 'goes'} with "
                           f"--tasks (perplexity uses --data, --seqlen, --max-windows)")
        return
    ppl = [f for f, v in (("--data", args.data), ("--max-windows", args.max_windows),
                          ("--seqlen", args.seqlen)) if v is not None]
    if ppl or args.join != "file":
        ppl += ["--join"] if args.join != "file" else []
        raise DMXError(f"{', '.join(ppl)} set the perplexity run; --tasks runs lm-eval tasks "
                       f"instead: run them as two commands")
    _require_lm_eval()  # fail before the model loads


def run_task_eval(args, model, tokenizer, label: str) -> int:
    """`dmx eval --tasks`: lm-eval's table on stdout, the records in OUT/eval.json (--save)."""
    t0 = time.time()
    result = run_tasks(model, tokenizer, args.tasks, args.limit, args.num_fewshot,
                       args.batch_size, args.include_path)
    entries = task_entries(result, label, args.limit, args.batch_size, time.time() - t0)
    print(f"{label}: lm-eval {result['lm_eval_version']}"
          + (f", limit {args.limit} per task" if args.limit is not None else ""))
    print(results_table(result))
    if args.save:
        from dmx.outdir.evaljson import save_task_results
        print(f"dmx eval: recorded in {save_task_results(args.out, entries)}")
    return 0
