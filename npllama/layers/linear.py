"""Linear layer in PyTorch layout: y = x @ W.T + b, with W (out, in)."""
from __future__ import annotations

from typing import Any, NamedTuple


class LinearCache(NamedTuple):
    x: Any            # the input (..., in)
    W: Any            # the weight (out, in)
    has_bias: bool
    frozen: bool = False   # W and b learn nothing: the backward skips their gradients


def forward(x: Any, W: Any, b: Any = None, frozen: bool = False) -> tuple[Any, LinearCache]:
    """x (..., in), W (out, in), b (out,) or None -> y (..., out); frozen: no dW, db in the backward."""
    x2 = x.reshape(-1, x.shape[-1])      # one 2-D GEMM instead of a batch of small ones
    y = x2 @ W.T
    if b is not None:
        y = y + b
    return y.reshape(*x.shape[:-1], W.shape[0]), LinearCache(x, W, b is not None, frozen)


def backward(dy: Any, cache: LinearCache) -> tuple[Any, Any, Any]:
    """-> dx (..., in), dW (out, in), db (out,) or None (dW and db None when frozen)."""
    x, W, has_bias, frozen = cache
    dy2 = dy.reshape(-1, dy.shape[-1])   # (N, out)
    dx = (dy2 @ W).reshape(x.shape)
    if frozen:                           # the weight's product is the costly one, and nobody wants it
        return dx, None, None
    x2 = x.reshape(-1, x.shape[-1])      # (N, in)
    dW = dy2.T @ x2
    db = dy2.sum(axis=0) if has_bias else None
    return dx, dW, db
