"""Load a file of benchmarks/ or scripts/ as a module: they are scripts, not a package."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str):
    """The module of ``ROOT/relpath``, run once. Its folder goes on sys.path first: a
    benchmark imports its siblings (bench_trajectory_mean takes bench_rank_fusion's
    protocol)."""
    path = ROOT / relpath
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def search_and_kl(work: Path, seed: int = 0):
    """A 3-step search ``dmx-default-5-s<seed>`` of the embedded model (final offsets, no
    fill) and its KL baseline ``kl-s<seed>``, made with the product commands. -> (search,
    kl) paths under ``work``."""
    from dmx.cli import main
    from dmx.data import embedded_model_dir

    src = str(embedded_model_dir())
    out, kl = work / f"dmx-default-5-s{seed}", work / f"kl-s{seed}"
    assert main(["search", "--model", src, "--target-bits", "5", "--steps", "3",
                 "--batch-size", "2", "--seqlen", "64", "--seed", str(seed),
                 "--average-last", "0", "--no-fill-budget", "--no-progress",
                 "-o", str(out)]) == 0
    assert main(["baseline", "--model", src, "--method", "kl", "--target-bits", "5",
                 "--samples", "2", "--seqlen", "64", "--seed", str(seed), "--no-progress",
                 "-o", str(kl)]) == 0
    return out, kl


def search_kl_and_fused(work: Path, texts, seqlen: int, windows: int, kl_rule: str = "max"):
    """What the fusion probes read: :func:`search_and_kl` of seed 0 and ``dmx combine`` of
    the two by ``kl_rule`` (--kl-rule), ``fused``; each scored with `dmx eval --save` on the
    first ``windows`` windows of ``seqlen`` tokens of every text. -> (search, kl, fused)
    paths under ``work``."""
    from dmx.cli import main

    out, kl = search_and_kl(work, 0)
    fused = work / "fused"
    assert main(["combine", str(out), "--kl", str(kl), "--kl-rule", kl_rule,
                 "-o", str(fused)]) == 0
    for o in (out, kl, fused):
        for text in texts:
            assert main(["eval", str(o), "--data", str(text), "--seqlen", str(seqlen),
                         "--max-windows", str(windows), "--save", "--no-progress"]) == 0
    return out, kl, fused
