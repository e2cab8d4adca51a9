"""A run's output folder (--out) has one writer: an exclusive lock held for the whole run; killed runs' temps swept.

The lock is an flock on `<out>/.lock`: the kernel drops it when the process ends, however it
ends, so a killed trainer never leaves the folder locked. Only while holding it is it safe to
delete the temp entries (`.tmp-*`) a killed run left behind: no other writer can be making them.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Iterator

from npllama.errors import NpllamaError
from npllama.io.atomic import remove_stale_temps

try:
    import fcntl
except ImportError:            # Windows: no flock; the run goes unlocked
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
# where the trainer's writers put their temp entries, and the targets they are named after
TEMPS = {"": ("history.jsonl", "loss.png", "train_config.json", "final"), "checkpoints": ("step_", "latest"),
         "data": ("tokens.bin",)}


class OutputInUse(NpllamaError, BlockingIOError):
    """Another process holds the output folder's lock; the message names the folder."""


@contextlib.contextmanager
def claim_output(out: str) -> Iterator[str]:
    """Hold the exclusive lock on folder `out` (made if missing) for the block, after sweeping stale temps.

    A second claim, from any process, fails at once with OutputInUse naming the folder.
    """
    os.makedirs(out, exist_ok=True)
    lock_path = os.path.join(out, LOCK_NAME)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                raise OutputInUse(f"{out} is in use by another trainer{f' (pid {holder})' if holder else ''}: "
                                  f"wait for it to finish or choose another --out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        for sub, targets in TEMPS.items():
            left = remove_stale_temps(os.path.join(out, sub), targets)
            if left:
                print(f"note: removed {len(left)} temp entr{'y' if len(left) == 1 else 'ies'} an interrupted run "
                      f"left in {os.path.join(out, sub)}", file=sys.stderr)
        yield out
    finally:
        os.close(fd)                      # closing the descriptor releases the lock


__all__ = ["OutputInUse", "claim_output"]
