"""`dmx search` scale-out: data parallel under torchrun (gloo on CPU, two processes) and
``--device-map auto`` (accelerate; on this CPU-only machine everything lands on the CPU).

The data-parallel run must give the offsets, the format assignment and the OUT manifest of
one process with the same global batch (``--batch-size`` is global: each rank runs its
half of every step's windows, its CE weighted by its share, the penalty on rank 0 only,
gradients summed over the ranks).

Settings: the real stories260K checkpoint (tests/data), ``--lr 3`` for 4 steps. The dMX
loss is rough in the offsets (the soft quantizer's emax = floor(log2 maxval) jumps), so
a last-bit difference in a gradient can grow to whole units: with ``--lr 30`` within
three steps, at lr 1 within ~14 steps, in one process (a one-ulp change of the loss) as
much as between one and two processes. Over these 4 steps at lr 3 the runs agree to
~1e-7 of the largest offset, and the tests hold them to 1e-6. The gradient split itself
is checked step by step, in process, by
test_two_ranks_gradients_sum_to_the_one_process_gradient.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import transformers  # noqa: F401 (a hard dependency: a broken install fails, never skips)

from dmx.cli import main  # noqa: E402
from dmx.search.distributed import DistContext  # noqa: E402
from dmx.search import SEARCH_LOG_NAME, read_search_log, search  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_threaded")  # tests/conftest.py

MODEL = Path(__file__).resolve().parent / "data" / "stories260K-hf"
WIKI = Path(__file__).resolve().parents[1] / "dmx" / "data" / "wikitext-2-raw" / "wiki.valid.raw"

TARGET = 5.0  # above the all-MXFP4 start: the budget repair's fill gives a mixed assignment
# The paper's hinge from all-MXFP4 with a large lr (the offsets leave the ladder at once):
# the soft quantizer is not smooth in the offset, so recipes whose offsets stay inside the
# ladder turn last-bit gradient differences into different roundings within a few steps
# (docs/dmx_search_cli.md); this file tests the data-parallel machinery, not a recipe.
KW = dict(seqlen=32, samples=12, steps=4, batch_size=4, recipe="paper", lr=3.0,
          parameterization="clamp", tie_fused=True, grad_norm="none", fill_budget=True,
          export_target="none")


# Learned rotations under torchrun: 2 steps. Each Cayley step turns R1 by ~1 (Frobenius,
# step = min(lr, 1/||A||)), and MXFP4 rounding of the rotated weights amplifies the
# last-bit difference of the two-rank gradient sum like the offsets' (measured: equal to
# 1e-7 through step 3, the loss 0.5% apart at step 4 at the default lr 1.5).
LEARNED = dict(rotate="learned", steps=2)


def _flags(calib, out, **extra) -> list[str]:
    argv = ["search", "--model", str(MODEL), "--target-bits", str(TARGET), "--calib", str(calib),
            "--no-progress", "-o", str(out)]
    for key, value in {**KW, **extra}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["DMX_DIST_TIMEOUT"] = "120"  # a broken test fails in minutes, not half an hour
    # torchrun gives each worker 1 torch thread; Numba's pool (started by write_out) would
    # otherwise keep 2 threads per worker busy on a 2-core box and slow the next search 8x
    env["NUMBA_NUM_THREADS"] = "1"
    env.update(extra)
    return env


# One torchrun launch (two gloo workers: each pays the torch/transformers import once)
# runs every multi-process scenario in order; each worker writes a JSON report.
WORKER = r"""
import contextlib, io, json, sys

from dmx.cli import main
from dmx.search import search
from dmx.search.train import SearchInterrupted

job = json.loads(sys.argv[1])
LEARNED = job["learned_kw"]
report = {}

def stop(step, record):  # Ctrl-C after step 2, on every rank
    if step == 2:
        raise KeyboardInterrupt

# 1. interrupted (this first search() starts the process group from torchrun's env)
try:
    search(job["model"], job["target"], out=job["resumed"], callback=stop, **job["kw"])
    report["interrupted"] = None
except SearchInterrupted as stop_info:
    report["interrupted"] = ["SearchInterrupted", stop_info.step]
except KeyboardInterrupt:
    report["interrupted"] = ["KeyboardInterrupt", None]
# 2. resumed by the same two processes
search(job["model"], job["target"], out=job["resumed"], resume=True, **job["kw"])
import torch.distributed as dist
from dmx.errors import DMXError

# 3. failures seen by one rank only reach the other: a calibration file missing on rank 1
#    (checked on every rank), a checkpoint missing on rank 0 (read on rank 0 only)
kw = dict(job["kw"])
if dist.get_rank() == 1:
    kw["calib"] = ["/nonexistent/rank1-calib.txt"]
for key, extra in (("lonely", kw), ("nockpt", dict(job["kw"], resume=True))):
    try:
        search(job["model"], job["target"], out=job[key], **extra)
        report[key] = None
    except DMXError as err:
        report[key] = str(err)
# 4. learned rotations: their matrices' gradients are all-reduced with the offsets'
search(job["model"], job["target"], out=job["learned"], **dict(job["kw"], **LEARNED))
# 5. the CLI: bad input (OUT exists), then a search from scratch
for key in ("bad", "cli"):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(job[key])
    report[key] = {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}
with open(job["report"] + "." + str(dist.get_rank()), "w") as fh:
    json.dump(report, fh)
"""


@pytest.fixture(scope="module")
def launched(calib, tmp_path_factory):
    """``torchrun --standalone --nproc-per-node 2 worker.py``; the workers' reports."""
    root = tmp_path_factory.mktemp("torchrun")
    (root / "exists").mkdir()
    worker = root / "worker.py"
    worker.write_text(WORKER)
    kw = {**KW, "calib": [str(calib)], "progress": False}
    job = {"model": str(MODEL), "target": TARGET, "kw": kw, "resumed": str(root / "resumed"),
           "bad": _flags(calib, root / "exists"), "cli": _flags(calib, root / "dist"),
           "lonely": str(root / "lonely"), "nockpt": str(root / "nockpt"),
           "learned": str(root / "learned"), "learned_kw": LEARNED,
           "report": str(root / "report")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node=2", str(worker), json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_clean_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    reports = [json.loads((root / f"report.{r}").read_text()) for r in range(2)]
    return root, reports


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(WIKI.read_text(encoding="utf-8")[:8000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(calib, tmp_path_factory):
    """One process, global batch 4."""
    out = tmp_path_factory.mktemp("ref") / "out"
    result = search(MODEL, TARGET, calib=[calib], out=out, progress=False, **KW)
    return out, result


def _offsets(out) -> dict:
    return read_search_log(Path(out))["offsets"]


def _assert_same_search(got_out, ref_out):
    """Offsets, formats and manifest of two searches that ran the same global batches."""
    ref_log = read_search_log(ref_out)
    got_log = read_search_log(got_out)
    assert got_log["formats"] == ref_log["formats"]  # the hard assignment: exactly equal
    # Offsets: float32 values as JSON floats (exact). Not bit-equal: the sum of the two
    # ranks' share-weighted half-batch gradients rounds differently from one mean over the
    # batch (and a batch of 2 runs other matmul blockings than a batch of 4), a few ulp
    # per step. Measured: 1e-7 of the largest offset after 4 steps; allowed: 1e-6.
    names = sorted(ref_log["offsets"])
    ref = torch.tensor([ref_log["offsets"][n] for n in names], dtype=torch.float64)
    got = torch.tensor([got_log["offsets"][n] for n in names], dtype=torch.float64)
    scale = float(ref.abs().max())
    assert scale > 0.5  # the offsets really moved (from 0)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * scale)
    # the logged values are the global means: per-step loss and CE of the whole batch
    for a, b in zip(got_log["steps"], ref_log["steps"], strict=True):
        for key in ("loss", "ce", "penalty", "avg_bits", "hard_bits", "T"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), (a["step"], key)
    # the manifest: identical but for times and the final loss values (as above)
    ref_m = json.loads((ref_out / "dmx_manifest.json").read_text())
    got_m = json.loads((got_out / "dmx_manifest.json").read_text())
    assert got_m["layers"] == ref_m["layers"]  # formats, shapes, sha256 of the packed bytes
    assert got_m["avg_bits"] == ref_m["avg_bits"]
    # the file hashes seal the search log (float noise, above) and the manifest its times
    volatile = {"created", "wall_time_s", "search", "files", "manifest_sha256"}
    assert {k: v for k, v in got_m.items() if k not in volatile} == \
        {k: v for k, v in ref_m.items() if k not in volatile}
    got_m["files"].pop(SEARCH_LOG_NAME)
    ref_m["files"].pop(SEARCH_LOG_NAME)
    assert got_m["files"] == ref_m["files"]   # model.safetensors, config, tokenizer alike
    for key, value in ref_m["search"].items():
        if key != "train_seconds":
            _assert_close_tree(got_m["search"][key], value, key)


def _assert_close_tree(got, ref, where):
    """Equal JSON trees, floats (losses, offsets) within the tolerance discussed above."""
    if isinstance(ref, float):  # a few float32 ulp per step (offsets near 1: 1.2e-7 each)
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-5), where
    elif isinstance(ref, dict):
        assert sorted(got) == sorted(ref), where
        for key in ref:
            _assert_close_tree(got[key], ref[key], f"{where}.{key}")
    elif isinstance(ref, list):
        assert len(got) == len(ref), where
        for i, (g, r) in enumerate(zip(got, ref)):
            _assert_close_tree(g, r, f"{where}[{i}]")
    else:
        assert got == ref, where


def test_torchrun_two_processes_match_one_process(reference, launched):
    ref_out, _ = reference
    root, reports = launched
    assert [r["cli"]["rc"] for r in reports] == [0, 0]
    _assert_same_search(root / "dist", ref_out)
    assert not (root / "dist.partial").exists()  # rank 0 removed its checkpoint
    assert "dmx search: wrote" in reports[0]["cli"]["stdout"]
    assert reports[1]["cli"]["stdout"] == ""  # only rank 0 reports


def test_torchrun_interrupt_and_resume(reference, launched):
    """Ctrl-C after step 2 on both ranks: rank 0 saves the checkpoint, the other stops;
    --resume (read on rank 0, sent to rank 1) finishes the same search."""
    ref_out, _ = reference
    root, reports = launched
    assert reports[0]["interrupted"] == ["SearchInterrupted", 2]
    assert reports[1]["interrupted"] == ["KeyboardInterrupt", None]
    _assert_same_search(root / "resumed", ref_out)
    log = read_search_log(root / "resumed")
    assert len(log["steps"]) == KW["steps"]


def test_torchrun_learned_rotations_match_one_process(calib, launched, tmp_path):
    """--rotate learned under torchrun: R1/R2 gradients summed over the ranks like the
    offsets', so both processes take the same Cayley steps and the folded OUT is the one
    process's (to rounding: two steps, see LEARNED)."""
    from safetensors.torch import load_file

    root, _ = launched
    ref_out = tmp_path / "learned"
    search(MODEL, TARGET, calib=[calib], out=ref_out, progress=False, **{**KW, **LEARNED})
    ref_m = json.loads((ref_out / "dmx_manifest.json").read_text())
    got_m = json.loads((root / "learned" / "dmx_manifest.json").read_text())
    assert got_m["rotation"]["learned_steps"] == ref_m["rotation"]["learned_steps"] == 2
    assert got_m["rotation"]["orthogonality_error"] < 1e-5
    assert read_search_log(root / "learned")["formats"] == read_search_log(ref_out)["formats"]
    ref_w = load_file(str(ref_out / "model.safetensors"))
    got_w = load_file(str(root / "learned" / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):  # rotated by the final R1
        torch.testing.assert_close(got_w[key], ref_w[key], rtol=1e-5, atol=1e-6)
    ref_steps = read_search_log(ref_out)["steps"]
    got_steps = read_search_log(root / "learned")["steps"]
    for a, b in zip(got_steps, ref_steps, strict=True):  # the global rotation gradient
        assert a["rotation_grad_norm"] == pytest.approx(b["rotation_grad_norm"], rel=1e-4)
        assert b["rotation_grad_norm"] > 0


def test_bad_input_under_torchrun_is_one_line_on_rank_0(launched):
    """Both ranks stop (no hang) with exit 2; rank 0 alone prints the one line."""
    root, reports = launched
    assert [r["bad"]["rc"] for r in reports] == [2, 2]
    lines = [ln for ln in reports[0]["bad"]["stderr"].splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dmx search: error: "), lines
    assert "--force" in lines[0]
    assert reports[1]["bad"]["stderr"] == ""
    assert sorted(p.name for p in (root / "exists").iterdir()) == []  # nothing written


def test_failure_on_one_rank_stops_both_with_its_message(launched):
    """No hang when only one rank fails: the other raises the same one-line DMXError."""
    root, reports = launched
    for key, needle in (("lonely", "/nonexistent/rank1-calib.txt"), ("nockpt", "no checkpoint")):
        messages = [r[key] for r in reports]
        assert all(m is not None and needle in m for m in messages), (key, messages)
        assert messages[0] == messages[1]
    assert not (root / "lonely").exists() and not (root / "nockpt").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("env, needle", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR"),
    ({"WORLD_SIZE": "2"}, "RANK"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK=5"),
    ({"WORLD_SIZE": "8", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     "--batch-size 4 is smaller than the 8 processes"),
])
def test_torchrun_env_without_process_group_is_one_line(calib, tmp_path, capsys,
                                                        monkeypatch, env, needle):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    assert main(_flags(calib, out)) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error" in lines[0] and needle in lines[0], lines
    assert not out.exists()


def test_peer_that_never_comes_times_out_with_one_line(calib, tmp_path, capsys, monkeypatch):
    """Rank 0 of 2 with a reachable store but no rank 1: DMX_DIST_TIMEOUT, then one line."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("DMX_DIST_TIMEOUT", "1")
    out = tmp_path / "out"
    assert main(_flags(calib, out)) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot start the gloo process group" in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize("distill", [False, True])
def test_two_ranks_gradients_sum_to_the_one_process_gradient(calib, monkeypatch, distill):
    """The loss split (share-weighted CE, penalty on rank 0 only) without processes: run
    each rank's half of a step here, sum the gradients (what all_reduce does) and compare
    with one process. Target 4.05 < the soft start (4.07): the penalty is active, so
    counting it on both ranks would double its (large) part of the gradient."""
    import dmx.search.distributed
    from dmx import data
    from dmx.quant.anneal import TemperatureSchedule
    from dmx.nn.layers import dmx_parameters, wrap_model
    from dmx.nn.bits import average_bits
    from dmx.search.penalty import hinge_penalty
    from dmx.search.recipe import SearchConfig
    from dmx.search.train import _train_step

    monkeypatch.setattr(dmx.search.distributed, "reduce_sum", lambda ctx, values: values)
    monkeypatch.setattr(dmx.search.distributed, "all_reduce_grads", lambda ctx, params: None)
    model, tok = data.load_model_and_tokenizer(MODEL)
    windows = data.calibration_windows(tok, [str(calib)], 32, 3, 0)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = wrap_model(model, "fp8-fp4")
    for layer in layers.values():
        layer.train()
    params = dmx_parameters(model)
    # batch 3: uneven shares 2/3 + 1/3; with distill the KL is split the same way
    cfg = SearchConfig.from_recipe("paper", target_bits=4.05, steps=4, batch_size=3,
                                   distill=distill, parameterization="clamp", grad_norm="none")
    frozen = torch.optim.SGD(params, lr=0.0)  # the step leaves the offsets as they are

    def grads(dist):
        record = _train_step(model, layers, windows, cfg, frozen, TemperatureSchedule(4), 0,
                             dist)
        return record, torch.stack([p.grad.detach().clone() for p in params])

    record, one = grads(None)
    assert record["penalty"] > 0
    parts = [grads(DistContext(world_size=2, rank=r)) for r in range(2)]
    two = parts[0][1] + parts[1][1]
    # the logged values: each rank's share-weighted part (reduce_sum is the identity here)
    for key in ("ce",) + (("kl",) if distill else ()):
        assert parts[0][0][key] + parts[1][0][key] == pytest.approx(record[key], rel=1e-6)
    tol = 1e-6 * float(one.abs().max())
    torch.testing.assert_close(two, one, rtol=1e-5, atol=tol)
    # non-vacuous: the penalty's own gradient (what a second copy would add) is far larger
    penalty = hinge_penalty(average_bits(layers, "simple"), 4.05, cfg.lam)
    extra = torch.stack(torch.autograd.grad(penalty, params))
    assert float(extra.abs().max()) > 1000 * tol


def test_rank_slices_partition_the_global_batch():
    ids = torch.arange(7)
    parts = [DistContext(world_size=3, rank=r).rank_slice(ids, 7) for r in range(3)]
    assert torch.equal(torch.cat([p for p, _ in parts]), ids)
    assert [p.numel() for p, _ in parts] == [3, 2, 2]
    assert sum(share for _, share in parts) == pytest.approx(1.0)


def test_device_map_auto_runs_on_cpu(reference, calib, tmp_path):
    """accelerate places the model (all on the CPU here): the same search as --device cpu,
    bit for bit, and every offset on its layer's device."""
    import accelerate  # noqa: F401 (in the test extra: a broken install fails, never skips)
    ref_out, ref = reference
    mapped = search(MODEL, TARGET, calib=[calib], out=tmp_path / "mapped", progress=False,
                    device_map="auto", **KW)
    assert mapped["formats"] == ref["formats"]
    assert _offsets(tmp_path / "mapped") == _offsets(ref_out)
    layers = [m for m in mapped["model"].modules() if hasattr(m, "offset")]
    assert layers and all(m.offset.device == m.linear.weight.device for m in layers)


def test_device_map_without_accelerate_is_one_line(calib, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate -> ImportError
    out = tmp_path / "out"
    assert main(_flags(calib, out) + ["--device-map", "auto"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install accelerate" in lines[0], lines


def test_layers_on_other_gpus_run_with_their_gpu_current(monkeypatch):
    """--device-map: Triton launches on the current GPU, so each DMXLinear's forward makes
    its own GPU current and restores the previous one (also when forward raises). No GPU
    here: the layers' devices and torch.cuda's device calls are stand-ins."""
    import dmx.search.distributed
    from dmx.nn.layers import DMXLinear

    layers = {f"l{i}": DMXLinear(torch.nn.Linear(32, 32), "fp8-fp4") for i in range(3)}
    where = {id(layers["l0"]): 0, id(layers["l1"]): 1, id(layers["l2"]): 1}
    monkeypatch.setattr(dmx.search.distributed, "_weight_device",
                        lambda layer: torch.device("cuda", where[id(layer)]))
    current, calls = [0], []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])

    def set_device(dev):
        calls.append(torch.device(dev).index if not isinstance(dev, int) else dev)
        current[0] = calls[-1]
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    handles = dmx.search.distributed.pin_layer_devices(layers)
    assert len(handles) == 6
    x = torch.randn(2, 32)
    layers["l1"](x)
    assert calls == [1, 0] and current[0] == 0
    with pytest.raises(RuntimeError):
        layers["l2"](torch.randn(2, 7))  # wrong width: F.linear raises inside forward
    assert calls == [1, 0, 1, 0] and current[0] == 0
    for h in handles:
        h.remove()
    where.update({k: 0 for k in where})
    assert dmx.search.distributed.pin_layer_devices(layers) == []  # all on the current GPU
