"""SwiGLU feed-forward, computed faster than its reference `npllama.layers.mlp` (same results): gate and up
as one stacked product, silu and the product fused into one CUDA kernel on CuPy."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from npllama.backend import fused_kernels, get_array_module
from npllama.fast import threads
from npllama.fast.linear import backward_split
from npllama.layers import linear, projection


class FastMLPCache(NamedTuple):
    inputs: tuple     # the LinearCache of the stacked gate/up product, or one per projection
    down_proj: Any
    g: Any            # gate(x) (B, T, I)
    s: Any            # sigmoid(g)
    u: Any            # up(x)
    a: Any            # silu(g)


def forward(x: Any, p: dict[str, Any], fused: bool = False) -> tuple[Any, FastMLPCache]:
    """= layers.mlp.forward: x (B, T, D) -> y (B, T, D); p keyed 'gate_proj.weight', 'up_proj.weight', 'down_proj.weight' (+ biases).

    With 'gate_up_proj.weight' (gate and up stacked by rows; + 'gate_up_proj.bias') one product does both.
    """
    xp = get_array_module(x)
    if "gate_up_proj.weight" in p:
        frozen = projection.is_frozen(p, "gate_proj") and projection.is_frozen(p, "up_proj")
        gu, cgu = linear.forward(x, p["gate_up_proj.weight"], p.get("gate_up_proj.bias"), frozen)   # (B, T, 2 I)
        I = gu.shape[-1] // 2
        g, u = gu[..., :I], gu[..., I:]
        cin: tuple = (cgu,)
    else:
        g, cg = projection.forward(x, p, "gate_proj")   # (B, T, I)
        u, cu = projection.forward(x, p, "up_proj")     # (B, T, I)
        cin = (cg, cu)
    if k := fused_kernels(x, fused):
        s, a, h = k.swiglu_forward(g, u)
    elif xp is np and g.size >= PARALLEL_MIN:
        s, a, h = _swiglu_shared(g, u)
    else:
        s = 1.0 / (1.0 + xp.exp(-g))                                             # sigmoid(g)
        a = g * s                                                                # silu(g)
        h = a * u
    y, cd = projection.forward(h, p, "down_proj")
    return y, FastMLPCache(cin, cd, g, s, u, a)


PARALLEL_MIN = 1 << 18   # gate entries (tokens x intermediate) from which the element-wise part is shared out


def _swiglu_shared(g: Any, u: Any) -> tuple[Any, Any, Any]:
    """(sigmoid(g), silu(g), silu(g) * u) as the plain expressions give them, in row blocks on the free
    cores (npllama.fast.threads): NumPy's exp is single-threaded and costs ~16 multiplies an element."""
    I = g.shape[-1]
    g2, u2 = g.reshape(-1, I), u.reshape(-1, I)                              # (N, I) views of the stacked product
    s, a, h = (np.empty(g2.shape, dtype=g.dtype) for _ in range(3))

    def rows(r: slice) -> None:
        sr = s[r]
        np.negative(g2[r], out=sr)
        np.exp(sr, out=sr)
        sr += 1.0
        np.reciprocal(sr, out=sr)                                            # 1 / (1 + exp(-g)): sigmoid(g)
        np.multiply(g2[r], sr, out=a[r])
        np.multiply(a[r], u2[r], out=h[r])
    threads.share_rows(rows, g2.shape[0], 4)
    return tuple(x.reshape(g.shape) for x in (s, a, h))


def _swiglu_backward_shared(dh: Any, g: Any, s: Any, u: Any, a: Any) -> tuple[Any, Any]:
    """(dg, du) as the plain expressions in backward give them, in row blocks on the free cores."""
    I = g.shape[-1]
    dh2, g2, s2, u2, a2 = (x.reshape(-1, I) for x in (dh, g, s, u, a))
    dg, du = np.empty(dh2.shape, dtype=dh.dtype), np.empty(dh2.shape, dtype=dh.dtype)

    def rows(r: slice) -> None:
        np.multiply(dh2[r], a2[r], out=du[r])
        t = np.subtract(1.0, s2[r])
        np.multiply(g2[r], t, out=t)
        np.add(1.0, t, out=t)
        np.multiply(s2[r], t, out=t)                                         # silu'(g) = s (1 + g (1 - s))
        np.multiply(dh2[r], u2[r], out=dg[r])
        dg[r] *= t
    threads.share_rows(rows, dh2.shape[0], 4)
    return dg.reshape(dh.shape), du.reshape(dh.shape)


def backward(dy: Any, cache: FastMLPCache, fused: bool = False) -> tuple[Any, dict[str, Any]]:
    """= layers.mlp.backward: -> dx (B, T, D), grads keyed like p."""
    cin, cd, g, s, u, a = cache
    grads: dict[str, Any] = {}
    dh = projection.backward(dy, cd, "down_proj", grads)
    if k := fused_kernels(dh, fused):
        dg, du = k.swiglu_backward(dh, g, s, u, a)
    elif get_array_module(dh) is np and g.size >= PARALLEL_MIN:
        dg, du = _swiglu_backward_shared(dh, g, s, u, a)
    else:
        du = dh * a
        dg = dh * u * (s * (1.0 + g * (1.0 - s)))    # silu'(g) = s + g s (1 - s)
    return backward_split(("gate_proj", "up_proj"), (dg, du), cin, grads), grads
