"""Linear layer in PyTorch layout: y = x @ W.T + b, with W (out, in)."""
from __future__ import annotations

from typing import Any


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
