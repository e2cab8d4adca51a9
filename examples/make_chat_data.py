"""Make a small chat SFT set, seeded, no downloads: two-number additions answered in one fixed format.

    python examples/make_chat_data.py --out runs/arith          # train.jsonl (400) + heldout.jsonl (40)

The user asks for a sum in one of a few phrasings ("What is 17 + 25?", "Add 17 and 25.", ...); the assistant
answers exactly "The answer is 42." SmolLM2-135M-Instruct answers such questions in its own words ("17 + 25 =
42", a sentence, sometimes a wrong sum), so the behaviour is new to it and can be scored exactly: the reply
matches or it does not. The held-out questions use operand pairs that never occur in the training set.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

QUESTIONS = ("What is {a} + {b}?", "What's {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.",
             "How much is {a} plus {b}?", "{a} + {b} = ?")


def answer(a: int, b: int) -> str:
    """The one reply format the fine-tune teaches."""
    return f"The answer is {a + b}."


def conversation(a: int, b: int, phrasing: int) -> dict:
    """One {"messages": [...]} record."""
    return {"messages": [{"role": "user", "content": QUESTIONS[phrasing].format(a=a, b=b)},
                         {"role": "assistant", "content": answer(a, b)}]}


def make(n_train: int = 400, n_heldout: int = 40, seed: int = 0, low: int = 10, high: int = 99) -> tuple[list, list]:
    """(train, held-out) records; the held-out operand pairs are disjoint from the training ones."""
    rng = np.random.default_rng(seed)
    pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
    order = rng.permutation(len(pairs))[:n_train + n_heldout]
    chosen = [pairs[i] for i in order]
    phr = rng.integers(0, len(QUESTIONS), len(chosen))
    recs = [conversation(a, b, int(p)) for (a, b), p in zip(chosen, phr)]
    return recs[:n_train], recs[n_train:]


def write(records: list, path: str) -> None:
    """One JSON object per line (written whole, then renamed)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/arith", help="output folder (default runs/arith)")
    ap.add_argument("--train", type=int, default=400, help="training conversations (default 400)")
    ap.add_argument("--heldout", type=int, default=40, help="held-out conversations (default 40)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    train, held = make(args.train, args.heldout, args.seed)
    write(train, os.path.join(args.out, "train.jsonl"))
    write(held, os.path.join(args.out, "heldout.jsonl"))
    print(f"wrote {len(train)} training and {len(held)} held-out conversations to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
