"""Preallocated per-layer key/value buffers for incremental decoding."""
from __future__ import annotations

from typing import Any


class KVCache:
    """K and V for every layer, each (batch, n_kv_heads, max_len, head_dim), allocated once."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: Any, xp: Any) -> None:
        # zeros, not empty: slots never written stay finite, so a masked-out slot cannot turn into NaN
        self.k = [xp.zeros((batch_size, n_kv_heads, max_len, head_dim), dtype=dtype) for _ in range(n_layers)]
        self.v = [xp.zeros((batch_size, n_kv_heads, max_len, head_dim), dtype=dtype) for _ in range(n_layers)]
        self.batch_size = batch_size
        self.max_len = max_len

    def layer(self, i: int) -> tuple[Any, Any]:
        """(k, v) buffers of layer i."""
        return self.k[i], self.v[i]

    @property
    def nbytes(self) -> int:
        """Bytes held by all buffers."""
        return sum(a.nbytes for a in self.k + self.v)
