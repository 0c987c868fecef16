"""Atomic writes of files and directories: every file lmprune publishes goes through this module.

Why: a reader (a resumed run, a second process, another tool) must never see half a file or half a
directory, and a crash (kill, power loss) at any point must never leave a mix of old and new under
the final name. For a file (`os.replace`) the old or the new version is always there. Replacing a
directory takes two renames (old aside, new in): a crash between them leaves the new one complete
under its temp name, the old one under `.{name}.old-PID`, and nothing under the final name — which
every reader of lmprune's dirs treats as "not written yet" (a resume re-exports; a checkpoint dir is
only ever replaced when it is the same step). The recipe is always the same: write everything under a
temporary name beside the target (same directory, so same filesystem: `os.replace`/`os.rename` is
atomic), fsync the data, rename it onto the target, then fsync the parent directory so the rename
itself is durable. The strongest guarantee the hand-written helpers this replaces gave was exactly
that, fsync of the file AND of its directory, and every function here keeps it:

- `atomic_file` / `write_text` / `write_json`: one file. Temp `.{name}.tmp-{pid}`; flush + fsync;
  `os.replace`; fsync of the parent dir.
- `atomic_dir`: a whole directory. Temp dir `.{name}.tmp-{pid}`; every file and dir inside fsynced;
  an existing target is moved aside to `.{name}.old-{pid}`, the temp dir renamed onto the target, the
  parent fsynced, the old one deleted.
- `remove_tree`: deletion. The dir is first renamed to `.{name}.deleting-{pid}` (it leaves its
  namespace in one step, so a kill mid-delete never leaves a half-deleted dir under its real name),
  the parent fsynced, then the tree removed.

Temp names start with "." and carry the pid, so globs like `step-*` never see them and two processes
never share one; two threads of one process writing the same target at once are not supported.
Leftovers of a killed process (`.{name}.tmp-*`, `.old-*`, `.deleting-*`) are never read as data.

Crash tests (`scripts/crash_grid.py`): with the env var `LMPRUNE_CRASH_AT=<site>:<n>` the n-th call
of `crash_point(site)` in a process SIGKILLs that process, at one of the sites "atomic_dir.filled"
(temp dir filled, before its fsync), "atomic_dir.before_rename" (the final rename), "atomic_file.
before_replace", "remove_tree.renamed" (renamed away, not yet removed) and "metrics.mid_line" (half a
metrics.jsonl row written). It is read once, at import; unset, a crash point costs one comparison.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["sha256_file", "fsync_dir", "atomic_file", "write_text", "write_json", "atomic_dir", "remove_tree",
           "remove_stale_leftovers", "disk_full_is_user_error", "pid_alive", "crash_point"]

_BLOCK = 1 << 20  # 1 MiB


# ----------------------------------------------------------------------------- fault injection (crash tests)

def _parse_crash_at(value: str | None) -> tuple[str | None, int]:
    if not value:
        return None, 0
    site, _, n = value.rpartition(":")
    if not site or not n.isdigit() or int(n) < 1:
        warnings.warn(f"LMPRUNE_CRASH_AT={value!r} ignored: expected <site>:<n> with n >= 1", stacklevel=2)
        return None, 0
    return site, int(n)


_CRASH_SITE, _CRASH_N = _parse_crash_at(os.environ.get("LMPRUNE_CRASH_AT"))
_crash_calls = 0


def crash_point(site: str) -> None:
    """SIGKILL this process on the n-th call of `site` when LMPRUNE_CRASH_AT is "<site>:<n>"; else nothing."""
    global _crash_calls
    if site != _CRASH_SITE:
        return
    _crash_calls += 1
    if _crash_calls == _CRASH_N:
        os.write(2, f"lmprune: LMPRUNE_CRASH_AT: SIGKILL at {site} #{_CRASH_N} (pid {os.getpid()})\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's contents, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, making the creations/renames/deletions of its entries durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete whatever is at `path` (dir tree, file or link); nothing there is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file beside `path` for writing; on a clean exit it replaces `path` atomically.

    mode "w" (text, `encoding`) or "wb" (binary, `encoding` ignored). The temp file is
    `.{name}.tmp-{pid}` in path's directory (which must exist); on exit it is flushed, fsynced,
    `os.replace`d onto `path`, and the directory fsynced. On an exception in the block the temp file
    is removed and the exception re-raised; `path` is untouched. The handle's `.name` is the temp
    path, for writers that only take a file name (e.g. safetensors' `save_file`): what they write
    there is fsynced (fsync covers the file, whichever descriptor wrote it) and published the same way.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    handle = open(tmp, mode) if mode == "wb" else open(tmp, mode, encoding=encoding)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        crash_point("atomic_file.before_replace")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    """Atomically write `text` (UTF-8) to `path`."""
    with atomic_file(path) as handle:
        handle.write(text)


def write_json(path: str | Path, obj: Any, *, indent: int = 2, sort_keys: bool = True) -> None:
    """Atomically write `obj` as JSON to `path`, with a trailing newline."""
    with atomic_file(path) as handle:
        json.dump(obj, handle, indent=indent, sort_keys=sort_keys)
        handle.write("\n")


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and every directory under root (root included); links are skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            file = os.path.join(dirpath, name)
            if not os.path.islink(file):
                _fsync_file(file)
        for name in dirnames:
            sub = os.path.join(dirpath, name)
            if not os.path.islink(sub):  # os.walk does not descend into it either
                fsync_dir(sub)
    fsync_dir(root)


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh temp dir beside `target` to fill; on a clean exit it becomes `target` atomically.

    The temp dir is `.{name}.tmp-{pid}` in target's parent (created if missing; a leftover of that
    name is removed first). On a clean exit: every file and dir in it is fsynced; then, if `target`
    exists, `replace=False` raises FileExistsError, and `replace=True` renames it to `.{name}.old-{pid}`;
    the temp dir is renamed to `target`, the parent fsynced, and the old version deleted. On an
    exception in the block the temp dir is removed and the exception re-raised; `target` is untouched.

    If the final rename fails (OSError, e.g. another process put a non-empty `target` there in
    between) the temp dir is removed and the error re-raised: the old version is put back when
    `target` is still free, and deleted when another writer's version now holds the name.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    tmp = parent / f".{target.name}.tmp-{pid}"
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        crash_point("atomic_dir.filled")
        _fsync_tree(tmp)
        old = None
        if target.exists() or target.is_symlink():
            if not replace:
                raise FileExistsError(errno.EEXIST, "target already exists", str(target))
            old = parent / f".{target.name}.old-{pid}"
            _remove(old)
            try:
                os.rename(target, old)
            except FileNotFoundError:  # another process moved it away in between
                old = None
        crash_point("atomic_dir.before_rename")
        try:
            os.rename(tmp, target)
        except OSError:
            if old is not None:
                if not (target.exists() or target.is_symlink()):
                    with contextlib.suppress(OSError):
                        os.rename(old, target)  # put the old version back
                if old.exists() or old.is_symlink():
                    with contextlib.suppress(OSError):
                        _remove(old)  # another writer's version holds the name now
            raise
        fsync_dir(parent)
        if old is not None:
            with contextlib.suppress(OSError):
                _remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
        raise


def remove_tree(path: str | Path) -> None:
    """Delete the directory `path` so that it leaves its name in one step.

    It is renamed to `.{name}.deleting-{pid}` in the same parent, the parent fsynced, then the tree
    removed: a crash mid-delete leaves a hidden leftover, never a half-deleted dir under its own
    name. A missing `path` -> FileNotFoundError; one that is not a directory -> NotADirectoryError.
    """
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        if not path.exists() and not path.is_symlink():
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(path))
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
    doomed = path.with_name(f".{path.name}.deleting-{os.getpid()}")
    _remove(doomed)
    os.rename(path, doomed)
    crash_point("remove_tree.renamed")
    fsync_dir(path.parent)
    shutil.rmtree(doomed)


# ----------------------------------------------------------------------------- leftovers and full disks

_LEFTOVER = re.compile(r"^\..+\.(?:tmp|old|deleting)-(\d+)$")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_leftovers(directory: str | Path) -> list[Path]:
    """Delete the `.{name}.tmp-PID` / `.old-PID` / `.deleting-PID` entries of dead processes in
    `directory` (not recursive); returns what was removed. Entries of live pids are kept."""
    directory, removed = Path(directory), []
    if not directory.is_dir():
        return removed
    for entry in sorted(directory.iterdir()):
        match = _LEFTOVER.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                _remove(entry)
                removed.append(entry)
    return removed


def _is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)  # safetensors (Rust) reports I/O errors as text
    return "No space left on device" in text or "StorageFull" in text or "os error 28" in text


@contextlib.contextmanager
def disk_full_is_user_error(target: str | Path) -> Iterator[None]:
    """Turn "no space left on device" while writing `target` into one UserError line (exit 2)."""
    from lmprune.errors import UserError

    try:
        yield
    except Exception as error:
        if not _is_disk_full(error):
            raise
        where = Path(target).parent
        while not where.exists() and where != where.parent:
            where = where.parent
        free = shutil.disk_usage(where).free / 2**20
        raise UserError(f"no space left on device while writing {target} ({free:,.1f} MiB free on {where}); "
                        "the previous version is intact: free space and run again (--resume)") from None
