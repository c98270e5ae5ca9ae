"""OUT/eval.json: perplexities (`dmx eval OUT --save`) and lm-eval task results, one file.

Its own module so that dmx.eval.command (perplexity) and dmx.eval.zeroshot (tasks) both write it
without importing each other.
"""
from __future__ import annotations

import json
from pathlib import Path

from dmx.errors import DMXError

__all__ = ["load_eval", "latest_result", "latest_eval", "find_result", "result_on_text",
           "save_eval", "save_task_results"]


def load_eval(out_dir) -> dict | None:
    """OUT/eval.json, or None when `dmx eval OUT --save` has not run; a one-line DMXError
    when it is unreadable or not shaped as `dmx eval --save` writes it (:func:`_check`)."""
    from dmx.outdir.layout import EVAL_NAME
    path = Path(out_dir) / EVAL_NAME
    if not path.is_file():
        return None
    # eval.json is not sealed (only results, nothing the model is built from): deleting it
    # is always safe. "rerun `dmx eval --save`" alone could not help: that rerun reads it too
    fix = f"delete it and rerun `dmx eval {out_dir} --save`"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DMXError(f"{path}: unreadable JSON ({err}); {fix}") from None
    problem = _check(data)
    if problem:
        raise DMXError(f"{path}: not as `dmx eval --save` writes it ({problem}); {fix}")
    return data


_NUMBER = (int, float)
# the fields every reader (dmx report, find_result, --against) indexes without .get();
# later additions (window_nll, ppl_ci95, nll_se...) are optional: older files lack them
_RESULT_FIELDS = {"file": str, "seqlen": int, "windows": int, "windows_total": int,
                  "ppl": _NUMBER}
_TASK_FIELDS = {"task": str, "metrics": dict, "protocol": str}


def _bad_type(v, t) -> bool:
    return isinstance(v, bool) or not isinstance(v, t)


def _entries_problem(section: str, entries, fields: dict) -> str | None:
    """What is wrong with one section of eval.json ({key: entry}), or None."""
    if not isinstance(entries, dict):
        return f"field {section} is not an object"
    for key, e in entries.items():
        if not isinstance(e, dict):
            return f"{section}[{key!r}] is not an object"
        for name, t in fields.items():
            if _bad_type(e.get(name), t):
                kind = getattr(t, "__name__", "number")
                return f"{section}[{key!r}].{name} is missing or not a {kind}"
    return None


def _check(data) -> str | None:
    """What makes a loaded eval.json unusable (a hand edit, another tool's file), or None.
    Before this, `dmx report` and `dmx eval --save` died with a KeyError/TypeError
    traceback on such a file."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    results = data.get("results", {})
    problem = _entries_problem("results", results, _RESULT_FIELDS)
    if problem:
        return problem
    for key, r in results.items():   # the optional fields, when present
        if r.get("protocol") is not None and not isinstance(r["protocol"], str):
            return f"results[{key!r}].protocol is not a str"
        w = r.get("window_nll")
        if w is not None and (not isinstance(w, list) or any(_bad_type(x, _NUMBER) for x in w)):
            return f"results[{key!r}].window_nll is not a list of numbers"
        ci = r.get("ppl_ci95")
        if ci is not None and (not isinstance(ci, list) or len(ci) != 2
                               or any(_bad_type(x, _NUMBER) for x in ci)):
            return f"results[{key!r}].ppl_ci95 is not two numbers"
    latest = data.get("latest")
    if latest is not None and latest not in results:
        return f"field latest ({latest!r}) names no entry of results"
    return _entries_problem("tasks", data.get("tasks", {}), _TASK_FIELDS)


def latest_result(ev: dict | None) -> dict | None:
    """Of a loaded eval.json: the perplexity result recorded last ("ppl", "protocol",
    ...), or None when there is none."""
    return ev["results"][ev["latest"]] if ev and ev.get("latest") else None


def latest_eval(out_dir) -> dict | None:
    """The perplexity result `dmx eval OUT --save` recorded last in OUT, or None."""
    return latest_result(load_eval(out_dir))


def find_result(ev: dict | None, file, seqlen: int, max_windows: int | None = None,
                join: str = "file") -> dict | None:
    """Of a loaded eval.json: the perplexity result of one protocol (the text's file name,
    the window length, ``--max-windows``: None or 0 for the whole text, ``--join``), or
    None when OUT was not scored that way. An OUT scored on several texts keeps them all;
    "latest" names only the last one."""
    for result in (ev or {}).get("results", {}).values():
        if (Path(result["file"]).name != Path(file).name or result["seqlen"] != seqlen
                or result.get("join", "file") != join):
            continue
        want = result["windows_total"]
        if max_windows:
            want = min(max_windows, want)
        if result["windows"] == want:
            return result
    return None


def result_on_text(ev: dict | None, text=None) -> tuple[str | None, dict | None]:
    """(key, result) of a loaded eval.json: the latest perplexity, or with ``text`` the
    latest one scored on that file, whatever its window protocol ((None, None) if none)."""
    if text is None:
        return (ev or {}).get("latest"), latest_result(ev)
    results = (ev or {}).get("results", {})
    keys = [k for k, r in results.items() if Path(r["file"]).name == Path(text).name]
    key = ev["latest"] if ev.get("latest") in keys else (keys[-1] if keys else None)
    return key, results.get(key)


def save_eval(out_dir, result: dict) -> Path:
    """Record ``result`` in OUT/eval.json under its protocol key; "latest" names it."""
    data = load_eval(out_dir) or {"results": {}}
    key = (f"{Path(result['file']).name}|seqlen={result['seqlen']}|windows={result['windows']}"
           f"|join={result.get('join', 'file')}")
    data["results"][key] = result
    data["latest"] = key
    return _write_eval(out_dir, data)


def save_task_results(out_dir, entries: dict) -> Path:
    """Record lm-eval task entries (dmx.eval.zeroshot.task_entries) in OUT/eval.json under
    "tasks", next to the perplexities; a rerun of the same protocol replaces its entry and
    moves it last (the last entry of a task is the one `dmx report` shows)."""
    data = load_eval(out_dir) or {"results": {}}
    tasks = data.setdefault("tasks", {})
    for key, entry in entries.items():
        tasks.pop(key, None)
        tasks[key] = entry
    return _write_eval(out_dir, data)


def _write_eval(out_dir, data: dict) -> Path:
    from dmx.outdir.layout import EVAL_NAME
    from dmx.outdir.write import atomic_write_text
    path = Path(out_dir) / EVAL_NAME
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    return path
