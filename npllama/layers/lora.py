"""LoRA: a frozen linear layer plus a trainable low-rank update (Hu et al. 2021).

    y = x W^T + b + s · (dropout(x) A^T) B^T          A (r, in), B (out, r), s = alpha / r  (rsLoRA: alpha / sqrt(r))

Only A and B learn. W's gradient dy^T x is the largest product of a linear's backward, and a frozen W
needs none: skipping it is most of what LoRA saves. Dropout is inverted (kept inputs are scaled by
1 / (1 - p)), so the expected update is the same with and without it, and it acts on the adapter's
input only, as in PEFT.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from npllama.layers import linear


class Settings(NamedTuple):
    """What every adapted projection of a model shares."""
    scale: float              # s = alpha / r, or alpha / sqrt(r) with rsLoRA
    dropout: float = 0.0      # p
    rng: Any = None           # a numpy Generator while training with dropout; None: no dropout
    rows: Any = None          # (a, b, n): the input is rows [a, b) of a batch of n (data parallel), else None


def keep_mask(settings: Settings, shape: tuple, dtype: Any, xp: Any) -> Any:
    """Inverted dropout's mask for an input of `shape`: 1 / (1 - p) where kept, 0 where dropped; None if off.

    Drawn on the host, so a seed gives the same masks on NumPy and CuPy; a rank of a data-parallel run draws
    the whole batch's mask and keeps its rows, so that its masks are those one process would use."""
    if settings.rng is None or settings.dropout <= 0.0:
        return None
    p = settings.dropout
    if settings.rows is None:
        u = settings.rng.random(shape)
    else:
        a, b, n = settings.rows
        u = settings.rng.random((n, *shape[1:]))[a:b]
    keep = (u >= p) / (1.0 - p)
    return xp.asarray(keep.astype(np.dtype(dtype)))


class LoraCache(NamedTuple):
    base: linear.LinearCache   # x W^T + b
    xd: Any                    # dropout(x) (N, in): x itself without dropout
    keep: Any                  # the dropout mask times 1 / (1 - p) (N, in), or None
    z: Any                     # xd A^T (N, r)
    A: Any                     # (r, in)
    B: Any                     # (out, r)
    scale: float


def forward(x: Any, W: Any, b: Any, A: Any, B: Any, scale: float, keep: Any = None,
            frozen: bool = True) -> tuple[Any, LoraCache]:
    """x (..., in) -> y (..., out). keep: dropout's scaled keep mask (..., in) or None; frozen: W (and b) learn nothing."""
    y, base = linear.forward(x, W, b, frozen=frozen)
    x2 = x.reshape(-1, x.shape[-1])                                           # (N, in)
    k2 = None if keep is None else keep.reshape(x2.shape)
    xd = x2 if k2 is None else x2 * k2
    z = xd @ A.T                                                              # (N, r): the rank-r bottleneck
    y = y + (scale * (z @ B.T)).reshape(y.shape)                              # (..., out)
    return y, LoraCache(base, xd, k2, z, A, B, scale)


def backward(dy: Any, cache: LoraCache) -> tuple[Any, Any, Any, Any, Any]:
    """-> dx (..., in), dW (None when frozen), db (or None), dA (r, in), dB (out, r)."""
    dx, dW, db = linear.backward(dy, cache.base)
    dy2 = dy.reshape(-1, dy.shape[-1])                                        # (N, out)
    dB = cache.scale * (dy2.T @ cache.z)                                      # y += s z B^T
    dz = cache.scale * (dy2 @ cache.B)                                        # (N, r)
    dA = dz.T @ cache.xd                                                      # z = xd A^T
    dxd = dz @ cache.A                                                        # (N, in)
    if cache.keep is not None:
        dxd = dxd * cache.keep                                                # xd = x * keep
    return dx + dxd.reshape(dx.shape), dW, db, dA, dB
