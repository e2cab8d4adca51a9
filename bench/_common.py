"""Shared machinery of the CPU benchmarks: one process per side, machine load, ceilings, reports.

Every side (npllama, PyTorch, llama.cpp) runs in a child process of its own, so BLAS thread
pools never compete and each child's peak RSS is its own. The parent only starts children,
measures how busy the rest of the machine was while each ran, and writes the tables.

Load accounting: the machine's busy CPU time (psutil.cpu_times, all cores) during a child's
run, minus the child's own CPU time (getrusage of children) and ours, is what *other*
processes used. Divided by the wall time it is "other cores busy": on a 2-core machine a
value near 1 means a second busy process shared the cores, which slows a threaded
matrix-vector product 1.6-2x. Such a run is flagged and retried once; both attempts are kept.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a side counts as disturbed when other processes kept more than this many cores busy on average
BUSY_CORES = 0.25


def cache_dir() -> str:
    """Where derived weights (HF dir, F32 GGUF, random test models) are made once and kept."""
    d = os.environ.get("NPLLAMA_BENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "npllama", "bench")
    os.makedirs(d, exist_ok=True)
    return d


def ncores() -> int:
    """Cores this process may run on (what BLAS and llama.cpp are told to use)."""
    from npllama.blasthreads import cores
    return cores()


# ---------------------------------------------------------------- inside a child
def peak_rss_mb() -> float:
    """This process's peak resident set so far, MiB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this address space. Not ru_maxrss:
    Linux carries ru_maxrss across fork+exec, so a child would report its parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def rss_mb() -> float:
    """This process's current resident set, MiB."""
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timeit(fn: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
    """Wall times of `reps` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def emit(result: dict) -> None:
    """A child's last stdout line is its JSON result (anything printed before it is ignored)."""
    sys.stdout.flush()
    print("\n" + json.dumps(result), flush=True)


# ---------------------------------------------------------------- load of the machine
def _busy_seconds() -> float:
    import psutil
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _own_seconds() -> tuple[float, float]:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime


def other_load(seconds: float = 1.0) -> dict:
    """How busy the rest of the machine is now: sampled for `seconds` with nothing of ours running."""
    try:
        import psutil
    except ImportError:
        return {"loadavg": list(os.getloadavg())}
    b0, (m0, _) = _busy_seconds(), _own_seconds()
    time.sleep(seconds)
    b1, (m1, _) = _busy_seconds(), _own_seconds()
    top = []
    for p in psutil.process_iter(["pid", "cpu_percent", "cmdline"]):
        pass  # first call primes cpu_percent; the sample below is over a short window
    time.sleep(0.2)
    for p in psutil.process_iter(["pid", "cpu_percent", "cmdline"]):
        try:
            cpu = p.info["cpu_percent"] or 0.0
            if cpu > 20 and p.pid != os.getpid():
                top.append({"pid": p.pid, "cpu_percent": cpu, "cmd": " ".join(p.info["cmdline"] or [])[:80]})
        except Exception:
            continue
    return {"loadavg": [round(x, 2) for x in os.getloadavg()],
            "other_cores_busy": round(max(0.0, (b1 - b0) - (m1 - m0)) / seconds, 2),
            "busy_processes": sorted(top, key=lambda d: -d["cpu_percent"])[:5]}


def run_child(argv: list[str], timeout: float = 1800) -> tuple[dict, dict]:
    """Run a child (python argv...), return (its JSON result, the load of other processes while it ran)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    try:
        import psutil  # noqa: F401
        have_psutil = True
    except ImportError:
        have_psutil = False
    la0 = os.getloadavg()
    b0 = _busy_seconds() if have_psutil else 0.0
    m0, c0 = _own_seconds()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable] + argv, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    b1 = _busy_seconds() if have_psutil else 0.0
    m1, c1 = _own_seconds()
    child_cpu = c1 - c0
    load = {"wall_s": round(wall, 2), "child_cpu_cores": round(child_cpu / wall, 2),
            "loadavg_before": [round(x, 2) for x in la0], "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    if have_psutil:
        load["other_cores_busy"] = round(max(0.0, (b1 - b0) - child_cpu - (m1 - m0)) / wall, 2)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}, load
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1]), load
    except (json.JSONDecodeError, IndexError):
        return {"error": "no JSON result: " + proc.stdout[-500:] + proc.stderr[-500:]}, load


@contextlib.contextmanager
def competing_load(n: int) -> Iterator[list]:
    """n CPU-bound processes (`while True: pass`) running for the duration: a busy machine, on purpose."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        if procs:
            time.sleep(0.5)           # running, and seen by the scheduler, before the side starts
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def run_side(argv: list[str], retry_busy: bool = True, timeout: float = 1800) -> dict:
    """run_child, flagged when other processes were busy meanwhile, retried once then (best kept, both listed)."""
    res, load = run_child(argv, timeout)
    busy = load.get("other_cores_busy", 0.0) > BUSY_CORES
    res["load"] = load
    res["busy"] = busy
    if busy and retry_busy and "error" not in res:
        print(f"   [busy machine: other processes kept {load['other_cores_busy']} cores busy; retrying once]",
              file=sys.stderr, flush=True)
        res2, load2 = run_child(argv, timeout)
        res2["load"] = load2
        res2["busy"] = load2.get("other_cores_busy", 0.0) > BUSY_CORES
        # keep the quieter attempt; the other one stays in the record
        first, second = (res, res2) if load["other_cores_busy"] <= load2.get("other_cores_busy", 9) or "error" in res2 \
            else (res2, res)
        first["other_attempt"] = {k: v for k, v in second.items() if k != "other_attempt"}
        first["retried"] = True
        return first
    return res


# ---------------------------------------------------------------- machine ceilings
def measure_ceilings(dtypes: tuple[str, ...] = ("float32", "float64"), gemm_n: int = 1536,
                     bw_mb: int = 512, reps: int = 5) -> dict:
    """Read bandwidth and GEMM GFLOP/s of NumPy (and BLAS gemv) measured here, now (run in a child).

    read GB/s, three ways, all over a `bw_mb` array (far larger than the caches):
      sum_1t  - np.sum on one thread (what a plain NumPy reduction reaches)
      sum_nt  - the array split over `ncores` threads, each summing its part (NumPy releases the GIL)
      gemv    - x @ W for a float32 W (in, out) of that size through BLAS: the decode step's own pattern
    The decode ceiling uses the best of them.
    """
    import concurrent.futures as cf

    import numpy as np
    n = bw_mb * 2**20 // 4
    a = np.ones(n, dtype=np.float32)
    out: dict[str, Any] = {"numpy": np.__version__, "blas": _blas_info(), "cores": ncores()}
    t = timeit(lambda: a.sum(), reps)
    out["read_GBps_sum_1t"] = round(a.nbytes / statistics.median(t) / 1e9, 1)
    k = ncores()
    parts = np.array_split(a, k)
    with cf.ThreadPoolExecutor(k) as ex:
        t = timeit(lambda: list(ex.map(np.sum, parts)), reps)
    out["read_GBps_sum_nt"] = round(a.nbytes / statistics.median(t) / 1e9, 1)
    W = a.reshape(-1, 4096)
    x = np.ones(W.shape[0], dtype=np.float32)
    t = timeit(lambda: x @ W, reps)
    out["read_GBps_gemv"] = round(a.nbytes / statistics.median(t) / 1e9, 1)
    out["read_GBps"] = max(out["read_GBps_sum_1t"], out["read_GBps_sum_nt"], out["read_GBps_gemv"])
    del a, W, parts
    for dt in dtypes:
        A = np.random.default_rng(0).standard_normal((gemm_n, gemm_n)).astype(dt)
        B = A.copy()
        t = timeit(lambda: A @ B, reps)
        out[f"gemm_GFLOPs_{dt}"] = round(2 * gemm_n**3 / statistics.median(t) / 1e9, 1)
    return out


def measure_torch_gemm(dtypes: tuple[str, ...] = ("float32", "float64"), gemm_n: int = 1536, reps: int = 5) -> dict:
    """PyTorch's GEMM GFLOP/s (MKL/oneDNN on x86): the peer's own ceiling for prefill and training."""
    import torch
    out: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for dt in dtypes:
        A = torch.randn(gemm_n, gemm_n, dtype=getattr(torch, dt))
        B = A.clone()
        t = timeit(lambda: A @ B, reps)
        out[f"gemm_GFLOPs_{dt}"] = round(2 * gemm_n**3 / statistics.median(t) / 1e9, 1)
    return out


def _blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
        info = [f"{d.get('internal_api')} {d.get('version')} ({d.get('num_threads')} threads, {d.get('architecture')})"
                for d in threadpool_info() if d.get("user_api") == "blas"]
        return "; ".join(info)
    except ImportError:
        return "unknown (threadpoolctl missing)"


def blas_note(ceil: dict) -> str:
    """One line naming NumPy's BLAS kernels, and any OPENBLAS_* override in the environment (it changes them)."""
    forced = ", ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"))
    return (f"NumPy BLAS: {ceil.get('blas', 'unknown')}"
            + (f", kernels forced by the environment ({forced})." if forced else ", kernels picked by OpenBLAS itself."))


def machine_info() -> dict:
    """What ran the benchmark."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": ncores(), "python": platform.python_version(), "platform": platform.platform(),
            "when_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


# ---------------------------------------------------------------- reports
def med(xs: list[float]) -> float:
    """Median (benchmarks report medians, never means or minima)."""
    return statistics.median(xs)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded, None when either side is missing."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


def fmt(x: Any, nd: int = 1) -> str:
    """A table cell: numbers rounded, missing as an em dash."""
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def load_note(results: dict[str, dict]) -> str:
    """One line per side: how busy the rest of the machine was while it ran."""
    parts = []
    for side, r in results.items():
        ld = r.get("load", {})
        flag = " BUSY" if r.get("busy") else ""
        retry = " (retried)" if r.get("retried") else ""
        parts.append(f"{side}: other processes {ld.get('other_cores_busy', '?')} cores, "
                     f"loadavg {ld.get('loadavg_before', ['?'])[0]}→{ld.get('loadavg_after', ['?'])[0]}{flag}{retry}")
    return "; ".join(parts)


def write_outputs(name: str, data: dict, markdown: str, out_dir: str | None) -> None:
    """Print the markdown, and write <name>.json and <name>.md into out_dir (default bench/results)."""
    out_dir = out_dir or os.path.join(ROOT, "bench", "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out_dir, name + ".md"), "w") as f:
        f.write(markdown + "\n")
    print(markdown)
    print(f"\n(written: {os.path.join(out_dir, name)}.json / .md)")


if __name__ == "__main__":
    # a child of run_child: python bench/_common.py ceilings|torch_gemm
    # NPLLAMA_BENCH_TINY=1 (the smoke test): the same code on toy sizes
    small = dict(gemm_n=64, reps=1) if os.environ.get("NPLLAMA_BENCH_TINY") else {}
    if sys.argv[1] == "ceilings":
        emit(measure_ceilings(bw_mb=8, **small) if small else measure_ceilings())
    else:
        emit(measure_torch_gemm(**small))
