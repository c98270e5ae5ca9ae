"""`dmx search --seeds`: one search per seed, kept in OUT.seeds/, combined into OUT.

The combined OUT must be exactly what `dmx combine` writes from the same seed OUTs (same
formats, same packed bytes by their sha256), a rerun must keep the seeds already done, and
bad requests are refused in one line before the first search, with nothing written.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import sys

import pytest

from dmx.cli import main
from dmx.errors import DMXError
from dmx.outdir import read_manifest
from dmx.search.command import seed_out_dir
from tiny_models import tiny_model_dir, tiny_root

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tiny_model_dir(tiny_root(tmp_path_factory), "llama")


def _argv(src, calib, out, *extra, steps=3):
    return ["search", "--model", str(src), "--target-bits", "6", "--calib", str(calib),
            "--seqlen", "32", "--samples", "12", "--batch-size", "2", "--steps", str(steps),
            "--export-target", "none", "--no-progress", *extra, "-o", str(out)]


def _refused(capsys, argv, match, parent):
    before = sorted(p.name for p in parent.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dmx search: error: "), err
    assert match in lines[0], lines[0]
    assert sorted(p.name for p in parent.iterdir()) == before  # nothing written


def test_seeds_are_searched_kept_and_combined(src, calib, tmp_path, capsys):
    out = tmp_path / "comb"
    assert main(_argv(src, calib, out, "--seeds", "0", "2")) == 0
    said = capsys.readouterr()
    assert "seeds 0, 2 ->" in said.out and "seed 2:" in said.out
    seed_outs = [seed_out_dir(out, s) for s in (0, 2)]
    assert [p.relative_to(tmp_path).as_posix() for p in seed_outs] == \
        ["comb.seeds/seed-0", "comb.seeds/seed-2"]
    assert [read_manifest(p)["search"]["config"]["seed"] for p in seed_outs] == [0, 2]
    assert not list(tmp_path.glob("**/*.partial"))  # every seed's checkpoint dir removed

    # the same as `dmx combine` of those OUTs, byte for byte in the packed weights
    ref = tmp_path / "ref"
    assert main(["combine", *map(str, seed_outs), "-o", str(ref)]) == 0
    m, r = read_manifest(out), read_manifest(ref)
    assert {n: (e["format"], e["sha256"]) for n, e in m["layers"].items()} == \
        {n: (e["format"], e["sha256"]) for n, e in r["layers"].items()}
    assert m["search"]["combined"]["seeds"] == [0, 2]
    assert m["search"]["combined"]["offsets"] == r["search"]["combined"]["offsets"]
    assert m["search"]["combined"]["fill"] is True  # the default recipe's fill

    # a rerun keeps the seeds already searched (nothing rewritten) and combines again
    shas = [read_manifest(p)["manifest_sha256"] for p in seed_outs]
    created = [read_manifest(p)["created"] for p in seed_outs]
    shutil.rmtree(out)
    assert main(_argv(src, calib, out, "--seeds", "0", "2")) == 0
    err = capsys.readouterr().err
    assert err.count(": kept ") == 2, err
    assert [read_manifest(p)["manifest_sha256"] for p in seed_outs] == shas
    assert [read_manifest(p)["created"] for p in seed_outs] == created
    assert read_manifest(out)["layers"] == m["layers"]

    # another search where a seed's OUT would go: refused before any work
    shutil.rmtree(out)
    _refused(capsys, _argv(src, calib, out, "--seeds", "0", "2", steps=4),
             "holds another search", tmp_path)


@pytest.mark.parametrize("extra, match", [
    (["--seeds", "3"], "two or more different seeds"),
    (["--seeds", "1", "1"], "two or more different seeds"),
    (["--seed", "1", "--seeds", "0", "2"], "not both"),
    (["--seeds", "0", "1", "--rotate", "hadamard"], "--rotate none"),
    (["--seeds", "-1", "0"], "--seed must be a non-negative integer"),
])
def test_seeds_refusals(src, calib, tmp_path, capsys, extra, match):
    _refused(capsys, _argv(src, calib, tmp_path / "o", *extra), match, tmp_path)


def test_seeds_refuse_an_existing_out_before_searching(src, calib, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("not an OUT")
    _refused(capsys, _argv(src, calib, out, "--seeds", "0", "1"), "-o/--out", tmp_path)
    assert (out / "keep.txt").read_text() == "not an OUT"


def test_ctrl_c_in_a_later_seed_resumes_with_the_whole_command(src, calib, tmp_path, capsys,
                                                                monkeypatch):
    import shlex

    import dmx.search.train

    real_step = dmx.search.train._train_step
    calls = []

    def interrupted_step(*args):
        calls.append(1)
        if len(calls) == 5:  # seed 0 ran steps 1-3; seed 2 is stopped in its second step
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(dmx.search.train, "_train_step", interrupted_step)
    out = tmp_path / "comb"
    assert main(_argv(src, calib, out, "--seeds", "0", "2")) == 130
    err = capsys.readouterr().err
    command = shlex.split(err.strip().splitlines()[-1])
    assert command[:2] == ["dmx", "search"] and "--resume" in command
    assert command[command.index("--seeds") + 1:][:2] == ["0", "2"] and "--seed" not in command
    assert not out.exists() and (seed_out_dir(out, 0)).is_dir()
    assert not seed_out_dir(out, 2).exists()
    # without --resume: refused before any work, naming seed 2's checkpoint
    _refused(capsys, _argv(src, calib, out, "--seeds", "0", "2"),
             "seed 2 left a checkpoint", tmp_path)

    monkeypatch.setattr(dmx.search.train, "_train_step", real_step)
    assert main(command[1:]) == 0
    err = capsys.readouterr().err
    assert ": kept " in err and err.count(": kept ") == 1  # seed 0; seed 2 resumed
    assert read_manifest(seed_out_dir(out, 2))["search"]["steps_run"] == 3
    assert read_manifest(out)["search"]["combined"]["seeds"] == [0, 2]
    assert not list(tmp_path.glob("**/*.partial"))


def test_jobs_run_the_seeds_side_by_side_with_the_same_result(src, calib, tmp_path, capsys):
    """--jobs 2: the two seeds in two spawned processes; every seed OUT and the combination
    equal the one-after-another run's, bit for bit in the packed weights."""
    def layers(out):
        return {n: (e["format"], e["sha256"]) for n, e in read_manifest(out)["layers"].items()}

    seq, par = tmp_path / "seq", tmp_path / "par"
    assert main(_argv(src, calib, seq, "--seeds", "0", "2")) == 0
    capsys.readouterr()
    assert main(_argv(src, calib, par, "--seeds", "0", "2", "--jobs", "2", "--threads",
                      "1")) == 0
    said = capsys.readouterr()
    assert "2 searches, up to 2 at a time (as memory allows), 1 CPU thread(s) each" in said.err
    assert "seed 0:" in said.out and "seed 2:" in said.out
    if sys.platform.startswith("linux"):  # measured in each worker, said with its seed
        assert said.out.count("its process peaked at") == 2
    for s in (0, 2):
        assert layers(seed_out_dir(par, s)) == layers(seed_out_dir(seq, s))
    assert layers(par) == layers(seq)
    assert read_manifest(par)["search"]["combined"]["offsets"] == \
        read_manifest(seq)["search"]["combined"]["offsets"]
    assert not list(tmp_path.glob("**/*.partial"))


def test_jobs_without_seeds_is_refused(src, calib, tmp_path, capsys):
    _refused(capsys, _argv(src, calib, tmp_path / "o", "--jobs", "2"), "--jobs goes with --seeds or --fuse-kl",
             tmp_path)
    _refused(capsys, _argv(src, calib, tmp_path / "o", "--seeds", "0", "1", "--jobs", "0"),
             "--jobs must be a positive integer", tmp_path)


def _fake_search(*, outcome, callback, say, **_):
    """A stand-in for dmx.search.search in a seed_pool worker (module level: picklable)."""
    from dmx.errors import DMXError
    from dmx.search.seed_pool import SUMMARY_KEYS
    from dmx.search.train import SearchInterrupted

    if outcome == "stop":
        raise SearchInterrupted(2, "/ckpt/seed-1")
    if outcome == "bad":
        raise DMXError("bad calibration text")
    if outcome == "die":  # as the kernel's OOM killer would end it
        import os
        os._exit(9)
    if isinstance(outcome, tuple):  # ("meet", dir, me, other, s): one step, then wait (up
        import time                 # to s seconds) for the other search to start; when it ran
        from pathlib import Path

        _, where, me, other, limit = outcome
        t0 = time.time()
        (Path(where) / f"started-{me}").touch()
        callback(1, {})
        while time.time() < t0 + limit and not (Path(where) / f"started-{other}").exists():
            time.sleep(0.05)
        return {**{k: "timed" for k in SUMMARY_KEYS}, "wall_seconds": (t0, time.time())}
    callback(1, {})
    return {k: outcome for k in SUMMARY_KEYS}


def test_seed_pool_reports_where_ctrl_c_stopped_each_seed_and_passes_errors_on():
    from dmx.errors import DMXError
    from dmx.search.seed_pool import run_seed_searches
    from dmx.search.train import SearchInterrupted

    reported = []
    done = run_seed_searches(_fake_search, [(0, {"outcome": "a"}), (1, {"outcome": "b"})],
                             jobs=2, threads=1, steps=1, progress=False,
                             report=lambda s, r: reported.append((s, r["out"])))
    assert {s: r["out"] for s, r in done.items()} == {0: "a", 1: "b"}
    if sys.platform.startswith("linux"):  # each worker's own peak: at least an interpreter
        assert all(r["peak_rss_bytes"] > 2 ** 20 for r in done.values())
    assert sorted(reported) == [(0, "a"), (1, "b")]

    with pytest.raises(SearchInterrupted, match=r"seed 1 after step 2 \(checkpoint "
                                                r"/ckpt/seed-1\); seeds 0 finished"):
        run_seed_searches(_fake_search, [(0, {"outcome": "a"}), (1, {"outcome": "stop"})],
                          jobs=2, threads=1, steps=1, progress=False)
    with pytest.raises(DMXError, match="bad calibration text"):
        run_seed_searches(_fake_search, [(0, {"outcome": "bad"}), (1, {"outcome": "a"})],
                          jobs=2, threads=1, steps=1, progress=False)
    with pytest.raises(DMXError, match=r"a search process died .* GiB available now\); "
                                       r"rerun with fewer --jobs"):
        run_seed_searches(_fake_search, [(0, {"outcome": "die"}), (1, {"outcome": "a"})],
                          jobs=2, threads=1, steps=1, progress=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak memory a worker "
                    "reports is read with getrusage, in bytes on Linux only here")
def test_seed_pool_starts_only_the_searches_the_memory_holds(tmp_path):
    """--jobs is an upper bound: one search starts alone; after its first step, with memory
    for no second one, the other waits for it to end (and the pool says why); with plenty,
    the second starts while the first still runs."""
    from dmx.search.seed_pool import jobs_that_fit, run_seed_searches

    def tasks(where, limit):
        where.mkdir()
        return [(0, {"outcome": ("meet", str(where), 0, 1, limit)}),
                (1, {"outcome": ("meet", str(where), 1, 0, limit)})]

    said = []
    done = run_seed_searches(_fake_search, tasks(tmp_path / "plenty", 60), jobs=2, threads=1,
                             steps=1, progress=False, say=said.append, memory=lambda: 2 ** 40)
    (a0, a1), (b0, b1) = done[0]["wall_seconds"], done[1]["wall_seconds"]
    assert b0 < a1 and a1 - a0 < 50 and said == []  # side by side, nothing to say

    # 1 MiB available: the first search waits its 2 s for a second that does not start
    done = run_seed_searches(_fake_search, tasks(tmp_path / "tight", 2), jobs=2, threads=1,
                             steps=1, progress=False, say=said.append, memory=lambda: 2 ** 20)
    (a0, a1), (b0, b1) = done[0]["wall_seconds"], done[1]["wall_seconds"]
    assert a1 - a0 >= 2 and b0 >= a1  # one after the other
    assert len(said) == 1 and said[0].startswith("--jobs 2: one search holds ") and \
        said[0].endswith("after its first step and 0.0 GiB is available: running 1 at a time")

    assert jobs_that_fit(4, peak=10, available=25) == 3  # 1 + floor(0.9 * 25 / 10)
    assert jobs_that_fit(4, peak=10, available=5) == 1
    assert jobs_that_fit(4, peak=10, available=None) == 4  # the OS does not say: as asked
    assert jobs_that_fit(2, peak=1, available=100) == 2


def _fake_side(*, outcome, where=None, other=None, limit=0):
    """A stand-in for a side task (a KL baseline) in a seed_pool worker: touches
    ``started-kl`` and, for "meet", waits up to ``limit`` s for ``started-<other>``."""
    import time
    from pathlib import Path

    from dmx.errors import DMXError

    if outcome == "bad":
        raise DMXError("bad KL text")
    if outcome == "stop":  # as Ctrl-C would reach it
        raise KeyboardInterrupt
    if outcome == "meet":
        t0 = time.time()
        (Path(where) / "started-kl").touch()
        while time.time() < t0 + limit and not (Path(where) / f"started-{other}").exists():
            time.sleep(0.05)
        (Path(where) / "kl-saw-other").write_text(
            str((Path(where) / f"started-{other}").exists()))
    return {"ignored": True}


def test_seed_pool_runs_side_tasks_beside_the_searches(tmp_path):
    """side_tasks (the KL baselines of --fuse-kl) share the pool: with one search and
    --jobs 2 the side task starts while the search runs; it is said done, not returned;
    its error passes on; a Ctrl-C that stops it names it by its label."""
    from dmx.errors import DMXError
    from dmx.search.seed_pool import run_seed_searches
    from dmx.search.train import SearchInterrupted

    said = []
    done = run_seed_searches(
        _fake_search, [(0, {"outcome": ("meet", str(tmp_path), 0, "kl", 60)})], jobs=2,
        threads=1, steps=1, progress=False, say=said.append, memory=lambda: 2 ** 40,
        side_tasks=[("KL baseline of seed 0", _fake_side,
                     {"outcome": "meet", "where": str(tmp_path), "other": 0, "limit": 60})])
    (a0, a1) = done[0]["wall_seconds"]
    assert list(done) == [0] and a1 - a0 < 50  # the search met the side task: side by side
    assert (tmp_path / "kl-saw-other").read_text() == "True"
    assert len(said) == 1 and said[0].startswith("KL baseline of seed 0: done (")

    with pytest.raises(DMXError, match="bad KL text"):
        run_seed_searches(_fake_search, [(0, {"outcome": "a"})], jobs=2, threads=1, steps=1,
                          progress=False, side_tasks=[("KL", _fake_side, {"outcome": "bad"})])
    with pytest.raises(SearchInterrupted, match=r"interrupted: KL baseline of seed 1 \(it "
                                                r"starts over on a rerun\); seeds 0 finished"):
        run_seed_searches(_fake_search, [(0, {"outcome": "a"})], jobs=1, threads=1, steps=1,
                          progress=False, side_tasks=[("KL baseline of seed 1", _fake_side,
                                                       {"outcome": "stop"})])


def test_fuse_kl_with_jobs_runs_the_baseline_beside_the_search_same_result(src, calib,
                                                                           tmp_path, capsys):
    """`--fuse-kl --jobs 2` (one seed): the search and its KL baseline at once, in two
    processes; the same OUTs, bit for bit, as one after the other (--threads 1 both)."""
    outs = {}
    for name, extra in (("serial", ()), ("pool", ("--jobs", "2"))):
        out = tmp_path / name
        assert main(_argv(src, calib, out, "--seed", "1", "--fuse-kl", "--kl-samples", "2",
                          "--threads", "1", *extra)) == 0
        outs[name] = (out, capsys.readouterr().err)
    assert "1 search and 1 KL baseline, up to 2 at a time" in outs["pool"][1]
    assert "KL baseline of seed 1: done (" in outs["pool"][1]
    (a, _), (b, _) = outs["serial"], outs["pool"]
    for sub in ("", ".seeds/seed-1", ".seeds/kl-1"):
        ma, mb = read_manifest(Path(f"{a}{sub}")), read_manifest(Path(f"{b}{sub}"))
        assert {n: (e["format"], e["sha256"]) for n, e in ma["layers"].items()} == \
            {n: (e["format"], e["sha256"]) for n, e in mb["layers"].items()}, sub
    ka, kb = (read_manifest(Path(f"{o}.seeds/kl-1"))["baseline"] for o in (a, b))
    assert ka["sensitivity"] == kb["sensitivity"]


def test_fuse_kl_writes_what_combine_kl_writes_and_keeps_it_on_a_rerun(src, calib, tmp_path,
                                                                         capsys):
    """--seeds --fuse-kl: a KL baseline per seed in OUT.seeds/kl-<s> (calibration seed =
    the search's), then OUT = `dmx combine seed-0 seed-1 --kl kl-0 kl-1`, byte for byte in
    the packed weights; a rerun keeps searches and baselines; another baseline there is
    refused before any work."""
    out = tmp_path / "fused"
    argv = _argv(src, calib, out, "--seeds", "0", "1", "--fuse-kl", "--kl-samples", "2")
    assert main(argv) == 0
    said = capsys.readouterr()
    assert "KL baseline of seed 1 (2 of 2)" in said.err
    seed_outs = [seed_out_dir(out, s) for s in (0, 1)]
    kl_outs = [tmp_path / "fused.seeds" / f"kl-{s}" for s in (0, 1)]
    kls = [read_manifest(k) for k in kl_outs]
    assert [k["method"] for k in kls] == ["kl", "kl"] and [k["seed"] for k in kls] == [0, 1]
    assert all(k["baseline"]["samples"] == 2 and k["baseline"]["seqlen"] == 32 for k in kls)
    ref = tmp_path / "ref"
    assert main(["combine", *map(str, seed_outs), "--kl", *map(str, kl_outs),
                 "-o", str(ref)]) == 0
    m, r = read_manifest(out), read_manifest(ref)
    assert {n: (e["format"], e["sha256"]) for n, e in m["layers"].items()} == \
        {n: (e["format"], e["sha256"]) for n, e in r["layers"].items()}
    assert m["search"]["combined"]["kl"]["scores"] == r["search"]["combined"]["kl"]["scores"]
    assert [i["manifest_sha256"] for i in m["search"]["combined"]["kl"]["inputs"]] == \
        [k["manifest_sha256"] for k in kls]

    shas = [k["manifest_sha256"] for k in kls]
    shutil.rmtree(out)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count(": kept ") == 4, err  # two searches, two baselines
    assert [read_manifest(k)["manifest_sha256"] for k in kl_outs] == shas

    shutil.rmtree(out)
    _refused(capsys, _argv(src, calib, out, "--seeds", "0", "1", "--fuse-kl", "--kl-samples",
                           "3"), "holds another KL baseline", tmp_path)


def test_fuse_kl_without_seeds_is_one_search_fused_with_its_kl_baseline(src, calib, tmp_path,
                                                                        capsys):
    """`--fuse-kl --seed 1` (no --seeds): the search in OUT.seeds/seed-1, its KL baseline
    (calibration seed 1) in OUT.seeds/kl-1, and OUT = `dmx combine seed-1 --kl kl-1`."""
    from dmx.search.command import FUSE_KL_SAMPLES

    out = tmp_path / "fused"
    assert main(_argv(src, calib, out, "--seed", "1", "--fuse-kl")) == 0
    err = capsys.readouterr().err
    assert "--fuse-kl: the search of seed 1 goes to" in err
    assert read_manifest(seed_out_dir(out, 1))["seed"] == 1
    kl = tmp_path / "fused.seeds" / "kl-1"
    assert read_manifest(kl)["method"] == "kl" and read_manifest(kl)["seed"] == 1
    # the default --kl-samples: the 4 windows every fusion was measured with
    assert FUSE_KL_SAMPLES == 4 and read_manifest(kl)["baseline"]["samples"] == 4
    ref = tmp_path / "ref"
    assert main(["combine", str(seed_out_dir(out, 1)), "--kl", str(kl), "-o", str(ref)]) == 0
    m, r = read_manifest(out), read_manifest(ref)
    assert {n: (e["format"], e["sha256"]) for n, e in m["layers"].items()} == \
        {n: (e["format"], e["sha256"]) for n, e in r["layers"].items()}
    assert m["search"]["combined"]["seeds"] == [1]


@pytest.mark.parametrize("extra, match", [
    (["--fuse-kl", "--seed", "1", "--seeds", "0"], "give --seed (one search) or --seeds"),
    (["--seeds", "0", "1", "--kl-samples", "4"], "add --fuse-kl"),
    (["--seeds", "0", "1", "--fuse-kl", "--kl-samples", "0"], "--kl-samples must be a positive"),
])
def test_fuse_kl_refusals(src, calib, tmp_path, capsys, extra, match):
    _refused(capsys, _argv(src, calib, tmp_path / "out", *extra), match, tmp_path)


def test_fuse_kl_keeps_a_baseline_whose_text_held_fewer_windows(src, calib, tmp_path):
    """A text too short for --kl-samples records the windows it had; the same request on a
    rerun is the same baseline and is kept, not refused as "another baseline"."""
    from dmx.search.baseline import kl_baseline
    from dmx.search.command import _kept_kl_out, _kl_settings, make_config

    cfg = make_config(6.0, "default", calib=[str(calib)], seqlen=32, export_target="none",
                      seed=0)
    out = tmp_path / "kl-0"
    kl_baseline(src, cfg.target_bits, out, **_kl_settings(cfg, 100_000), seed=0,
                progress=False)
    b = read_manifest(out)["baseline"]
    assert b["samples"] < 100_000 and b["samples_requested"] == 100_000
    assert _kept_kl_out(out, src, cfg, 100_000)
    with pytest.raises(DMXError, match="holds another KL baseline"):
        _kept_kl_out(out, src, cfg, b["samples"] - 1)
    # other layers asked for: refused before any search runs, not at the combine step
    assert b["include"] is None and b["exclude"] == []
    with pytest.raises(DMXError, match="holds another KL baseline"):
        _kept_kl_out(out, src, cfg.replace(exclude=("mlp",)), 100_000)
    with pytest.raises(DMXError, match="holds another KL baseline"):
        _kept_kl_out(out, src, cfg.replace(include=("self_attn",)), 100_000)


def test_seed_pool_names_the_side_tasks_after_the_progress_bar():
    """The bar counts search steps only; a KL baseline running after the last search is
    named after it (running, then queued); searches (int keys) are not named."""
    from dmx.search.seed_pool import _side_tasks_text

    running = {"f0": 0, "f1": "KL baseline of seed 0"}
    waiting = [(1, None, ()), ("KL baseline of seed 1", None, ())]
    assert _side_tasks_text(running, waiting) == \
        "running KL baseline of seed 0; queued KL baseline of seed 1"
    assert _side_tasks_text({"f2": "KL baseline of seed 1"}, []) == \
        "running KL baseline of seed 1"
    assert _side_tasks_text({"f0": 0}, [(1, None, ())]) == ""
