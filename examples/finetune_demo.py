"""Teach SmolLM2-135M-Instruct a new answer format with LoRA, scored exactly before and after.

    python examples/finetune_demo.py                  # ~10 minutes on 2 CPU cores
    python examples/finetune_demo.py --steps 5        # a quick look (little is learned)

Steps: make the data (examples/make_chat_data.py: 400 training additions answered "The answer is N.", 40
held-out ones with unseen operand pairs); score the embedded model on the held-out questions (greedy replies
that match the expected one exactly, and the mean loss on the assistant tokens); fine-tune a LoRA adapter
with `run.py finetune`'s code path; load the adapter, merge it, and score again. Everything lands in --out
(default runs/finetune_demo): data/, run/ (checkpoints, history.jsonl, loss.png, final/ = the PEFT adapter)
and results.json.

Measured once (AMD EPYC, 2 cores shared with other jobs, float32; LoRA r 8 on q/k/v/o, 35 steps of 8
conversations): exact match 0/40 -> 30/40, held-out loss on the assistant tokens 1.3614 -> 0.0592, 10.6 min.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import make_chat_data  # noqa: E402
from npllama import Llama, Tokenizer, lora  # noqa: E402
from npllama.cli import main as cli_main  # noqa: E402
from npllama.io.defaults import default_model_path  # noqa: E402
from npllama.train import encode_chat  # noqa: E402
from npllama.train.sft import Example, pad_batch  # noqa: E402

TARGETS = "q_proj,k_proj,v_proj,o_proj"


def score(model: Any, tok: Any, held: list[dict], batch: int = 20) -> dict[str, Any]:
    """Exact-match rate of greedy replies, and the mean loss over the assistant tokens, on held-out chats."""
    prompts = [tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True) for r in held]
    want = [r["messages"][-1]["content"] for r in held]
    replies = []
    for i in range(0, len(prompts), batch):
        outs = model.generate(prompts[i:i + batch], max_new_tokens=12, temperature=0.0, eos_ids=tok.eos_ids)
        replies += [tok.decode(o).strip() for o in outs]
    exact = sum(r == w for r, w in zip(replies, want))
    total, count = 0.0, 0
    for i in range(0, len(held), batch):
        rows = [Example(*(np.asarray(a) for a in encode_chat(tok, r["messages"]))) for r in held[i:i + batch]]
        x, y = pad_batch(rows)
        n = int((y != -100).sum())
        total += float(model.loss(x, y)) * n
        count += n
    return {"exact_match": exact / len(held), "exact": exact, "n": len(held), "heldout_loss": total / count,
            "examples": [{"question": h["messages"][0]["content"], "reply": r} for h, r in zip(held[:3], replies)]}


def show(name: str, s: dict[str, Any]) -> None:
    print(f"{name}: exact match {s['exact']}/{s['n']} ({100 * s['exact_match']:.1f}%), "
          f"held-out loss on assistant tokens {s['heldout_loss']:.4f}")
    for e in s["examples"]:
        print(f"    {e['question']!r} -> {e['reply']!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/finetune_demo", help="output folder (default runs/finetune_demo)")
    ap.add_argument("--steps", type=int, default=35)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lora-r", type=int, default=8)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    data = os.path.join(args.out, "data")
    os.makedirs(data, exist_ok=True)
    train, held = make_chat_data.make()
    make_chat_data.write(train, os.path.join(data, "train.jsonl"))
    make_chat_data.write(held, os.path.join(data, "heldout.jsonl"))
    print(f"data: {len(train)} training and {len(held)} held-out conversations in {data}")

    path = default_model_path()
    tok = Tokenizer.from_pretrained(path)
    model = Llama.from_pretrained(path, dtype="float32")
    t = time.perf_counter()
    before = score(model, tok, held)
    t_score = time.perf_counter() - t
    show("before", before)

    run = os.path.join(args.out, "run")
    cmd = ["finetune", "--data", os.path.join(data, "train.jsonl"), "--out", run, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--seq-len", "64", "--lr", str(args.lr), "--warmup", "3",
           "--lora-r", str(args.lora_r), "--lora-alpha", str(2 * args.lora_r), "--lora-targets", TARGETS,
           "--val-fraction", "0.05", "--eval-every", "10", "--eval-batches", "1", "--save-every", "10",
           "--log-every", "1"]
    if os.path.exists(os.path.join(run, "checkpoints", "latest")):
        cmd = ["finetune", "--out", run, "--resume"]          # an interrupted demo continues where it stopped
    print("$ python run.py " + " ".join(cmd), flush=True)
    t = time.perf_counter()
    rc = cli_main(cmd)
    t_train = time.perf_counter() - t
    if rc != 0:
        return rc

    lora.load(model, os.path.join(run, "final"))
    lora.merge(model)
    after = score(model, tok, held)
    show("after", after)
    wall = time.perf_counter() - t0
    res = {"before": before, "after": after, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
           "lora_r": args.lora_r, "targets": TARGETS, "train_s": t_train, "score_s": t_score, "wall_s": wall}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"wall time {wall / 60:.1f} min (fine-tune {t_train / 60:.1f} min, one scoring pass {t_score:.0f} s); "
          f"results in {os.path.join(args.out, 'results.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
