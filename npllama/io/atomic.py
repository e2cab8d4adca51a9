"""Files and folders written whole or not at all: built under a temp name beside the target, then renamed over it.

Every temp entry's name starts with TEMP_PREFIX and is unique (mkstemp / mkdtemp), so two writers
never share one, and a folder's owner can sweep what a killed run left (remove_stale_temps).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from typing import Iterable, Iterator

TEMP_PREFIX = ".tmp-"
_EXISTING = ("replace", "merge", "keep")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _temp_prefix(target: str) -> str:
    return f"{TEMP_PREFIX}{os.path.basename(target)[:64]}-"


def _naming(e: BaseException, path: str) -> BaseException:
    """`e`, or for a bare OSError without a file name (ENOSPC from a write) the same error naming `path`."""
    if isinstance(e, OSError) and type(e).__module__ == "builtins" and e.errno and e.filename is None:
        return OSError(e.errno, e.strerror, path)
    return e


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (the renames done in it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "", fsync: bool = False) -> Iterator[str]:
    """Yield a temp path beside `path` to write; on success it replaces `path`, on any error it is removed.

    The file gets the mode of an ordinary new file (0666 less the umask), not mkstemp's private 0600.
    fsync: flush the file to disk before the rename (for checkpoints that must survive a crash).
    """
    path = os.path.abspath(os.fspath(path))
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=suffix, dir=os.path.dirname(path))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        err = _naming(e, path)
        if err is e:
            raise
        raise err from e


def _fsync_tree(folder: str) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def _install(tmp: str, path: str, existing: str) -> None:
    if existing == "merge" and os.path.isdir(path):
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
        os.rmdir(tmp)
    elif existing == "keep":
        try:
            os.rename(tmp, path)
        except OSError as e:        # another writer finished first: its copy stays
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not os.path.isdir(path):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.isdir(path) and not os.path.islink(path):
        # a folder cannot be renamed over a non-empty one: move the old one aside, then drop it
        old = tempfile.mkdtemp(prefix=_temp_prefix(path) + "old-", dir=os.path.dirname(path))
        os.replace(path, old)                # onto the empty dir just made: that name is ours alone
        try:
            os.rename(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str, existing: str = "replace", fsync: bool = False) -> Iterator[str]:
    """Yield a new empty temp folder beside `path` to fill; on success it becomes `path`, on any error it is removed.

    existing says what happens to a folder already at `path` once the new one is complete:
      "replace"  it is swapped out whole;
      "merge"    it stays with its other files, and each entry of the temp folder replaces its namesake
                 (a model folder keeps its tokenizer when the weights are saved again);
      "keep"     it wins (another writer finished first) and the new folder is dropped.
    The folder gets an ordinary folder's mode (0777 less the umask), not mkdtemp's 0700.
    fsync: flush every file and the folders to disk before and after the rename (checkpoints).
    """
    if existing not in _EXISTING:
        raise ValueError(f"existing must be one of {', '.join(_EXISTING)}, got {existing!r}")
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(path), dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if fsync:
            _fsync_tree(tmp)
        _install(tmp, path, existing)
        if fsync:
            fsync_dir(parent)
            if existing == "merge":
                fsync_dir(path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = _naming(e, path)
        if err is e:
            raise
        raise err from e


def remove_stale_temps(folder: str, targets: Iterable[str] | None = None) -> list[str]:
    """Delete the temp entries a killed writer left in `folder` (those of `targets` when given); returns their names.

    `targets` are the start of the target names, e.g. ("history.jsonl", "step_"): a user's own `.tmp-x` survives.
    Only for a folder the caller owns exclusively (e.g. under a lock): a live writer's temp would go too.
    """
    starts = tuple(TEMP_PREFIX + t for t in targets) if targets is not None else (TEMP_PREFIX,)
    try:
        names = sorted(n for n in os.listdir(folder) if n.startswith(starts))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for n in names:
        p = os.path.join(folder, n)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
    return names
