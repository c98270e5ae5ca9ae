"""mxref.outputs: the one writer of every output (atomic, no silent replace, --force rules,
umask modes, stale temporaries). Race tests run two real processes that both pass the
existence check before either renames (a barrier of files), so the race is certain; a
directory race without --force through `dmx baseline`: tests/test_dmx_integrity.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mxref.errors import MXError
from mxref.outputs import (atomic_write, canonical_sha256, check_output, clean_stale_temps,
                           output_dir)

ROOT = Path(__file__).resolve().parents[1]

# Writer process: builds `dest` (a dir with marker "m", or a file), then waits inside the
# writer until every peer has reached the same point, so each has passed its checks
# before any commits. Exit 0 = wrote it; exit 2 + one line = refused.
WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from mxref.errors import MXError
    from mxref.outputs import atomic_write, output_dir
    kind, dest, me, peers, force = sys.argv[1], Path(sys.argv[2]), sys.argv[3], \\
        sys.argv[4].split(","), sys.argv[5] == "1"
    bar = dest.parent / "barrier"
    def wait():
        (bar / me).touch()
        t0 = time.time()
        while not all((bar / p).exists() for p in peers):
            if time.time() - t0 > 60:
                sys.exit(3)
            time.sleep(0.01)
    try:
        if kind == "dir":
            with output_dir(dest, force=force, marker="m") as tmp:
                (tmp / "m").write_text(me)
                wait()
        else:
            def write(fh):
                fh.write(me.encode())
                wait()
            atomic_write(dest, write, force=force, marker=lambda p: True)
    except MXError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
""")


def _race(tmp_path, kind: str, force: bool = False):
    dest = tmp_path / "dest"
    (tmp_path / "barrier").mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    names = ["a", "b"]
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, kind, str(dest), n,
                               ",".join(names), "1" if force else "0"], env=env,
                              stderr=subprocess.PIPE, text=True) for n in names]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    return dest, results


@pytest.mark.parametrize("kind, force", [("file", False), ("dir", True)])
def test_two_writers_one_wins_the_other_says_how_to_recover(tmp_path, kind, force):
    if force:   # both replace an earlier output they recognise
        old = tmp_path / "dest"
        if kind == "dir":
            old.mkdir()
            (old / "m").write_text("old")
        else:
            old.write_text("old")
    dest, results = _race(tmp_path, kind, force)
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    winner = ["a", "b"][[rc for rc, _ in results].index(0)]
    loser_err = next(err for rc, err in results if rc == 2).strip()
    assert len(loser_err.splitlines()) == 1
    assert "was written by another process" in loser_err and "nothing was replaced" in loser_err
    content = (dest / "m" if kind == "dir" else dest).read_text()
    assert content == winner   # the winner's output is intact, not replaced by the loser
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("dest.conflict-")]
    assert len(kept) == 1 and str(kept[0]) in loser_err   # the loser's result is kept
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_force_replaces_only_own_outputs_and_never_inputs(tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(MXError, match="not an output of tool-x .it has no m.; --force"):
        check_output(other, force=True, is_dir=True, marker="m", tool="tool-x")
    assert (other / "notes.txt").read_text() == "mine"
    src = tmp_path / "src"
    src.mkdir()
    (src / "m").write_text("an earlier output, but also this command's input")
    for dest in (src, tmp_path):   # the input itself, or a directory holding it
        with pytest.raises(MXError, match="is also an input of this command"):
            check_output(dest, force=True, is_dir=True, marker="m", inputs=[src])
    f = src / "m"   # an existing file inside an input directory is part of that input
    with pytest.raises(MXError, match="is part of the input"):
        check_output(f, force=True, is_dir=False, inputs=[src])
    assert f.read_text().startswith("an earlier output")


def test_umask_modes_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        f = atomic_write(tmp_path / "f.bin", lambda fh: fh.write(b"x"))
        with output_dir(tmp_path / "d") as d:
            # a writer that ignores the umask (safetensors creates its files 0600)
            os.close(os.open(d / "private", os.O_CREAT | os.O_WRONLY, 0o600))
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "d" / "private").stat().st_mode & 0o777 == 0o644


def unwritable_dir(tmp_path) -> Path:
    """A directory this process cannot create entries in (root ignores mode bits: /proc)."""
    if os.geteuid() == 0:
        return Path("/proc")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return ro


def test_unwritable_parent_fails_before_work(tmp_path):
    with pytest.raises(MXError, match="not writable"):
        check_output(unwritable_dir(tmp_path) / "out", is_dir=True)


def test_kill_9_leftovers_are_cleaned_and_a_moved_aside_output_restored(tmp_path):
    """A writer killed with SIGKILL leaves its temp dir; the next write removes it. A
    --force killed between moving the old output aside and installing the new one left
    the only copy aside: it is put back."""
    dest = tmp_path / "out"
    script = textwrap.dedent("""
        import sys, time
        from mxref.outputs import output_dir
        with output_dir(sys.argv[1]) as tmp:
            (tmp / "part").write_text("x")
            print("ready", flush=True)
            time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", script, str(dest)], stdout=subprocess.PIPE,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.stdout.readline().strip() == "ready"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    left = [q for q in tmp_path.iterdir() if q.name.startswith(".out.tmp-")]
    assert len(left) == 1
    # the same situation for a --force: only the moved-aside copy of the old output exists
    aside = tmp_path / left[0].name.replace(".tmp-", ".old-")
    (aside / "d").mkdir(parents=True)
    (aside / "d" / "m").write_text("previous")
    check_output(dest, is_dir=True)   # what any next run (e.g. --resume) does first
    assert [q.name for q in tmp_path.iterdir()] == ["out"]
    assert (dest / "m").read_text() == "previous"
    assert clean_stale_temps(dest) == []


def test_canonical_sha256_ignores_layout_not_values():
    a = {"b": [1, 2], "a": {"x": 1.5}}
    assert canonical_sha256(a) == canonical_sha256(json.loads(json.dumps(a, indent=3)))
    assert canonical_sha256(a) != canonical_sha256({"b": [1, 2], "a": {"x": 1.25}})
