"""Training-step benchmark: npllama next to PyTorch eager LlamaForCausalLM, same weights, same batch.

    python bench/bench_train.py                       # stories15M-sized, batch 8 x 256, float32 and float64
    python bench/bench_train.py --steps 3 --dtypes float32
    python bench/bench_train.py --device cuda         # npllama on CuPy vs torch on CUDA

A step is forward, backward, clip_grad_norm(1.0) and AdamW on both sides. Each (library, dtype)
runs in its own subprocess, so peak memory (max RSS on the CPU; the allocator's peak on a GPU)
belongs to that side alone. Reported: median step time, tokens/s, peak memory, and npllama/torch ratios.
Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STORIES15M = dict(hidden_size=288, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=6, vocab_size=32000, max_position_embeddings=256, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=True)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # Linux: KiB


def _batch(B: int, T: int, V: int):
    import numpy as np
    return np.random.default_rng(0).integers(0, V, (B, T + 1))


def worker(lib: str, dtype: str, model_dir: str, B: int, T: int, steps: int, device: str) -> dict:
    """Time `steps` training steps (after one warm-up step) in this process; return the figures."""
    import numpy as np
    batch = _batch(B, T, STORIES15M["vocab_size"])
    if lib == "npllama":
        from npllama.model import Llama
        from npllama.train.clip import clip_grad_norm
        from npllama.train.optim import AdamW
        model = Llama.from_pretrained(model_dir, dtype=dtype, backend="cupy" if device == "cuda" else "numpy")
        xp = model.xp
        opt = AdamW(model.params, lr=1e-4, weight_decay=0.1)
        x, y = xp.asarray(batch[:, :-1]), xp.asarray(batch[:, 1:])
        sync = (lambda: xp.cuda.Device().synchronize()) if device == "cuda" else (lambda: None)
        if device == "cuda":
            pool = xp.get_default_memory_pool()

        def step() -> float:
            loss, grads = model.loss_and_grads(x, y)
            clip_grad_norm(grads, 1.0)
            opt.step(grads)
            return float(loss)
    else:
        import torch
        from transformers import LlamaForCausalLM
        dev = torch.device(device)
        model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager",
                                                 dtype=getattr(torch, dtype)).to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        x, y = torch.tensor(batch[:, :-1], device=dev), torch.tensor(batch[:, 1:], device=dev)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            logits = model(x).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return loss.item()
    rss_loaded = _rss_mb()
    first_loss = step()                       # warm-up: allocates the optimizer state, caches, pools
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    if device == "cuda":
        peak = (pool.total_bytes() if lib == "npllama" else torch.cuda.max_memory_allocated()) / 2**20
        mem_kind = "GPU pool" if lib == "npllama" else "GPU peak alloc"
    else:
        peak, mem_kind = _rss_mb(), "max RSS"
    med = statistics.median(times)
    return {"lib": lib, "dtype": dtype, "median_s": med, "tok_s": B * T / med, "peak_mb": peak,
            "rss_after_load_mb": rss_loaded, "mem_kind": mem_kind, "first_loss": first_loss, "times": times}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side (after one warm-up)")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--worker", nargs=3, metavar=("LIB", "DTYPE", "MODEL_DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        lib, dtype, model_dir = a.worker
        print(json.dumps(worker(lib, dtype, model_dir, a.batch_size, a.seq_len, a.steps, a.device)))
        return 0

    from npllama.config import LlamaConfig
    from npllama.model import Llama
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "stories15m")
        model = Llama.init(LlamaConfig(**STORIES15M), seed=0, dtype="float64")
        model.save_pretrained(model_dir)        # float64 weights: each side narrows them the same way
        print(f"training step, stories15M-sized Llama ({model.num_params / 1e6:.1f}M params), "
              f"batch {a.batch_size} x {a.seq_len}, {a.steps} timed steps, device {a.device}")
        del model
        rows = []
        for dtype in a.dtypes.split(","):
            for lib in ("npllama", "torch"):
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", lib, dtype, model_dir,
                       "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--steps", str(a.steps),
                       "--device", a.device]
                r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
                if r.returncode:
                    print(f"{lib} {dtype}: failed\n{r.stderr[-2000:]}")
                    continue
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
                x = rows[-1]
                print(f"  {lib:8s} {dtype}: {x['median_s'] * 1e3:8.0f} ms/step  {x['tok_s']:8,.0f} tok/s  "
                      f"peak {x['peak_mb']:7,.0f} MB ({x['mem_kind']}; {x['rss_after_load_mb']:,.0f} MB after load)  "
                      f"first loss {x['first_loss']:.4f}", flush=True)
    print("\nratios npllama / torch:")
    for dtype in a.dtypes.split(","):
        n = [r for r in rows if r["lib"] == "npllama" and r["dtype"] == dtype]
        t = [r for r in rows if r["lib"] == "torch" and r["dtype"] == dtype]
        if n and t:
            print(f"  {dtype}: tokens/s x{n[0]['tok_s'] / t[0]['tok_s']:.2f}   peak memory x{n[0]['peak_mb'] / t[0]['peak_mb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
