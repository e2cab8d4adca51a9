"""Causal self-attention with grouped-query heads (MHA, GQA, MQA), rotary positions and a KV cache.

    q, k, v = x Wq, x Wk, x Wv              separate projections
    q, k = rope(q), rope(k)                 positions enter by rotation
    k, v = repeat_kv(k), repeat_kv(v)       each KV head serves G = n_heads / n_kv query heads
    P = softmax(q k^T / sqrt(hd) + mask)    the full (T, S) score matrix, one causal mask
    y = (P v) Wo

This is the textbook form. `npllama.fast.attention` computes the same numbers in query blocks, with the
K/V heads shared instead of repeated and the softmax in place.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from npllama.backend import get_array_module
from npllama.layers import projection, rope


class AttentionCache(NamedTuple):
    q_proj: Any       # each projection's cache (npllama.layers.projection)
    k_proj: Any
    v_proj: Any
    o_proj: Any
    cos: Any          # rotary tables (T, 1, hd/2) or (B, T, 1, hd/2)
    sin: Any
    q: Any            # rotated queries (B, H, T, hd)
    k: Any            # rotated keys, repeated per query head (B, H, S, hd)
    v: Any            # values, repeated per query head (B, H, S, hd)
    P: Any            # attention weights (B, H, T, S)
    n_kv: int


def repeat_kv(x: Any, G: int) -> Any:
    """(B, KV, S, hd) -> (B, KV * G, S, hd): query head h reads KV head h // G (transformers' repeat_kv)."""
    return get_array_module(x).repeat(x, G, axis=1)


def repeat_kv_backward(dx: Any, G: int) -> Any:
    """(B, KV * G, S, hd) -> (B, KV, S, hd): a KV head's gradient sums those of the G query heads it served."""
    B, H, S, hd = dx.shape
    return dx.reshape(B, H // G, G, S, hd).sum(axis=2)


def causal_mask(T: int, S: int, start_pos: int, key_mask: Any, xp: Any) -> Any:
    """True where a query may see a key: query t (position start_pos + t) sees keys 0 .. start_pos + t,
    and only real ones (key_mask (B, S)). -> (T, S), or (B, 1, T, S) with key_mask."""
    mask = xp.arange(S)[None, :] <= (start_pos + xp.arange(T))[:, None]          # (T, S)
    if key_mask is not None:
        mask = mask[None, None] & key_mask[:, None, None, :S].astype(bool)         # (B, 1, T, S)
    return mask


def forward(x: Any, p: dict[str, Any], cos: Any, sin: Any, n_heads: int, n_kv: int, head_dim: int,
            kv: tuple[Any, Any] | None = None, start_pos: int = 0, key_mask: Any = None) -> tuple[Any, AttentionCache]:
    """x (B, T, D) -> y (B, T, D).

    p: this layer's weights, keyed 'q_proj.weight', 'q_proj.bias' (optional), ... 'o_proj.weight'.
    kv: preallocated (k, v) buffers (B', n_kv, S_max, hd); this call writes positions
        [start_pos, start_pos + T) and attends to [0, start_pos + T).
    key_mask: optional bool (B, start_pos + T), False for padding slots that no query may see.
    """
    xp = get_array_module(x)
    B, T, _ = x.shape
    H, KV, hd = n_heads, n_kv, head_dim
    q, cq = projection.forward(x, p, "q_proj")      # (B, T, H hd)
    k, ck = projection.forward(x, p, "k_proj")      # (B, T, KV hd)
    v, cv = projection.forward(x, p, "v_proj")      # (B, T, KV hd)
    q = rope.apply(q.reshape(B, T, H, hd), cos, sin).transpose(0, 2, 1, 3)   # (B, H, T, hd)
    k = rope.apply(k.reshape(B, T, KV, hd), cos, sin).transpose(0, 2, 1, 3)  # (B, KV, T, hd)
    v = v.reshape(B, T, KV, hd).transpose(0, 2, 1, 3)                        # (B, KV, T, hd)
    S = start_pos + T
    if kv is not None:          # the cache keeps every earlier token's K and V: attend to all of them
        kbuf, vbuf = kv
        kbuf[:B, :, start_pos:S] = k
        vbuf[:B, :, start_pos:S] = v
        k, v = kbuf[:B, :, :S], vbuf[:B, :, :S]                              # (B, KV, S, hd)
    k, v = repeat_kv(k, H // KV), repeat_kv(v, H // KV)                      # (B, H, S, hd)
    scores = (q @ k.transpose(0, 1, 3, 2)) * hd ** -0.5                      # (B, H, T, S)
    # a large finite negative, not -inf: a query that may see no key at all (left padding) then gets
    # equal weights instead of NaN; no real token ever reads that row
    scores = xp.where(causal_mask(T, S, start_pos, key_mask, xp), scores, xp.finfo(scores.dtype).min)
    P = softmax(scores)
    out = (P @ v).transpose(0, 2, 1, 3).reshape(B, T, H * hd)                # (B, T, H hd)
    y, co = projection.forward(out, p, "o_proj")
    return y, AttentionCache(cq, ck, cv, co, cos, sin, q, k, v, P, KV)


def softmax(s: Any) -> Any:
    """Softmax over the last axis, shifted by the row max so exp cannot overflow."""
    xp = get_array_module(s)
    e = xp.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def backward(dy: Any, cache: AttentionCache) -> tuple[Any, dict[str, Any]]:
    """-> dx (B, T, D), grads keyed like p. For calls that wrote no KV cache (training: keys are these T tokens)."""
    c = cache
    B, H, T, hd = c.q.shape
    G = H // c.n_kv
    grads: dict[str, Any] = {}
    dout = projection.backward(dy, c.o_proj, "o_proj", grads)
    dout = dout.reshape(B, T, H, hd).transpose(0, 2, 1, 3)                   # (B, H, T, hd)
    dv = c.P.transpose(0, 1, 3, 2) @ dout                                    # (B, H, S, hd)
    dP = dout @ c.v.transpose(0, 1, 3, 2)                                    # (B, H, T, S)
    # softmax backward: dS = P * (dP - sum_j P dP); masked entries have P = 0 and get no gradient
    dS = c.P * (dP - (dP * c.P).sum(axis=-1, keepdims=True)) * hd ** -0.5
    dq = dS @ c.k                                                            # (B, H, T, hd)
    dk = dS.transpose(0, 1, 3, 2) @ c.q                                      # (B, H, S, hd)
    dk, dv = repeat_kv_backward(dk, G), repeat_kv_backward(dv, G)            # (B, KV, S, hd)
    dq = rope.apply_backward(dq.transpose(0, 2, 1, 3), c.cos, c.sin).reshape(B, T, H * hd)
    dk = rope.apply_backward(dk.transpose(0, 2, 1, 3), c.cos, c.sin).reshape(B, T, -1)
    dv = dv.transpose(0, 2, 1, 3).reshape(B, T, -1)
    dx = 0
    for name, d, lc in (("q_proj", dq, c.q_proj), ("k_proj", dk, c.k_proj), ("v_proj", dv, c.v_proj)):
        dx = dx + projection.backward(d, lc, name, grads)
    return dx, grads
