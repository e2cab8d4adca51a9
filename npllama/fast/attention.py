"""Causal GQA attention, computed faster than its reference `npllama.layers.attention` (same results).

Query heads are grouped by the KV head they share (head h uses KV head h // G, as in
transformers' repeat_kv). Instead of repeating K and V G times, the G query heads of a group
are stacked along the row axis, so one batched matmul per (batch, KV head) does the work and
the backward sums each group's K/V gradients for free.

Queries go in blocks of BLOCK. A block sees only the keys up to its last query, so the masked upper
triangle past it is never computed (about half the work of a long prompt), and its scores stay small
enough to stay in cache. Softmax rows are whole within a block, so the result is exact, not an online
rescaling as in FlashAttention; the backward walks the same blocks.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from npllama.backend import fused_kernels, get_array_module
from npllama.fast import rope, threads
from npllama.fast.linear import backward_split
from npllama.layers import linear, projection

BLOCK = 64   # queries per block of the attention (see _blocks); any value gives the same result for real tokens


class FastAttentionCache(NamedTuple):
    inputs: tuple     # the LinearCache of the stacked q/k/v product, or one per projection
    o_proj: Any
    cos: Any          # rotary tables
    sin: Any
    qg: Any           # rotated queries, a KV head's G query heads as rows (t, g): (B, KV, T G, hd)
    k: Any            # rotated keys (B, KV, S, hd), shared by the group
    v: Any            # values (B, KV, S, hd)
    Ps: list          # each query block's attention weights (B, KV, n G, S1)
    n_heads: int
    start_pos: int


def forward(x: Any, p: dict[str, Any], cos: Any, sin: Any, n_heads: int, n_kv: int, head_dim: int,
            kv: tuple[Any, Any] | None = None, start_pos: int = 0, key_mask: Any = None,
            fused: bool = False, keep: bool = True) -> tuple[Any, FastAttentionCache | None]:
    """= layers.attention.forward: x (B, T, D) -> y (B, T, D).

    p: this layer's weights, keyed 'q_proj.weight', 'q_proj.bias' (optional), ... 'o_proj.weight';
       with 'qkv_proj.weight' (q, k, v stacked by rows; + 'qkv_proj.bias') one product does all three.
    kv: preallocated (k, v) buffers (B', n_kv, S_max, hd); this call writes positions
        [start_pos, start_pos + T) and attends to [0, start_pos + T).
    key_mask: optional bool (B, start_pos + T), False for padding slots that no query may see.
    fused: use the fused CUDA rotary and softmax kernels on CuPy input (same result).
    keep: return the cache a backward needs; False (inference) keeps no attention weights and returns None.
    """
    xp = get_array_module(x)
    B, T, _ = x.shape
    H, KV, hd, G = n_heads, n_kv, head_dim, n_heads // n_kv
    if "qkv_proj.weight" in p:
        frozen = all(projection.is_frozen(p, n) for n in ("q_proj", "k_proj", "v_proj"))
        qkv, cqkv = linear.forward(x, p["qkv_proj.weight"], p.get("qkv_proj.bias"), frozen)  # (B, T, (H + 2 KV) hd)
        qk = rope.apply(qkv[..., :(H + KV) * hd].reshape(B, T, H + KV, hd), cos, sin, fused)  # one rotation
        q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[..., (H + KV) * hd:]
        cin: tuple = (cqkv,)
    else:
        q, cq = projection.forward(x, p, "q_proj")
        k, ck = projection.forward(x, p, "k_proj")
        v, cv = projection.forward(x, p, "v_proj")
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
    # the G query heads of a KV head become rows, ordered (t, g): a block of queries is then a row range
    qg = q.reshape(B, T, KV, G, hd).transpose(0, 2, 1, 3, 4).reshape(B, KV, T * G, hd)
    if not keep and not fused_kernels(qg, fused):
        out = _infer(qg, k, v, hd ** -0.5, start_pos, G, key_mask)
        out = out.reshape(B, KV, T, G, hd).transpose(0, 2, 1, 3, 4).reshape(B, T, H * hd)
        return projection.forward(out, p, "o_proj")[0], None
    out = xp.empty_like(qg)
    Ps = []                                      # each block's attention weights, for the backward
    for t0, t1 in _blocks(T):
        S1, rows = start_pos + t1, slice(t0 * G, t1 * G)
        P = qg[:, :, rows] @ k[:, :, :S1].transpose(0, 1, 3, 2)              # (B, KV, (t1 - t0) G, S1)
        P = _causal_softmax_(P, hd ** -0.5, start_pos, t0, G, key_mask, fused)
        out[:, :, rows] = P @ v[:, :, :S1]
        Ps.append(P)
    out = out.reshape(B, KV, T, G, hd).transpose(0, 2, 1, 3, 4).reshape(B, T, H * hd)
    y, co = projection.forward(out, p, "o_proj")
    return y, FastAttentionCache(cin, co, cos, sin, qg, k, v, Ps, H, start_pos)


def _infer(qg: Any, k: Any, v: Any, scale: float, start_pos: int, G: int, key_mask: Any) -> Any:
    """The forward's attention core when no backward follows: the same blocks, four passes fewer over the
    scores. The scale goes on the queries (T rows, not T x S scores), the causal mask only on the keys a block
    shares with its own queries (the ones before it are seen by all), the softmax's division on the (rows, hd)
    output instead of the (rows, S) weights, and the weights' row sums come out of the weights-times-values
    product (a column of ones beside the values: 1/hd more of that product, against a pass over the weights).
    On the host a long prompt's blocks are shared out over the free cores, one (block, batch row, KV head) at
    a time: the element-wise passes (max, exp) are single-threaded in NumPy and at 8k tokens cost more than
    the products. qg (B, KV, T G, hd) -> same."""
    xp = get_array_module(qg)
    B, KV, TG, hd = qg.shape
    qg = qg * qg.dtype.type(scale)
    kT = k.transpose(0, 1, 3, 2)                                             # (B, KV, hd, S)
    v1 = xp.empty(v.shape[:-1] + (hd + 1,), dtype=v.dtype)                   # (B, KV, S, hd + 1): [v, 1]
    v1[..., :hd] = v
    v1[..., hd] = 1.0
    out = xp.empty_like(qg)
    lowest = xp.finfo(qg.dtype).min      # finite, as in _causal_softmax_: a fully masked row stays finite

    def block(bs: slice, hs: slice, t0: int, t1: int) -> None:
        n, S0, S1, rows = t1 - t0, start_pos + t0, start_pos + t1, slice(t0 * G, t1 * G)
        s = qg[bs, hs, rows] @ kT[bs, hs, :, :S1]                            # (b, h, n G, S1)
        b, h = s.shape[:2]
        if n > 1:   # query t0 + i sees keys up to S0 + i: only the block's last n keys need masking
            hide = xp.arange(n)[None, :] > xp.arange(n)[:, None]                              # (n, n)
            xp.copyto(s.reshape(b, h, n, G, S1)[..., S0:], lowest, where=hide[:, None, :])
        if key_mask is not None:
            xp.copyto(s.reshape(b, h, n, G, S1), lowest, where=~key_mask[bs, None, None, None, :S1].astype(bool))
        s -= s.max(axis=-1, keepdims=True)
        e = xp.exp(s, out=s)
        o = e @ v1[bs, hs, :S1]                                              # (b, h, n G, hd + 1): [e v, sum e]
        xp.divide(o[..., :hd], o[..., hd:], out=out[bs, hs, rows])

    T = TG // G
    if xp is np and B * KV * TG * (start_pos + T / 2) >= PARALLEL_MIN:
        tasks = [(slice(b, b + 1), slice(h, h + 1), t0, t1)       # the costliest (last) blocks first
                 for t0, t1 in reversed(_blocks(T)) for b in range(B) for h in range(KV)]
        threads.share([lambda t=t: block(*t) for t in tasks])
        return out
    everything = slice(None)
    for t0, t1 in _blocks(T):
        block(everything, everything, t0, t1)
    return out


# score entries (rows x keys) of a call from which its blocks are shared out: measured on 2 cores, sharing won
# from ~4k tokens (4096: 632 -> 366 ms per layer) and lost at 2k (its small pieces fight over the GIL)
PARALLEL_MIN = 1 << 26


def _blocks(T: int) -> list[tuple[int, int]]:
    """[t0, t1) ranges of BLOCK queries. Block [t0, t1) attends to keys before start_pos + t1 only, so the
    causal upper triangle beyond a block is never computed, and a block's scores stay small enough for cache."""
    return [(t0, min(T, t0 + BLOCK)) for t0 in range(0, T, BLOCK)]


def _causal_softmax_(scores: Any, scale: float, start_pos: int, t0: int, G: int, key_mask: Any,
                     fused: bool) -> Any:
    """In place: softmax(scores * scale) over the keys each row may see; scores (B, KV, n G, S1) are the
    rows (t, g) of queries t0 .. t0 + n - 1 against keys 0 .. S1 - 1. Returns P (the same array)."""
    if kf := fused_kernels(scores, fused):                                     # the same P in one pass
        return kf.causal_softmax_(scores, scale, start_pos, t0, G, key_mask)
    xp = get_array_module(scores)
    B, KV, nG, S1 = scores.shape
    n = nG // G
    scores *= scale
    if n > 1 or key_mask is not None:  # one query (the last so far) sees every key: nothing to mask
        # query t sits at position start_pos + t and may see keys 0 .. start_pos + t
        mask = xp.arange(S1)[None, :] <= (start_pos + xp.arange(t0, t0 + n))[:, None]      # (n, S1)
        mask = mask[:, None, :]                                                            # (n, 1, S1)
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, None, :S1].astype(bool)                 # (B, 1, n, 1, S1)
        # a large finite negative, not -inf: a fully masked (padding) row then stays finite (equal weights
        # over its block's keys; no real token ever reads that row's output)
        xp.copyto(scores.reshape(B, KV, n, G, S1), xp.finfo(scores.dtype).min, where=~mask)
    scores -= scores.max(axis=-1, keepdims=True)
    P = xp.exp(scores, out=scores)
    P /= P.sum(axis=-1, keepdims=True)
    return P


def backward(dy: Any, cache: FastAttentionCache, fused: bool = False) -> tuple[Any, dict[str, Any]]:
    """= layers.attention.backward: -> dx (B, T, D), grads keyed like p (calls that wrote no KV cache)."""
    cin, co, cos, sin, qg, k, v, Ps, H, start_pos = cache
    B, KV, TG, hd = qg.shape
    G = H // KV
    T = TG // G
    xp = get_array_module(dy)
    grads: dict[str, Any] = {}
    dout = projection.backward(dy, co, "o_proj", grads)
    dout = dout.reshape(B, T, KV, G, hd).transpose(0, 2, 1, 3, 4).reshape(B, KV, T * G, hd)   # rows (t, g)

    dqg = xp.empty_like(qg)
    dk, dv = xp.zeros_like(k), xp.zeros_like(v)                              # (B, KV, S, hd)
    for (t0, t1), P in zip(_blocks(T), Ps):
        S1, rows = start_pos + t1, slice(t0 * G, t1 * G)
        do = dout[:, :, rows]
        dv[:, :, :S1] += P.transpose(0, 1, 3, 2) @ do                        # sums the group's rows
        dP = do @ v[:, :, :S1].transpose(0, 1, 3, 2)                         # (B, KV, (t1 - t0) G, S1)
        # softmax backward: dS = P * (dP - sum_j P dP); masked entries have P = 0 and stay 0
        if kf := fused_kernels(dy, fused):
            dS = kf.softmax_backward_(dP, P, hd ** -0.5)
        else:
            dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))
            dS *= hd ** -0.5
        dqg[:, :, rows] = dS @ k[:, :, :S1]
        dk[:, :, :S1] += dS.transpose(0, 1, 3, 2) @ qg[:, :, rows]

    dq = dqg.reshape(B, KV, T, G, hd).transpose(0, 2, 1, 3, 4).reshape(B, T, H, hd)
    dq = rope.apply_backward(dq, cos, sin, fused).reshape(B, T, H * hd)
    dk = rope.apply_backward(dk.transpose(0, 2, 1, 3), cos, sin, fused).reshape(B, T, KV * hd)
    dv = dv.transpose(0, 2, 1, 3).reshape(B, T, KV * hd)
    return backward_split(("q_proj", "k_proj", "v_proj"), (dq, dk, dv), cin, grads), grads
