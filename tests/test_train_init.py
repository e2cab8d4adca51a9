"""A model trained from scratch: the init is reproducible from its seed, and the trained model's
HF-layout export loads in transformers with the same logits (float32, 1e-4)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import npllama
from npllama.config import LlamaConfig
from npllama.train.trainer import TrainConfig, Trainer

CONF = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=61, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True)


def test_init_reproducible_from_seed():
    cfg = LlamaConfig(**CONF)
    a, b, c = (npllama.Llama.init(cfg, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert not np.array_equal(a.params["model.embed_tokens.weight"], c.params["model.embed_tokens.weight"])
    w = a.params["model.layers.0.mlp.up_proj.weight"]
    assert abs(w.std() - 0.02) < 0.003 and (a.params["model.norm.weight"] == 1).all()


def test_trained_export_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = npllama.Llama.init(LlamaConfig(**CONF), seed=0)
    toks = (np.arange(3000) * 3 % 61).astype(np.uint16)
    Trainer(model, toks, None, TrainConfig(steps=15, batch_size=2, seq_len=16, lr=1e-2, warmup=2, eval_every=0,
                                            save_every=0, log_every=0), str(tmp_path / "run")).fit()
    out = str(tmp_path / "export")
    model.save_pretrained(out)
    assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is True
    hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = np.random.default_rng(1).integers(0, 61, (2, 20))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = model.forward(ids)
    assert np.abs(ours - ref).max() <= 1e-4
    init = npllama.Llama.init(LlamaConfig(**CONF), seed=0).forward(ids)
    assert np.abs(init - ref).max() > 1e-2                      # trained weights, not the init, were exported
