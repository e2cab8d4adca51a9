"""Linear layer in PyTorch layout: y = x @ W.T + b, with W (out, in)."""
from __future__ import annotations

from typing import Any, NamedTuple


class LinearCache(NamedTuple):
    x: Any            # the input (..., in)
    W: Any            # the weight (out, in)
    has_bias: bool


def forward(x: Any, W: Any, b: Any = None) -> tuple[Any, LinearCache]:
    """x (..., in), W (out, in), b (out,) or None -> y (..., out)."""
    x2 = x.reshape(-1, x.shape[-1])      # one 2-D GEMM instead of a batch of small ones
    y = x2 @ W.T
    if b is not None:
        y = y + b
    return y.reshape(*x.shape[:-1], W.shape[0]), LinearCache(x, W, b is not None)


def backward(dy: Any, cache: LinearCache) -> tuple[Any, Any, Any]:
    """-> dx (..., in), dW (out, in), db (out,) or None."""
    x, W, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])   # (N, out)
    x2 = x.reshape(-1, x.shape[-1])      # (N, in)
    dx = (dy2 @ W).reshape(x.shape)
    dW = dy2.T @ x2
    db = dy2.sum(axis=0) if has_bias else None
    return dx, dW, db
