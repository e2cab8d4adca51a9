"""Fine-tuning step on SmolLM2-135M-Instruct, float32: LoRA (npllama vs PEFT) and full (npllama vs PyTorch).

    python bench/bench_finetune.py [--modes lora,full] [--steps 5] [--batch 4] [--seq 256] [--r 8]

One step = loss and the gradients of what trains, then one AdamW update of it.
  lora     r 8, alpha 16, q_proj and v_proj (PEFT's default targets for Llama), the base frozen
             npllama   npllama.lora.add + model.loss_and_grads + AdamW over model.trainable
             npllama-noskip  the same, but every frozen linear still computes its weight gradient
                       (and throws it away): what skipping the frozen products saves
             peft      peft.get_peft_model(LoraConfig(...)) on transformers' LlamaForCausalLM, eager
  full     every weight trains: npllama loss_and_grads + AdamW vs LlamaForCausalLM + torch.optim.AdamW
The weights are bench_smollm2's float32 HF dir (dequantized once from the Q4_1 GGUF). Each side runs in a
process of its own (its peak RSS is its own); medians over --steps steps after one warm-up step.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

LR, WD = 1e-4, 0.0
R, ALPHA, TARGETS = 8, 16, ("q_proj", "v_proj")


def side(which: str, mode: str, path: str, a: argparse.Namespace) -> dict:
    import numpy as np
    V = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
    batch = np.random.default_rng(0).integers(0, V, (a.batch, a.seq + 1))
    ids, targets = batch[:, :-1], batch[:, 1:]
    res: dict = {"side": which, "mode": mode}
    if which.startswith("npllama"):
        import npllama
        from npllama import lora
        model = npllama.Llama.from_pretrained(path, dtype="float32")
        if mode == "lora":
            lora.add(model, r=a.r, alpha=ALPHA, targets=TARGETS)
            if which == "npllama-noskip":
                from npllama.layers import linear
                real = linear.forward
                linear.forward = lambda x, W, b=None, frozen=False: real(x, W, b, False)
        opt = npllama.AdamW({k: model.params[k] for k in model.trainable}, lr=LR, weight_decay=WD)
        res["trainable"] = int(sum(model.params[k].size for k in model.trainable))

        def step() -> float:
            loss, grads = model.loss_and_grads(ids, targets)
            opt.step(grads)
            return loss
    else:
        import torch
        from transformers import LlamaForCausalLM
        res["threads"] = torch.get_num_threads()
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        if mode == "lora":
            import peft
            model = peft.get_peft_model(model, peft.LoraConfig(r=a.r, lora_alpha=ALPHA, target_modules=list(TARGETS),
                                                               lora_dropout=0.0, task_type="CAUSAL_LM"))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        res["trainable"] = int(sum(p.numel() for p in params))
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
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


SIDES = {"lora": ("npllama", "npllama-noskip", "peft"), "full": ("npllama", "torch")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up (median reported)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=R)
    ap.add_argument("--hf-dir", default=None, help="a float32 HF model dir (default: SmolLM2 from the GGUF)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-retry", action="store_true")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.side:
        C.emit(side(a.side, a.mode, a.path, a))
        return {}
    if a.hf_dir:
        path = a.hf_dir
    else:
        import bench_smollm2
        path = bench_smollm2.prepare(C.cache_dir())["hf_dir"]
    data: dict = {"workload": f"fine-tuning step, batch {a.batch} x {a.seq}, float32", "machine": C.machine_info(),
                  "load_before": C.other_load()}
    data["ceilings"], _ = C.run_child([os.path.join(C.ROOT, "bench", "_common.py"), "ceilings"])
    have_torch = importlib.util.find_spec("torch") is not None
    have_peft = have_torch and importlib.util.find_spec("peft") is not None
    raw: dict = {}
    for mode in a.modes.split(","):
        for s in SIDES[mode]:
            key = f"{mode} {s}"
            if (s == "peft" and not have_peft) or (s == "torch" and not have_torch):
                raw[key] = {"error": f"skipped: {'peft' if s == 'peft' else 'torch'} is not installed "
                                     "(pip install 'npllama[bench]')"}
                continue
            print(f"-- {key}", file=sys.stderr, flush=True)
            raw[key] = C.run_side([os.path.abspath(__file__), "--side", s, "--mode", mode, "--path", path,
                                   "--steps", str(a.steps), "--batch", str(a.batch), "--seq", str(a.seq),
                                   "--r", str(a.r)], retry_busy=not a.no_retry)
    data["raw"] = raw
    data["load_after"] = C.other_load()
    tok = a.batch * a.seq
    summ = {}
    for k, r in raw.items():
        if "error" in r:
            summ[k] = {"error": r["error"]}
            continue
        summ[k] = {"step_s": round(C.med(r["step_s"]), 4), "tok_s": round(tok / C.med(r["step_s"]), 1),
                   "peak_rss_mb": round(r["peak_rss_mb"], 1), "trainable": r["trainable"],
                   "first_loss": round(r["losses"][0], 5)}
    data["summary"] = summ
    data["ratios"] = {}
    for mode, peer in (("lora", "peft"), ("full", "torch")):
        n, t = summ.get(f"{mode} npllama", {}), summ.get(f"{mode} {peer}", {})
        if "tok_s" in n and "tok_s" in t:
            data["ratios"][f"{mode}: npllama / {peer}"] = {"tok_s": C.ratio(n["tok_s"], t["tok_s"]),
                                                           "peak_rss_mb": C.ratio(n["peak_rss_mb"], t["peak_rss_mb"])}
    n, ns = summ.get("lora npllama", {}), summ.get("lora npllama-noskip", {})
    if "tok_s" in n and "tok_s" in ns:
        data["ratios"]["lora: skipping frozen products (npllama / npllama-noskip)"] = {
            "tok_s": C.ratio(n["tok_s"], ns["tok_s"]), "peak_rss_mb": C.ratio(n["peak_rss_mb"], ns["peak_rss_mb"])}
    C.write_outputs("finetune", data, render(data, a), a.out)
    return data


def render(d: dict, a: argparse.Namespace) -> str:
    rows = []
    for k, v in d["summary"].items():
        if "error" in v:
            rows.append([k, v["error"][:90], None, None, None, None])
        else:
            rows.append([k, v["step_s"], v["tok_s"], v["peak_rss_mb"], v["trainable"], v["first_loss"]])
    out = [f"### Fine-tuning step, SmolLM2-135M-Instruct float32, batch {a.batch} x {a.seq}; LoRA r {a.r} on "
           f"{'/'.join(TARGETS)} ({d['machine']['cores']} cores, {d['machine'].get('cpu', '?')})", "",
           C.md_table(["mode side", "step s (median)", "tok/s", "peak RSS MiB", "trainable params", "first loss"],
                      rows), ""]
    rr = [[k, r["tok_s"], r["peak_rss_mb"]] for k, r in d["ratios"].items()]
    if rr:
        out += ["Ratios (tok/s above 1 = faster; RSS below 1 = smaller):", "",
                C.md_table(["", "tok/s", "peak RSS"], rr), ""]
    if "blas" in d.get("ceilings", {}):
        out.append(C.blas_note(d["ceilings"]))
    out.append(f"Machine load: before {d['load_before'].get('other_cores_busy')} other cores busy, after "
               f"{d['load_after'].get('other_cores_busy')}; " + C.load_note(d["raw"]))
    return "\n".join(out)


if __name__ == "__main__":
    main()
