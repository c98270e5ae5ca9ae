"""benchmarks/bench_fusion_weight.py: one search fused with its KL baseline at several KL
weights, on a real (short) search of the embedded model: the weights that mean something
on their own reproduce the product's OUTs."""
from __future__ import annotations

import json

import numpy as np
import pytest
from script_helpers import load_script, search_and_kl, search_kl_and_fused

fw = load_script("benchmarks/bench_fusion_weight.py")


def _formats(out):
    return {n: e["format"] for n, e in
            json.loads((out / "dmx_manifest.json").read_text())["layers"].items()}


@pytest.mark.usefixtures("single_threaded")   # main() sets this process's threads
def test_weights_half_and_one_are_combine_kl_and_kl_itself_on_any_windows(tmp_path):
    """w = 0.5 is `dmx combine SEARCH --kl KL --kl-rule mean` (formats and window losses);
    w = 1 ranks by
    KL's sensitivities alone, so it is KL's own assignment. Scored from window 1 on, each
    is the later windows of the OUT's own `dmx eval` (the confirmation windows are a
    slice of the same tokenization)."""
    _, kl, fused = search_kl_and_fused(tmp_path, fw.TEXTS.values(), fw.SEQLEN, 4, "mean")
    res = tmp_path / "res"
    common = ["--work", str(tmp_path), "--kl", str(tmp_path / "kl-s{seed}"), "--kl-out",
              str(tmp_path / "kl-s{seed}"), "--targets", "5", "--seeds", "0", "--weights",
              "0.5", "1", "--fraction", "0", "--jobs", "1", "--results", str(res)]
    for first in (0, 1):
        assert fw.main([*common, "--windows", f"{first}:4"]) == 0
        for w, own in ((0.5, fused), (1, kl)):
            rec = json.loads((res / "cache" / f"fused-5-s0-w{w:g}-f0-{first}-4.json").read_text())
            assert rec["formats"] == _formats(own), w
            if w == 0.5:
                for name, text in fw.TEXTS.items():
                    assert rec["results"][name]["window_nll"] == \
                        fw._saved(own, text, 4)["window_nll"][first:]
    # windows 0-3: KL's side is its own `dmx eval --save`; windows 1-3: scored here
    assert not (res / "cache" / "kl-5-s0-0-4.json").exists()
    rec = json.loads((res / "cache" / "kl-5-s0-1-4.json").read_text())
    for name, text in fw.TEXTS.items():
        assert rec["results"][name]["window_nll"] == fw._saved(kl, text, 4)["window_nll"][1:]
    table = (res / "fusion_weight-1-4.md").read_text()
    assert "| w = 1 minus w = 0.5 |" in table
    # a cached record of other formats (an older rule's) is scored again, not trusted
    stale = res / "cache" / "fused-5-s0-w0.5-f0-1-4.json"
    good = json.loads(stale.read_text())
    name = next(iter(good["formats"]))
    wrong = {**good, "formats": {**good["formats"], name: "stale"}, "results": {}}
    stale.write_text(json.dumps(wrong))
    assert fw.main([*common, "--windows", "1:4"]) == 0
    again = json.loads(stale.read_text())
    assert again["formats"] == good["formats"] and again["results"] == good["results"]
    # two ranges: a table each, then both pooled -- the same rows as the whole range
    assert fw.main([*common, "--with-search", "--windows", "0:2", "2:4"]) == 0
    assert fw.main([*common, "--with-search", "--windows", "0:4"]) == 0
    parts = (res / "fusion_weight-0-2+2-4.md").read_text().split("## Windows ")
    assert [p.split("\n")[0] for p in parts[1:]] == ["0-1", "2-3", "0-1 + 2-3"]
    whole = (res / "fusion_weight-0-4.md").read_text().split("## Windows ")[1]
    rows = lambda part: [r for r in part.splitlines() if r.startswith("| 5 |")]  # noqa: E731
    assert rows(parts[3]) == rows(whole) and len(rows(whole)) == 2
    with pytest.raises(SystemExit):
        fw.main([*common, "--windows", "3:3"])
    # several fractions: each entry also minus the first fraction's; w = 1 is KL's own
    # assignment at any fraction, so the second fraction's is reused, not rescored
    at = common.index("--fraction") + 1
    assert fw.main([*common[:at], "0", "0.5", *common[at + 1:], "--with-search",
                    "--windows", "0:2"]) == 0
    cache = res / "cache"
    reused = json.loads((cache / "fused-5-s0-w1-f0.5-0-2.json").read_text())
    assert "from" in reused and reused["formats"] == _formats(kl)
    table = (res / "fusion_weight-0-2-f0+0.5.md").read_text()
    head = next(r for r in table.splitlines() if r.startswith("| bits |")).split(" | ")
    column = head.index("f = 0.5, search alone minus f = 0, search alone")
    from dmx.eval.paired import paired, paired_line
    for name in fw.TEXTS:
        a, b = (json.loads((cache / f"search-5-s0-f{f}-0-2.json").read_text())
                ["results"][name]["window_nll"] for f in ("0", "0.5"))
        row = next(r for r in table.splitlines() if r.startswith(f"| 5 | {name} |"))
        assert row.split(" | ")[column] == paired_line(paired(a, b))


@pytest.mark.usefixtures("single_threaded")
def test_a_seed_set_is_dmx_combine_with_and_without_kl(tmp_path):
    """A dotted --seeds entry is a set: fused, `dmx combine S0 S1 --kl K0 K1 --kl-rule mean`
    (--weights 0.5); alone, `dmx
    combine S0 S1` (final offsets, the fill); KL is the two baselines' losses averaged."""
    from dmx.cli import main

    s0, k0, _ = search_kl_and_fused(tmp_path, fw.TEXTS.values(), fw.SEQLEN, 2, "mean")
    s1, k1 = search_and_kl(tmp_path, 1)
    both, fused = tmp_path / "comb", tmp_path / "fused01"
    assert main(["combine", str(s0), str(s1), "--fill-budget", "-o", str(both)]) == 0
    assert main(["combine", str(s0), str(s1), "--kl", str(k0), str(k1), "--kl-rule", "mean",
                 "-o", str(fused)]) == 0
    res = tmp_path / "res"
    assert fw.main(["--work", str(tmp_path), "--kl", str(tmp_path / "kl-s{seed}"),
                    "--kl-out", str(tmp_path / "kl-s{seed}"), "--targets", "5", "--seeds",
                    "0.1", "--weights", "0.5", "--with-search", "--fraction", "0",
                    "--windows", "2:4", "--jobs", "1", "--results", str(res)]) == 0
    cache = res / "cache"
    assert json.loads((cache / "fused-5-s0.1-w0.5-f0-2-4.json").read_text())["formats"] == \
        _formats(fused)
    assert json.loads((cache / "search-5-s0.1-f0-2-4.json").read_text())["formats"] == \
        _formats(both)
    kl = [json.loads((cache / f"kl-5-s{s}-2-4.json").read_text())["results"] for s in (0, 1)]
    for name in fw.TEXTS:   # the KL side: the two baselines' window losses averaged
        mean = [(a + b) / 2 for a, b in zip(kl[0][name]["window_nll"], kl[1][name]["window_nll"])]
        want = f"| 5 | {name} | {np.exp(np.mean(mean)):.2f} |"
        assert want in (res / "fusion_weight-2-4.md").read_text()
    # a pair whose members share one KL baseline (linked under two seeds) fuses it once,
    # as `dmx combine S0 S1 --kl K0` (combine refuses the same baseline given twice)
    (tmp_path / "dmx-default-5-s2").symlink_to(s1)
    (tmp_path / "kl-s2").symlink_to(k0)
    once = tmp_path / "fused01-k0"
    assert main(["combine", str(s0), str(s1), "--kl", str(k0), "--kl-rule", "mean",
                 "-o", str(once)]) == 0
    assert fw.main(["--work", str(tmp_path), "--kl", str(tmp_path / "kl-s{seed}"),
                    "--kl-out", str(tmp_path / "kl-s{seed}"), "--targets", "5", "--seeds",
                    "0.2", "--weights", "0.5", "--fraction", "0", "--windows", "2:4",
                    "--jobs", "1", "--results", str(res)]) == 0
    assert json.loads((cache / "fused-5-s0.2-w0.5-f0-2-4.json").read_text())["formats"] == \
        _formats(once)


@pytest.mark.usefixtures("single_threaded")
def test_the_max_rule_scores_the_better_rank_fusion(tmp_path):
    """--rule max: one fused entry per search, the greedy promotion in fused_order's "max"
    order (bench_trajectory_mean.assignment, rule="max"), cached apart from the mean's."""
    traj = load_script("benchmarks/bench_trajectory_mean.py")
    s0, k0 = search_and_kl(tmp_path, 0)
    res = tmp_path / "res"
    assert fw.main(["--work", str(tmp_path), "--kl", str(tmp_path / "kl-s{seed}"), "--kl-out",
                    str(tmp_path / "kl-s{seed}"), "--targets", "5", "--seeds", "0",
                    "--rule", "max", "--fraction", "0", "--windows", "0:2", "--jobs", "1",
                    "--results", str(res)]) == 0
    rec = json.loads((res / "cache" / "fused-5-s0-wmax-f0-0-2.json").read_text())
    assert rec["formats"] == traj.assignment([s0], 0.0, kl=[k0], rule="max")["formats"]
    # on this search the two rules part (2 of 42 layers): the rule reached the assignment
    assert rec["formats"] != traj.assignment([s0], 0.0, kl=[k0], rule="mean")["formats"]
    assert "the better rank: ppl, minus KL" in (res / "fusion_weight-0-2.md").read_text()
