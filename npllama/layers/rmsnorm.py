"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * w  (no mean subtraction, no bias)."""
from __future__ import annotations

from typing import Any, NamedTuple

from npllama.backend import get_array_module


class RMSNormCache(NamedTuple):
    xhat: Any         # x / rms(x), (..., D)
    rstd: Any         # 1 / rms(x), (..., 1)
    w: Any            # the gain (D,)


def forward(x: Any, w: Any, eps: float) -> tuple[Any, RMSNormCache]:
    """x (..., D), w (D,) -> y (..., D)."""
    xp = get_array_module(x)
    rstd = 1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)   # (..., 1)
    xhat = x * rstd
    return xhat * w, RMSNormCache(xhat, rstd, w)


def backward(dy: Any, cache: RMSNormCache) -> tuple[Any, Any]:
    """-> dx (..., D), dw (D,)."""
    xhat, rstd, w = cache
    dw = (dy * xhat).reshape(-1, xhat.shape[-1]).sum(axis=0)
    dxhat = dy * w
    # d/dx of x * rstd: the direct term, minus the part of dxhat along xhat (rstd depends on x)
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, dw
