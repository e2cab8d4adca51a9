"""Inference on the host: the fast layers' math with nothing kept for a backward, in fewer NumPy passes
and calls. `InferOps` serves every `Llama.forward` on NumPy; `StepOps` adds the decoding step (one new
token per row through the KV cache).

Why: a forward that no backward follows need not keep SwiGLU's sigmoid and silu nor RMSNorm's normalized
input, so each is a pass (and an array) fewer. And at one token a layer's matrix-vector products stream ~17
MB of weights in ~1 ms while everything else is arrays of a few hundred numbers, where a NumPy call costs
its overhead (1.5-5 us on the machines measured), not its arithmetic: the general layers spend ~60 calls
per layer on shapes, masks and caches that one token does not need (about 370 us per layer on an
Intel(R) Xeon(R) Processor @ 2.60GHz, 2 cores: a quarter of the step); the step's layer is ~30 calls.
Results equal the general path's up to rounding (tested in float64).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from npllama.fast import mlp as fast_mlp, rope, threads
from npllama.fast.ops import FastOps
from npllama.transformer import Context


def project(x2: Any, W: Any) -> Any:
    """x2 (N, in) @ W.T for W (out, in). A batch of 2-16 decoded rows against a W stored (out, in) goes as
    (W @ x2.T).T: OpenBLAS then packs the few rows, not the whole matrix, for the same product
    (Intel(R) Xeon(R) Processor @ 2.60GHz, 2 cores, 8 rows: 1.3-1.6x faster; bench/README.md).
    One row is a matrix-vector product either way."""
    if 2 <= x2.shape[0] <= 16 and W.flags.c_contiguous:
        return (W @ x2.T).T
    return x2 @ W.T


class InferOps(FastOps):
    """FastOps for a host forward that keeps nothing for a backward (caches come back None).

    Layers without a stacked gate/up (LoRA adapters, rebound weights) go to FastOps."""

    def rmsnorm(self, x: Any, w: Any) -> tuple[Any, None]:
        D = x.shape[-1]
        x2 = x.reshape(-1, D)                                                    # (N, D)
        ms = np.einsum("nd,nd->n", x2, x2)[:, None]                             # sums of squares: no (N, D) temporary
        ms /= D
        ms += self.config.rms_norm_eps
        np.sqrt(ms, out=ms)
        y = x2 / ms
        y *= w
        return y.reshape(x.shape), None

    def mlp(self, x: Any, w: dict) -> tuple[Any, Any]:
        if "gate_up_proj.weight" not in w:
            return super().mlp(x, w)
        x2 = x.reshape(-1, x.shape[-1])
        gu = project(x2, w["gate_up_proj.weight"])                              # (N, 2 I)
        if "gate_up_proj.bias" in w:
            gu += w["gate_up_proj.bias"]
        I = gu.shape[1] // 2
        h = np.empty((gu.shape[0], I), dtype=gu.dtype)

        def rows(r: slice) -> None:      # silu(g) u = g / (1 + exp(-g)) u: four passes, one array
            g, t = gu[r, :I], h[r]
            np.negative(g, out=t)
            np.exp(t, out=t)
            t += 1.0
            np.divide(g, t, out=t)
            t *= gu[r, I:]
        if h.size >= fast_mlp.PARALLEL_MIN:     # shared out in row blocks, as the general path does
            threads.share_rows(rows, h.shape[0], 4)
        else:
            rows(slice(None))
        y = project(h, w["down_proj.weight"])
        if "down_proj.bias" in w:
            y += w["down_proj.bias"]
        return y.reshape(x.shape), None


class StepOps(InferOps):
    """InferOps for a call of one token per row that writes a KV cache.

    An attention without a stacked q/k/v (LoRA adapters, rebound weights) goes to FastOps."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._tables: tuple = (None, None)       # (the cos array of the current call, its pair tables)

    def attention(self, x: Any, w: dict, i: int, ctx: Context) -> tuple[Any, Any]:
        if "qkv_proj.weight" not in w or ctx.cache is None:
            return super().attention(x, w, i, ctx)
        c = self.config
        H, KV, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        B, G, p = x.shape[0], H // KV, ctx.start_pos
        qkv = project(x.reshape(B, -1), w["qkv_proj.weight"])                  # (B, (H + 2 KV) hd)
        if "qkv_proj.bias" in w:
            qkv += w["qkv_proj.bias"]
        r = rope.rotate(qkv[:, :(H + KV) * hd].reshape(B, 1, H + KV, hd), *self._pair_tables(ctx))
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
        y = project(o.reshape(B, H * hd), w["o_proj.weight"])
        if "o_proj.bias" in w:
            y += w["o_proj.bias"]
        return y.reshape(x.shape), None

    def _pair_tables(self, ctx: Context) -> tuple[Any, Any]:
        """rope.pair_tables of this call's position(s): every layer of a call shares them."""
        if self._tables[0] is not ctx.cos:
            self._tables = (ctx.cos, rope.pair_tables(ctx.cos, ctx.sin))
        return self._tables[1]
