"""Training step (forward, backward, AdamW) on a stories15M-sized Llama: npllama vs PyTorch eager.

    python bench/bench_train_step.py [--dtypes float32,float64] [--steps 5] [--batch 8] [--seq 256]

Model: hidden 288, intermediate 768, 6 layers, 6 heads (6 KV heads), vocab 32000, tied embeddings
(stories15M's shape), random weights made once by transformers (seed 0) and loaded by both sides.
One step = loss and every gradient of a batch (B x T next-token targets), then one AdamW update.
  npllama  model.loss_and_grads + npllama.train.optim.AdamW
  torch    LlamaForCausalLM (eager mode, transformers' default attention), F.cross_entropy on the
           logits, loss.backward(), torch.optim.AdamW
Each (side, dtype) runs in its own process: its peak RSS is its own. Reported: median step time over
--steps steps after one warm-up step, tokens/s, peak RSS and the RSS the step adds over the loaded model.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

STORIES15M = dict(hidden_size=288, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=6, vocab_size=32000, max_position_embeddings=1024, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=True)
LR, BETAS, EPS, WD = 1e-4, (0.9, 0.999), 1e-8, 0.1


def prepare(cache: str, config: dict, name: str = "stories15m-random") -> str:
    """Random weights (transformers' init, seed 0) saved once as an HF dir; both sides load them."""
    path = os.path.join(cache, name)
    if not os.path.exists(os.path.join(path, "config.json")):
        try:
            import torch
            from transformers import LlamaConfig, LlamaForCausalLM
            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(path + ".tmp")
        except ImportError:  # no PyTorch here: npllama's own init (the torch side is skipped anyway)
            import npllama
            from npllama.config import LlamaConfig as NConfig
            npllama.Llama.init(NConfig.from_dict(config)).save_pretrained(path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def side(which: str, path: str, dtype: str, a: argparse.Namespace) -> dict:
    import numpy as np
    rng = np.random.default_rng(0)
    V = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
    batch = rng.integers(0, V, (a.batch, a.seq + 1))
    ids, targets = batch[:, :-1], batch[:, 1:]
    res: dict = {"side": which, "dtype": dtype}
    if which == "npllama":
        import npllama
        model = npllama.Llama.from_pretrained(path, dtype=dtype)
        from npllama.train.optim import AdamW
        res["optimizer"] = "npllama.train.optim.AdamW"
        opt = AdamW(model.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)

        def step() -> float:
            loss, grads = model.loss_and_grads(ids, targets)
            opt.step(grads)
            return loss
    else:
        import torch
        from transformers import LlamaForCausalLM
        res["threads"] = torch.get_num_threads()
        model = LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).train()
        res["attn_implementation"] = model.config._attn_implementation
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        x, y = torch.tensor(ids), torch.tensor(targets)

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            loss.backward()
            opt.step()
            return loss.item()
    res["rss_loaded_mb"] = C.rss_mb()
    losses: list = []
    res["step_s"] = C.timeit(lambda: losses.append(float(step())), a.steps, warmup=1)
    res["losses"] = losses
    res["peak_rss_mb"] = C.peak_rss_mb()
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up (median reported)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--sides", default="npllama,torch")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-retry", action="store_true")
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)     # tests: a tiny model (JSON)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.side:
        C.emit(side(a.side, a.path, a.dtype, a))
        return {}
    cfg = json.loads(a.config) if a.config else STORIES15M
    name = "stories15m-random" if not a.config else "train-tiny-" + str(abs(hash(a.config)) % 10**8)
    path = prepare(C.cache_dir(), cfg, name)
    dtypes = a.dtypes.split(",")
    data: dict = {"workload": f"training step, batch {a.batch} x {a.seq}", "config": cfg, "machine": C.machine_info(),
                  "load_before": C.other_load()}
    data["ceilings"], _ = C.run_child([os.path.join(C.ROOT, "bench", "_common.py"), "ceilings"])
    sides = [s for s in a.sides.split(",") if s != "torch" or importlib.util.find_spec("torch")]
    if "torch" in sides:
        data["torch_gemm"], _ = C.run_child([os.path.join(C.ROOT, "bench", "_common.py"), "torch_gemm"])
    raw: dict = {}
    for dt in dtypes:
        for s in sides:
            print(f"-- {s} {dt}", file=sys.stderr, flush=True)
            raw[f"{s} {dt}"] = C.run_side([os.path.abspath(__file__), "--side", s, "--path", path, "--dtype", dt,
                                           "--steps", str(a.steps), "--batch", str(a.batch), "--seq", str(a.seq)],
                                          retry_busy=not a.no_retry)
    data["raw"] = raw
    data["load_after"] = C.other_load()
    tok = a.batch * a.seq
    summ = {}
    for k, r in raw.items():
        if "error" in r:
            summ[k] = {"error": r["error"]}
            continue
        summ[k] = {"step_s": round(C.med(r["step_s"]), 4), "tok_s": round(tok / C.med(r["step_s"]), 1),
                   "peak_rss_mb": round(r["peak_rss_mb"], 1),
                   "step_rss_mb": round(r["peak_rss_mb"] - r["rss_loaded_mb"], 1),
                   "first_loss": round(r["losses"][0], 6)}
    data["summary"] = summ
    data["ratios"] = {}
    for dt in dtypes:
        n, t = summ.get(f"npllama {dt}", {}), summ.get(f"torch {dt}", {})
        if "tok_s" in n and "tok_s" in t:
            data["ratios"][dt] = {"tok_s": C.ratio(n["tok_s"], t["tok_s"]),
                                  "peak_rss_mb": C.ratio(n["peak_rss_mb"], t["peak_rss_mb"]),
                                  "step_rss_mb": C.ratio(n["step_rss_mb"], t["step_rss_mb"])}
    md = render(data, a)
    C.write_outputs("train_step", data, md, a.out)
    return data


def render(d: dict, a: argparse.Namespace) -> str:
    rows = []
    for k, v in d["summary"].items():
        if "error" in v:
            rows.append([k, "error: " + v["error"][:80], None, None, None, None])
            continue
        dt = k.split()[-1]
        gemm = (d["ceilings"] if k.startswith("npllama") else d.get("torch_gemm", {})).get(f"gemm_GFLOPs_{dt}")
        rows.append([k, v["step_s"], v["tok_s"], v["peak_rss_mb"], v["step_rss_mb"], gemm])
    c = d["config"]
    out = [f"### Training step (forward, backward, AdamW), batch {a.batch} x {a.seq}; hidden {c['hidden_size']}, "
           f"{c['num_hidden_layers']} layers, vocab {c['vocab_size']} ({d['machine']['cores']} cores)", "",
           C.md_table(["side dtype", "step s (median)", "tok/s", "peak RSS MiB", "RSS added by a step MiB",
                       "own BLAS GEMM GFLOP/s"], rows), ""]
    rr = [[dt, r["tok_s"], r["peak_rss_mb"], r["step_rss_mb"]] for dt, r in d["ratios"].items()]
    if rr:
        out += ["Ratios npllama / torch (tok/s above 1 = npllama faster; RSS below 1 = npllama smaller):", "",
                C.md_table(["dtype", "tok/s", "peak RSS", "RSS added by a step"], rr), ""]
    opt = d["raw"].get("npllama float32", d["raw"].get("npllama float64", {})).get("optimizer")
    if opt:
        out.append(f"npllama optimizer: {opt}.")
    if "blas" in d.get("ceilings", {}):
        out.append(C.blas_note(d["ceilings"]))
    out.append(f"Machine load: before {d['load_before'].get('other_cores_busy')} other cores busy, after "
               f"{d['load_after'].get('other_cores_busy')}; " + C.load_note(d["raw"]))
    return "\n".join(out)


if __name__ == "__main__":
    main()
