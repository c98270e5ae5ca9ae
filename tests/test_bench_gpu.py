"""benchmarks/bench_gpu.py: the prepared GPU script, checked on CPU (--cpu-dry-run).

The whole dry run (every section on tiny CPU shapes, the search on the embedded
tiny-qwen3: ~25 s); where triton is installed its kernels run through the interpreter,
where it is not (CI) the Triton rows say "skipped". Nothing here is a timing: the dry run
checks that every code path runs and the one table is filled.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from script_helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
bench_gpu = load_script("benchmarks/bench_gpu.py")


def test_dry_run_runs_every_section_and_fills_the_summary(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    sections = [s for s in bench_gpu.SECTIONS if s != "torchao"]  # torchao: optional extra
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"),
                           "--cpu-dry-run", "--sections", ",".join(sections),
                           "--search-steps", "3", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    raw = json.loads((tmp_path / "gpu_raw.json").read_text())
    ran = raw["sections"]
    assert set(ran) == {"env", *sections}
    assert not {k: v for k, v in ran.items() if "error" in v}, "a section failed"
    assert all(v["exact"] == v["cases"] > 0 for v in ran["exact"]["summary"].values())
    assert {m for m, r in ran["step"]["modes"].items() if "sec_per_step" in r} >= {"bf16", "dmx"}
    assert any(r["impl"] == "plain PyTorch torch.compile" and "sec" in r
               for r in ran["speed"]["rows"])
    search = ran["search"]
    assert search["exit_code"] == 0 and len(search["step_s"]) == 3
    assert search["achieved_bits"]["simple"] <= 6.0
    assert search["projected_paper_steps_s"] == 400 * search["median_step_s"] > 0
    md = (tmp_path / "gpu.md").read_text()
    assert "## Summary" in md and "| dmx search tiny-qwen3, 3 steps x 2x32 |" in md
    assert "--cpu-dry-run: code paths only" in md
    assert "**not met**" not in md.split("## Summary")[1].split("\n## ")[0]  # no verdicts
    assert proc.stdout.rstrip().endswith(md.split("## Summary\n\n")[1].split("\n\n")[0].rstrip())


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert bench_gpu.main(["--sections", "exact,nope", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "bench_gpu: error: unknown section(s) nope; choose from "
        + ", ".join(bench_gpu.SECTIONS))
    assert bench_gpu.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such directory" in err and "\n" not in err
    assert not (tmp_path / "gpu.md").exists()  # nothing written on bad input
