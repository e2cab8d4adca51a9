"""The backend-independent parts of the GPU work, run on NumPy: the fused-kernel dispatch takes the plain
path, the TF32 switch is a no-op off by default, and the static decode step (what a CUDA graph captures,
here with the model's own layer operations) gives what the model's own KV-cache forward gives."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import npllama
from npllama.backend import fused_kernels, int_range, is_cupy, tf32, tf32_enabled
from npllama.fast.decode import DecodeStep, GraphDecoder, decode_tables
from conftest import rel_err

# every attention layout, biases, tied embeddings and each rope type whose table depends on position only
# (default, linear, llama3) or also on the sequence length (dynamic, past max_position_embeddings)
DECODE_CONFIGS = {
    "gqa-default": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa-bias-tied-linear": dict(num_attention_heads=4, num_key_value_heads=1, attention_bias=True, mlp_bias=True,
                                 tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mha-headdim-dynamic": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=12,
                                rope_scaling={"rope_type": "dynamic", "factor": 3.0}),
    "gqa-llama3": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
}


def small_model(name: str = "gqa-default", dtype: str = "float64", **kw) -> npllama.Llama:
    cfg = npllama.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, vocab_size=61,
                              max_position_embeddings=12, **DECODE_CONFIGS[name])
    return npllama.Llama.init(cfg, seed=3, dtype=dtype, std=0.2, **kw)


def test_dispatch_takes_the_plain_path_on_numpy():
    x = np.zeros((2, 3), dtype=np.float32)
    assert fused_kernels(x, True) is None and fused_kernels(x, False) is None
    assert not is_cupy(x) and not is_cupy(3.0)
    m = small_model()
    assert m.fused is False and m.tf32 is False           # defaults on NumPy


def test_fused_flag_changes_nothing_on_numpy():
    a, b = small_model(fused=True), small_model(fused=False)
    ids = np.random.default_rng(0).integers(0, 61, (2, 9))
    targets = np.roll(ids, -1, axis=1)
    targets[0, :2] = -100
    la, ga = a.loss_and_grads(ids, targets)
    lb, gb = b.loss_and_grads(ids, targets)
    assert la == lb
    for k in ga:
        np.testing.assert_array_equal(ga[k], gb[k])


def test_tf32_is_a_noop_on_numpy_and_off_by_default():
    assert tf32_enabled(np) is False
    with tf32(np, True):
        assert tf32_enabled(np) is False                  # NumPy has no TF32: nothing to switch
    m = small_model(dtype="float32", tf32=True)
    assert m.tf32 is True
    np.testing.assert_array_equal(m.forward([[1, 2, 3]]), small_model(dtype="float32").forward([[1, 2, 3]]))


def test_int_range_and_out_of_range_ids():
    assert int_range(np.array([[3, -2], [7, 0]])) == (-2, 7)
    m = small_model()
    with pytest.raises(ValueError, match="token id 61 is out of range"):
        m.forward([[1, 61]])
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        m.forward(np.array([[-1, 3]]))


@pytest.mark.parametrize("name", DECODE_CONFIGS)
def test_decode_tables_are_the_models_per_position_tables(name):
    m = small_model(name)
    cos, sin = decode_tables(m.config, 20, m.dtype)          # past max_position_embeddings = 12
    for p in range(20):
        c, s = m._rope_tables(1, p, None)                    # what a plain decoding step at p uses
        np.testing.assert_array_equal(cos[p], c.reshape(-1))
        np.testing.assert_array_equal(sin[p], s.reshape(-1))


def _greedy(model, dec, prompt, steps):
    """Greedy decoding with the model's forward (dec None) or a decoder; -> tokens, list of step logits."""
    target = model if dec is None else dec
    B, L = prompt.shape
    cache = target.new_cache(B, L + steps)
    logits = target.forward(prompt, cache=cache, start_pos=0, last_only=True)
    toks, outs = [], []
    for t in range(steps):
        nxt = logits[:, -1].argmax(axis=-1)[:, None]
        toks.append(nxt[:, 0].tolist())
        logits = target.forward(nxt, cache=cache, start_pos=L + t, last_only=True)
        outs.append(np.asarray(logits))
    return toks, outs


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("name", DECODE_CONFIGS)
def test_static_decode_step_matches_the_model(name, dtype, tol):
    m = small_model(name, dtype)
    dec = GraphDecoder(m)                                    # NumPy: the static step, eager, plain operations
    assert dec.graph is False and dec.kernels is False
    calls = []
    step_call = DecodeStep.__call__
    prompt = np.random.default_rng(1).integers(0, 61, (2, 5))
    try:
        DecodeStep.__call__ = lambda self: calls.append(1) or step_call(self)
        toks, outs = _greedy(m, dec, prompt, 15)             # runs past max_position_embeddings
    finally:
        DecodeStep.__call__ = step_call
    ref_toks, ref_outs = _greedy(m, None, prompt, 15)
    assert len(calls) == 15                                  # every single-token step took the static path
    assert toks == ref_toks
    for a, b in zip(outs, ref_outs):
        assert a.dtype == m.dtype and a.shape == b.shape
        assert rel_err(a, b) <= tol


def test_decoder_falls_back_to_the_model_for_prompts_and_padding():
    m = small_model()
    dec = GraphDecoder(m)
    cache = dec.new_cache(2, 10)
    assert dec.new_cache(2, 10) is cache                     # same shape: cache (and graph) reused
    ids = np.array([[0, 5, 6], [7, 8, 9]])
    pos = np.array([[0, 0, 1], [0, 1, 2]])
    mask = np.array([[False, True, True], [True, True, True]])
    ref_cache = m.new_cache(2, 10)
    a = dec.forward(ids, cache=cache, positions=pos, attn_mask=mask)
    b = m.forward(ids, cache=ref_cache, positions=pos, attn_mask=mask)
    np.testing.assert_array_equal(a, b)
    step_mask = np.ones((2, 4), dtype=bool)
    step_mask[0, 0] = False
    a = dec.forward([[1], [2]], cache=cache, start_pos=3, positions=[[2], [3]], attn_mask=step_mask)
    b = m.forward([[1], [2]], cache=ref_cache, start_pos=3, positions=[[2], [3]], attn_mask=step_mask)
    np.testing.assert_array_equal(a, b)
    assert dec.config is m.config and dec.dtype == m.dtype   # looks like the model to a caller


def test_decoder_refuses_what_needs_a_gpu_and_bad_input():
    m = small_model()
    with pytest.raises(ValueError, match="backend='cupy'"):
        GraphDecoder(m, graph=True)
    with pytest.raises(ValueError, match="backend='cupy'"):
        GraphDecoder(m, kernels=True)
    dec = GraphDecoder(m)
    with pytest.raises(RuntimeError, match="new_cache"):
        dec.decode([1], 0)
    dec.new_cache(1, 4)
    with pytest.raises(ValueError, match="out of range"):
        dec.decode([61], 0)
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        dec.decode([1], 4)
    with pytest.raises(ValueError, match="batch"):
        dec.decode([1, 2], 0)


@pytest.mark.skipif(importlib.util.find_spec("npllama.generate") is None, reason="npllama.generate not on this branch")
def test_generate_cuda_graph_needs_cupy():
    m = small_model()
    with pytest.raises(ValueError, match="backend='cupy'"):
        m.generate([1, 2, 3], max_new_tokens=2, cuda_graph=True)
