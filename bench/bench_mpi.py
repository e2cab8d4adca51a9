"""Data parallel training over MPI on this machine: 1 process x T BLAS threads against N ranks x 1 thread,
and how much of the gradient allreduce the overlap with the backward hides.

    python bench/bench_mpi.py [--steps 3] [--ranks 2] [--quick]

A stories15M-sized Llama (hidden 288, intermediate 768, 6 layers, 6 heads, vocab 32000, tied), float32,
global batch 8 x 256, random weights and tokens. Every configuration runs in child processes of its own
(`mpiexec -n N python bench/bench_mpi.py --worker ...`); each reports the median step time over --steps
timed steps after one warm-up step, and, per rank, the seconds it sat blocked waiting for the reduction
(`exposed` communication). Communication alone is timed too: the same buckets allreduced back to back
with no compute. Then
    hidden = comm alone - exposed (overlap on)        (what ran while the backward went on)
Writes bench/results/mpi.json and mpi.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORIES15M = dict(hidden_size=288, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=6, vocab_size=32000, max_position_embeddings=256, rms_norm_eps=1e-5,
                  tie_word_embeddings=True)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True)


def worker(a: argparse.Namespace) -> None:
    """One configuration, inside mpiexec (or alone): time the training steps, print JSON from rank 0."""
    sys.path.insert(0, ROOT)
    import numpy as np
    import npllama
    from npllama.config import LlamaConfig
    from npllama.train.distributed import Parallel, World
    from npllama.train.trainer import TrainConfig, Trainer
    world = World.from_env()
    conf = TINY if a.tiny else STORIES15M
    model = npllama.Llama.init(LlamaConfig(**conf), seed=0, dtype="float32")
    rng = np.random.default_rng(0)
    toks = rng.integers(0, conf["vocab_size"], 200_000).astype(np.uint16)
    cfg = TrainConfig(steps=a.steps + 1, batch_size=a.batch, seq_len=a.seq, lr=1e-4, warmup=0, eval_every=0,
                      save_every=0, log_every=0)
    par = Parallel(world, zero=a.zero, overlap=not a.no_overlap, bucket_bytes=int(a.bucket_mb * 2 ** 20))
    out = os.path.join(a.tmp, f"run{os.getpid() if world.size == 1 else 'mpi'}")
    tr = Trainer(model, toks, None, cfg, out, parallel=par)
    times, exposed = [], []
    for i in range(a.steps + 1):
        world.barrier()
        waited = lambda: (tr.dp.comm_wait if tr.dp else 0.0) + getattr(tr.opt, "comm_wait", 0.0)  # noqa: E731
        w0 = waited()
        t = time.perf_counter()
        tr.train_step()
        if i:                                # the first step warms up (allocations, BLAS)
            times.append(time.perf_counter() - t)
            exposed.append(waited() - w0)
    # communication alone: the very buckets, reduced back to back with no compute (ZeRO-1: reduce-scatter
    # of the gradients plus allgather of the parameters; else one allreduce per bucket)
    alone = []
    if tr.dp is not None:
        for _ in range(a.steps):
            world.barrier()
            t = time.perf_counter()
            for i, b in enumerate(tr.dp.buckets):
                if a.zero:
                    world.ireduce_scatter_(b.flat, tr.dp.shards[i])()
                    world.allgather_(b.flat)
                else:
                    world.allreduce_(b.flat)
            alone.append(time.perf_counter() - t)
    med = statistics.median
    every = world.allgather_obj({"step_s": med(times), "exposed_s": med(exposed),
                                 "alone_s": med(alone) if alone else 0.0})
    if world.is_main:
        tokens = a.batch * a.seq
        rec = {"ranks": world.size, "threads_per_rank": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
               "overlap": not a.no_overlap, "zero": a.zero, "step_s": max(e["step_s"] for e in every),
               "tok_per_s": tokens / max(e["step_s"] for e in every),
               "exposed_comm_s": max(e["exposed_s"] for e in every),
               "comm_alone_s": max(e["alone_s"] for e in every),
               "buckets": len(tr.dp.buckets) if tr.dp else 0,
               "allreduce_bytes": sum(b.nbytes for b in tr.dp.buckets) if tr.dp else 0,
               "params": model.num_params, "steps_timed": a.steps, "per_rank": every}
        print("RESULT " + json.dumps(rec), flush=True)


def run_config(n: int, threads: int, extra: list[str], a: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    base = [sys.executable, os.path.abspath(__file__), "--worker", "--steps", str(a.steps), "--batch", str(a.batch),
            "--seq", str(a.seq), "--tmp", a.tmp, *(["--tiny"] if a.tiny else []), *extra]
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    cmd = base if n == 1 else [mpiexec, "-n", str(n), *base]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not line:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return json.loads(line[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--tiny", action="store_true", help="a tiny model (smoke test of the machinery)")
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--quick", action="store_true", help="--steps 2")
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results"), help="where mpi.json / mpi.md go")
    a = ap.parse_args()
    if a.quick:
        a.steps = 2
    if a.worker:
        worker(a)
        return
    import tempfile
    a.tmp = a.tmp or tempfile.mkdtemp(prefix="npllama-bench-mpi-")
    n, cores = a.ranks, os.cpu_count() or 1
    rows = [run_config(1, 1, [], a), run_config(1, n, [], a),
            run_config(n, 1, ["--no-overlap", "--bucket-mb", str(a.bucket_mb)], a),
            run_config(n, 1, ["--bucket-mb", str(a.bucket_mb)], a),
            run_config(n, 1, ["--bucket-mb", "2"], a),
            run_config(n, 1, ["--zero", "1", "--bucket-mb", "2"], a)]
    for r in rows:
        if r["ranks"] > 1:
            r["hidden_comm_s"] = max(r["comm_alone_s"] - r["exposed_comm_s"], 0.0) if r["overlap"] else 0.0
    cpu = platform.processor() or platform.machine()
    lines = [f"# Data parallel over MPI ({'tiny model' if a.tiny else 'stories15M-sized'}, float32, "
             f"batch {a.batch} x {a.seq}; {cpu}, {cores} cores)", "",
             "| setup | overlap | zero | buckets | step s | tok/s | comm alone s | exposed comm s | hidden s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        setup = f"{r['ranks']} rank(s) x {r['threads_per_rank']} thread(s)"
        lines.append(f"| {setup} | {'on' if r['overlap'] else 'off'} | {r['zero']} | {r['buckets']} | "
                     f"{r['step_s']:.3f} | {r['tok_per_s']:,.0f} | {r['comm_alone_s']:.4f} | "
                     f"{r['exposed_comm_s']:.4f} | {r.get('hidden_comm_s', 0):.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    res = a.results
    os.makedirs(res, exist_ok=True)
    with open(os.path.join(res, "mpi.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(res, "mpi.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
