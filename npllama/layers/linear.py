"""Linear layer in PyTorch layout: y = x @ W.T + b, with W (out, in)."""
from __future__ import annotations

from typing import Any

from npllama.backend import get_array_module


def forward(x: Any, W: Any, b: Any = None) -> tuple[Any, tuple]:
    """x (..., in), W (out, in), b (out,) or None -> y (..., out)."""
    x2 = x.reshape(-1, x.shape[-1])      # one 2-D GEMM instead of a batch of small ones
    y = x2 @ W.T
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], W.shape[0]), (x, W, b is not None)


def backward(dy: Any, cache: tuple) -> tuple[Any, Any, Any]:
    """-> dx (..., in), dW (out, in), db (out,) or None."""
    x, W, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])   # (N, out)
    x2 = x.reshape(-1, x.shape[-1])      # (N, in)
    dx = (dy2 @ W).reshape(x.shape)
    dW = dy2.T @ x2
    db = dy2.sum(axis=0) if has_bias else None
    return dx, dW, db


def backward_split(names: tuple[str, ...], dys: tuple[Any, ...], caches: tuple, grads: dict[str, Any]) -> Any:
    """Backward of projections of one input, done as one stacked linear (one cache) or one each.

    dys: each projection's output gradient. Adds '<name>.weight' (and '.bias') to grads; returns dx.
    With one stacked cache the gradients are row blocks of one stacked dW (views, not copies).
    """
    if len(caches) == 1:
        xp = get_array_module(dys[0])
        dx, dW, db = backward(xp.concatenate(dys, axis=-1), caches[0])
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
        dxi, grads[f"{name}.weight"], db = backward(d, c)
        if db is not None:
            grads[f"{name}.bias"] = db
        dx = dxi if dx is None else dx + dxi
    return dx
