"""npllama on CuPy vs PyTorch eager, same GPU, same process, same weights, same shapes, same precision.

    python bench/bench_gpu.py [--out results.json] [--train-steps 5] [--decode-runs 3] [--quick]

Training: a 110M Llama (hidden 768, 12 layers, 12 heads, intermediate 2048, vocab 32000, tied embeddings),
batch 16 x 1024, AdamW, one step = loss + every gradient + the optimizer update, synchronized. float32 with
TF32 off, then with TF32 on. PyTorch side: transformers' LlamaForCausalLM with SDPA attention and
torch.optim.AdamW (its default, foreach). Median step time over --train-steps after 2 warm-up steps;
peak memory is what each framework's allocator reserved (CuPy: the memory pool's total after the run,
started empty; PyTorch: max_memory_reserved; max_memory_allocated printed too).

Decode: a SmolLM2-135M-shaped model (576 hidden, 30 layers, 9 heads / 3 KV heads, vocab 49152, tied), random
weights, float32, batch 1, a 16-token prompt, exactly 128 new greedy tokens (no EOS). npllama:
model.generate(..., cuda_graph=True) (capture once, replay per token), and eager CuPy for reference;
PyTorch: Hugging Face `generate` (eager). tok/s = 128 / wall time of the whole call (prompt included),
median of --decode-runs after one warm-up call. Bandwidth ceiling: measured device-to-device copy bandwidth
(bytes read + written) / bytes of weights one token reads.

Needs CuPy, PyTorch with CUDA and transformers; takes ~2-4 minutes on an H100/H200.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import npllama  # noqa: E402
from npllama.config import LlamaConfig  # noqa: E402

TRAIN_CFG = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 vocab_size=32000, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=True)
SMOL_CFG = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                rope_theta=100000.0, tie_word_embeddings=True)


def log(*a: Any) -> None:
    print(*a, flush=True)


def timed(fn: Callable[[], Any], sync: Callable[[], None], reps: int, warmup: int) -> list[float]:
    """Wall seconds of `reps` synchronized calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
        sync()
    out = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------- helpers per framework
def cupy_sync() -> None:
    import cupy
    cupy.cuda.get_current_stream().synchronize()


def torch_sync() -> None:
    import torch
    torch.cuda.synchronize()


def free_all() -> None:
    """Give every cached block of both allocators back, so each side's peak is its own."""
    import cupy
    import torch
    gc.collect()
    cupy.cuda.Device().synchronize()
    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (1 GiB buffers, 20 copies)."""
    import cupy
    a = cupy.ones(2 ** 28, dtype=cupy.float32)
    b = cupy.empty_like(a)
    b[...] = a
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(20):
        b[...] = a
    stop.record()
    stop.synchronize()
    seconds = cupy.cuda.get_elapsed_time(start, stop) / 1e3
    del a, b
    return 2 * 2 ** 30 * 20 / seconds


def hf_model(path: str, train: bool) -> Any:
    import torch
    from transformers import LlamaForCausalLM
    m = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").cuda()
    return m.train() if train else m.eval()


def npllama_adamw() -> Any:
    try:
        from npllama.train.optim import AdamW
        return AdamW
    except ImportError:
        return None


# ---------------------------------------------------------------- training
def bench_train(args: argparse.Namespace, workdir: str) -> dict:
    import cupy
    import torch
    import torch.nn.functional as F
    AdamW = npllama_adamw()
    if AdamW is None:
        log("train: skipped, npllama.train.optim (AdamW) is not in this checkout (merge the training branch)")
        return {"skipped": "npllama.train.optim missing"}
    cfg = dict(TRAIN_CFG)
    B, T = (4, 256) if args.quick else (16, 1024)
    if args.quick:
        cfg.update(num_hidden_layers=2)
    config = LlamaConfig(**cfg)
    host = npllama.Llama.init(config, seed=0, dtype="float32")
    log(f"train model: {host}")
    path = os.path.join(workdir, "train110m")
    host.save_pretrained(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (B, T))
    targets = np.roll(ids, -1, axis=1)
    res: dict = {"batch": [B, T], "params": host.num_params}
    for mode in ("float32", "tf32"):
        tf32 = mode == "tf32"
        # npllama
        free_all()
        pool = cupy.get_default_memory_pool()
        model = npllama.Llama(config, host.params, backend="cupy", tf32=tf32)
        opt = AdamW(model.params, lr=3e-4, weight_decay=0.1)
        ids_g, tgt_g = cupy.asarray(ids), cupy.asarray(targets)
        losses: list[float] = []

        def np_step() -> None:
            loss, grads = model.loss_and_grads(ids_g, tgt_g)
            opt.step(grads)
            losses.append(loss)
        t_np = timed(np_step, cupy_sync, args.train_steps, warmup=2)
        mem_np = pool.total_bytes()
        first_np = losses[0]
        del model, opt, ids_g, tgt_g
        # PyTorch eager, SDPA
        free_all()
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.cuda.reset_peak_memory_stats()
        tm = hf_model(path, train=True)
        topt = torch.optim.AdamW(tm.parameters(), lr=3e-4, weight_decay=0.1)
        ids_t, tgt_t = torch.as_tensor(ids).cuda(), torch.as_tensor(targets).cuda()
        tlosses: list[float] = []

        def torch_step() -> None:
            topt.zero_grad(set_to_none=True)
            logits = tm(input_ids=ids_t).logits
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt_t.view(-1))
            loss.backward()
            topt.step()
            tlosses.append(loss.item())
        t_pt = timed(torch_step, torch_sync, args.train_steps, warmup=2)
        mem_pt, alloc_pt = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
        first_pt = tlosses[0]
        del tm, topt, ids_t, tgt_t
        torch.set_float32_matmul_precision("highest")
        tok_np, tok_pt = B * T / statistics.median(t_np), B * T / statistics.median(t_pt)
        res[mode] = {
            "npllama_tok_s": tok_np, "torch_tok_s": tok_pt, "ratio": tok_np / tok_pt,
            "npllama_step_s": t_np, "torch_step_s": t_pt,
            "npllama_peak_gib": mem_np / 2 ** 30, "torch_peak_reserved_gib": mem_pt / 2 ** 30,
            "torch_peak_allocated_gib": alloc_pt / 2 ** 30,
            "first_loss": {"npllama": first_np, "torch": first_pt},
        }
        log(f"train {mode}: npllama {tok_np:,.0f} tok/s, PyTorch {tok_pt:,.0f} tok/s, ratio {tok_np / tok_pt:.2f}x; "
            f"peak npllama {mem_np / 2**30:.1f} GiB vs PyTorch {mem_pt / 2**30:.1f} GiB reserved "
            f"({alloc_pt / 2**30:.1f} allocated); first-step loss {first_np:.6f} vs {first_pt:.6f}")
    return res


# ---------------------------------------------------------------- decode
def _npllama_generate(model: Any, prompt: list[int], n: int, cuda_graph: bool) -> list[int]:
    try:
        import npllama.generate  # noqa: F401
    except ImportError:          # generation branch not merged: the same greedy loop by hand
        from npllama.backend import to_host
        from npllama.fast.decode import GraphDecoder
        target = GraphDecoder(model) if cuda_graph else model
        cache = target.new_cache(1, len(prompt) + n)
        logits = target.forward(np.array([prompt]), cache=cache, last_only=True)
        out = []
        for t in range(n):
            tok = int(to_host(logits)[0, -1].argmax())
            out.append(tok)
            if t < n - 1:
                logits = target.forward(np.array([[tok]]), cache=cache, start_pos=len(prompt) + t, last_only=True)
        return out
    return model.generate(prompt, max_new_tokens=n, eos_ids=[], cuda_graph=cuda_graph)


def bench_decode(args: argparse.Namespace, workdir: str) -> dict:
    import torch
    config = LlamaConfig(**SMOL_CFG)
    host = npllama.Llama.init(config, seed=1, dtype="float32")
    log(f"decode model: {host}")
    path = os.path.join(workdir, "smollm2shape")
    host.save_pretrained(path)
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, config.vocab_size, 16)]
    N = 128
    free_all()
    model = npllama.Llama(config, host.params, backend="cupy")
    weight_bytes = sum(p.nbytes for p in model.params.values())    # tied: the embedding is read once, as lm_head
    out: dict = {}

    def run_graph() -> None:
        out["graph"] = _npllama_generate(model, prompt, N, cuda_graph=True)
    t_graph = timed(run_graph, cupy_sync, args.decode_runs, warmup=1)

    def run_eager() -> None:
        out["eager"] = _npllama_generate(model, prompt, 32, cuda_graph=False)
    t_eager = timed(run_eager, cupy_sync, 1, warmup=1)
    del model
    free_all()
    hf = hf_model(path, train=False)
    ids = torch.tensor([prompt], device="cuda")

    def run_hf() -> None:
        with torch.inference_mode():
            o = hf.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0,
                            attention_mask=torch.ones_like(ids))
        out["hf"] = o[0, len(prompt):].tolist()
    t_hf = timed(run_hf, torch_sync, max(1, args.decode_runs - 1), warmup=1)
    del hf
    free_all()
    bw = copy_bandwidth()
    ceiling = bw / weight_bytes
    tok_graph, tok_eager, tok_hf = N / statistics.median(t_graph), 32 / t_eager[0], N / statistics.median(t_hf)
    same = next((i for i, (a, b) in enumerate(zip(out["graph"], out["hf"])) if a != b), N)
    res = {"new_tokens": N, "prompt_tokens": len(prompt), "weight_bytes": weight_bytes,
           "npllama_graph_tok_s": tok_graph, "npllama_eager_tok_s": tok_eager, "hf_generate_tok_s": tok_hf,
           "ratio_graph_vs_hf": tok_graph / tok_hf, "copy_bandwidth_tb_s": bw / 1e12, "ceiling_tok_s": ceiling,
           "graph_pct_of_ceiling": 100 * tok_graph / ceiling, "graph_run_s": t_graph, "hf_run_s": t_hf,
           "leading_tokens_equal_to_hf": same}
    log(f"decode: npllama+graph {tok_graph:,.0f} tok/s, npllama eager {tok_eager:,.1f} tok/s, HF generate "
        f"{tok_hf:,.1f} tok/s, ratio {tok_graph / tok_hf:.1f}x; ceiling {ceiling:,.0f} tok/s "
        f"({bw / 1e12:.2f} TB/s / {weight_bytes / 1e6:.0f} MB) -> {100 * tok_graph / ceiling:.1f}% of it; "
        f"first {same} of {N} tokens equal to HF's")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--train-steps", type=int, default=5, help="timed training steps per side and precision")
    ap.add_argument("--decode-runs", type=int, default=3, help="timed generate calls (npllama; HF gets one fewer)")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of the script, not a benchmark")
    args = ap.parse_args(argv)
    try:
        import cupy
        import torch
        import transformers
    except ImportError as e:
        sys.exit(f"bench_gpu needs CuPy, PyTorch (CUDA) and transformers: {e}")
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: PyTorch sees no CUDA device")
    dev = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    dev = dev.decode() if isinstance(dev, bytes) else dev
    info = {"device": dev, "cupy": cupy.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__}
    log("; ".join(f"{k} {v}" for k, v in info.items()))
    results: dict = {"info": info}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="npllama-bench-gpu-") as workdir:
        if not args.skip_train:
            results["train"] = bench_train(args, workdir)
        if not args.skip_decode:
            results["decode"] = bench_decode(args, workdir)
    results["wall_s"] = time.perf_counter() - t0
    log(f"total {results['wall_s']:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
