"""`dmx eval --tasks` through lm-evaluation-harness, offline: a local multiple-choice task
(YAML + jsonl written here) on an OUT of the embedded tiny-qwen3, checked item by item
against log-likelihoods computed here with the model directly; eval.json and the report."""
from __future__ import annotations

import json
import re
import sys

import lm_eval
import pytest
import torch

from dmx import data

from dmx import outdir
from dmx.eval import zeroshot
from dmx.cli import main

pytestmark = pytest.mark.usefixtures("single_threaded")  # tests/conftest.py

TASK = "dmx_tiny_mc"
ITEMS = [  # label: the right answer; the tiny model gets some of them wrong
    ("The capital of France is", ["Paris", "London", "Berlin"], 0),
    ("Two plus two equals", ["four", "seven", "purple"], 0),
    ("The sky on a clear day is", ["green", "blue", "loud"], 1),
    ("Water freezes at zero degrees", ["Celsius", "of music", "in the morning"], 0),
    ("The opposite of hot is", ["tall", "cold", "music"], 1),
    ("In the year 1900, the city", ["was", "elephant", "blue sky"], 0),
]


def write_task(root):
    """A task directory lm-eval reads with --include-path: the YAML points at the jsonl
    (absolute path) and keeps datasets' cache under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    jsonl = root / "items.jsonl"
    jsonl.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n"
                             for q, c, y in ITEMS))
    (root / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
  cache_dir: {root / "hf-cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return root


def choice_logliks(model, tok, question, choices):
    """log p(" " + choice | question), summed over the choice's tokens, by hand."""
    ctx = tok(question)["input_ids"]
    out = []
    for c in choices:
        ids = tok(f"{question} {c}")["input_ids"]
        assert ids[:len(ctx)] == ctx  # the choice starts a new token: a clean split
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        out.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(ctx), len(ids))))
    return out


def argmax(xs):
    return max(range(len(xs)), key=xs.__getitem__)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An MXFP4 (weights and inputs) OUT of the embedded model, the task, the hand answers."""
    root = tmp_path_factory.mktemp("zeroshot")
    out = root / "mxfp4"
    assert main(["baseline", "--model", str(data.embedded_model_dir()), "--method", "uniform",
                 "--format", "fp4_e2m1", "-o", str(out)]) == 0
    model, tok, _ = outdir.load(out)
    hand = [choice_logliks(model, tok, q, c) for q, c, _ in ITEMS]
    return {"out": out, "tasks": write_task(root / "tasks"), "model": model, "tok": tok,
            "hand": hand}


def test_lm_eval_scores_each_item_as_computed_by_hand(setup, single_threaded):
    res = zeroshot.run_tasks(setup["model"], setup["tok"], [TASK], batch_size=4,
                             include_path=setup["tasks"], log_samples=True)
    samples = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(ITEMS)
    for s, hand, (_, choices, label) in zip(samples, setup["hand"], ITEMS):
        lls = [r[0] for r in s["filtered_resps"]]
        assert lls == pytest.approx(hand, abs=1e-4)
        assert s["acc"] == float(argmax(hand) == label)
        norm = [ll / len(c) for ll, c in zip(hand, choices)]  # lm-eval: per character
        assert s["acc_norm"] == float(argmax(norm) == label)
    # the OUT's quantized model was scored, not the float one it came from
    fp32, tok = data.load_model_and_tokenizer(data.embedded_model_dir())
    q, c, _ = ITEMS[0]
    assert choice_logliks(fp32, tok, q, c) != pytest.approx(setup["hand"][0], abs=1e-3)


def test_dmx_eval_tasks_saves_next_to_ppl_and_reports(setup, tmp_path, capsys,
                                                      single_threaded):
    out, hand = setup["out"], setup["hand"]
    acc = sum(argmax(h) == y for h, (_, _, y) in zip(hand, ITEMS)) / len(ITEMS)
    acc_norm = sum(argmax([ll / len(c) for ll, c in zip(h, cs)]) == y
                   for h, (_, cs, y) in zip(hand, ITEMS)) / len(ITEMS)
    assert main(["eval", str(out), "--max-windows", "2", "--seqlen", "32", "--no-progress",
                 "--save"]) == 0
    assert main(["eval", str(out), "--tasks", TASK, "--include-path", str(setup["tasks"]),
                 "--batch-size", "3", "--save"]) == 0
    printed = capsys.readouterr().out
    assert f"lm-eval {lm_eval.__version__}" in printed
    assert re.search(rf"\|{TASK}\s*\|.*\|acc\s*\|.*\|{acc:.4f}\|", printed)  # lm-eval's table

    saved = json.loads((out / outdir.EVAL_NAME).read_text())
    assert saved["results"][saved["latest"]]["windows"] == 2  # the perplexity stays
    entry = saved["tasks"][f"{TASK}|fewshot=0|limit=None"]
    assert entry["metrics"]["acc"] == pytest.approx(acc)
    assert entry["metrics"]["acc_norm"] == pytest.approx(acc_norm)
    assert entry["n_samples"] == {"original": len(ITEMS), "effective": len(ITEMS)}
    assert entry["lm_eval_version"] == lm_eval.__version__ and entry["model"] == str(out)

    report = tmp_path / "report"
    assert main(["report", str(out), "-o", str(report)]) == 0
    md = (report / "report.md").read_text()
    assert f"| {TASK} (acc) |" in md and f"| {acc:.4f} |" in md
    assert f"{TASK}: {len(ITEMS)} of {len(ITEMS)} items, 0-shot" in md
    assert (report / "accuracy.png").stat().st_size > 0
    row = json.loads((report / "report.json").read_text())["runs"][0]
    assert row["tasks"][TASK]["value"] == pytest.approx(acc) and row["ppl"] is not None


def test_model_uniform_matches_the_out(setup, capsys, single_threaded):
    """--model DIR --uniform FMT quantizes on the fly like the OUT: the same scores."""
    args = ["--tasks", TASK, "--include-path", str(setup["tasks"])]
    assert main(["eval", str(setup["out"]), *args]) == 0
    from_out = capsys.readouterr().out.split("\n", 1)[1]
    assert main(["eval", "--model", str(data.embedded_model_dir()), "--uniform", "fp4_e2m1",
                 *args]) == 0
    assert capsys.readouterr().out.split("\n", 1)[1] == from_out


@pytest.mark.parametrize("argv, message", [
    (["--tasks", TASK, "--data", "x.txt"], "run them as two commands"),
    (["--limit", "3"], "--limit goes with --tasks"),
    (["--tasks", TASK, "--limit", "0"], "argument --limit: must be a positive number"),
    (["--tasks", TASK, "--num-fewshot", "-1"], "argument --num-fewshot: must be a non-negative"),
    (["--tasks", TASK, "--include-path", "no/such/dir"], "no such directory"),
    (["--tasks", " , "], "argument --tasks: is empty"),
])
def test_task_flags_bad_input(setup, capsys, argv, message):
    assert main(["eval", str(setup["out"]), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_without_lm_eval_the_flag_names_the_install_command(setup, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    assert main(["eval", str(setup["out"]), "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not installed" in err and "pip install" in err
    assert "[eval]" in err and "lm-eval" in err
