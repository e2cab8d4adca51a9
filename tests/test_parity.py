"""Logits of npllama vs PyTorch on the same saved weights: float64 against a float64-throughout
reference, float32 against stock transformers; KV-cache decoding against the full forward."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import npllama
import torch_reference
from conftest import CONFIGS, hf_model, rel_err

SHAPES = {  # (batch, seq): batch > 1 everywhere, up to 64 tokens (past max_position_embeddings=32 too)
    "mha-untied-default": (2, 64), "gqa-tied-linear": (3, 40), "mqa-headdim-dynamic": (2, 64),
    "bias-llama3": (2, 48), "gqa6-headdim-tied-theta": (4, 17), "mqa-untied-bias": (2, 33),
}


def _ids(cfg, B, T, seed=0):
    return np.random.default_rng(seed).integers(0, 97, (B, T))


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("name", CONFIGS)
def test_float64_matches_float64_reference(name, reference, save_hf):
    m = hf_model(**CONFIGS[name])
    d = save_hf(m)
    B, T = SHAPES[name]
    ids = _ids(m.config, B, T)
    ours = npllama.Llama.from_pretrained(d, dtype="float64", reference=reference).forward(ids)
    assert ours.dtype == np.float64
    sd = {k: v.double() for k, v in m.state_dict().items()}
    ref = torch_reference.forward(sd, m.config.to_dict(), torch.tensor(ids)).numpy()
    assert rel_err(ours, ref) <= 1e-10
    # the reference is the same model as stock transformers, up to its float32 islands
    with torch.no_grad():
        stock = m.double()(torch.tensor(ids)).logits.numpy()
    noise = rel_err(stock, ref)
    assert noise <= 1e-5, f"reference differs from stock transformers by {noise}, more than float32 noise"


@pytest.mark.parametrize("name", CONFIGS)
def test_float32_matches_stock_transformers(name, save_hf):
    m = hf_model(**CONFIGS[name])
    d = save_hf(m)
    B, T = SHAPES[name]
    ids = _ids(m.config, B, T, seed=1)
    ours = npllama.Llama.from_pretrained(d, dtype="float32").forward(ids)
    assert ours.dtype == np.float32
    with torch.no_grad():
        stock = m(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - stock).max() <= 1e-4


@pytest.mark.parametrize("name", ["mha-untied-default", "gqa-tied-linear", "mqa-headdim-dynamic", "bias-llama3"])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_kv_cache_decoding_equals_full_forward(name, dtype, tol, save_hf):
    m = hf_model(**CONFIGS[name])
    model = npllama.Llama.from_pretrained(save_hf(m), dtype=dtype)
    # dynamic rope changes its frequencies past max_position_embeddings, so compare below it
    T = 31 if "dynamic" in name else 48
    ids = _ids(m.config, 2, T, seed=2)
    full = model.forward(ids)
    cache = model.new_cache(2, T)
    steps = [model.forward(ids[:, :7], cache=cache, start_pos=0)]
    for t in range(7, T):
        steps.append(model.forward(ids[:, t:t + 1], cache=cache, start_pos=t))
    assert rel_err(np.concatenate(steps, axis=1), full) <= tol


def test_chunked_prefill_and_last_only(save_hf):
    model = npllama.Llama.from_pretrained(save_hf(hf_model(**CONFIGS["bias-llama3"])), dtype="float64")
    ids = _ids(None, 2, 30, seed=3)
    full = model.forward(ids)
    cache = model.new_cache(2, 40)
    a = model.forward(ids[:, :11], cache=cache)
    b = model.forward(ids[:, 11:], cache=cache, start_pos=11, last_only=True)
    assert rel_err(a, full[:, :11]) <= 1e-12
    assert b.shape == (2, 1, 97) and rel_err(b, full[:, -1:]) <= 1e-12


def test_left_padding_mask_and_positions_match_unpadded(save_hf):
    model = npllama.Llama.from_pretrained(save_hf(hf_model(**CONFIGS["gqa-tied-linear"])), dtype="float64")
    short = _ids(None, 1, 9, seed=4)
    pad = 5
    ids = np.concatenate([np.zeros((1, pad), dtype=short.dtype), short], axis=1)
    mask = np.arange(pad + 9)[None] >= pad
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    padded = model.forward(ids, positions=pos, attn_mask=mask)
    assert rel_err(padded[:, pad:], model.forward(short)) <= 1e-12


@pytest.mark.parametrize("torch_dtype,np_dtype", [(torch.bfloat16, "float32"), (torch.float16, "float32"),
                                                  (torch.bfloat16, "float64")])
def test_half_precision_checkpoints_widen_like_torch(torch_dtype, np_dtype, save_hf):
    m = hf_model(**CONFIGS["gqa-tied-linear"]).to(torch_dtype)
    d = save_hf(m)
    model = npllama.Llama.from_pretrained(d, dtype=np_dtype)
    tdt = torch.float32 if np_dtype == "float32" else torch.float64
    for k, v in m.state_dict().items():
        if k in model.params:
            np.testing.assert_array_equal(model.params[k], v.to(tdt).numpy(), err_msg=k)
    ids = _ids(None, 2, 20, seed=5)
    if np_dtype == "float32":
        # transformers widening the half-precision file itself (m.float() would keep a rounded rotary buffer)
        from transformers import LlamaForCausalLM
        wide = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            stock = wide(torch.tensor(ids)).logits.numpy()
        assert np.abs(model.forward(ids) - stock).max() <= 1e-4


def test_sharded_checkpoint_loads(save_hf):
    m = hf_model(**CONFIGS["mha-untied-default"])
    d = save_hf(m, max_shard_size="40KB")
    import os
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    ids = _ids(None, 1, 12)
    with torch.no_grad():
        stock = m(torch.tensor(ids)).logits.numpy()
    assert np.abs(npllama.Llama.from_pretrained(d).forward(ids) - stock).max() <= 1e-4


def test_params_hold_every_named_parameter(save_hf):
    for name in ("mha-untied-default", "gqa-tied-linear", "bias-llama3"):
        m = hf_model(**CONFIGS[name])
        model = npllama.Llama.from_pretrained(save_hf(m, name=name))
        named = dict(m.named_parameters())
        assert set(model.params) == set(named)
        for k, p in named.items():
            assert model.params[k].shape == tuple(p.shape), k


def test_save_pretrained_round_trips_through_transformers(tmp_path):
    from transformers import LlamaForCausalLM
    cfg = npllama.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=50, tie_word_embeddings=True, rms_norm_eps=1e-5,
                              rope_theta=5000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    model = npllama.Llama.init(cfg, seed=3, std=0.2)
    model.save_pretrained(str(tmp_path / "out"))
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager").eval()
    assert hf.config.rope_parameters["rope_theta"] == 5000.0
    ids = _ids(None, 2, 10) % 50
    with torch.no_grad():
        stock = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(model.forward(ids) - stock).max() <= 1e-4
    again = npllama.Llama.from_pretrained(str(tmp_path / "out"))
    for k in model.params:
        np.testing.assert_array_equal(again.params[k], model.params[k])
