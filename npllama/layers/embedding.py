"""Token embedding: a row lookup forward, a scatter-add backward."""
from __future__ import annotations

from typing import Any

from npllama.backend import get_array_module, scatter_add


def forward(ids: Any, W: Any) -> tuple[Any, tuple]:
    """y[b, t] = W[ids[b, t]].   ids (B, T) int, W (V, D) -> y (B, T, D)."""
    return W[ids], (ids, W.shape, W.dtype)


def backward(dy: Any, cache: tuple) -> Any:
    """dW: each row sums the dy of every position that looked it up (repeated ids accumulate)."""
    ids, shape, dtype = cache
    xp = get_array_module(dy)
    dW = xp.zeros(shape, dtype=dtype)
    scatter_add(dW, ids.reshape(-1), dy.reshape(-1, shape[1]))
    return dW
