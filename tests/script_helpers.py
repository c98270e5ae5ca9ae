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
