"""NumPy vs CuPy, fused vs plain kernels, CUDA-graph decoding vs plain decoding, TF32 off by default.

Runs only with CuPy and a CUDA device; otherwise every test here skips with the reason. Tolerances
(max|a - b| / max|b|): float64 <= 1e-10, float32 <= 1e-5.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install 'npllama[gpu]'): GPU tests skipped")
try:
    _N_DEVICES, _WHY = cupy.cuda.runtime.getDeviceCount(), "no CUDA device"
except Exception as e:  # CUDA driver or runtime missing
    _N_DEVICES, _WHY = 0, f"CUDA is not usable: {e}"
if _N_DEVICES == 0:
    pytest.skip(f"CuPy is installed but {_WHY}: GPU tests skipped", allow_module_level=True)

import npllama  # noqa: E402
from npllama.backend import tf32, tf32_enabled, to_host  # noqa: E402
from npllama.fast import attention, mlp, rmsnorm, rope  # noqa: E402
from npllama.fast.decode import CudaOps, GraphDecoder  # noqa: E402
from npllama.kvcache import KVCache  # noqa: E402
from npllama.layers import attention as ref_attention, mlp as ref_mlp, rmsnorm as ref_rmsnorm, rope as ref_rope  # noqa: E402
from npllama.transformer import Context  # noqa: E402
from conftest import rel_err  # noqa: E402
from test_gpu_paths import DECODE_CONFIGS  # noqa: E402

TOL = {"float64": 1e-10, "float32": 1e-5}
DTYPES = list(TOL)


def models(name: str, dtype: str, **kw):
    """The same random weights as a NumPy model and a CuPy model."""
    cfg = npllama.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=97,
                              max_position_embeddings=32, **DECODE_CONFIGS[name])
    ref = npllama.Llama.init(cfg, seed=5, dtype=dtype, std=0.15)
    gpu = npllama.Llama(cfg, ref.params, backend="cupy", dtype=dtype, **kw)
    return ref, gpu


def batch(B=3, T=24, V=97, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T))
    ids[1, :6] = ids[0, :6]                  # repeated ids: the embedding gradient must sum them
    targets = rng.integers(0, V, (B, T))
    targets[0, :3] = -100
    return ids, targets


def err(a, b) -> float:
    return rel_err(to_host(a), to_host(b))


def assert_all_close(got: dict, want: dict, tol: float) -> None:
    """Every array of `got` within tol of `want`; a failure lists every name that is off (one GPU run tells all)."""
    assert list(got) == list(want)
    bad = {k: f"{err(got[k], want[k]):.2e}" for k in want if not err(got[k], want[k]) <= tol}
    assert not bad, f"over {tol:g}: {bad}"


# ---------------------------------------------------------------- whole model, NumPy vs CuPy
def test_weights_live_on_the_gpu_and_outputs_stay_there(tmp_path):
    ref, gpu = models("gqa-default", "float32")
    assert gpu.backend == "cupy" and gpu.fused is True and gpu.tf32 is False
    assert all(isinstance(p, cupy.ndarray) for p in gpu.params.values())
    ref.save_pretrained(str(tmp_path / "m"))
    loaded = npllama.Llama.from_pretrained(str(tmp_path / "m"), backend="cupy")
    assert all(isinstance(p, cupy.ndarray) for p in loaded.params.values())
    out = loaded.forward([[1, 2, 3]])
    assert isinstance(out, cupy.ndarray) and out.dtype == np.float32


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", DECODE_CONFIGS)
def test_logits_and_every_gradient_match_numpy(name, dtype, fused):
    ref, gpu = models(name, dtype, fused=fused)
    ids, targets = batch()
    assert err(gpu.forward(ids), ref.forward(ids)) <= TOL[dtype]
    loss_r, g_r = ref.loss_and_grads(ids, targets)
    loss_g, g_g = gpu.loss_and_grads(ids, targets)
    assert abs(loss_g - loss_r) <= TOL[dtype] * abs(loss_r)
    for k in g_r:
        assert isinstance(g_g[k], cupy.ndarray) and g_g[k].dtype == g_r[k].dtype, k
    assert_all_close(g_g, g_r, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_cache_decoding_matches_numpy(dtype):
    ref, gpu = models("gqa-llama3", dtype)
    ids, _ = batch(2, 8)
    cr, cg = ref.new_cache(2, 16), gpu.new_cache(2, 16)
    assert err(gpu.forward(ids, cache=cg), ref.forward(ids, cache=cr)) <= TOL[dtype]
    for t in range(8):
        tok = ids[:, t:t + 1]
        assert err(gpu.forward(tok, cache=cg, start_pos=8 + t), ref.forward(tok, cache=cr, start_pos=8 + t)) <= TOL[dtype]


@pytest.mark.skipif(importlib.util.find_spec("npllama.train.optim") is None, reason="npllama.train.optim not on this branch")
@pytest.mark.parametrize("dtype", DTYPES)
def test_twenty_adamw_steps_match_numpy(dtype):
    # Losses agree to TOL at every step. The float32 weights get 1e-4: AdamW divides each gradient element by
    # its own running RMS, so where a gradient is near zero its float32 rounding noise becomes an lr-sized
    # step (a k_proj bias, whose gradient nearly cancels, drifts 3e-4 even between two CPU builds), and
    # the per-parameter max|a-b|/max|b| of a layer norm reaches ~1.5e-5. float64 has no such noise: 1e-10.
    from npllama.train.optim import AdamW
    ref, gpu = models("gqa-llama3", dtype)
    opt_r = AdamW(ref.params, lr=1e-3, weight_decay=0.01)
    opt_g = AdamW(gpu.params, lr=1e-3, weight_decay=0.01)
    for step in range(20):
        ids, targets = batch(seed=step)
        loss_r, g_r = ref.loss_and_grads(ids, targets)
        loss_g, g_g = gpu.loss_and_grads(ids, targets)
        assert abs(loss_g - loss_r) <= TOL[dtype] * abs(loss_r), step
        opt_r.step(g_r)
        opt_g.step(g_g)
    assert all(isinstance(p, cupy.ndarray) for p in gpu.params.values())
    assert_all_close(gpu.params, ref.params, 1e-10 if dtype == "float64" else 1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_with_dropout_matches_numpy(dtype, tmp_path):
    # the dropout masks are drawn on the host from the adapter's seed: the same on both backends
    from npllama import lora
    ref, gpu = models("gqa-llama3", dtype)
    for m in (ref, gpu):
        lora.add(m, r=4, alpha=8, targets=["q_proj", "v_proj", "o_proj", "up_proj"], dropout=0.2, seed=3)
        for k in lora.lora_params(m):
            if ".lora_B." in k:
                m.params[k][...] = m.xp.asarray(np.random.default_rng(1).standard_normal(m.params[k].shape) * 0.1)
    assert all(isinstance(p, cupy.ndarray) for p in lora.lora_params(gpu).values())
    ids, targets = batch()
    assert err(gpu.forward(ids), ref.forward(ids)) <= TOL[dtype]
    for _ in range(2):                                   # two calls: two fresh (and equal) dropout draws
        (loss_r, g_r), (loss_g, g_g) = ref.loss_and_grads(ids, targets), gpu.loss_and_grads(ids, targets)
        assert abs(loss_g - loss_r) <= TOL[dtype] * abs(loss_r)
        assert set(g_g) == gpu.trainable
        assert_all_close(g_g, g_r, TOL[dtype])
    with pytest.raises(npllama.NpllamaError, match="merge"):
        GraphDecoder(gpu)                                # the decode kernels read base weights only
    lora.save(gpu, tmp_path / "adapter")
    lora.merge(gpu)
    lora.merge(ref)
    assert err(gpu.forward(ids), ref.forward(ids)) <= TOL[dtype]


def test_sft_lora_trainer_matches_numpy_and_resumes_on_the_gpu(tmp_path):
    # chat SFT batches (padded, -100 targets), accumulation weighted by labelled targets, held-out loss,
    # a LoRA checkpoint written from device arrays and read back onto them
    import os
    from npllama import lora
    from npllama.train import TrainConfig, Trainer
    from npllama.train.sft import Example, SFTBatcher, SFTEval
    rng = np.random.default_rng(0)
    ex = []
    for _ in range(9):
        ids = rng.integers(0, 97, int(rng.integers(5, 20)))
        ex.append(Example(ids, np.where(np.arange(len(ids)) >= len(ids) // 2, ids, -100)))
    cfg = TrainConfig(steps=4, batch_size=2, seq_len=24, accum=2, lr=1e-2, warmup=1, eval_every=2, eval_batches=1,
                      save_every=2, log_every=0, seed=1)
    null = open(os.devnull, "w")
    ref, gpu = models("gqa-llama3", "float64")
    runs = []
    for m, out in ((ref, "np"), (gpu, "cp")):
        lora.add(m, r=2, alpha=4, targets=["q_proj", "down_proj"], dropout=0.1, seed=2)
        t = Trainer(m, SFTBatcher(ex[:7], 2, seed=1), SFTEval(ex[7:]), cfg, str(tmp_path / out), log=null)
        t.fit()
        runs.append(t)
    for a, b in zip(runs[0].history, runs[1].history):
        for k in ("loss", "val_loss"):
            if k in a:
                assert abs(a[k] - b[k]) <= 1e-10 * abs(a[k]), (k, a["step"])
    assert_all_close(lora.lora_params(gpu), lora.lora_params(ref), 1e-10)
    _, again = models("gqa-llama3", "float64")
    lora.add(again, r=2, alpha=4, targets=["q_proj", "down_proj"], dropout=0.1, seed=2)
    t = Trainer(again, SFTBatcher(ex[:7], 2, seed=1), SFTEval(ex[7:]), TrainConfig(**{**cfg.__dict__, "steps": 6}),
                str(tmp_path / "cp"), log=null)
    t.resume()
    assert t.step == 4 and all(isinstance(p, cupy.ndarray) for p in lora.lora_params(again).values())
    assert_all_close(lora.lora_params(again), lora.lora_params(gpu), 0.0)


# ---------------------------------------------------------------- fused kernels vs the plain code
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_rmsnorm(dtype):
    rng = np.random.default_rng(1)
    x = cupy.asarray(rng.standard_normal((3, 5, 40)), dtype=dtype)
    w = cupy.asarray(1 + 0.1 * rng.standard_normal(40), dtype=dtype)
    dy = cupy.asarray(rng.standard_normal((3, 5, 40)), dtype=dtype)
    y0, c0 = rmsnorm.forward(x, w, 1e-5)
    y1, c1 = rmsnorm.forward(x, w, 1e-5, fused=True)
    assert y1.dtype == x.dtype and y1.shape == y0.shape and err(y1, y0) <= TOL[dtype]
    for a, b in zip(c1[:2], c0[:2]):
        assert a.shape == b.shape and err(a, b) <= TOL[dtype]     # same cache: plain and fused mix freely
    for cache in (c0, c1):
        dx0, dw0 = rmsnorm.backward(dy, cache)
        dx1, dw1 = rmsnorm.backward(dy, cache, fused=True)
        assert err(dx1, dx0) <= TOL[dtype] and err(dw1, dw0) <= TOL[dtype] and dw1.shape == (40,)


@pytest.mark.parametrize("per_row_tables", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_rope(dtype, per_row_tables):
    rng = np.random.default_rng(2)
    B, T, H, hd = 2, 6, 3, 8
    cfg = npllama.LlamaConfig(hidden_size=24, intermediate_size=8, num_hidden_layers=1, num_attention_heads=H,
                              vocab_size=5)
    positions = rng.integers(0, 50, (B, T)) if per_row_tables else np.arange(3, 3 + T)
    cos, sin = ref_rope.tables(cfg, positions, dtype, cupy)
    x = cupy.asarray(rng.standard_normal((B, T, H, hd)), dtype=dtype)
    assert err(rope.apply(x, cos, sin, fused=True), rope.apply(x, cos, sin)) <= TOL[dtype]
    xt = cupy.asarray(rng.standard_normal((B, H, T, hd)), dtype=dtype).transpose(0, 2, 1, 3)   # a strided view
    assert err(rope.apply_backward(xt, cos, sin, fused=True), rope.apply_backward(xt, cos, sin)) <= TOL[dtype]
    # the backward is the inverse rotation
    assert err(rope.apply_backward(rope.apply(x, cos, sin, fused=True), cos, sin, fused=True), x) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_swiglu_mlp(dtype):
    rng = np.random.default_rng(3)
    p = {k: cupy.asarray(0.2 * rng.standard_normal(s), dtype=dtype)
         for k, s in (("gate_proj.weight", (24, 16)), ("up_proj.weight", (24, 16)), ("down_proj.weight", (16, 24)),
                      ("gate_proj.bias", (24,)))}
    x = cupy.asarray(rng.standard_normal((2, 5, 16)), dtype=dtype)
    dy = cupy.asarray(rng.standard_normal((2, 5, 16)), dtype=dtype)
    y0, c0 = mlp.forward(x, p)
    y1, c1 = mlp.forward(x, p, fused=True)
    assert err(y1, y0) <= TOL[dtype]
    dx0, g0 = mlp.backward(dy, c0)
    dx1, g1 = mlp.backward(dy, c1, fused=True)
    assert err(dx1, dx0) <= TOL[dtype]
    for k in g0:
        assert err(g1[k], g0[k]) <= TOL[dtype], k


@pytest.mark.parametrize("block", [4, 64])                      # 4: two query blocks, the second partial
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_attention_softmax(dtype, block, monkeypatch):
    monkeypatch.setattr(attention, "BLOCK", block)
    rng = np.random.default_rng(8)
    B, T, D, H, KV, hd = 3, 6, 24, 6, 2, 4
    p = {f"{n}.weight": cupy.asarray(0.3 * rng.standard_normal(s), dtype=dtype)
         for n, s in (("q_proj", (H * hd, D)), ("k_proj", (KV * hd, D)), ("v_proj", (KV * hd, D)), ("o_proj", (D, H * hd)))}
    cfg = npllama.LlamaConfig(hidden_size=D, intermediate_size=8, num_hidden_layers=1, num_attention_heads=H,
                              num_key_value_heads=KV, head_dim=hd, vocab_size=5)
    x = cupy.asarray(rng.standard_normal((B, T, D)), dtype=dtype)
    dy = cupy.asarray(rng.standard_normal((B, T, D)), dtype=dtype)
    cos, sin = ref_rope.tables(cfg, np.arange(T), dtype, cupy)
    y0, c0 = attention.forward(x, p, cos, sin, H, KV, hd)
    y1, c1 = attention.forward(x, p, cos, sin, H, KV, hd, fused=True)
    assert err(y1, y0) <= TOL[dtype]
    assert len(c0.Ps) == -(-T // block) and all(err(a, b) <= TOL[dtype] for a, b in zip(c1.Ps, c0.Ps))
    dx0, g0 = attention.backward(dy, c0)
    dx1, g1 = attention.backward(dy, c1, fused=True)
    assert err(dx1, dx0) <= TOL[dtype]
    assert_all_close(g1, g0, TOL[dtype])
    # with a KV cache past position 0 and left padding: row 0's first query sees only padding (uniform P)
    start = 3
    cos, sin = ref_rope.tables(cfg, np.arange(start, start + T), dtype, cupy)
    key_mask = np.ones((B, start + T), dtype=bool)
    key_mask[0, :start + 1] = False
    key_mask[2, :2] = False
    kv = cupy.asarray(rng.standard_normal((2, B, KV, 16, hd)), dtype=dtype)      # earlier keys and values
    outs = [attention.forward(x, p, cos, sin, H, KV, hd, kv=(kv[0].copy(), kv[1].copy()), start_pos=start,
                              key_mask=cupy.asarray(key_mask), fused=fused) for fused in (False, True)]
    assert err(outs[1][0], outs[0][0]) <= TOL[dtype]
    assert all(err(a, b) <= TOL[dtype] for a, b in zip(outs[1][1].Ps, outs[0][1].Ps))


# ---------------------------------------------------------------- decode kernels vs the reference layers
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_kernels_match_the_reference_layers(dtype, bias):
    rng = np.random.default_rng(5)
    rand = lambda *s: cupy.asarray(rng.standard_normal(s), dtype=dtype)   # noqa: E731
    B, H, KV, L, hd, D, I = 2, 6, 2, 40, 16, 45, 33                      # 45: not a multiple of the warp
    cfg = npllama.LlamaConfig(hidden_size=D, intermediate_size=I, num_hidden_layers=1, num_attention_heads=H,
                              num_key_value_heads=KV, head_dim=hd, vocab_size=30, max_position_embeddings=L)
    K = CudaOps(cfg, dtype)
    W, b, x = rand(70, D), rand(70), rand(B, D)
    assert err(K.gemv(x, W, b), x @ W.T + b) <= TOL[dtype]
    with pytest.raises(ValueError, match="C-contiguous"):
        K.gemv(x, W.T.copy().T)
    E, tok = rand(30, 12), cupy.asarray([[4], [29]], dtype=cupy.int32)
    assert err(K.embedding(tok, E)[0], E[tok]) <= 0.0
    w = rand(D)
    xs = rand(B, 1, D)
    assert err(K.rmsnorm(xs, w)[0], ref_rmsnorm.forward(xs, w, cfg.rms_norm_eps)[0]) <= TOL[dtype]
    attn = {"q_proj.weight": rand(H * hd, D), "k_proj.weight": rand(KV * hd, D), "v_proj.weight": rand(KV * hd, D),
            "o_proj.weight": rand(D, H * hd)}
    mlpw = {"gate_proj.weight": rand(I, D), "up_proj.weight": rand(I, D), "down_proj.weight": rand(D, I)}
    if bias:
        attn.update({"q_proj.bias": rand(H * hd), "k_proj.bias": rand(KV * hd), "v_proj.bias": rand(KV * hd),
                     "o_proj.bias": rand(D)})
        mlpw.update({"gate_proj.bias": rand(I), "up_proj.bias": rand(I), "down_proj.bias": rand(D)})
    assert err(K.mlp(xs, mlpw)[0], ref_mlp.forward(xs, mlpw)[0]) <= TOL[dtype]
    cos, sin = rand(L, hd // 2), rand(L, hd // 2)
    cache_k, cache_r = (KVCache(1, 3, KV, L, hd, np.dtype(dtype), cupy) for _ in range(2))
    for p in (0, 1, 17, L - 1):
        xs = rand(B, 1, D)
        ctx = Context(cos, sin, cache_k, cupy.asarray([p], dtype=cupy.int32), None)
        got = K.attention(xs, attn, 0, ctx)[0]
        want = ref_attention.forward(xs, attn, cos[p:p + 1, None], sin[p:p + 1, None], H, KV, hd,
                                     kv=cache_r.layer(0), start_pos=p)[0]
        assert err(got, want) <= TOL[dtype], p
        assert err(cache_k.k[0], cache_r.k[0]) <= TOL[dtype] and err(cache_k.v[0], cache_r.v[0]) <= TOL[dtype]


def _greedy(target, prompt, steps):
    B, L = prompt.shape
    cache = target.new_cache(B, L + steps)
    logits = target.forward(prompt, cache=cache, last_only=True)
    toks, outs = [], []
    for t in range(steps):
        nxt = to_host(logits)[:, -1].argmax(axis=-1)[:, None]
        toks.append(nxt[:, 0].tolist())
        logits = target.forward(nxt, cache=cache, start_pos=L + t, last_only=True)
        outs.append(to_host(logits))
    return toks, outs


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", DECODE_CONFIGS)
def test_kernel_and_graph_decoding_give_the_plain_tokens(name, dtype, graph):
    _, gpu = models(name, dtype)
    prompt = np.random.default_rng(6).integers(0, 97, (2, 7))
    dec = GraphDecoder(gpu, graph=graph, kernels=True)
    toks, outs = _greedy(dec, prompt, 30)                 # runs past max_position_embeddings = 32
    ref_toks, ref_outs = _greedy(gpu, prompt, 30)
    assert toks == ref_toks
    for a, b in zip(outs, ref_outs):
        assert err(a, b) <= TOL[dtype]
    assert dec.captures == (1 if graph else 0)           # captured once, replayed 29 more times


def test_graph_sees_in_place_updates_and_recaptures_for_new_arrays():
    _, gpu = models("gqa-default", "float64")
    dec = GraphDecoder(gpu)
    prompt = np.array([[3, 1, 4, 1, 5]])
    _greedy(dec, prompt, 3)
    w = gpu.params["model.norm.weight"]
    w *= 1.5                                             # in place: the captured graph reads it
    a = _greedy(dec, prompt, 3)[1]
    b = _greedy(gpu, prompt, 3)[1]
    assert dec.captures == 1 and max(err(x, y) for x, y in zip(a, b)) <= 1e-10
    gpu.params["model.norm.weight"] = w * 0.5            # a new array: the next step must capture again
    a = _greedy(dec, prompt, 3)[1]
    b = _greedy(gpu, prompt, 3)[1]
    assert dec.captures == 2 and max(err(x, y) for x, y in zip(a, b)) <= 1e-10


@pytest.mark.skipif(importlib.util.find_spec("npllama.generate") is None, reason="npllama.generate not on this branch")
def test_generate_with_cuda_graph_gives_the_same_tokens():
    _, gpu = models("mqa-bias-tied-linear", "float32")
    prompt = [5, 9, 2, 7]
    plain = gpu.generate(prompt, max_new_tokens=20, eos_ids=[])
    assert gpu.generate(prompt, max_new_tokens=20, eos_ids=[], cuda_graph=True) == plain
    assert gpu.generate(prompt, max_new_tokens=20, eos_ids=[], cuda_graph=True) == plain   # reused decoder


# ---------------------------------------------------------------- TF32
def test_tf32_is_off_by_default_and_scoped():
    import os
    if os.environ.get("CUPY_TF32", "0") not in ("", "0"):
        pytest.skip("CUPY_TF32 is set in this environment: CuPy's own default is TF32 on")
    assert tf32_enabled(cupy) is False
    ref, gpu = models("gqa-default", "float32")
    assert gpu.tf32 is False
    gpu.forward([[1, 2]])
    assert tf32_enabled(cupy) is False
    if int(cupy.cuda.Device().compute_capability) < 80:
        pytest.skip("TF32 needs compute capability >= 8.0")
    rng = np.random.default_rng(7)
    # shapes large enough that cuBLAS takes tensor-core kernels when TF32 is allowed
    a = cupy.asarray(rng.standard_normal((1024, 1024)), dtype=cupy.float32)
    b = cupy.asarray(rng.standard_normal((1024, 1024)), dtype=cupy.float32)
    a3, b3 = a.reshape(4, 256, 1024), b.reshape(4, 1024, 256)
    exact, exact3 = to_host(a).astype(np.float64) @ to_host(b), to_host(a3).astype(np.float64) @ to_host(b3)
    assert err(a @ b, exact) < 1e-5 and err(a3 @ b3, exact3) < 1e-5           # full float32
    with tf32(cupy, True):
        assert tf32_enabled(cupy) is True
        assert err(a @ b, exact) > 1e-5, "2-D GEMM (linear layers) did not use TF32"
        assert err(a3 @ b3, exact3) > 1e-5, "batched GEMM (attention) did not use TF32"
    assert tf32_enabled(cupy) is False and err(a @ b, exact) < 1e-5            # restored
    # the model's flag puts its matmuls inside the scope (checked where the matmuls happen)
    from npllama.layers import linear
    seen, plain_forward = [], linear.forward
    fast = npllama.Llama(gpu.config, ref.params, backend="cupy", tf32=True)
    try:
        linear.forward = lambda *a, **k: seen.append(tf32_enabled(cupy)) or plain_forward(*a, **k)
        fast.forward([[1, 2]])
        assert seen and all(seen)
        seen.clear()
        gpu.forward([[1, 2]])
        assert seen and not any(seen)
    finally:
        linear.forward = plain_forward
    assert tf32_enabled(cupy) is False


def test_adamw_on_cupy_matches_numpy():
    from npllama.train.clip import clip_grad_norm
    from npllama.train.optim import AdamW
    from test_train_optim import _grads_seq, _params, _rel
    cp = cupy
    P = _params(np.float32)
    Q = {k: cp.asarray(v) for k, v in P.items()}
    a, b = AdamW(P, lr=1e-2, weight_decay=0.1, amsgrad=True), AdamW(Q, lr=1e-2, weight_decay=0.1, amsgrad=True)
    for G in _grads_seq(np.float32, 10):
        GQ = {k: cp.asarray(v) for k, v in G.items()}
        assert abs(clip_grad_norm(G, 1.0) - clip_grad_norm(GQ, 1.0)) < 1e-4
        a.step(G)
        b.step(GQ)
    assert all(Q[k].dtype == np.float32 for k in Q)
    assert _rel({k: to_host(v) for k, v in Q.items()}, P) < 1e-5
