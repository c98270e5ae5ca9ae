"""The sweep's KL pair matches the search it is compared with: same bits under the same
average (--weighting), same quantized inputs (--weights-only), same layers
(--export-target) and units (--tie-fused)."""
from __future__ import annotations

import json
from pathlib import Path
from script_helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
sweep = load_script("benchmarks/bench_search_sweep.py")


def _manifest(weighting=None, weights_only=None, **more):
    config = {"target_bits": 5.0, **more}
    if weighting is not None:
        config["weighting"] = weighting
    if weights_only is not None:
        config["weights_only"] = weights_only
    return {"avg_bits": {"simple": 4.99, "size_weighted": 5.13}, "search": {"config": config}}


def _flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def test_kl_pair_uses_the_searchs_average_and_inputs(tmp_path):
    args = sweep._parse(["--model", str(tmp_path)])
    for manifest, bits, weighting, weights_only in (
            (_manifest(), 4.99, "simple", False),  # a config written before the fields
            (_manifest("simple", False), 4.99, "simple", False),
            (_manifest("size", True), 5.13, "size", True)):
        argv = sweep._kl_argv(args, 0, tmp_path / "kl", *sweep._search_budget(manifest))
        assert float(_flag(argv, "--target-bits")) == bits
        assert _flag(argv, "--weighting") == weighting
        assert ("--weights-only" in argv) == weights_only


def test_kl_pair_uses_the_searchs_layers_and_units(tmp_path):
    args = sweep._parse(["--model", str(tmp_path)])
    for manifest, target, tied in (
            (_manifest(), "any", False),  # a config written before the fields: the defaults
            (_manifest(export_target="none", tie_fused=False), "none", False),
            (_manifest(export_target="compressed-tensors", tie_fused=True),
             "compressed-tensors", True)):
        argv = sweep._kl_argv(args, 0, tmp_path / "kl", *sweep._search_budget(manifest))
        assert _flag(argv, "--export-target") == target
        assert ("--tie-fused" in argv) == tied and ("--no-tie-fused" in argv) != tied


def test_kl_pair_shares_the_searchs_rotation(tmp_path):
    search = tmp_path / "dmx-default-5-s0"
    for rotate, want in (("none", []), ("hadamard", ["--rotate", "hadamard"]),
                         ("learned", ["--rotate-from", str(search)])):
        args = sweep._parse(["--model", str(tmp_path), "--rotate", rotate])
        argv = sweep._kl_argv(args, 0, tmp_path / "kl", *sweep._search_budget(_manifest()),
                              search_out=search)
        got = [a for a in argv if a.startswith("--rotate")]
        assert got == want[::2], (rotate, argv)
        if want:
            assert _flag(argv, want[0]) == want[1]
        # the uniform anchors: a learned rotation is each search's own, so they stay unrotated
        uniform = sweep._uniform_argv(args, "fp4_e2m1", tmp_path / "u")
        assert ("--rotate-from" in uniform) is False
        assert ("--rotate" in uniform) == (rotate == "hadamard")


def _scored_out(out: Path, texts: dict, window_nll=None) -> Path:
    """An OUT (its manifest only) scored on {file: ppl} with the sweep's protocol (and
    these per-window losses, if given)."""
    from dmx.outdir.evaljson import save_eval
    out.mkdir()
    (out / "dmx_manifest.json").write_text("{}")
    for file, ppl in texts.items():
        save_eval(out, {"file": file, "seqlen": 256, "windows": 40, "windows_total": 1185,
                        "join": "file", "ppl": ppl,
                        **({} if window_nll is None else {"window_nll": window_nll})})
    return out


def test_every_out_is_scored_on_each_text_and_read_by_protocol(tmp_path, monkeypatch):
    args = sweep._parse(["--model", str(tmp_path), "--eval", "/d/wiki.test.raw",
                         "--eval-also", "/d/eval.txt", "--max-windows", "40", "--reuse"])
    out = _scored_out(tmp_path / "kl-default-5-s0", {"/d/wiki.test.raw": 70.0},
                      window_nll=[4.2, 4.3])
    ran = []
    monkeypatch.setattr(sweep, "_dmx", lambda a, name, argv: ran.append(argv))
    assert sweep._evaluate(args, out)
    (argv,) = ran  # --reuse: only the text it lacks
    assert argv[argv.index("--data") + 1] == "/d/eval.txt" and "--save" in argv
    # whichever was scored last, each table reads its own text's result
    _scored_out(tmp_path / "two", {"/d/wiki.test.raw": 70.0, "/d/eval.txt": 20.0})
    assert sweep._ppl(args, tmp_path / "two") == 70.0
    assert sweep._ppl(args, tmp_path / "two", "/d/eval.txt") == 20.0
    # another protocol (every window, another length) is not this sweep's
    whole = sweep._parse(["--model", str(tmp_path), "--eval", "/d/wiki.test.raw",
                          "--max-windows", "0"])
    assert sweep._scored(whole, tmp_path / "two") is None
    assert not sweep._done(tmp_path / "two", True, whole)
    ran.clear()
    assert sweep._evaluate(args, tmp_path / "two")  # saved before per-window losses: again
    assert sorted(a[a.index("--data") + 1] for a in ran) == ["/d/eval.txt", "/d/wiki.test.raw"]
    ran.clear()
    _scored_out(tmp_path / "three", {"/d/wiki.test.raw": 70.0, "/d/eval.txt": 20.0},
                window_nll=[4.2, 4.3])
    assert not sweep._evaluate(args, tmp_path / "three") and ran == []


def test_kl_pair_reuses_a_seeds_sensitivities_only_when_they_fit(tmp_path):
    args = sweep._parse(["--model", str(tmp_path), "--kl-samples", "4", "--seqlen", "128"])

    def kl(name, seed=0, **baseline):
        out = tmp_path / name
        out.mkdir()
        fields = {"weights_only": False, "export_target": "any", "tie_fused": False,
                  "samples": 4, "seqlen": 128, "sensitivity": {"a": 1.0}, **baseline}
        (out / "dmx_manifest.json").write_text(
            json.dumps({"seed": seed, "baseline": fields}))
        return out

    kl("kl-default-4.5-s1", seed=1)
    kl("kl-default-5-s0", tie_fused=True)
    kl("kl-default-5.5-s0", sensitivities_from="elsewhere")  # reuse the measured one only
    kl("kl-default-6-s0", samples=16)
    assert sweep._sensitivity_source(args, tmp_path, 0, False, "any", False) is None
    good = kl("kl-default-7-s0")
    assert sweep._sensitivity_source(args, tmp_path, 0, False, "any", False) == good
    assert sweep._sensitivity_source(args, tmp_path, 0, True, "any", False) is None
    assert sweep._sensitivity_source(args, tmp_path, 0, False, "any", True) == \
        tmp_path / "kl-default-5-s0"
    learned = sweep._parse(["--model", str(tmp_path), "--rotate", "learned"])
    assert sweep._sensitivity_source(learned, tmp_path, 0, False, "any", False) is None


def test_combined_seeds_are_made_once_all_seeds_are_searched_and_scored_against_kl(
        tmp_path, monkeypatch):
    args = sweep._parse(["--model", str(tmp_path), "--eval", "/d/wiki.test.raw",
                         "--max-windows", "40", "--reuse", "--combine", "--seeds", "0", "1",
                         "--stages", "search,eval"])
    ran = []
    monkeypatch.setattr(sweep, "_dmx", lambda a, name, argv: ran.append(argv))
    _scored_out(tmp_path / "dmx-default-5-s0", {"/d/wiki.test.raw": 70.0})
    assert not sweep._combine_chain(args, tmp_path, "default", 5.0, 0.0) and ran == []
    _scored_out(tmp_path / "dmx-default-5-s1", {"/d/wiki.test.raw": 72.0})
    assert sweep._combine_chain(args, tmp_path, "default", 5.0, 0.0)
    (argv,) = ran  # the OUT is not there yet (the stub wrote nothing): no evaluation
    assert argv[:3] == ["combine", str(tmp_path / "dmx-default-5-s0"),
                        str(tmp_path / "dmx-default-5-s1")]
    assert "--fill-budget" in argv and _flag(argv, "-o") == str(tmp_path / "dmx-default-5-comb0.1")
    # its row: raw bits and fill moves apart, the difference to each seed's KL pair
    comb = _scored_out(tmp_path / "dmx-default-5-comb0.1", {"/d/wiki.test.raw": 66.0})
    manifest = _manifest(weighting="simple")
    manifest["search"].update(raw_bits={"simple": 4.9, "size_weighted": 5.0},
                              budget_repair={"moves": [{"step": "fill"}] * 3})
    (comb / "dmx_manifest.json").write_text(json.dumps(manifest))
    kls = {f"kl-default-5-s{s}": _scored_out(tmp_path / f"kl-default-5-s{s}",
                                             {"/d/wiki.test.raw": p})
           for s, p in ((0, 68.0), (1, 65.0))}
    row = sweep._combined_row(args, {"dmx-default-5-comb0.1": comb, **kls}, "default", 5.0,
                              50.0)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "default, seeds 0,1 combined" and cells[2] == "4.900 (+3 fill)"
    assert cells[3] == "4.990" and cells[5] == "66.00 (one OUT)"
    assert cells[7] == "-0.50 (-2.00..1.00, 2 seeds)" and cells[8] == "1 of 2"
    assert cells[10] == "-"  # scored before per-window losses were recorded


def test_window_noise_cell_compares_the_seeds_mean_losses_window_by_window():
    """dMX's and KL's per-window losses, each averaged over its seeds, then paired."""
    from dmx.eval.paired import paired
    kl = [[4.0, 4.5, 3.0, 5.0], [4.2, 4.3, 3.2, 5.2]]
    ours = [[3.9, 4.3, 3.0, 4.9], [4.0, 4.2, 3.0, 5.1]]
    p = paired([4.1, 4.4, 3.1, 5.1], [3.95, 4.25, 3.0, 5.0])
    lo, hi = p["delta_ppl_ci95"]
    assert sweep._window_cell(ours, kl) == (f"{p['delta_ppl']:+.2f} ({lo:+.2f}..{hi:+.2f}) "
                                            f"{p['verdict']}")
    assert p["verdict"] == "lower"  # 0.1 to 0.15 nats better on every window
    assert sweep._window_cell(ours, [kl[0], None]) == "-"


def test_search_and_kl_pair_calibrate_on_the_same_files(tmp_path):
    def calib(argv):
        i = argv.index("--calib") + 1
        j = next(k for k in range(i, len(argv)) if argv[k].startswith("--"))
        return argv[i:j]

    files = [str(tmp_path / "wiki.txt"), str(tmp_path / "stories.txt")]
    args = sweep._parse(["--model", str(tmp_path), "--calib", *files])
    search = sweep._search_argv(args, "default", 5.0, 0, tmp_path / "dmx")
    kl = sweep._kl_argv(args, 0, tmp_path / "kl", *sweep._search_budget(_manifest()))
    assert calib(search) == calib(kl) == files
    one = sweep._parse(["--model", str(tmp_path)])  # the default: one file
    assert len(calib(sweep._search_argv(one, "default", 5.0, 0, tmp_path / "dmx"))) == 1


def test_a_seeds_kl_pairs_run_one_at_a_time_and_the_second_reuses_the_first(
        tmp_path, monkeypatch):
    """--jobs: two budgets' chains of one seed reach their KL pair together; the second
    waits and reuses the first's sensitivities instead of measuring them beside it."""
    import threading
    import time as _time

    args = sweep._parse(["--model", str(tmp_path), "--kl-samples", "4", "--seqlen", "128",
                         "--stages", "baseline", "--jobs", "2"])
    for t in (5, 6):
        out = tmp_path / f"dmx-default-{t}-s0"
        out.mkdir()
        (out / "dmx_manifest.json").write_text(json.dumps(_manifest(target_bits=float(t))))
    calls, running, overlap = [], [0], []

    def fake_dmx(a, name, argv):
        running[0] += 1
        overlap.append(running[0])
        calls.append(argv)
        _time.sleep(0.3)  # measuring sensitivities
        out = Path(_flag(argv, "-o"))
        out.mkdir()
        (out / "dmx_manifest.json").write_text(json.dumps({"seed": 0, "baseline": {
            "weights_only": False, "export_target": "any", "tie_fused": False, "samples": 4,
            "seqlen": 128, "sensitivity": {"a": 1.0}}}))
        running[0] -= 1

    monkeypatch.setattr(sweep, "_dmx", fake_dmx)
    chains = [threading.Thread(target=sweep._pair_chain,
                               args=(args, tmp_path, "default", float(t), 0, 0.0))
              for t in (5, 6)]
    for c in chains:
        c.start()
    for c in chains:
        c.join()
    assert max(overlap) == 1 and len(calls) == 2
    assert ["--sensitivities-from" in argv for argv in calls] == [False, True]


def test_a_stopped_sweep_ends_the_dmx_commands_it_started(tmp_path, monkeypatch):
    """SIGTERM (or SIGINT sent to the sweep alone) used to leave its `dmx search` children
    computing with nobody to read them; the handler ends them and stops the chains."""
    import signal
    import sys
    import threading
    import time as _time

    import pytest

    args = sweep._parse(["--model", str(tmp_path), "--results", str(tmp_path / "res")])
    monkeypatch.setattr(sweep, "_DMX_COMMAND",
                        [sys.executable, "-c", "import time; time.sleep(120)"])
    failed = []

    def chain():
        try:
            sweep._dmx(args, "long", ["search"])
        except SystemExit as err:   # the child's non-zero exit
            failed.append(str(err))

    worker = threading.Thread(target=chain)
    worker.start()
    try:
        for _ in range(200):
            if sweep._CHILDREN:
                break
            _time.sleep(0.05)
        (child,) = list(sweep._CHILDREN)
        t0 = _time.time()
        with pytest.raises(SystemExit, match="stopped by SIGTERM"):
            sweep._stop_children(signal.SIGTERM, None)
        worker.join(timeout=30)
        assert not worker.is_alive() and _time.time() - t0 < 30
        assert child.poll() is not None and failed and not sweep._CHILDREN
        with pytest.raises(sweep._Stopped):   # the other chains start nothing new
            sweep._dmx(args, "next", ["search"])
    finally:
        sweep._STOP.clear()
