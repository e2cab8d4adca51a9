"""Forward-pass time of a mid-sized random Llama: npllama vs PyTorch eager, same weights, same run.

Each side runs in its own process so BLAS thread pools never compete. Prints medians and the
ratio (npllama time / PyTorch time; below 1 means npllama is faster). Not a test.

    python bench/bench_forward.py [--dtype float32] [--batch 4] [--seq 256] [--reps 7]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CONFIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
              tie_word_embeddings=False)


def make_weights(path: str) -> None:
    """Save a random model (transformers' layout) that both sides load."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(path)


def side(which: str, path: str, dtype: str, B: int, T: int, reps: int) -> list[float]:
    import numpy as np
    ids = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (B, T))
    if which == "npllama":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import npllama
        model = npllama.Llama.from_pretrained(path, dtype=dtype)
        run = lambda: model.forward(ids)
    else:
        import torch
        from transformers import LlamaForCausalLM
        tdt = {"float32": torch.float32, "float64": torch.float64}[dtype]
        model = LlamaForCausalLM.from_pretrained(path, dtype=tdt).eval()
        tids = torch.tensor(ids)

        def run():
            with torch.no_grad():
                return model(tids).logits
    run()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description="npllama vs PyTorch forward pass")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        print(json.dumps(side(a.side, a.weights, a.dtype, a.batch, a.seq, a.reps)))
        return
    with tempfile.TemporaryDirectory() as d:
        make_weights(d)
        res = {}
        for which in ("npllama", "torch"):
            out = subprocess.run([sys.executable, __file__, "--side", which, "--weights", d, "--dtype", a.dtype,
                                  "--batch", str(a.batch), "--seq", str(a.seq), "--reps", str(a.reps)],
                                 capture_output=True, text=True, check=True)
            res[which] = statistics.median(json.loads(out.stdout.strip().splitlines()[-1]))
    tok = a.batch * a.seq
    print(f"forward, {a.dtype}, batch {a.batch} x {a.seq}, hidden {CONFIG['hidden_size']}, "
          f"{CONFIG['num_hidden_layers']} layers, vocab {CONFIG['vocab_size']} (median of {a.reps})")
    for k, v in res.items():
        print(f"  {k:8s} {v * 1e3:8.1f} ms   {tok / v:9.0f} tok/s")
    print(f"  ratio npllama/torch time: {res['npllama'] / res['torch']:.2f}x")


if __name__ == "__main__":
    main()
