"""Token embedding: a row lookup forward, a scatter-add backward."""
from __future__ import annotations

from typing import Any, NamedTuple

from npllama.backend import get_array_module, scatter_add


class EmbeddingCache(NamedTuple):
    ids: Any          # (B, T) token ids
    shape: tuple      # W's shape (V, D)
    dtype: Any


def forward(ids: Any, W: Any) -> tuple[Any, EmbeddingCache]:
    """y[b, t] = W[ids[b, t]].   ids (B, T) int, W (V, D) -> y (B, T, D)."""
    return W[ids], EmbeddingCache(ids, W.shape, W.dtype)


def backward(dy: Any, cache: EmbeddingCache) -> Any:
    """dW: each row sums the dy of every position that looked it up (repeated ids accumulate)."""
    xp = get_array_module(dy)
    dW = xp.zeros(cache.shape, dtype=cache.dtype)
    scatter_add(dW, cache.ids.reshape(-1), dy.reshape(-1, cache.shape[1]))
    return dW
