"""Host memory policy for NumPy models: let freed temporaries be reused instead of page-faulted anew.

A forward pass allocates and frees arrays of a few hundred KiB to tens of MiB, layer after layer.
With glibc's starting thresholds, each such array is mmap'ed fresh (or the heap top is trimmed and
regrown), so every call zero-fills new pages: a SmolLM2 prefill of 512 tokens took ~126,000 page
faults and 28% of its time that way. glibc raises both thresholds by itself once a large block is
freed, up to 32 MiB (mmap) and 64 MiB (trim); this sets those ceilings at once. The cost is that up
to 64 MiB of freed memory stays with the process for reuse. Set NPLLAMA_MALLOC_TUNING=0 to leave
the allocator alone.
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD = 32 << 20                        # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD              # what glibc pairs with a raised mmap threshold

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; False where that is off or not glibc."""
    global _applied
    if _applied is None:
        _applied = False
        if os.environ.get("NPLLAMA_MALLOC_TUNING", "1") != "0":
            try:
                mallopt = ctypes.CDLL(None).mallopt     # glibc only: musl and macOS have no mallopt
            except (AttributeError, OSError, TypeError):   # TypeError: Windows has no CDLL(None)
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
