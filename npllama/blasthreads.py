"""BLAS thread policy for NumPy models: as many BLAS threads as there are cores other processes leave free.

Why: a decode step is a chain of matrix-vector products of well under a millisecond each. OpenBLAS splits
each one over its threads and waits for the slowest; when another process holds one of the cores, the
thread that lands there waits for a scheduler time slice (milliseconds) on every product. On a 2-core
machine with one competing CPU-bound process, SmolLM2 decode drops from ~16-40 tok/s with one BLAS thread
to ~1.5-3 tok/s with two (bench/README.md). So at model load, and again when generate() starts, npllama
counts the other processes that want a CPU (the runnable count of /proc/loadavg, sampled over ~7 ms,
minus this process's own running threads) and sets the thread count to the cores left free, at least 1,
never more than BLAS had when first seen.

Overrides, strongest first:
  NPLLAMA_BLAS_THREADS=n     always n threads;  =keep  leave BLAS alone;  =auto (or unset)  the policy above
  OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, GOTO_NUM_THREADS, MKL_NUM_THREADS set by the user: left alone
  a thread count someone else set after npllama's (threadpoolctl, say): left alone from then on
The count is process-wide (BLAS has one pool), so it also applies to the caller's own NumPy products.
"""
from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from npllama.errors import NpllamaError

ENV = "NPLLAMA_BLAS_THREADS"
USER_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "GOTO_NUM_THREADS", "MKL_NUM_THREADS")
# symbol prefixes/suffixes of OpenBLAS builds: plain, 64-bit-int (numpy/scipy wheels), scipy_openblas
_OPENBLAS_NAMES = ("openblas", "scipy_openblas")
_OPENBLAS_SUFFIXES = ("", "64_")

_state: dict = {"cap": None, "last_set": None, "managed": True, "lib": None}


class BlasThreadsError(NpllamaError, ValueError):
    """NPLLAMA_BLAS_THREADS holds something that is not a positive integer, 'auto' or 'keep'."""


def cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:            # not Linux
        return os.cpu_count() or 1


def _own_running() -> int:
    """Threads of this process in state R right now (spinning BLAS workers count in /proc/loadavg too)."""
    n = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    # the state follows the ')' closing the command name (which may hold spaces)
                    if f.read().rsplit(")", 1)[1].split()[0] == "R":
                        n += 1
            except (OSError, IndexError):
                continue
    except OSError:
        return 1
    return max(n, 1)                  # the thread reading is running


def other_running(samples: int = 4, interval: float = 0.002) -> float | None:
    """Mean number of other processes' threads that are runnable, sampled over samples * interval s; None off Linux."""
    total = 0
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, IndexError, ValueError):
            return None
        total += max(0, running - _own_running())
        if i + 1 < samples:
            time.sleep(interval)
    return total / samples


def choose(n_cores: int, others: float | None, cap: int) -> int:
    """Threads for n_cores cores of which others (mean runnable threads of other processes) are taken; 1..cap."""
    free = n_cores if others is None else int(n_cores - others + 0.5)   # round half up: 0.5 busy -> still free
    return max(1, min(cap, free))


# ---------------------------------------------------------------- the BLAS library itself
def _threadpoolctl_controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    c = ThreadpoolController().select(user_api="blas")
    return c if c.lib_controllers else None


def _openblas_lib() -> tuple | None:
    """(set, get) of the OpenBLAS NumPy loaded, found through /proc/self/maps and ctypes; None if not found."""
    if _state["lib"] is None:
        _state["lib"] = ()
        paths = []
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    p = line.split()[-1]
                    if "openblas" in os.path.basename(p).lower() and p not in paths:
                        paths.append(p)
        except OSError:
            pass
        for p in paths:
            try:
                lib = ctypes.CDLL(p)
            except OSError:
                continue
            for name in _OPENBLAS_NAMES:
                for suf in _OPENBLAS_SUFFIXES:
                    s, g = getattr(lib, f"{name}_set_num_threads{suf}", None), getattr(lib, f"{name}_get_num_threads{suf}", None)
                    if s is not None and g is not None:
                        s.argtypes, s.restype, g.argtypes, g.restype = [ctypes.c_int], None, [], ctypes.c_int
                        _state["lib"] = (s, g)
                        return _state["lib"]
    return _state["lib"] or None


def get_threads(use_threadpoolctl: bool = True) -> int | None:
    """NumPy's BLAS thread count now; None when no BLAS npllama can drive was found."""
    c = _threadpoolctl_controller() if use_threadpoolctl else None
    if c is not None:
        return max(lc.num_threads for lc in c.lib_controllers)
    lib = _openblas_lib()
    return None if lib is None else int(lib[1]())


def set_threads(n: int, use_threadpoolctl: bool = True) -> bool:
    """Set NumPy's BLAS thread count (threadpoolctl when installed, else OpenBLAS through ctypes); False if neither."""
    c = _threadpoolctl_controller() if use_threadpoolctl else None
    if c is not None:
        c.limit(limits=n)             # a plain call, not a context: it stays set
        return True
    lib = _openblas_lib()
    if lib is None:
        return False
    lib[0](n)
    return True


# ---------------------------------------------------------------- the policy
def apply(use_threadpoolctl: bool = True) -> int | None:
    """Set the BLAS thread count by the policy above; returns the count set, None when BLAS was left alone."""
    want = os.environ.get(ENV, "auto").strip().lower()
    if want == "keep" or not _state["managed"]:
        return None
    if want != "auto":
        try:
            n = int(want)
        except ValueError:
            n = 0
        if n < 1:
            raise BlasThreadsError(f"{ENV}={os.environ[ENV]!r}: expected a positive integer, 'auto' or 'keep'")
        return n if set_threads(n, use_threadpoolctl) else None
    if any(os.environ.get(k) for k in USER_ENV):
        return None                   # the user chose; BLAS read it at startup
    now = get_threads(use_threadpoolctl)
    if now is None:
        return None
    if _state["last_set"] is not None and now != _state["last_set"]:
        _state["managed"] = False     # someone else set it since: theirs from now on
        return None
    if _state["cap"] is None:
        _state["cap"] = now           # what BLAS had at first sight (a limit set before load stays a limit)
    n_cores = cores()
    n = choose(n_cores, other_running() if min(n_cores, _state["cap"]) > 1 else None, _state["cap"])
    if n != now and not set_threads(n, use_threadpoolctl):
        return None
    _state["last_set"] = n
    return n


@contextmanager
def split(n_tasks: int) -> Iterator[int]:
    """For a stretch of work cut into n_tasks independent pieces: yields how many Python threads should
    run them (the BLAS thread count, at most n_tasks), with BLAS held to one thread meanwhile, so each
    core runs one piece's products *and* its element-wise NumPy work (which is single-threaded).
    Yields 1 (nothing changed) where OpenBLAS cannot be driven through ctypes."""
    lib = _openblas_lib()
    before = 1 if lib is None else int(lib[1]())
    if min(before, n_tasks) <= 1:
        yield 1
        return
    lib[0](1)
    try:
        yield min(before, n_tasks)
    finally:
        lib[0](before)
