"""Host inference (npllama.fast.infer: InferOps for every forward, StepOps for one token per row through the
KV cache) equals the reference layers in float64: layer by layer with padding masks, per-row rotary positions,
biases and the row blocks shared over threads, and end to end through prefill, greedy and ragged-batch
generation. The model must actually take these paths."""
from __future__ import annotations

import numpy as np
import pytest

import npllama
from conftest import CONFIGS, hf_model, rel_err
from npllama.config import LlamaConfig
from npllama.fast import mlp as fast_mlp, rope as fast_rope, threads
from npllama.fast.infer import InferOps, StepOps, project
from npllama.kvcache import KVCache
from npllama.layers import attention, mlp, rmsnorm, rope
from npllama.transformer import Context
from test_layers_fd import attention_weights, stack

TOL = 1e-12


def close(a, b, tol=TOL):
    assert a.shape == b.shape and a.dtype == b.dtype == np.float64
    assert rel_err(a, b) <= tol, rel_err(a, b)


@pytest.mark.parametrize("per_row_positions", [False, True])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("H,KV,hd,bias", [(4, 4, 8, False), (6, 2, 4, True), (4, 1, 12, False)])
def test_step_attention_equals_reference(H, KV, hd, bias, padding, per_row_positions):
    rng = np.random.default_rng(1)
    B, D, start, S_max = 3, 16, 6, 10
    cfg = LlamaConfig(hidden_size=D, intermediate_size=8, num_hidden_layers=1, num_attention_heads=H,
                      num_key_value_heads=KV, head_dim=hd, vocab_size=5, rope_scaling={"rope_type": "linear",
                                                                                          "factor": 2.0})
    p = attention_weights(rng, D, H, KV, hd, bias, 0.4)
    pf = stack(dict(p), "qkv_proj", ("q_proj", "k_proj", "v_proj"))
    x = rng.standard_normal((B, 1, D))
    if per_row_positions:                                    # left padding: each row's own position
        cos, sin = rope.tables(cfg, np.array([[start], [start - 2], [start - 4]]), np.float64)
    else:
        cos, sin = rope.tables(cfg, np.array([start]), np.float64)
    key_mask = None
    if padding:
        key_mask = np.ones((B, start + 1), dtype=bool)
        key_mask[1, :2] = False
        key_mask[2, :4] = False
    earlier = rng.standard_normal((2, B, KV, S_max, hd))
    kv_ref = (earlier[0].copy(), earlier[1].copy())
    y_ref, _ = attention.forward(x, p, cos, sin, H, KV, hd, kv=kv_ref, start_pos=start, key_mask=key_mask)
    cache = KVCache(1, B, KV, S_max, hd, np.float64, np)
    cache.k[0][...], cache.v[0][...] = earlier[0], earlier[1]
    ops = StepOps(cfg)
    y, none = ops.attention(x, pf, 0, Context(cos, sin, cache, start, key_mask, grad=False))
    assert none is None
    close(y, y_ref)
    close(cache.k[0], kv_ref[0])
    close(cache.v[0], kv_ref[1])


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_infer_mlp_and_rmsnorm_equal_reference(bias, shared, monkeypatch, two_blas_threads):
    rng = np.random.default_rng(2)
    D, I, B = 12, 20, 3
    p = {"gate_proj.weight": rng.standard_normal((I, D)), "up_proj.weight": rng.standard_normal((I, D)),
         "down_proj.weight": rng.standard_normal((D, I))}
    if bias:
        p.update({"gate_proj.bias": rng.standard_normal(I), "up_proj.bias": rng.standard_normal(I),
                  "down_proj.bias": rng.standard_normal(D)})
    pf = stack(dict(p), "gate_up_proj", ("gate_proj", "up_proj"))
    calls = []
    if shared:                                          # every size is shared out, in 4 row blocks of 7 tokens x 2
        monkeypatch.setattr(fast_mlp, "PARALLEL_MIN", 0)
        real = threads.share
        monkeypatch.setattr(threads, "share", lambda jobs: calls.append(len(jobs)) or real(jobs))
    ops = InferOps(LlamaConfig(hidden_size=D, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2,
                               vocab_size=5, rms_norm_eps=1e-6))
    for T in (1, 7):                                    # a decoding step's shape and a prompt's
        x, w = rng.standard_normal((B, T, D)), rng.standard_normal(D)
        y, none = ops.mlp(x, pf)
        assert none is None
        close(y, mlp.forward(x, p)[0])
        close(ops.rmsnorm(x, w)[0], rmsnorm.forward(x, w, 1e-6)[0])
    assert calls == ([3, 4] if shared else [])


@pytest.mark.parametrize("per_row", [False, True])
def test_rotation_is_the_reference_bit_for_bit(per_row):
    rng = np.random.default_rng(4)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, vocab_size=5)
    pos = rng.integers(0, 30, (2, 5)) if per_row else np.arange(3, 8)
    cos, sin = rope.tables(cfg, pos, np.float64)
    x = rng.standard_normal((2, 5, 3, 8))
    np.testing.assert_array_equal(fast_rope.apply(x, cos, sin), rope.apply(x, cos, sin))
    np.testing.assert_array_equal(fast_rope.apply_backward(x, cos, sin), rope.apply_backward(x, cos, sin))


def _models(name, save_hf):
    d = save_hf(hf_model(**CONFIGS[name]))
    return (npllama.Llama.from_pretrained(d, dtype="float64"),
            npllama.Llama.from_pretrained(d, dtype="float64", reference=True))


@pytest.mark.parametrize("name", ["gqa-tied-linear", "bias-llama3", "mqa-headdim-dynamic"])
def test_decoding_takes_the_step_and_equals_reference(name, save_hf, monkeypatch):
    fast, ref = _models(name, save_hf)
    taken, prefills = [], []
    real, real_mlp = StepOps.attention, InferOps.mlp
    monkeypatch.setattr(StepOps, "attention", lambda self, *a: taken.append(1) or real(self, *a))
    monkeypatch.setattr(InferOps, "mlp", lambda self, x, w: prefills.append(x.shape[1]) or real_mlp(self, x, w))
    r = np.random.default_rng(3)
    prompt = r.integers(0, 97, (2, 7))
    outs = []
    for m in (fast, ref):
        cache = m.new_cache(2, 20)
        steps = [m.forward(prompt, cache=cache, last_only=True)]
        for t in range(10):
            nxt = steps[-1][:, -1].argmax(axis=-1)[:, None]
            steps.append(m.forward(nxt, cache=cache, start_pos=7 + t, last_only=True))
        outs.append(np.concatenate(steps, axis=1))
    n = fast.config.num_hidden_layers
    assert len(taken) == 10 * n                              # every decoding step, no prefill
    assert prefills == [7] * n + [1] * 10 * n                # the prefill took InferOps too
    close(outs[0], outs[1])
    # a ragged batch: left padding, per-row positions and the padding mask through the step
    prompts = [r.integers(0, 97, 9).tolist(), r.integers(0, 97, 3).tolist(), r.integers(0, 97, 6).tolist()]
    assert fast.generate(prompts, max_new_tokens=8, eos_ids=[]) == ref.generate(prompts, max_new_tokens=8, eos_ids=[])


def test_layers_it_cannot_take_go_to_the_general_path(save_hf):
    fast, ref = _models("gqa-tied-linear", save_hf)
    # a rebound projection leaves the stacked product: the step must not read the stale stacked matrix
    k = "model.layers.1.self_attn.k_proj.weight"
    for m in (fast, ref):
        m.params[k] = m.params[k] * 1.5
    prompt = [5, 17, 3, 60]
    assert fast.generate(prompt, max_new_tokens=10, eos_ids=[]) == ref.generate(prompt, max_new_tokens=10, eos_ids=[])
    cache_f, cache_r = fast.new_cache(1, 8), ref.new_cache(1, 8)
    fast.forward(np.array([prompt]), cache=cache_f)
    ref.forward(np.array([prompt]), cache=cache_r)
    close(fast.forward(np.array([[9]]), cache=cache_f, start_pos=4), ref.forward(np.array([[9]]), cache=cache_r, start_pos=4))


@pytest.mark.parametrize("rows", [1, 2, 8, 16, 17, 64])
def test_project_takes_either_product_form(rows):
    rng = np.random.default_rng(6)
    W = rng.standard_normal((24, 10))
    x = rng.standard_normal((rows, 10))
    for w in (W, np.ascontiguousarray(W.T).T):           # stored (out, in), and (in, out) behind a view
        close(project(x, w), x @ W.T)
