"""Rotary position embedding (RoPE) in Hugging Face's rotate-half layout, with its scaling types.

A head vector x = [x1, x2] (two halves) at position p is rotated pairwise:
    y1 = x1 * cos(p f) - x2 * sin(p f),   y2 = x2 * cos(p f) + x1 * sin(p f)
with one frequency f per pair. Frequencies are computed in float64 on the host (they are tiny)
and only the finished tables are cast to the model's dtype.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from npllama.backend import get_array_module


def inv_freq(config: Any, seq_len: int | None = None) -> np.ndarray:
    """Per-pair inverse frequencies (head_dim // 2,), float64, for the config's rope type.

    `seq_len` matters only to 'dynamic' scaling, which stretches the base once a call
    reaches past max_position_embeddings (as transformers does, per call).
    """
    dim = config.head_dim
    base = config.rope_theta
    s = config.rope_scaling or {"rope_type": "default"}
    kind = s["rope_type"]
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    if kind == "dynamic":
        max_pos = config.max_position_embeddings
        seq_len = max(seq_len or max_pos, max_pos)
        factor = s["factor"]
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    freq = 1.0 / base ** exponents
    if kind == "linear":
        freq = freq / s["factor"]
    elif kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freq
        # long wavelengths are slowed by `factor`, short ones kept, the band between blended smoothly
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = np.where(wavelen > old_ctx / low, freq / factor, freq)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
        freq = np.where(medium, blended, scaled)
    return freq


def tables(config: Any, positions: Any, dtype: Any, xp: Any = np) -> tuple[Any, Any]:
    """cos, sin of positions * inv_freq: positions (T,) or (B, T) ints -> (..., T, 1, head_dim // 2)."""
    pos = np.asarray(positions.get() if hasattr(positions, "get") else positions, dtype=np.float64)
    seq_len = int(pos.max()) + 1 if pos.size else 0
    angles = pos[..., None] * inv_freq(config, seq_len)            # (..., T, hd/2), float64
    cos = xp.asarray(np.cos(angles)[..., None, :], dtype=dtype)   # head axis of size 1 broadcasts
    sin = xp.asarray(np.sin(angles)[..., None, :], dtype=dtype)
    return cos, sin


def apply(x: Any, cos: Any, sin: Any) -> Any:
    """Rotate x (B, T, H, hd) by the tables (T, 1, hd/2) or (B, T, 1, hd/2)."""
    xp = get_array_module(x)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def apply_backward(dy: Any, cos: Any, sin: Any) -> Any:
    """Gradient of `apply` w.r.t. x: the inverse rotation (the tables are constants)."""
    xp = get_array_module(dy)
    h = dy.shape[-1] // 2
    dy1, dy2 = dy[..., :h], dy[..., h:]
    return xp.concatenate([dy1 * cos + dy2 * sin, dy2 * cos - dy1 * sin], axis=-1)
