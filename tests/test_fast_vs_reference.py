"""The speed layer (npllama.fast) equals the reference layers (npllama.layers) in float64, function by
function (forward and backward) and end to end (logits, every gradient, greedy KV-cache decoding), on
configurations with GQA/MQA, head_dim != hidden/heads, biases, every rope type, and sequence lengths that
are not a multiple of the attention's query block."""
from __future__ import annotations

import numpy as np
import pytest

import npllama
from conftest import CONFIGS, hf_model, rel_err
from npllama.config import LlamaConfig
from npllama.fast import attention as fast_attention, loss as fast_loss, mlp as fast_mlp
from npllama.fast import rmsnorm as fast_rmsnorm, rope as fast_rope
from npllama.fast import linear as fast_linear
from npllama.fast.linear import backward_split
from npllama.fast.storage import STACKED
from npllama.layers import attention, linear, loss, mlp, rmsnorm, rope
from test_layers_fd import attention_weights, stack

TOL = 1e-12
rng = np.random.default_rng(0)

ROPES = [None, {"rope_type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 3.0},
         {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 4}]


def close(a, b, tol=TOL):
    assert a.shape == b.shape and a.dtype == b.dtype == np.float64
    assert rel_err(a, b) <= tol, rel_err(a, b)


def grads_close(ga, gb):
    assert set(ga) == set(gb)
    for k in gb:
        close(ga[k], gb[k])


@pytest.mark.parametrize("scaling", ROPES)
@pytest.mark.parametrize("block", [64, 5])                  # T = 13: one block, or three with a partial last
@pytest.mark.parametrize("is_stacked", [False, True])
@pytest.mark.parametrize("H,KV,hd,bias", [(4, 4, 8, False), (6, 2, 4, True), (4, 1, 12, False)])
def test_attention(H, KV, hd, bias, is_stacked, block, scaling, monkeypatch):
    monkeypatch.setattr(fast_attention, "BLOCK", block)
    D, B, T = 16, 2, 13
    cfg = LlamaConfig(hidden_size=D, intermediate_size=8, num_hidden_layers=1, num_attention_heads=H,
                      num_key_value_heads=KV, head_dim=hd, vocab_size=5, max_position_embeddings=8,
                      rope_scaling=scaling)
    cos, sin = rope.tables(cfg, np.arange(T), np.float64)
    p = attention_weights(rng, D, H, KV, hd, bias, 0.4)
    pf = stack(dict(p), "qkv_proj", ("q_proj", "k_proj", "v_proj")) if is_stacked else p
    x, dy = rng.standard_normal((B, T, D)), rng.standard_normal((B, T, D))
    y_ref, c_ref = attention.forward(x, p, cos, sin, H, KV, hd)
    y_fast, c_fast = fast_attention.forward(x, pf, cos, sin, H, KV, hd)
    close(y_fast, y_ref)
    y_infer, nothing = fast_attention.forward(x, pf, cos, sin, H, KV, hd, keep=False)   # no backward follows
    close(y_infer, y_ref)
    assert nothing is None
    dx_ref, g_ref = attention.backward(dy, c_ref)
    dx_fast, g_fast = fast_attention.backward(dy, c_fast)
    close(dx_fast, dx_ref)
    grads_close(g_fast, g_ref)


@pytest.mark.parametrize("keep", [True, False])             # False: the inference path (no weights kept)
@pytest.mark.parametrize("block", [64, 3])
def test_attention_with_a_kv_cache_and_padding(block, keep, monkeypatch):
    monkeypatch.setattr(fast_attention, "BLOCK", block)
    B, T, D, H, KV, hd, start = 3, 7, 24, 6, 2, 4, 5
    cfg = LlamaConfig(hidden_size=D, intermediate_size=8, num_hidden_layers=1, num_attention_heads=H,
                      num_key_value_heads=KV, head_dim=hd, vocab_size=5)
    p = {f"{n}.weight": 0.3 * rng.standard_normal(s)
         for n, s in (("q_proj", (H * hd, D)), ("k_proj", (KV * hd, D)), ("v_proj", (KV * hd, D)), ("o_proj", (D, H * hd)))}
    x = rng.standard_normal((B, T, D))
    cos, sin = rope.tables(cfg, np.arange(start, start + T), np.float64)
    key_mask = np.ones((B, start + T), dtype=bool)
    key_mask[0, :start + 2] = False                     # row 0: its first two queries see no real key at all
    key_mask[2, :3] = False
    earlier = rng.standard_normal((2, B, KV, 16, hd))
    outs = []
    for impl in (attention, fast_attention):
        kv = (earlier[0].copy(), earlier[1].copy())
        more = {"keep": keep} if impl is fast_attention else {}
        outs.append((impl.forward(x, p, cos, sin, H, KV, hd, kv=kv, start_pos=start, key_mask=key_mask, **more)[0],
                     kv))
    (y_ref, kv_ref), (y_fast, kv_fast) = outs
    real = key_mask[:, start:]                          # rows of padding queries are never read
    close(y_fast[real], y_ref[real])
    close(kv_fast[0], kv_ref[0])
    close(kv_fast[1], kv_ref[1])


def _watch_shares(monkeypatch) -> list:
    """Record each threads.share call: (jobs, BLAS thread counts seen inside: {1} when it was shared out)."""
    from npllama import blasthreads
    from npllama.fast import threads
    calls, real = [], threads.share

    def share(jobs):
        counts = set()

        def wrap(job):
            def run():
                counts.add(blasthreads.get_threads(use_threadpoolctl=False))
                job()
            return run
        real([wrap(j) for j in jobs])
        calls.append((len(jobs), counts))
    monkeypatch.setattr(threads, "share", share)
    return calls


def test_inference_attention_shared_over_threads(monkeypatch, two_blas_threads):
    """A long prompt's attention blocks run on two threads (BLAS held to one meanwhile): same result."""
    blasthreads = two_blas_threads
    monkeypatch.setattr(fast_attention, "PARALLEL_MIN", 1)            # this small call counts as long
    monkeypatch.setattr(fast_attention, "BLOCK", 3)
    shares = _watch_shares(monkeypatch)
    B, T, D, H, KV, hd, start = 3, 10, 24, 6, 2, 4, 5
    cfg = LlamaConfig(hidden_size=D, intermediate_size=8, num_hidden_layers=1, num_attention_heads=H,
                      num_key_value_heads=KV, head_dim=hd, vocab_size=5)
    p = {f"{n}.weight": 0.3 * rng.standard_normal(s) for n, s in
         (("q_proj", (H * hd, D)), ("k_proj", (KV * hd, D)), ("v_proj", (KV * hd, D)), ("o_proj", (D, H * hd)))}
    x = rng.standard_normal((B, T, D))
    cos, sin = rope.tables(cfg, np.arange(start, start + T), np.float64)
    key_mask = np.ones((B, start + T), dtype=bool)
    key_mask[1, :start + 1] = False
    earlier = rng.standard_normal((2, B, KV, 16, hd))
    ys = []
    for impl, more in ((attention, {}), (fast_attention, {"keep": False})):
        kv = (earlier[0].copy(), earlier[1].copy())
        ys.append(impl.forward(x, p, cos, sin, H, KV, hd, kv=kv, start_pos=start, key_mask=key_mask, **more)[0])
    real = key_mask[:, start:]
    close(ys[1][real], ys[0][real])
    assert shares == [(B * KV * 4, {1})]     # 4 blocks of 3 queries per row and KV head, BLAS at 1 meanwhile
    assert blasthreads.get_threads(use_threadpoolctl=False) == 2   # BLAS's count is back


def test_mlp_elementwise_shared_over_threads(monkeypatch, two_blas_threads):
    """A long prompt's SwiGLU element-wise parts (forward and backward) run in row blocks on two threads."""
    blasthreads = two_blas_threads
    monkeypatch.setattr(fast_mlp, "PARALLEL_MIN", 1)
    shares = _watch_shares(monkeypatch)
    D, I = 12, 20
    p = {"gate_proj.weight": rng.standard_normal((I, D)), "up_proj.weight": rng.standard_normal((I, D)),
         "down_proj.weight": rng.standard_normal((D, I))}
    x, dy = rng.standard_normal((2, 7, D)), rng.standard_normal((2, 7, D))
    y_ref, c_ref = mlp.forward(x, p)
    y, c = fast_mlp.forward(x, stack(dict(p), "gate_up_proj", ("gate_proj", "up_proj")))
    g = c.g
    s = 1.0 / (1.0 + np.exp(-g))
    np.testing.assert_array_equal(c.s, s)                       # exactly the plain expressions
    np.testing.assert_array_equal(c.a, g * s)
    close(y, y_ref)
    dx_ref, g_ref = mlp.backward(dy, c_ref)
    dx, gr = fast_mlp.backward(dy, c)
    close(dx, dx_ref)
    grads_close(gr, g_ref)
    assert shares == [(4, {1})] * 2               # forward and backward: 4 row blocks, BLAS held to 1 meanwhile
    assert blasthreads.get_threads(use_threadpoolctl=False) == 2


def test_loss_rows_shared_over_threads(monkeypatch, two_blas_threads):
    """A big batch's cross-entropy runs in row blocks on two threads: the same bits as in one thread."""
    logits, targets = rng.standard_normal((37, 50)) * 4, rng.integers(0, 50, 37)
    targets[:3] = -100
    loss_one, c_one = fast_loss.forward(logits, targets)
    d_one = fast_loss.backward(1.0, c_one)
    monkeypatch.setattr(fast_loss, "PARALLEL_MIN", 1)
    shares = _watch_shares(monkeypatch)
    loss_two, c_two = fast_loss.forward(logits, targets)
    d_two = fast_loss.backward(1.0, c_two)
    assert loss_two == loss_one and shares == [(8, {1})]
    np.testing.assert_array_equal(d_two, d_one)
    ref_loss, ref_cache = loss.forward(logits, targets)                # and the reference agrees
    assert abs(loss_two - ref_loss) <= 1e-12 * abs(ref_loss)
    close(d_two, loss.backward(1.0, ref_cache))


@pytest.mark.parametrize("is_stacked", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_mlp(is_stacked, bias):
    D, I = 12, 20
    p = {"gate_proj.weight": rng.standard_normal((I, D)), "up_proj.weight": rng.standard_normal((I, D)),
         "down_proj.weight": rng.standard_normal((D, I))}
    if bias:
        p.update({"gate_proj.bias": rng.standard_normal(I), "up_proj.bias": rng.standard_normal(I),
                  "down_proj.bias": rng.standard_normal(D)})
    pf = stack(dict(p), "gate_up_proj", ("gate_proj", "up_proj")) if is_stacked else p
    x, dy = rng.standard_normal((2, 5, D)), rng.standard_normal((2, 5, D))
    y_ref, c_ref = mlp.forward(x, p)
    y_fast, c_fast = fast_mlp.forward(x, pf)
    close(y_fast, y_ref)
    dx_ref, g_ref = mlp.backward(dy, c_ref)
    dx_fast, g_fast = fast_mlp.backward(dy, c_fast)
    close(dx_fast, dx_ref)
    grads_close(g_fast, g_ref)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_backward_lays_dW_out_like_W(bias):
    x, dy = rng.standard_normal((2, 3, 6)), rng.standard_normal((2, 3, 14))
    W, b = rng.standard_normal((14, 6)), (rng.standard_normal(14) if bias else None)
    Wt = np.ascontiguousarray(W.T).T                       # (out, in), kept (in, out) in memory (fast.storage)
    for w in (W, Wt):
        y, c = linear.forward(x, w, b)
        dx, dW, db = fast_linear.backward(dy, c)
        rdx, rdW, rdb = linear.backward(dy, linear.forward(x, W, b)[1])
        close(dx, rdx)
        close(dW, rdW)
        assert (db is None) == (not bias) and (db is None or np.allclose(db, rdb))
        assert dW.flags.c_contiguous == w.flags.c_contiguous and dW.T.flags.c_contiguous == w.T.flags.c_contiguous


def test_stacked_linear_backward():
    x, dys = rng.standard_normal((2, 3, 6)), [rng.standard_normal((2, 3, n)) for n in (4, 2, 2)]
    Ws = [rng.standard_normal((n, 6)) for n in (4, 2, 2)]
    bs = [rng.standard_normal(n) for n in (4, 2, 2)]
    names = ("q_proj", "k_proj", "v_proj")
    caches = [linear.forward(x, W, b)[1] for W, b in zip(Ws, bs)]
    one = linear.forward(x, np.concatenate(Ws), np.concatenate(bs))[1]
    g_sep, g_one = {}, {}
    dx_sep = backward_split(names, tuple(dys), tuple(caches), g_sep)
    dx_one = backward_split(names, tuple(dys), (one,), g_one)
    dx_ref = sum(linear.backward(d, c)[0] for d, c in zip(dys, caches))
    close(dx_sep, dx_ref)
    close(dx_one, dx_ref)
    for n, d, c in zip(names, dys, caches):
        _, dW, db = linear.backward(d, c)
        close(g_one[n + ".weight"], dW)
        close(g_one[n + ".bias"], db)
        close(g_sep[n + ".weight"], dW)


def test_rmsnorm():
    x, w, dy = rng.standard_normal((3, 4, 10)), rng.standard_normal(10), rng.standard_normal((3, 4, 10))
    y_ref, c_ref = rmsnorm.forward(x, w, 1e-6)
    y_fast, c_fast = fast_rmsnorm.forward(x, w, 1e-6)
    close(y_fast, y_ref)
    for a, b in zip(rmsnorm.backward(dy, c_ref), fast_rmsnorm.backward(dy, c_fast)):
        close(b, a)


@pytest.mark.parametrize("scaling", ROPES)
def test_rope(scaling):
    cfg = LlamaConfig(hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, vocab_size=5,
                      max_position_embeddings=4, rope_scaling=scaling)
    cos, sin = rope.tables(cfg, np.arange(9), np.float64)
    x = rng.standard_normal((2, 9, 2, 8))
    close(fast_rope.apply(x, cos, sin), rope.apply(x, cos, sin))
    close(fast_rope.apply_backward(x, cos, sin), rope.apply_backward(x, cos, sin))


def test_loss():
    logits = rng.standard_normal((7, 11)) * 4
    t = np.array([3, -100, 10, 0, 5, -100, 1])
    l_ref, c_ref = loss.forward(logits, t)
    l_fast, c_fast = fast_loss.forward(logits.copy(), t)
    assert abs(l_fast - l_ref) <= TOL * abs(l_ref)
    close(fast_loss.backward(1.0, c_fast), loss.backward(1.0, c_ref))


# ---------------------------------------------------------------- end to end
def _models(name, save_hf):
    d = save_hf(hf_model(**CONFIGS[name]))
    return (npllama.Llama.from_pretrained(d, dtype="float64"),
            npllama.Llama.from_pretrained(d, dtype="float64", reference=True))


def test_reference_storage_is_plain_and_fast_storage_is_stacked(save_hf):
    fast, ref = _models("bias-llama3", save_hf)
    assert ref.reference and not fast.reference
    assert all(v.base is None for v in ref.params.values())               # one array per HF name
    q = "model.layers.0.self_attn.q_proj.weight"
    assert fast.params[q].base is fast.params[q.replace("q_proj", "k_proj")].base is not None
    assert "qkv_proj.weight" in fast.layer(0).self_attn and "qkv_proj.weight" not in ref.layer(0).self_attn
    for k in ref.params:
        np.testing.assert_array_equal(fast.params[k], ref.params[k])


@pytest.mark.parametrize("block", [64, 16])                 # 16: T = 37 is three blocks, the last partial
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_every_gradient(name, block, save_hf, monkeypatch):
    monkeypatch.setattr(fast_attention, "BLOCK", block)
    fast, ref = _models(name, save_hf)
    r = np.random.default_rng(4)
    ids, targets = r.integers(0, 97, (2, 37)), r.integers(0, 97, (2, 37))
    targets[0, :4] = -100
    close(fast.forward(ids), ref.forward(ids))
    l_fast, g_fast = fast.loss_and_grads(ids, targets)
    l_ref, g_ref = ref.loss_and_grads(ids, targets)
    assert abs(l_fast - l_ref) <= TOL * abs(l_ref)
    assert list(g_fast) == list(g_ref) == list(ref.params)
    grads_close(g_fast, g_ref)


@pytest.mark.parametrize("name", ["gqa-tied-linear", "mqa-headdim-dynamic", "bias-llama3", "gqa6-headdim-tied-theta"])
def test_greedy_decoding_with_a_kv_cache(name, save_hf):
    fast, ref = _models(name, save_hf)
    prompt = np.random.default_rng(5).integers(0, 97, (2, 9))
    outs = []
    for m in (fast, ref):
        cache = m.new_cache(2, 30)
        logits = m.forward(prompt, cache=cache, last_only=True)
        steps = [logits]
        for t in range(20):                                  # dynamic rope: stays below 32 positions
            nxt = logits[:, -1].argmax(axis=-1)[:, None]
            logits = m.forward(nxt, cache=cache, start_pos=9 + t, last_only=True)
            steps.append(logits)
        outs.append(np.concatenate(steps, axis=1))
    close(outs[0], outs[1])
    assert (outs[0].argmax(-1) == outs[1].argmax(-1)).all()
    # and generate() gives the same new tokens on both paths
    assert fast.generate(prompt[0].tolist(), max_new_tokens=12, eos_ids=[]) == \
        ref.generate(prompt[0].tolist(), max_new_tokens=12, eos_ids=[])


def test_stacked_names_cover_the_model():
    # every stacked group names projections that exist in a layer, so the fast path can never skip one
    shapes = npllama.model.param_shapes(LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                                    num_attention_heads=2, vocab_size=5))
    for part, _, names in STACKED:
        for n in names:
            assert f"model.layers.0.{part}.{n}.weight" in shapes
