"""One new token per row through the KV cache (a decoding step) on the host, inference only: the fast
layers' math in the fewest NumPy calls.

Why: at one token a layer's matrix-vector products stream ~17 MB of weights in ~1 ms, and everything
else is arrays of a few hundred numbers, where a NumPy call costs its overhead (1.5-5 us on the machines
measured), not its arithmetic. The general layers spend ~60 calls per layer on shapes, masks and caches
that one token does not need (about 370 us per layer on an Intel Xeon, 2 cores: a quarter of the step).
Here a layer is ~30 calls: no backward cache, no query blocks, one rotation on a table built once per
step, in-place softmax and SwiGLU. The results equal the general path's up to rounding (tested in float64).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from npllama.fast.ops import FastOps
from npllama.transformer import Context


class StepOps(FastOps):
    """FastOps for a call of one token per row that writes a KV cache and keeps nothing for a backward.

    Layers it cannot take (no stacked q/k/v or gate/up: LoRA adapters, rebound weights) go to FastOps."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._tables: tuple = (None, None)       # (the cos array of the current call, its rotation tables)

    def rmsnorm(self, x: Any, w: Any) -> tuple[Any, None]:
        D = x.shape[-1]
        x2 = x.reshape(-1, D)                                                    # (B, D)
        # sum of squares as a (B, 1, D) @ (B, D, 1) product: one call, no (B, D) temporary
        rstd = np.matmul(x2[:, None, :], x2[:, :, None]).reshape(-1, 1)         # (B, 1)
        rstd /= D
        rstd += self.config.rms_norm_eps
        np.sqrt(rstd, out=rstd)
        y = x2 / rstd
        y *= w
        return y.reshape(x.shape), None

    def attention(self, x: Any, w: dict, i: int, ctx: Context) -> tuple[Any, Any]:
        if "qkv_proj.weight" not in w or ctx.cache is None:
            return super().attention(x, w, i, ctx)
        c = self.config
        H, KV, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        B, G, p = x.shape[0], H // KV, ctx.start_pos
        qkv = x.reshape(B, -1) @ w["qkv_proj.weight"].T                        # (B, (H + 2 KV) hd)
        if "qkv_proj.bias" in w:
            qkv += w["qkv_proj.bias"]
        cs, sn = self._rotation(ctx)                                             # (B or 1, 1, 2, hd/2)
        # rotate-half as two products: [x1, x2] * [c, c] + [x2, x1] * [-s, s] = [x1 c - x2 s, x2 c + x1 s]
        qk = qkv[:, :(H + KV) * hd].reshape(B, H + KV, 2, hd // 2)
        r = qk * cs
        r += qk[:, :, ::-1] * sn
        r = r.reshape(B, H + KV, hd)
        kbuf, vbuf = ctx.cache.layer(i)                                          # (B', KV, S_max, hd)
        kbuf[:B, :, p] = r[:, H:]
        vbuf[:B, :, p] = qkv[:, (H + KV) * hd:].reshape(B, KV, hd)
        q = r[:, :H].reshape(B, KV, G, hd)
        q *= q.dtype.type(hd ** -0.5)             # on the queries, as the general path does: not on B H S scores
        s = q @ kbuf[:B, :, :p + 1].transpose(0, 1, 3, 2)                       # (B, KV, G, S)
        if ctx.key_mask is not None:
            np.copyto(s, np.finfo(s.dtype).min, where=~ctx.key_mask[:, None, None, :p + 1].astype(bool))
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        o = s @ vbuf[:B, :, :p + 1]                                              # (B, KV, G, hd)
        o /= s.sum(axis=-1, keepdims=True)
        y = o.reshape(B, H * hd) @ w["o_proj.weight"].T
        if "o_proj.bias" in w:
            y += w["o_proj.bias"]
        return y.reshape(x.shape), None

    def _rotation(self, ctx: Context) -> tuple[Any, Any]:
        """The rotation's tables [c, c] and [-s, s] (B or 1, 1, 2, hd/2): every layer of a call shares them."""
        if self._tables[0] is not ctx.cos:
            c = ctx.cos.reshape(-1, 1, 1, ctx.cos.shape[-1])
            s = ctx.sin.reshape(c.shape)
            self._tables = (ctx.cos, (np.concatenate([c, c], axis=2), np.concatenate([-s, s], axis=2)))
        return self._tables[1]

    def mlp(self, x: Any, w: dict) -> tuple[Any, Any]:
        if "gate_up_proj.weight" not in w:
            return super().mlp(x, w)
        B = x.shape[0]
        gu = x.reshape(B, -1) @ w["gate_up_proj.weight"].T                     # (B, 2 I)
        if "gate_up_proj.bias" in w:
            gu += w["gate_up_proj.bias"]
        I = gu.shape[1] // 2
        g = gu[:, :I]
        t = np.negative(g)
        np.exp(t, out=t)
        t += 1.0
        np.reciprocal(t, out=t)                                                  # sigmoid(g)
        t *= g                                                                   # silu(g)
        t *= gu[:, I:]
        y = t @ w["down_proj.weight"].T
        if "down_proj.bias" in w:
            y += w["down_proj.bias"]
        return y.reshape(x.shape), None
