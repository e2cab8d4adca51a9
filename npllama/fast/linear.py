"""The linear layer's backward as the speed layer runs it: dW laid out like W, and the backward of several
projections of one input done as one stacked product (see fast.storage)."""
from __future__ import annotations

from typing import Any

from npllama.backend import get_array_module
from npllama.layers import linear, projection


def backward(dy: Any, cache: linear.LinearCache) -> tuple[Any, Any, Any]:
    """= layers.linear.backward, but a W kept (in, out) in memory (a tall matrix: fast.storage) gets its
    dW in the same order, so the optimizer's element-wise update walks both alike (mixed orders: 2x slower)."""
    x, W, has_bias, frozen = cache
    if frozen or W.flags.c_contiguous or not W.T.flags.c_contiguous:
        return linear.backward(dy, cache)
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])    # (N, out), (N, in)
    db = dy2.sum(axis=0) if has_bias else None
    return (dy2 @ W).reshape(x.shape), (x2.T @ dy2).T, db


def backward_split(names: tuple[str, ...], dys: tuple[Any, ...], caches: tuple, grads: dict[str, Any]) -> Any:
    """Backward of projections of one input, done as one stacked linear (one cache) or one each.

    dys: each projection's output gradient. Adds '<name>.weight' (and '.bias') to grads; returns dx.
    With one stacked cache the gradients are row blocks of one stacked dW (views, not copies), and none
    when the stack is frozen. One cache per projection may each carry a LoRA (npllama.layers.projection).
    """
    if len(caches) == 1:
        xp = get_array_module(dys[0])
        dx, dW, db = backward(xp.concatenate(dys, axis=-1), caches[0])
        if dW is None:
            return dx
        bounds = [0]
        for d in dys:
            bounds.append(bounds[-1] + d.shape[-1])
        for name, a, b in zip(names, bounds[:-1], bounds[1:]):
            grads[f"{name}.weight"] = dW[a:b]
            if db is not None:
                grads[f"{name}.bias"] = db[a:b]
        return dx
    dx = None
    for name, d, c in zip(names, dys, caches):
        dxi = projection.backward(d, c, name, grads)
        dx = dxi if dx is None else dx + dxi
    return dx

