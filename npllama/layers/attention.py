"""Causal self-attention with grouped-query heads (MHA, GQA, MQA), rotary positions and a KV cache.

Query heads are grouped by the KV head they share (head h uses KV head h // G, as in
transformers' repeat_kv). Instead of repeating K and V G times, the G query heads of a group
are stacked along the row axis, so one batched matmul per (batch, KV head) does the work and
the backward sums each group's K/V gradients for free.
"""
from __future__ import annotations

from typing import Any

from npllama.backend import fused_kernels, get_array_module
from npllama.layers import linear, rope


def forward(x: Any, p: dict[str, Any], cos: Any, sin: Any, n_heads: int, n_kv: int, head_dim: int,
            kv: tuple[Any, Any] | None = None, start_pos: int = 0, key_mask: Any = None,
            fused: bool = False) -> tuple[Any, tuple]:
    """x (B, T, D) -> y (B, T, D).

    p: this layer's weights, keyed 'q_proj.weight', 'q_proj.bias' (optional), ... 'o_proj.weight';
       with 'qkv_proj.weight' (q, k, v stacked by rows; + 'qkv_proj.bias') one product does all three.
    kv: preallocated (k, v) buffers (B', n_kv, S_max, hd); this call writes positions
        [start_pos, start_pos + T) and attends to [0, start_pos + T).
    key_mask: optional bool (B, start_pos + T), False for padding slots that no query may see.
    fused: use the fused CUDA rotary and softmax kernels on CuPy input (same result).
    """
    xp = get_array_module(x)
    B, T, _ = x.shape
    H, KV, hd, G = n_heads, n_kv, head_dim, n_heads // n_kv
    if "qkv_proj.weight" in p:
        qkv, cqkv = linear.forward(x, p["qkv_proj.weight"], p.get("qkv_proj.bias"))   # (B, T, (H + 2 KV) hd)
        qk = rope.apply(qkv[..., :(H + KV) * hd].reshape(B, T, H + KV, hd), cos, sin, fused)  # one rotation
        q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[..., (H + KV) * hd:]
        cin: tuple = (cqkv,)
    else:
        q, cq = linear.forward(x, p["q_proj.weight"], p.get("q_proj.bias"))
        k, ck = linear.forward(x, p["k_proj.weight"], p.get("k_proj.bias"))
        v, cv = linear.forward(x, p["v_proj.weight"], p.get("v_proj.bias"))
        q = rope.apply(q.reshape(B, T, H, hd), cos, sin, fused)
        k = rope.apply(k.reshape(B, T, KV, hd), cos, sin, fused)
        cin = (cq, ck, cv)
    k = k.transpose(0, 2, 1, 3)                                              # (B, KV, T, hd)
    v = v.reshape(B, T, KV, hd).transpose(0, 2, 1, 3)                        # (B, KV, T, hd)
    S = start_pos + T
    if kv is not None:
        kbuf, vbuf = kv
        kbuf[:B, :, start_pos:S] = k
        vbuf[:B, :, start_pos:S] = v
        k, v = kbuf[:B, :, :S], vbuf[:B, :, :S]                              # (B, KV, S, hd)
        if T > 1:  # a prefill's big matmuls run faster on packed K/V; one decoded token's would not repay the copy
            k, v = xp.ascontiguousarray(k), xp.ascontiguousarray(v)
    qg = q.reshape(B, T, KV, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, KV, G * T, hd)

    if kf := fused_kernels(x, fused):                                        # the same P in one pass
        P = kf.causal_softmax_(qg @ k.transpose(0, 1, 3, 2), hd ** -0.5, start_pos, T, key_mask)
    else:
        scores = (qg @ k.transpose(0, 1, 3, 2)) * (hd ** -0.5)              # (B, KV, G*T, S)
        scores = scores.reshape(B, KV, G, T, S)
        if T > 1 or key_mask is not None:  # one new query sees every key so far: nothing to mask
            # query t sits at position start_pos + t and may see keys 0 .. start_pos + t
            mask = xp.arange(S)[None, :] <= (start_pos + xp.arange(T))[:, None]  # (T, S)
            if key_mask is not None:
                mask = mask & key_mask[:, None, None, None, :].astype(bool)    # (B, 1, 1, T, S)
            # a large finite negative, not -inf: a fully masked (padding) row then stays finite;
            # written in place (no second (B, KV, G, T, S) array)
            xp.copyto(scores, xp.finfo(scores.dtype).min, where=~mask)
        scores -= scores.max(axis=-1, keepdims=True)
        P = xp.exp(scores, out=scores)
        P /= P.sum(axis=-1, keepdims=True)
        P = P.reshape(B, KV, G * T, S)
    out = (P @ v).reshape(B, KV, G, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, H * hd)
    y, co = linear.forward(out, p["o_proj.weight"], p.get("o_proj.bias"))
    return y, (cin, co, cos, sin, qg, k, v, P, (B, T, H, KV, hd))


def backward(dy: Any, cache: tuple, fused: bool = False) -> tuple[Any, dict[str, Any]]:
    """-> dx (B, T, D), grads keyed like p. Only for calls without a KV cache (training)."""
    cin, co, cos, sin, qg, k, v, P, (B, T, H, KV, hd) = cache
    G = H // KV
    grads: dict[str, Any] = {}
    dout, grads["o_proj.weight"], db = linear.backward(dy, co)
    if db is not None:
        grads["o_proj.bias"] = db
    dout = dout.reshape(B, T, KV, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, KV, G * T, hd)

    dv = P.transpose(0, 1, 3, 2) @ dout                                       # (B, KV, S, hd): sums the group
    dP = dout @ v.transpose(0, 1, 3, 2)                                       # (B, KV, G*T, S)
    # softmax backward: dS = P * (dP - sum_j P dP); masked entries have P = 0 and stay 0
    if kf := fused_kernels(dy, fused):
        dS = kf.softmax_backward_(dP, P, hd ** -0.5)
    else:
        dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))
        dS *= hd ** -0.5
    dqg = dS @ k                                                              # (B, KV, G*T, hd)
    dk = dS.transpose(0, 1, 3, 2) @ qg                                        # (B, KV, S, hd)

    dq = dqg.reshape(B, KV, G, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)
    dq = rope.apply_backward(dq, cos, sin, fused).reshape(B, T, H * hd)
    dk = rope.apply_backward(dk.transpose(0, 2, 1, 3), cos, sin, fused).reshape(B, T, KV * hd)
    dv = dv.transpose(0, 2, 1, 3).reshape(B, T, KV * hd)
    return linear.backward_split(("q_proj", "k_proj", "v_proj"), (dq, dk, dv), cin, grads), grads
