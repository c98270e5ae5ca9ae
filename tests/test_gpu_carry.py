"""scripts/gpu_carry.py: files split into parts that fit a device call, joined back there.

The device side is simulated with two checkouts: "here" (where prepare writes .carry) and
"there" (where each call's carried part arrives, one part per call).
"""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from script_helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
gc = load_script("scripts/gpu_carry.py")

MIB = gc.MIB


def git_repo(path: Path, tracked_bytes: int) -> Path:
    path.mkdir()
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    (path / ".gitignore").write_text("/.carry/\n/.carry.tmp/\n/.whl/\n/ignored.bin\n")
    (path / "tracked.bin").write_bytes(b"t" * tracked_bytes)
    subprocess.run(["git", "-C", str(path), "add", "."], check=True)
    return path


@pytest.fixture
def big(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(bytes(range(256)) * (10 * 1024) + b"tail")  # 2.5 MiB + 4 bytes
    return f


def carry_part(here: Path, there: Path, k: int):
    """What one run call with carry [".carry/partK"] puts on the device machine."""
    shutil.copytree(here / ".carry" / f"part{k}", there / ".carry" / f"part{k}")


def test_traveling_bytes_counts_tracked_and_untracked_not_ignored(tmp_path):
    repo = git_repo(tmp_path / "r", 1000)
    (repo / "untracked.txt").write_bytes(b"u" * 10)
    (repo / "ignored.bin").write_bytes(b"i" * 5000)  # ignored: does not travel
    assert gc.traveling_bytes(repo) == 1000 + 10 + len((repo / ".gitignore").read_bytes())


def test_prepare_parts_fit_the_room_left_by_the_tree(tmp_path, big):
    here = git_repo(tmp_path / "here", MIB)  # the tree takes 1 MiB of the call
    manifest = gc.prepare(here, [big], (), limit_mib=2.5, margin_mib=0.25, say=lambda m: None)
    room = int(2.5 * MIB) - gc.traveling_bytes(here) - int(0.25 * MIB)
    assert manifest["room_bytes"] == room and manifest["parts"] == 3  # 2.5 MiB / ~1.25 MiB
    for k in (1, 2, 3):
        part = here / ".carry" / f"part{k}"
        pieces = [p for p in part.iterdir() if p.name != gc.MANIFEST]
        assert sum(p.stat().st_size for p in pieces) <= room
        assert json.loads((part / gc.MANIFEST).read_text()) == manifest
    assert b"".join((here / ".carry" / f"part{p['part']}" / p["name"]).read_bytes()
                    for p in manifest["files"][0]["pieces"]) == big.read_bytes()


def test_stash_part_by_part_then_assemble_bit_identical(tmp_path, big):
    here = git_repo(tmp_path / "here", MIB)
    gc.prepare(here, [big], (), limit_mib=2.5, margin_mib=0.25, say=lambda m: None)
    there, stash = tmp_path / "there", tmp_path / "stash"
    carry_part(here, there, 1)
    state = gc.stash(there, stash, say=lambda m: None)
    assert state["have"] == {1} and state["missing"] == [2, 3]
    with pytest.raises(gc.CarryError, match=r"missing \.carry/part2, \.carry/part3"):
        gc.assemble(there, stash, tmp_path / "files", say=lambda m: None)
    shutil.rmtree(there / ".carry")  # the next call's tree need not hold part1 any more
    carry_part(here, there, 2)
    gc.stash(there, stash, say=lambda m: None)
    carry_part(here, there, 3)
    out = gc.assemble(there, stash, tmp_path / "files", say=lambda m: None)
    assert [p.name for p in out] == ["model.gguf"]
    assert out[0].read_bytes() == big.read_bytes()
    assert not list((tmp_path / "files").glob("*.partial"))


def test_damaged_piece_is_named_and_not_stashed(tmp_path, big):
    here = git_repo(tmp_path / "here", MIB)
    gc.prepare(here, [big], (), limit_mib=2.5, margin_mib=0.25, say=lambda m: None)
    there, stash = tmp_path / "there", tmp_path / "stash"
    carry_part(here, there, 2)
    piece = next(p for p in (there / ".carry" / "part2").iterdir() if p.name != gc.MANIFEST)
    data = bytearray(piece.read_bytes())
    data[7] ^= 1
    piece.write_bytes(bytes(data))
    with pytest.raises(gc.CarryError, match=r"sha256 differs .*carry part2 again"):
        gc.stash(there, stash, say=lambda m: None)
    assert piece.is_file() and not (stash / piece.name).exists()


def test_cli_without_any_part_is_one_line_exit_2(tmp_path, capsys):
    there = git_repo(tmp_path / "there", 10)
    rc = gc.main(["assemble", "--repo", str(there), "--stash", str(tmp_path / "stash")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("gpu_carry: error: no carried part") and "\n" not in err


def test_plan_puts_wheels_on_the_last_call():
    lines = gc.plan_lines({"parts": 2, "wheels": ["x.whl"]})
    assert '[".carry/part1"]' in lines[0] and "stash" in lines[0]
    assert '[".carry/part2", ".whl"]' in lines[1] and "assemble" in lines[1]
