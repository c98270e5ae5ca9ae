"""benchmarks/bench_paired_runs.py: ours minus theirs, per seed and pooled, from cache JSONs
and scored OUTs, with the verdict of dmx.eval.paired."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from script_helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
pr = load_script("benchmarks/bench_paired_runs.py")


def _cache(path: Path, nll: list) -> None:
    path.write_text(json.dumps({"results": {
        name: {"ppl": math.exp(sum(nll) / len(nll)), "window_nll": nll}
        for name in pr.TEXTS}}))


def test_ours_minus_theirs_per_seed_and_pooled(tmp_path, capsys):
    base = [3.0, 3.2, 2.9, 3.1]
    for s in (0, 1):
        _cache(tmp_path / f"theirs-5-s{s}.json", base)
        # seed 0 worse by 0.05 nats in every window, seed 1 the same as theirs
        _cache(tmp_path / f"ours-5-s{s}.json", [x + (0.05 if s == 0 else 0.0) for x in base])
    out = tmp_path / "table.md"
    assert pr.main(["--targets", "5", "--seeds", "0", "1", "--max-windows", "4",
                    "--ours", str(tmp_path / "ours-{bits}-s{seed}.json"),
                    "--theirs", "T=" + str(tmp_path / "theirs-{bits}-s{seed}.json"),
                    "--out", str(out)]) == 0
    lines = [ln for ln in out.read_text().splitlines() if ln.startswith("- 5 bits")]
    assert len(lines) == len(pr.TEXTS)
    ppl = math.exp(sum(base) / 4)
    for line in lines:
        s0 = line.split("; s0 ")[1].split(";")[0]
        s1 = line.split("; s1 ")[1]
        assert s0.startswith(f"+{ppl * (math.exp(0.05) - 1):.2f} ") and s0.endswith("higher")
        assert s1.startswith("+0.00 (+0.00..+0.00) tie")
        pooled = line.split("minus T: pooled ")[1].split(";")[0]
        assert pooled.startswith(f"+{ppl * (math.exp(0.025) - 1):.2f} ") and \
            pooled.endswith("higher")
    assert capsys.readouterr().out.count("- 5 bits") == len(pr.TEXTS)


def test_a_run_not_scored_is_refused_by_name(tmp_path):
    _cache(tmp_path / "ours-5-s0.json", [3.0, 3.1])
    with pytest.raises(SystemExit, match="theirs-5-s0.json does not exist"):
        pr.main(["--targets", "5", "--seeds", "0", "--max-windows", "2",
                 "--ours", str(tmp_path / "ours-{bits}-s{seed}.json"),
                 "--theirs", "T=" + str(tmp_path / "theirs-{bits}-s{seed}.json")])
    (tmp_path / "kl-5-s0").mkdir()
    with pytest.raises(SystemExit, match="kl-5-s0 has no eval.json; run `dmx eval --save`"):
        pr.main(["--targets", "5", "--seeds", "0", "--max-windows", "2",
                 "--ours", str(tmp_path / "ours-{bits}-s{seed}.json"),
                 "--theirs", "KL=" + str(tmp_path / "kl-{bits}-s{seed}")])
    with pytest.raises(SystemExit):  # argparse: LABEL=PATTERN
        pr.main(["--ours", "x", "--theirs", "no-label"])
