"""Host work shared out over the free cores: NumPy's element-wise loops (exp, max, sum, ...) run on one
thread, so on a long prompt they cost more than the BLAS products, which use every core. Independent
pieces of such work go to Python threads (NumPy releases the GIL inside its loops and BLAS calls), with
BLAS held to one thread meanwhile so that the two kinds of threads do not fight over the same cores."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from npllama import blasthreads

_pool: list = []


def share(jobs: list[Callable[[], None]]) -> None:
    """Run jobs on as many threads as BLAS has (costliest first, dealt out in turn); in turn where it has one."""
    with blasthreads.split(len(jobs)) as n:
        if n <= 1:
            for job in jobs:
                job()
            return
        if not _pool:
            _pool.append(ThreadPoolExecutor(max_workers=blasthreads.cores(), thread_name_prefix="npllama"))
        futures = [_pool[0].submit(lambda mine=jobs[i::n]: [job() for job in mine]) for i in range(n)]
        for f in futures:
            f.result()                                                       # re-raises a worker's error


def share_rows(rows: Callable[[slice], None], n_rows: int, parts: int) -> None:
    """rows(r) for `parts` contiguous row ranges r covering n_rows, shared out as above."""
    share([lambda r=r: rows(r) for r in row_blocks(n_rows, parts)])


def row_blocks(n_rows: int, parts: int) -> list[slice]:
    """n_rows cut into `parts` contiguous slices of (nearly) equal size, none empty."""
    parts = max(1, min(parts, n_rows))
    bounds = [n_rows * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
