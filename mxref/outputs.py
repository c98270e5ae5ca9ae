"""Writing outputs people can trust: the one implementation mxref, mxverify and dmx share.

Every file or directory a command writes goes through here, so every tool keeps the same
promises (docs/failures.md lists them with their messages). Errors are one line naming
the path and what to do, raised as ``error`` (default MXError; dmx passes DMXError):

* **Never half-written.** The output is built under a hidden temporary name next to the
  destination (``.NAME.tmp-HOST-PID-RANDOM``) and renamed into place at the end.
* **Never silently replaced.** Without ``force`` the final rename is a rename that refuses
  to replace (Linux ``renameat2(RENAME_NOREPLACE)``; elsewhere a hard link for files and
  a plain rename for directories, which cannot replace a non-empty directory). So when two
  processes write the same destination at once, exactly one wins; the other keeps its
  result at ``NAME.conflict-PID`` and raises an error saying so.
* **--force replaces only what it should.** Only a previous output of the same tool,
  recognised by its marker (a manifest file inside a directory, or a predicate for a
  file), and never a path that is also an input of the command (nor a directory holding
  one). The old output is moved aside and deleted only after the new one is in place;
  if something else replaced it since the check, nothing is replaced.
* **The umask's permissions.** Temporary files/directories are created 0600/0700 by
  :mod:`tempfile`; the results get ``0666 & ~umask`` / ``0777 & ~umask`` like any file.
* **No litter after kill -9.** Temporary names carry the host and process id: the next
  write to the same destination removes those whose process is gone (and puts back a
  previous output that a killed ``--force`` had moved aside but not yet deleted).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from mxref.errors import MXError

__all__ = ["check_output", "atomic_write", "output_dir", "sha256_file",
           "canonical_sha256", "current_umask", "clean_stale_temps", "is_mxref_npz"]


# ----------------------------------------------------------------------------- hashing
def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_sha256(obj) -> str:
    """sha256 of a JSON document's canonical form (sorted keys, no spaces, UTF-8): the
    same value however the file was indented, different as soon as any value changes."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- permissions
def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, then restore it at once
    os.umask(mask)
    return mask


def _give_umask_mode(path: Path, is_dir: bool) -> None:
    os.chmod(path, (0o777 if is_dir else 0o666) & ~current_umask())


def _umask_modes_below(root: Path) -> None:
    """Some writers create files 0600 whatever the umask (safetensors does): give every
    file and directory under ``root`` the umask's mode (executables stay executable)."""
    mask = current_umask()
    for d, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(d, name), 0o777 & ~mask)
        for name in files:
            p = os.path.join(d, name)
            if not os.path.islink(p):
                execs = os.stat(p).st_mode & 0o100
                os.chmod(p, (0o777 if execs else 0o666) & ~mask)


# ----------------------------------------------------------------------------- temp names
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32] or "host"


def _temp_prefix(dest: Path, kind: str) -> str:
    return f".{dest.name}.{kind}-{_HOST}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def clean_stale_temps(dest) -> list[Path]:
    """Remove the temporaries a killed writer of ``dest`` left next to it (same host,
    process gone); a previous output that a killed --force had moved aside is put back
    when ``dest`` is missing. Returns what was removed."""
    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    pattern = re.compile(re.escape(f".{dest.name}.") + r"(tmp|old)-" + re.escape(_HOST)
                         + r"-(\d+)-")
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if not m or int(m.group(2)) == os.getpid() or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and (p / "d").exists() and not os.path.lexists(dest):
            with contextlib.suppress(OSError):
                os.rename(p / "d", dest)  # the killed run never installed its result
        _remove(p)
        removed.append(p)
    return removed


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# ----------------------------------------------------------------------------- checks
def _real(p) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(p)))


def _refuse_inputs(dest: Path, inputs, what: str, error) -> None:
    """``dest`` must not be an input, a directory holding one, or an existing path inside
    an input directory (that would overwrite part of the input); --force cannot override."""
    d = _real(dest)
    for inp in inputs or ():
        if inp is None or str(inp) == "":
            continue
        i = _real(inp)
        if d == i or i.startswith(d.rstrip(os.sep) + os.sep):
            raise error(f"{what} {dest} is also an input of this command ({inp}); choose "
                        f"another {what}")
        if os.path.lexists(d) and d.startswith(i.rstrip(os.sep) + os.sep):
            raise error(f"{what} {dest} is part of the input {inp}; choose another {what}")


def check_output(dest, *, force: bool = False, is_dir: bool, marker=None, inputs=(),
                 what: str = "-o/--out", tool: str = "this tool", error=MXError) -> Path:
    """Check before any work that ``dest`` may be written; returns it as a Path.

    ``marker``: a file name (relative path) every directory this tool writes holds, or a
    predicate ``marker(path) -> bool`` (files; directories too). With ``force``, an
    existing ``dest`` is replaced only when it is of the right kind and carries the
    marker. Also removes stale temporaries of ``dest`` (:func:`clean_stale_temps`).
    """
    if dest is None or str(dest) == "":
        raise error(f"{what} is required: the {'directory' if is_dir else 'file'} to write")
    dest = Path(dest)
    _refuse_inputs(dest, inputs, what, error)
    parent = dest.parent if str(dest.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise error(f"{parent}: is a file, so {what} {dest} cannot be written under it; "
                    f"pick another path")
    if not parent.is_dir():
        raise error(f"{parent}: the parent directory of {what} {dest} does not exist; "
                    f"create it first")
    try:   # a real probe: permission bits do not tell root, read-only mounts, /proc
        os.rmdir(tempfile.mkdtemp(prefix=_temp_prefix(dest, "tmp"), dir=parent))
    except OSError as e:
        raise error(f"{parent}: not writable ({e.strerror}), so {what} {dest} cannot be "
                    f"created there; choose another {what}") from None
    if os.path.lexists(dest):
        if not force:
            raise error(f"{dest} already exists; pass --force to replace it or choose "
                        f"another {what}")
        kind_ok = dest.is_dir() if is_dir else dest.is_file()
        if dest.is_symlink() or not kind_ok:
            raise error(f"{dest} exists and is not a {'directory' if is_dir else 'file'}; "
                        f"--force will not replace it: remove it yourself or choose another "
                        f"{what}")
        if marker is not None and not _recognised(dest, marker):
            has = f" (it has no {marker})" if isinstance(marker, str) else ""
            raise error(f"{dest} is not an output of {tool}{has}; --force replaces only "
                        f"those: remove it yourself or choose another {what}")
    clean_stale_temps(dest)
    return dest


def _recognised(path: Path, marker) -> bool:
    if isinstance(marker, str):
        return (path / marker).is_file()
    return bool(marker(path))


def is_mxref_npz(path) -> bool:
    """An .npz written by mxref (``mxref quantize`` / ``mxref pack``): it records the format."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return "format.npy" in z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


# ----------------------------------------------------------------------------- renames
def _renameat2_noreplace():
    """libc's renameat2 with RENAME_NOREPLACE (Linux), or None."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                   ctypes.c_uint]
    fn.restype = ctypes.c_int

    def rename(src, dst) -> None:
        AT_FDCWD, RENAME_NOREPLACE = -100, 1
        if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE):
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), str(dst))
    return rename


_NOREPLACE = _renameat2_noreplace() if os.name == "posix" else None


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError when ``dst`` exists (never replaces it)."""
    if _NOREPLACE is not None:
        try:
            _NOREPLACE(src, dst)
            return
        except OSError as e:
            if e.errno == errno.EEXIST:
                raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
                raise
            # this file system has no RENAME_NOREPLACE (e.g. NFS): the portable way below
    if os.name == "nt":
        os.rename(src, dst)  # Windows' rename never replaces (FileExistsError)
    elif src.is_dir():
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        try:
            os.rename(src, dst)  # cannot replace a non-empty directory, and ours never are
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
            raise
    else:
        os.link(src, dst)  # FileExistsError when dst exists
        os.unlink(src)


def _identity(path: Path):
    st = os.lstat(path)
    return (st.st_dev, st.st_ino)


def _lost_race(tmp: Path, dest: Path, error, detail: str = ""):
    """Keep the loser's finished result under a visible name and say how to use it."""
    kept = dest.with_name(f"{dest.name}.conflict-{os.getpid()}")
    try:
        _rename_noreplace(tmp, kept)
        keep = (f"this run's result is kept at {kept} (move it where you want it, or "
                f"delete it)")
    except OSError:
        _remove(tmp)
        keep = "this run's result was discarded; run it again with another -o/--out"
    return error(f"{dest} was written by another process while this one was "
                 f"working{detail}; nothing was replaced; {keep}")


def _commit(tmp: Path, dest: Path, replaces, error, twin_ok=None) -> None:
    """Move the finished ``tmp`` to ``dest``. ``replaces``: the (dev, inode) of the old
    output --force may replace, or None (then ``dest`` must still not exist).
    ``twin_ok(dest)``: a concurrent writer's result there is as good as ours (a cache)."""
    if replaces is None or not os.path.lexists(dest):
        try:
            _rename_noreplace(tmp, dest)
        except FileExistsError:
            if twin_ok is not None and twin_ok(dest):
                _remove(tmp)
                return
            raise _lost_race(tmp, dest, error) from None
        return
    aside = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest, "old"), dir=dest.parent))
    try:
        os.rename(dest, aside / "d")
    except FileNotFoundError:  # it went away since the check: install as new
        shutil.rmtree(aside, ignore_errors=True)
        return _commit(tmp, dest, None, error, twin_ok)
    if _identity(aside / "d") != replaces:  # someone replaced it after our check
        with contextlib.suppress(OSError):
            _rename_noreplace(aside / "d", dest)
        shutil.rmtree(aside, ignore_errors=True)
        if twin_ok is not None and twin_ok(dest):
            _remove(tmp)
            return
        raise _lost_race(tmp, dest, error)
    try:
        _rename_noreplace(tmp, dest)
    except FileExistsError:
        raise _lost_race(tmp, dest, error, f" (the previous output is at {aside / 'd'})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            _rename_noreplace(aside / "d", dest)  # put the old one back
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _replaceable(dest: Path, force: bool):
    if force and os.path.lexists(dest):
        return _identity(dest)
    return None


# ----------------------------------------------------------------------------- writers
def atomic_write(path, write, *, force: bool = False, marker=None, inputs=(),
                 what: str = "-o/--output", tool: str = "this tool", text: bool = False,
                 error=MXError):
    """Write one file: ``write(fileobj)`` on a temp file next to ``path`` (binary, or text
    with ``text``), fsync, then rename into place (no-replace unless ``force``, and then
    only over a file ``marker(path)`` recognises). Returns ``path`` as a Path."""
    dest = check_output(path, force=force, is_dir=False, marker=marker, inputs=inputs,
                        what=what, tool=tool, error=error)
    replaces = _replaceable(dest, force)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dest, "tmp"), dir=dest.parent)
    tmp = Path(tmp)
    try:
        with os.fdopen(fd, "w" if text else "wb", **({"newline": "\n"} if text else {})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        _give_umask_mode(tmp, is_dir=False)
        _commit(tmp, dest, replaces, error)
    except BaseException:
        _remove(tmp)
        raise
    return dest


@contextlib.contextmanager
def output_dir(dest, *, force: bool = False, marker=None, inputs=(),
               what: str = "-o/--out", tool: str = "this tool", error=MXError, twin_ok=None):
    """``with output_dir(dest, ...) as tmp:`` build the output in ``tmp``; on a normal exit
    it is renamed to ``dest`` (see the module docstring), on an exception it is removed.
    The checks of :func:`check_output` run again here (cheap), in case ``dest`` changed
    since the caller checked it before its work. ``twin_ok(dest) -> bool``: when another
    process wrote ``dest`` meanwhile and this says its result is equivalent (a cache of
    the same input), ours is dropped quietly instead of raising."""
    dest = check_output(dest, force=force, is_dir=True, marker=marker, inputs=inputs,
                        what=what, tool=tool, error=error)
    replaces = _replaceable(dest, force)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest, "tmp"), dir=dest.parent))
    try:
        _give_umask_mode(tmp, is_dir=True)
        yield tmp
        if marker is not None and not _recognised(tmp, marker):
            raise AssertionError(f"{tool} output lacks its marker {marker}")  # a bug of ours
        _umask_modes_below(tmp)
        _commit(tmp, dest, replaces, error, twin_ok)
    except BaseException:
        _remove(tmp)
        raise
