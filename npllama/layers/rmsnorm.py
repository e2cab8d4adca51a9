"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * w  (no mean subtraction, no bias)."""
from __future__ import annotations

from typing import Any

from npllama.backend import fused_kernels, get_array_module


def forward(x: Any, w: Any, eps: float, fused: bool = False) -> tuple[Any, tuple]:
    """x (..., D), w (D,) -> y (..., D). fused: use the CUDA kernel on CuPy input (same result)."""
    if k := fused_kernels(x, fused):
        return k.rmsnorm_forward(x, w, eps)
    xp = get_array_module(x)
    # sum / D is what mean computes, minus its Python-level wrapper (a decode step calls this 61 times)
    rstd = 1.0 / xp.sqrt((x * x).sum(axis=-1, keepdims=True) / x.shape[-1] + eps)   # (..., 1)
    xhat = x * rstd
    return xhat * w, (xhat, rstd, w)


def backward(dy: Any, cache: tuple, fused: bool = False) -> tuple[Any, Any]:
    """-> dx (..., D), dw (D,)."""
    if k := fused_kernels(dy, fused):
        return k.rmsnorm_backward(dy, cache)
    xhat, rstd, w = cache
    dw = (dy * xhat).reshape(-1, xhat.shape[-1]).sum(axis=0)
    dxhat = dy * w
    # d/dx of x*rstd: the direct term, minus the part of dxhat along xhat (rstd depends on x)
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, dw
