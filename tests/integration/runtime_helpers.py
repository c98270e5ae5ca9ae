"""Helpers shared by the runtime tests (fixtures live in conftest.py)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STORIES = REPO / "tests" / "data" / "stories260K-hf"


def build_script():
    """scripts/build_llama_cpp.py as a module: the one place that knows where the binaries are."""
    spec = importlib.util.spec_from_file_location("build_llama_cpp",
                                                  REPO / "scripts" / "build_llama_cpp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def formats_of(out: Path) -> set:
    return {v["format"] for v in json.loads((out / "dmx_manifest.json").read_text())
            ["layers"].values()}
