"""Each layer's backward, reference (npllama.layers) and fast (npllama.fast), against central finite
differences in float64 (NumPy only, no torch)."""
from __future__ import annotations

import numpy as np
import pytest

from npllama.config import LlamaConfig
from npllama.fast import attention as fast_attention, loss as fast_loss, mlp as fast_mlp, rmsnorm as fast_rmsnorm
from npllama.layers import attention, embedding, linear, loss, mlp, rmsnorm, rope

rng = np.random.default_rng(0)
EPS = 1e-6


def numgrad(f, x, n_samples=None):
    """Central differences of scalar f at (a sample of) the entries of x, in place."""
    g = np.zeros(x.shape)
    idx = range(x.size) if n_samples is None else rng.choice(x.size, min(n_samples, x.size), replace=False)
    for i in idx:
        at = np.unravel_index(i, x.shape)   # not x.reshape(-1)[i]: a transposed view (fast.storage) would copy
        old = x[at]
        x[at] = old + EPS
        fp = f()
        x[at] = old - EPS
        fm = f()
        x[at] = old
        g[at] = (fp - fm) / (2 * EPS)
    return g, list(idx)


def check(analytic, f, x, n_samples=None, tol=1e-7):
    num, idx = numgrad(f, x, n_samples)
    a, n = analytic.reshape(-1)[idx], num.reshape(-1)[idx]
    assert np.abs(a - n).max() <= tol * max(1.0, np.abs(n).max()), (np.abs(a - n).max(), np.abs(n).max())


def test_linear():
    x, W, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    R = rng.standard_normal((2, 3, 4))
    f = lambda: float((linear.forward(x, W, b)[0] * R).sum())
    dx, dW, db = linear.backward(R, linear.forward(x, W, b)[1])
    check(dx, f, x)
    check(dW, f, W)
    check(db, f, b)


def test_embedding_with_repeated_ids():
    W = rng.standard_normal((7, 3))
    ids = np.array([[1, 1, 4], [6, 1, 4]])
    R = rng.standard_normal((2, 3, 3))
    dW = embedding.backward(R, embedding.forward(ids, W)[1])
    check(dW, lambda: float((embedding.forward(ids, W)[0] * R).sum()), W)
    assert np.abs(dW[1]).sum() > 0 and np.all(dW[0] == 0)


@pytest.mark.parametrize("impl", [rmsnorm, fast_rmsnorm])
def test_rmsnorm(impl):
    x, w = rng.standard_normal((2, 3, 6)), rng.standard_normal(6)
    R = rng.standard_normal((2, 3, 6))
    f = lambda: float((impl.forward(x, w, 1e-5)[0] * R).sum())
    dx, dw = impl.backward(R, impl.forward(x, w, 1e-5)[1])
    check(dx, f, x)
    check(dw, f, w)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 4}])
def test_rope(scaling):
    cfg = LlamaConfig(hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, vocab_size=5,
                      max_position_embeddings=4, rope_scaling=scaling)
    cos, sin = rope.tables(cfg, np.arange(6), np.float64)
    x = rng.standard_normal((2, 6, 2, 8))
    R = rng.standard_normal((2, 6, 2, 8))
    dx = rope.apply_backward(R, cos, sin)
    check(dx, lambda: float((rope.apply(x, cos, sin) * R).sum()), x)


def stack(p, stacked, names):
    """The model's layout: the named projections as row blocks of one matrix, the entries views of it."""
    for kind in ("weight", "bias"):
        if f"{names[0]}.{kind}" in p:
            W = np.concatenate([p[f"{n}.{kind}"] for n in names])
            p[f"{stacked}.{kind}"] = W
            bounds = np.cumsum([0] + [p[f"{n}.{kind}"].shape[0] for n in names])
            for n, a, b in zip(names, bounds[:-1], bounds[1:]):
                p[f"{n}.{kind}"] = W[a:b]
    return p


def attention_weights(rng, D, H, KV, hd, bias, scale):
    """Random q/k/v/o weights (and biases when `bias`) of one attention layer, one array per HF name."""
    p = {f"{n}.weight": rng.standard_normal(shape) * scale
         for n, shape in (("q_proj", (H * hd, D)), ("k_proj", (KV * hd, D)), ("v_proj", (KV * hd, D)),
                          ("o_proj", (D, H * hd)))}
    if bias:
        for n, k in (("q_proj", H), ("k_proj", KV), ("v_proj", KV)):
            p[n + ".bias"] = rng.standard_normal(k * hd)
        p["o_proj.bias"] = rng.standard_normal(D)
    return p


# reference; fast with separate and stacked projections; fast in 3 query blocks of 2
@pytest.mark.parametrize("impl,stacked,block", [(attention, False, 0), (fast_attention, False, 64),
                                                (fast_attention, True, 64), (fast_attention, True, 2)])
@pytest.mark.parametrize("H,KV,bias", [(4, 4, False), (4, 2, True), (6, 1, False)])
def test_attention_block(H, KV, bias, impl, stacked, block, monkeypatch):
    monkeypatch.setattr(fast_attention, "BLOCK", block)
    D, hd, B, T = 12, 4, 2, 5
    cfg = LlamaConfig(hidden_size=D, intermediate_size=8, num_hidden_layers=1, num_attention_heads=H,
                      num_key_value_heads=KV, head_dim=hd, vocab_size=5)
    cos, sin = rope.tables(cfg, np.arange(T), np.float64)
    p = attention_weights(rng, D, H, KV, hd, bias, 0.5)
    if stacked:
        p = stack(p, "qkv_proj", ("q_proj", "k_proj", "v_proj"))
    x = rng.standard_normal((B, T, D))
    R = rng.standard_normal((B, T, D))
    f = lambda: float((impl.forward(x, p, cos, sin, H, KV, hd)[0] * R).sum())
    dx, grads = impl.backward(R, impl.forward(x, p, cos, sin, H, KV, hd)[1])
    check(dx, f, x, n_samples=40)
    assert set(grads) == {k for k in p if not k.startswith("qkv_proj")}
    for k in grads:
        check(grads[k], f, p[k], n_samples=25)   # perturbing a view perturbs the stacked matrix


@pytest.mark.parametrize("impl,stacked", [(mlp, False), (fast_mlp, False), (fast_mlp, True)])
def test_mlp_with_bias(impl, stacked):
    D, I = 6, 10
    p = {"gate_proj.weight": rng.standard_normal((I, D)), "up_proj.weight": rng.standard_normal((I, D)),
         "down_proj.weight": rng.standard_normal((D, I)), "gate_proj.bias": rng.standard_normal(I),
         "up_proj.bias": rng.standard_normal(I), "down_proj.bias": rng.standard_normal(D)}
    if stacked:
        p = stack(p, "gate_up_proj", ("gate_proj", "up_proj"))
    x = rng.standard_normal((2, 3, D))
    R = rng.standard_normal((2, 3, D))
    f = lambda: float((impl.forward(x, p)[0] * R).sum())
    dx, grads = impl.backward(R, impl.forward(x, p)[1])
    check(dx, f, x)
    assert set(grads) == {k for k in p if not k.startswith("gate_up_proj")}
    for k in grads:
        check(grads[k], f, p[k], n_samples=30)


@pytest.mark.parametrize("impl", [loss, fast_loss])
def test_cross_entropy_with_ignore_index(impl):
    logits = rng.standard_normal((6, 9)) * 3
    t = np.array([1, -100, 8, 0, -100, 3])
    d = impl.backward(1.0, impl.forward(logits.copy(), t)[1])
    check(d, lambda: impl.forward(logits, t)[0], logits)
    assert np.all(d[[1, 4]] == 0)
    # mean over the 4 counted targets only
    lse = np.log(np.exp(logits).sum(-1))
    expect = np.mean([lse[i] - logits[i, t[i]] for i in (0, 2, 3, 5)])
    assert abs(impl.forward(logits, t)[0] - expect) < 1e-12


@pytest.mark.parametrize("reference", [True, False])
def test_whole_model_fd(reference):
    from npllama import Llama
    cfg = LlamaConfig(hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=11, tie_word_embeddings=True, attention_bias=True)
    model = Llama.init(cfg, seed=1, dtype="float64", std=0.4, reference=reference)
    ids = rng.integers(0, 11, (2, 5))
    tg = rng.integers(0, 11, (2, 5))
    _, grads = model.loss_and_grads(ids, tg)
    for k, p in model.params.items():
        check(grads[k], lambda: model.loss(ids, tg), p, n_samples=6)
