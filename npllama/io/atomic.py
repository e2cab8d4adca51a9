"""Files written whole or not at all: a temp file beside the target, renamed over it once complete."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "", fsync: bool = False) -> Iterator[str]:
    """Yield a temp path beside `path` to write; on success it replaces `path`, on any error it is removed.

    The file gets the mode of an ordinary new file (0666 less the umask), not mkstemp's private 0600.
    fsync: flush the file to disk before the rename (for checkpoints that must survive a crash).
    """
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
