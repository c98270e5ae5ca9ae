"""`dmx report RUN_DIRS... -o report/`: one table and one Pareto plot across OUT directories.

Public API:

* ``collect(run_dirs, text=None) -> list[dict]``: one row per OUT from its manifest and eval.json
  (run, method -- "dmx+kl" for a search fused with KL --, target bits, achieved average
  bits simple / size-weighted / storage, format mix, perplexity with its protocol, wall
  time).
* ``compare_against(rows, against) -> None``: adds to every row ``paired``, its
  perplexity difference from the run ``against`` window by window (dmx.eval.paired: a 95 %
  interval and "lower" / "higher" / "tie"), or ``paired_missing`` saying why not.
* ``write_report(rows, report_dir, reference=None, force=False, title=...) -> Path``:
  report.md, report.json and pareto.png (perplexity vs average bits, one series per
  method, points labelled), written into a temp dir and renamed into place (--force
  replaces only an earlier report, never an OUT). When OUTs have lm-eval task results
  (`dmx eval OUT --tasks ... --save`): a task table in report.md and accuracy.png
  (accuracy vs average bits, one panel per task).
* ``add_report_parser(subparsers)`` / ``run_report(args)``: the CLI.

``reference``: {"label", "ppl", "protocol"} of the unquantized model, drawn as a line.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from dmx.errors import DMXError

__all__ = ["collect", "compare_against", "write_report", "add_report_parser", "run_report"]

MARKERS = {"dmx": "o", "dmx+kl": "D", "kl": "s", "uniform": "^"}


def _method(m: dict) -> str:
    """The manifest's method; a search fused with KL baselines (`dmx combine --kl`,
    `dmx search --fuse-kl`) is "dmx+kl": its ranking is half KL's, so it gets its own
    series on the plots instead of being joined to the searches' line."""
    combined = (m.get("search") or {}).get("combined") or {}
    return "dmx+kl" if m["method"] == "dmx" and combined.get("kl") else m["method"]


def collect(run_dirs, text: str | None = None) -> list[dict]:
    """Rows of the report, in the order given (every OUT's manifest and file hashes are
    checked). Each OUT's perplexity is the latest `dmx eval --save` recorded, or with
    ``text`` the latest one on that evaluation file (an OUT scored on several texts)."""
    from dmx.outdir.evaljson import load_eval, result_on_text
    from dmx.outdir.read import read_manifest

    if not run_dirs:
        raise DMXError("pass at least one OUT directory to report on")
    rows = []
    for d in run_dirs:
        m = read_manifest(d)
        ev = load_eval(d)
        eval_key, result = result_on_text(ev, text)
        mix = Counter(e["format"] for e in m["layers"].values())
        every = m["avg_bits"].get("all_linears") or {}
        search = m.get("search") or {}
        rows.append({
            "run": Path(d).name, "path": str(d), "method": _method(m),
            "ladder": m["ladder"], "target_bits": m["target_bits"],
            "avg_bits": m["avg_bits"]["simple"],
            "avg_bits_size_weighted": m["avg_bits"]["size_weighted"],
            "storage_bits_per_weight": m["avg_bits"]["storage_bits_per_weight"],
            "all_linears_bits": every.get("simple"),
            "all_linears_weight_bits_size_weighted": every.get("weights_size_weighted"),
            "layers": len(m["layers"]),
            "quantized": sorted(m["layers"]),
            "formats": dict(sorted(mix.items())),
            "recipe": _recipe_label(search),
            "raw_bits": (search.get("raw_bits") or {}).get("simple"),
            "repair": _repair_summary(search.get("budget_repair")),
            "end_ppl": search.get("end_ppl"),
            "search_log": str(Path(d) / "search_log.jsonl")
            if (Path(d) / "search_log.jsonl").is_file() else None,
            "ppl": None if result is None else result["ppl"],
            "ppl_ci95": None if result is None else result.get("ppl_ci95"),
            # per-window losses (dmx eval since 2026-12-06): for --against; not in report.json
            "window_nll": None if result is None else result.get("window_nll"),
            "protocol": None if result is None else result.get("protocol"),
            "eval_key": eval_key,
            "tasks": _task_scores(ev),
            # a search that did not record its wall time: its training time is the bulk
            "wall_time_s": m.get("wall_time_s") if m.get("wall_time_s") is not None
            else (m.get("search") or {}).get("train_seconds"),
            "model": m["source_model"],
        })
    return rows


def compare_against(rows, against: dict) -> None:
    """Each row's paired comparison with ``against`` (a row of :func:`collect`), in place."""
    from dmx.eval.paired import paired
    for r in rows:
        r["paired"], r["paired_missing"] = None, None
        if r["path"] == against["path"]:
            r["paired_missing"] = "the reference run"
        elif r["eval_key"] is None or against["eval_key"] is None:
            r["paired_missing"] = "not evaluated"
        elif r["eval_key"] != against["eval_key"]:
            r["paired_missing"] = "scored on other windows"
        elif r["window_nll"] is None or against["window_nll"] is None:
            r["paired_missing"] = "no per-window losses: rerun `dmx eval OUT --save`"
        elif min(len(r["window_nll"]), len(against["window_nll"])) < 2:
            r["paired_missing"] = "fewer than 2 windows scored"
        else:
            r["paired"] = paired(against["window_nll"], r["window_nll"])


def _paired_cell(r) -> str:
    from dmx.eval.paired import paired_cell
    p = r.get("paired")
    if p is None:
        return f"- ({r['paired_missing']})" if r.get("paired_missing") else "-"
    return paired_cell(p)


def _ppl_cell(r) -> str:
    if r["ppl"] is None:
        return "-"
    ci = r.get("ppl_ci95")
    return f"{r['ppl']:.2f}" + ("" if not ci else f" ({ci[0]:.2f}-{ci[1]:.2f})")


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _recipe_label(search: dict) -> str | None:
    """The recipe of a search OUT; a `dmx combine` OUT says how many seeds it averaged."""
    recipe = (search.get("config") or {}).get("recipe")
    combined = search.get("combined")
    if recipe is not None and combined:
        fused = combined.get("kl")
        with_kl = f", fused with {len(fused['inputs'])} KL" if fused else ""
        n = len(combined["seeds"])
        return f"{recipe}, {'one search' if n == 1 else f'{n} seeds combined'}{with_kl}"
    return recipe


def _repair_summary(repair) -> dict | None:
    if not repair:
        return None
    steps = Counter(m["step"] for m in repair["moves"])
    return {"fit": steps.get("fit", 0), "fill": steps.get("fill", 0),
            "bits_before": repair["bits_before"], "bits_after": repair["bits_after"]}


def _layer_set_warning(rows) -> list[str]:
    """Runs that quantize different layers sit on one plot only with a warning: their
    averages count different things (dmx search --export-target, --include)."""
    sets = {tuple(r["quantized"]) for r in rows}
    if len(sets) <= 1:
        return []
    detail = ", ".join(f"{r['run']} {r['layers']}" for r in rows)
    return ["**Warning:** the runs quantize different sets of linears (" + detail + "); "
            "compare the all-linears column, which counts the unquantized ones at their "
            "stored bits.", ""]


def _search_markdown(rows) -> list[str]:
    """What the search found vs what the budget repair made of it, and the soft model
    before discretization vs the hard model after it (calibration windows)."""
    runs = [r for r in rows if r["method"] == "dmx" and r["repair"]]
    if not runs:
        return []
    lines = ["## dMX searches: found vs repaired", "",
             "raw = the hard assignment the annealed offsets select; repaired = after the "
             "budget repair (fit: units demoted to get under the target; fill: units "
             "promoted up to it, a greedy post-process ranked by the learned offsets). "
             "Calibration ppl: the first calibration windows (trained on), the soft model at "
             "the final temperature vs the hard models.", "",
             "| run | recipe | target | raw bits | repaired bits | fit / fill moves "
             "| calib ppl soft | hard raw | hard repaired |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        e = r["end_ppl"] or {}
        lines.append(
            f"| {r['run']} | {r['recipe'] or '-'} | {_fmt(r['target_bits'], 'g')} | "
            f"{_fmt(r['raw_bits'], '.3f')} | {r['avg_bits']:.3f} | {r['repair']['fit']} / "
            f"{r['repair']['fill']} | {_fmt(e.get('soft'), '.3f')} | "
            f"{_fmt(e.get('hard_raw'), '.3f')} | {_fmt(e.get('hard_repaired'), '.3f')} |")
    lines.append("")
    if any(r["search_log"] for r in runs):
        lines += ["![offset trajectories and soft vs hard bits per step](dynamics.png)", ""]
    return lines


def _markdown(rows, reference, title, against=None) -> str:
    lines = [f"# {title}", ""]
    keys = {r["eval_key"] for r in rows if r["eval_key"]}
    if reference:
        lines += [f"Unquantized reference ({reference['label']}): {reference['protocol']}", ""]
    if len(keys) > 1:
        lines += ["**Warning:** the runs were evaluated with different protocols "
                  f"({', '.join(sorted(keys))}); their perplexities are not comparable.", ""]
    elif keys:
        proto = next((r["protocol"] for r in rows if r["protocol"]), None)
        if proto:   # (a result written without its protocol line has none to show)
            lines += [f"Perplexity protocol: {proto.rsplit(', ppl', 1)[0]}.", ""]
    missing = [r["run"] for r in rows if r["ppl"] is None]
    if missing:
        lines += [f"Not evaluated (run `dmx eval OUT --save`): {', '.join(missing)}.", ""]
    lines += ["Average bits are element bits (MXFP4 = 4, MXFP8 = 8), the mean of the weight "
              "and input-activation averages (simple: each layer once; size: weighted by "
              "elements); storage = bytes of packed weights + E8M0 scales per weight.", ""]
    lines += ["All linears: the same average over every linear of the model (lm_head and "
              "layers left out counted at their stored bits, e.g. 32 for float32).", ""]
    lines += ["ppl: in brackets, its 95 % interval over the scored windows (other windows of "
              "the same text would move it that much; runs evaluated before per-window "
              "losses were recorded show none).", ""]
    if against is not None:
        lines += [f"vs {against['run']}: each run's perplexity minus {against['run']}'s on "
                  "the same windows, with its 95 % interval from the per-window differences "
                  "(paired: much tighter than the two intervals); \"tie\" when it includes "
                  "0. Window noise only: a search's seed moves it too.", ""]
    lines += _layer_set_warning(rows)
    extra = f" | vs {against['run']}" if against is not None else ""
    lines += ["| run | method | target | avg bits | size-weighted | storage bits/w "
              f"| all linears | formats | ppl | wall s{extra} |",
              "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if extra else "")]
    for r in rows:
        mix = ", ".join(f"{n}x {f}" for f, n in r["formats"].items())
        lines.append(f"| {r['run']} | {r['method']} | {_fmt(r['target_bits'], 'g')} | "
                     f"{r['avg_bits']:.3f} | {r['avg_bits_size_weighted']:.3f} | "
                     f"{r['storage_bits_per_weight']:.3f} | "
                     f"{_fmt(r['all_linears_bits'], '.3f')} | {mix} | "
                     f"{_ppl_cell(r)} | {_fmt(r['wall_time_s'], '.1f')}"
                     + (f" | {_paired_cell(r)}" if extra else "") + " |")
    lines += ["", "![perplexity vs average bits](pareto.png)", ""]
    lines += _search_markdown(rows)
    lines += _tasks_markdown(rows)
    return "\n".join(lines)


# the Pareto plot names and joins the points up to this many runs (then: points only)
MAX_LABELLED_RUNS = 12


def _label_points(ax, points) -> None:
    """Name each (x, y, run) point next to it; the names of points that (nearly) coincide
    -- a fused pick that equals KL's, two seeds at one budget -- are stacked downwards
    instead of printed over each other."""
    if not points:
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    near_x = 0.02 * ((max(xs) - min(xs)) or 1.0)
    near_y = 0.03 * ((max(ys) - min(ys)) or 1.0)
    placed = []
    for x, y, run in points:
        below = sum(abs(x - px) < near_x and abs(y - py) < near_y for px, py in placed)
        ax.annotate(run, (x, y), textcoords="offset points", xytext=(4, 4 - 9 * below),
                    fontsize=7)
        placed.append((x, y))


def _plot(rows, reference, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    # many runs (a sweep over seeds and recipes): labels would overlap and a line through
    # every point zigzags between seeds and recipes, so draw the points only (the means are
    # the sweep's table)
    crowded = len(rows) > MAX_LABELLED_RUNS
    labels = []   # (x, y, run) of the labelled points, every series
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["avg_bits"], r["ppl"], r["run"]) for r in rows
                     if r["method"] == method and r["ppl"] is not None)
        if not pts:
            continue
        marker = MARKERS.get(method, "x")
        if crowded:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, alpha=0.6,
                       s=22, label=f"{method} ({len(pts)} runs)")
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker,
                linestyle="-" if len(pts) > 1 else "none", label=method)
        labels += pts
    _label_points(ax, labels)
    if reference:
        ax.axhline(reference["ppl"], color="gray", linestyle="--", linewidth=1,
                   label=f"unquantized ({reference['ppl']:.2f})")
    ax.set_xlabel("average element bits (simple)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows, report_dir, reference=None, force: bool = False,
                 title: str = "dmx report: perplexity vs average bits", against=None) -> Path:
    """Write report.md/json and pareto.png into ``report_dir`` atomically (mxref.outputs:
    ``force`` replaces only an earlier report, never one of the OUT directories).
    ``against``: the row the others were compared with (:func:`compare_against`)."""
    from mxref.outputs import output_dir

    from dmx.outdir.write import parents_made
    dest = Path(report_dir)
    inputs = [r["path"] for r in rows] + ([against["path"]] if against is not None else [])
    with parents_made(dest, "-o/--out"), output_dir(dest, **_out_rules(force, inputs)) as tmp:
        (tmp / "report.md").write_text(_markdown(rows, reference, title, against))
        runs = [{k: v for k, v in r.items() if k != "window_nll"} for r in rows]
        (tmp / "report.json").write_text(json.dumps(
            {"reference": reference, "against": None if against is None else against["path"],
             "runs": runs}, indent=1) + "\n")
        _plot(rows, reference, tmp / "pareto.png", title)
        if any(r["search_log"] for r in rows):
            plot_dynamics([r["search_log"] for r in rows if r["search_log"]],
                          tmp / "dynamics.png")
        if any(r["tasks"] for r in rows):
            _plot_accuracy(rows, tmp / "accuracy.png")
    return dest


def _out_rules(force: bool, inputs) -> dict:
    """mxref.outputs rules for a report dir: --force only over an earlier report."""
    return dict(force=force, marker="report.json", inputs=inputs, what="-o/--out",
                tool="dmx report", error=DMXError)


# ----------------------------------------------------------------------------- dynamics
MAX_DYNAMICS_RUNS = 8


def plot_dynamics(logs, path: Path) -> None:
    """dynamics.png: per search (one row each, at most MAX_DYNAMICS_RUNS), the raw offset
    of every unit against the step (the decision boundaries of the ladder dashed) and the
    soft average bits the forward pass used vs the hard bits the offsets would deploy,
    with the target; the temperature on a second axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dmx.quant.ladders import get_ladder
    from dmx.outdir.read import read_search_log

    logs = list(logs)[:MAX_DYNAMICS_RUNS]
    fig, axes = plt.subplots(len(logs), 2, figsize=(11, 3.2 * len(logs)), squeeze=False)
    for (ax_o, ax_b), source in zip(axes, logs):
        log = read_search_log(Path(source).parent)
        steps = log["steps"]
        cfg = log.get("config") or {}
        name = f"{Path(source).parent.name} ({cfg.get('recipe', '?')}, target " \
               f"{cfg.get('target_bits', '?')})"
        x = [s["step"] for s in steps]
        if steps and "offsets" in steps[0]:
            traj = list(zip(*[s["offsets"] for s in steps]))
            for t in traj:
                ax_o.plot(x, t, linewidth=0.6, alpha=0.6)
        if cfg.get("ladder"):
            rungs = get_ladder(cfg["ladder"]).rungs
            for a, b in zip(rungs, rungs[1:]):
                ax_o.axhline(0.5 * (a.position + b.position), color="k", linestyle="--",
                             linewidth=0.8)
        ax_o.set_title(f"{name}: raw offsets", fontsize=9)
        ax_o.set_xlabel("step")
        ax_o.set_ylabel("offset b_hat")
        ax_o.grid(True, alpha=0.3)
        ax_b.plot(x, [s["avg_bits"] for s in steps], label="soft (forward pass)")
        ax_b.plot(x, [s["hard_bits"] for s in steps], label="hard (deployed)")
        if cfg.get("target_bits") is not None:
            ax_b.axhline(cfg["target_bits"], color="gray", linestyle="--", label="target")
        if any(s.get("floor") is not None for s in steps):  # --budget project's ramp
            ax_b.plot(x, [s.get("floor") for s in steps], color="gray", linestyle=":",
                      label="floor (ramp)")
        ax_t = ax_b.twinx()
        ax_t.plot(x, [s["T"] for s in steps], color="tab:red", linewidth=0.7, alpha=0.5)
        ax_t.set_yscale("log")
        ax_t.set_ylabel("T (red)", fontsize=8)
        ax_b.set_title(f"{name}: average bits", fontsize=9)
        ax_b.set_xlabel("step")
        ax_b.set_ylabel("element bits")
        ax_b.grid(True, alpha=0.3)
        ax_b.legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save_palette_png(fig, path)
    plt.close(fig)


def _save_palette_png(fig, path: Path) -> None:
    """Save ``fig`` as a 256-colour PNG: hundreds of thin translucent lines make an RGBA
    PNG of several MB (1.8 MB for a sweep's 8 runs), the palette one about a third."""
    import io

    from PIL import Image  # matplotlib's own dependency
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    buf.seek(0)
    with Image.open(buf) as im:
        im.convert("RGB").quantize(colors=256).save(path, format="PNG", optimize=True)


# ----------------------------------------------------------------------------- CLI
def add_report_parser(subparsers):
    p = subparsers.add_parser(
        "report", help="table + Pareto plot (perplexity vs average bits) across OUT dirs",
        description="Read each OUT's dmx_manifest.json and eval.json (from `dmx eval OUT "
                    "--save`) and write report.md, report.json and pareto.png.")
    p.add_argument("runs", nargs="+", metavar="OUT", help="OUT directories")
    p.add_argument("--reference-ppl", type=float, default=None,
                   help="perplexity of the unquantized model (drawn as a dashed line)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="report the perplexities scored on this text (its file name is "
                        "matched) where an OUT was scored on several; default: each OUT's "
                        "latest `dmx eval --save`")
    p.add_argument("--against", default=None, metavar="OUT",
                   help="compare every run with this OUT window by window (same text and "
                        "windows): the perplexity difference with a 95 %% interval, and "
                        "whether it is a tie")
    p.add_argument("--title", default="dmx report: perplexity vs average bits")
    p.add_argument("--force", action="store_true", help="overwrite an existing report dir")
    p.add_argument("-o", "--out", required=True, help="report directory to create")
    p.set_defaults(func=run_report)
    return p


def run_report(args) -> int:
    from dmx.outdir.write import parents_made
    # the parents of -o are made for the report and removed again if it fails
    with parents_made(args.out, "-o/--out"):
        return _run_report(args)


def _run_report(args) -> int:
    import math

    from mxref.outputs import check_output
    ref_ppl = args.reference_ppl
    if ref_ppl is not None and not (math.isfinite(ref_ppl) and ref_ppl >= 1):
        # a perplexity is exp(mean NLL) >= 1: -5 or nan was drawn as the reference line
        # (nan also made report.json invalid JSON)
        raise DMXError(f"--reference-ppl {ref_ppl}: not a perplexity (a finite number >= 1); "
                       f"pass the unquantized model's, e.g. from `dmx eval --model DIR`")
    inputs = [*args.runs, *([args.against] if args.against else [])]
    check_output(args.out, is_dir=True, **_out_rules(args.force, inputs))  # before work
    rows = collect(args.runs, args.data)   # every OUT's hashes checked
    if args.data is not None and all(r["eval_key"] is None for r in rows):
        # a --data no run was scored on (a typo, another file name) wrote a report of
        # empty ppl cells, exit 0, nothing said
        raise DMXError(f"--data {args.data}: none of the runs was scored on a file named "
                       f"{Path(args.data).name}; run `dmx eval OUT --data {args.data} --save` "
                       f"first, or leave out --data")
    against = None
    if args.against is not None:
        match = [r for r in rows if Path(r["path"]).resolve() == Path(args.against).resolve()]
        against = match[0] if match else collect([args.against], args.data)[0]
        if against["window_nll"] is None:
            raise DMXError(f"--against {args.against}: its eval.json has no per-window "
                           f"losses on this text; rerun `dmx eval {args.against} --save`"
                           + (f" --data {args.data}" if args.data else ""))
        compare_against(rows, against)
    ref = None
    if args.reference_ppl is not None:
        ref = {"label": "--reference-ppl", "ppl": args.reference_ppl,
               "protocol": f"ppl {args.reference_ppl:.2f}"}
    dest = write_report(rows, args.out, ref, args.force, args.title, against)
    for r in rows:
        print(f"{r['run']:>24}  {r['method']:<8} bits {r['avg_bits']:.3f}  "
              f"ppl {_ppl_cell(r)}"
              + (f"  vs {against['run']}: {_paired_cell(r)}" if against is not None else ""))
    sets = {tuple(r["quantized"]) for r in rows}
    if len(sets) > 1:
        print("dmx report: warning: the runs quantize different sets of linears; compare "
              "the all-linears column of report.md")
    keys = sorted({r["eval_key"] for r in rows if r["eval_key"]})
    if len(keys) > 1:   # said in report.md only, while the table above mixed them
        print(f"dmx report: warning: the runs were evaluated with different protocols "
              f"({', '.join(keys)}); their perplexities are not comparable")
    print(f"dmx report: wrote {dest}/report.md, report.json, pareto.png"
          + (", accuracy.png" if any(r["tasks"] for r in rows) else "")
          + (", dynamics.png" if any(r["search_log"] for r in rows) else ""))
    return 0


# ----------------------------------------------------------------------------- lm-eval tasks
def _task_scores(ev) -> dict:
    """{task: {metric, value, key, protocol}} of one OUT's eval.json: for each task the
    entry saved last (dmx.outdir.evaljson.save_task_results keeps them in that order)."""
    from dmx.eval.zeroshot import primary_metric
    scores = {}
    for key, e in ((ev or {}).get("tasks") or {}).items():
        metric, value = primary_metric(e["metrics"])
        if metric is not None:
            scores[e["task"]] = {"metric": metric, "value": value, "key": key,
                                 "protocol": e["protocol"]}
    return scores


def _task_names(rows) -> list[str]:
    return list(dict.fromkeys(t for r in rows for t in r["tasks"]))


def _tasks_markdown(rows) -> list[str]:
    """The task section of report.md: one column per task, its protocol, a warning when the
    runs ran a task differently (shots, limit, metric)."""
    tasks = _task_names(rows)
    if not tasks:
        return []
    lines = ["## Task accuracy (lm-evaluation-harness)", ""]
    for t in tasks:
        seen = {(r["tasks"][t]["key"], r["tasks"][t]["metric"]) for r in rows if t in r["tasks"]}
        first = next(r["tasks"][t] for r in rows if t in r["tasks"])
        lines.append(f"- {first['protocol'].rsplit(', ', 1)[0]}" + (
            f" **(runs differ: {', '.join(sorted(k for k, _ in seen))}; not comparable)**"
            if len(seen) > 1 else ""))
    missing = [r["run"] for r in rows if not r["tasks"]]
    if missing:
        lines.append(f"- no task results (run `dmx eval OUT --tasks ... --save`): "
                     f"{', '.join(missing)}")
    head = [f"{t} ({next(r['tasks'][t]['metric'] for r in rows if t in r['tasks'])})"
            for t in tasks]
    lines += ["", "| run | method | avg bits | " + " | ".join(head) + " |",
              "|---|---|---|" + "---|" * len(tasks)]
    for r in rows:
        cells = [_fmt(r["tasks"][t]["value"] if t in r["tasks"] else None, ".4f") for t in tasks]
        lines.append(f"| {r['run']} | {r['method']} | {r['avg_bits']:.3f} | "
                     + " | ".join(cells) + " |")
    return lines + ["", "![task accuracy vs average bits](accuracy.png)", ""]


def _plot_accuracy(rows, path: Path) -> None:
    """accuracy.png: one panel per task, score vs average bits, one series per method."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    tasks = _task_names(rows)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        labels = []
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r["avg_bits"], r["tasks"][t]["value"], r["run"]) for r in rows
                         if r["method"] == method and t in r["tasks"])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=method,
                        marker=MARKERS.get(method, "x"), linestyle="-" if len(pts) > 1 else "none")
            labels += pts
        _label_points(ax, labels)
        metric = next(r["tasks"][t]["metric"] for r in rows if t in r["tasks"])
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("average element bits (simple)")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
