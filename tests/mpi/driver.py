"""Run a few training steps through the Trainer API, in one process or under `mpiexec -n N` (tests/test_mpi.py).

Writes into OUT: params.safetensors (rank 0: the trained parameters), rows_rank<r>.npy (the ids every
loss_and_grads call of rank r saw, stacked), moments_rank<r>.json (bytes of optimizer state per rank).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import npllama  # noqa: E402
from npllama.backend import to_host  # noqa: E402
from npllama.config import LlamaConfig  # noqa: E402
from npllama.io.safetensors import save_file  # noqa: E402
from npllama.train.distributed import Parallel, World  # noqa: E402
from npllama.train.trainer import TrainConfig, Trainer  # noqa: E402

CONF = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=61, max_position_embeddings=64, rms_norm_eps=1e-5)


def tokens(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    return ((np.arange(n) * 5 + rng.integers(0, 3, n)) % 61).astype(np.uint16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--stop-at", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--bucket-bytes", type=int, default=20000)      # several buckets even for this tiny model
    ap.add_argument("--untied", action="store_true")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds after each step (a run slow enough to kill)")
    a = ap.parse_args()
    world = World.from_env()
    if a.backend == "cupy":
        world.use_local_gpu()
    conf = dict(CONF, tie_word_embeddings=not a.untied)
    model = npllama.Llama.init(LlamaConfig(**conf), seed=1, dtype="float64", backend=a.backend)
    seen = []
    inner = model.loss_and_grads

    def spy(ids, targets, **kw):
        seen.append(to_host(ids))
        return inner(ids, targets, **kw)
    model.loss_and_grads = spy
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch, seq_len=10, accum=a.accum, lr=2e-2, min_lr=2e-3, warmup=1,
                      clip=0.05, weight_decay=0.1, eval_every=0, save_every=a.save_every, log_every=1, seed=5)
    par = Parallel(world, zero=a.zero, overlap=not a.no_overlap, bucket_bytes=a.bucket_bytes)
    tr = Trainer(model, tokens(), None, cfg, a.out, parallel=par)
    if a.resume:
        tr.resume()
    tr.fit(stop_at=a.stop_at, on_step=(lambda rec: time.sleep(a.sleep)) if a.sleep else None)
    os.makedirs(a.out, exist_ok=True)
    np.save(os.path.join(a.out, f"rows_rank{world.rank}.npy"), np.stack(seen))
    nbytes = getattr(tr.opt, "state_nbytes", None)
    if nbytes is None:
        nbytes = sum(int(v.nbytes) for s in tr.opt.state.values() for k, v in s.items() if k != "step" and v is not None)
    with open(os.path.join(a.out, f"moments_rank{world.rank}.json"), "w") as f:
        json.dump({"bytes": nbytes, "buckets": len(tr.dp.buckets) if tr.dp else 0, "nccl": bool(world.nccl)}, f)
    if world.is_main:
        save_file({k: np.ascontiguousarray(to_host(v)) for k, v in model.params.items()}, os.path.join(a.out, "params.safetensors"))


if __name__ == "__main__":
    main()
