"""Fused CUDA kernels for the layers, written with CuPy's ElementwiseKernel / ReductionKernel.

Each function here is the same math as the plain array code in `npllama/layers/` and returns the same
values and the same `cache` tuple (so a fused forward may meet a plain backward and vice versa); it only
does the work in fewer passes over memory. The plain code stays the reference: tests/test_gpu.py checks
every function against it in float32 and float64. `T` in a kernel is the array dtype (float32 or float64).

Loaded through `npllama.backend.fused_kernels`, i.e. when CuPy is in use. CuPy itself is imported only
when the kernels are first built (`_kernels()`), so importing this module never needs it.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any


@functools.lru_cache(maxsize=None)
def _kernels() -> SimpleNamespace:
    """Build every kernel object once (CuPy compiles each on first call, per dtype, and caches it)."""
    import cupy
    EK, RK = cupy.ElementwiseKernel, cupy.ReductionKernel
    return SimpleNamespace(
        # RMSNorm forward: sum of squares along the last axis; then rstd; then xhat and y in one pass
        sumsq=RK("T x", "T y", "x * x", "a + b", "y = a", "0", "npllama_rms_sumsq"),
        rstd=EK("T ss, T d, T eps", "T r", "r = (T)1 / sqrt(ss / d + eps)", "npllama_rms_rstd"),
        rms_apply=EK("T x, T r, T w", "T xhat, T y", "xhat = x * r; y = xhat * w", "npllama_rms_apply"),
        # RMSNorm backward: per row sum(dy w xhat); per column sum(dy xhat); then dx in one pass
        rms_rowdot=RK("T dy, T w, T xhat", "T y", "dy * w * xhat", "a + b", "y = a", "0", "npllama_rms_rowdot"),
        colsum_mul=RK("T p, T q", "T y", "p * q", "a + b", "y = a", "0", "npllama_colsum_mul"),
        rms_dx=EK("T dy, T w, T xhat, T r, T dot, T d", "T dx", "dx = r * (dy * w - xhat * (dot / d))",
                  "npllama_rms_dx"),
        # RoPE: y = rotate-half rotation of x (B, T, H, hd) by tables (R, 1, hd/2), R = T or B*T.
        # sign = +1 is the forward rotation, -1 its inverse (the backward). Raw arrays are indexed
        # in C order whatever their strides, so x may be a transposed view.
        rope=EK("raw T x, raw T ct, raw T st, int64 hd, int64 nh, int64 rows, T sign", "T y", """
            const ptrdiff_t h = hd / 2;
            const ptrdiff_t d = i % hd;                    // coordinate within the head
            const ptrdiff_t r = (i / hd / nh) % rows;      // table row: t, or b * T + t
            const ptrdiff_t j = d < h ? d : d - h;         // frequency index of the pair (d, d +- h)
            const T c = ct[r * h + j];
            const T s = st[r * h + j];
            if (d < h) {
                y = x[i] * c - sign * x[i + h] * s;        // y1 = x1 cos - x2 sin
            } else {
                y = x[i] * c + sign * x[i - h] * s;        // y2 = x2 cos + x1 sin
            }
            """, "npllama_rope"),
        # SwiGLU between the linears: s = sigmoid(g), a = silu(g) = g s, h = a u; and its backward
        swiglu_fwd=EK("T g, T u", "T s, T a, T h", "s = (T)1 / ((T)1 + exp(-g)); a = g * s; h = a * u",
                      "npllama_swiglu_fwd"),
        swiglu_bwd=EK("T dh, T g, T s, T u, T a", "T dg, T du",
                      "du = dh * a; dg = dh * u * (s * ((T)1 + g * ((T)1 - s)))", "npllama_swiglu_bwd"),
        # cross-entropy: log(sum(exp(z))) per row without materializing exp(z) ...
        logsumexp=RK("T z", "T y", "exp(z)", "a + b", "y = log(a)", "0", "npllama_logsumexp"),
        # ... and, in place on the shifted logits z (N, V): d = (softmax - onehot(target)) * scale
        xent_bwd=EK("T lse, I tgt, T scale, int64 V", "T d",
                    "d = (exp(d - lse) - ((i % V) == tgt ? (T)1 : (T)0)) * scale", "npllama_xent_bwd"),
    )


# ---------------------------------------------------------------- RMSNorm
def rmsnorm_forward(x: Any, w: Any, eps: float) -> tuple[Any, tuple]:
    """= layers.rmsnorm.forward: x (..., D), w (D,) -> y, cache (xhat, rstd (..., 1), w)."""
    K = _kernels()
    rstd = K.rstd(K.sumsq(x, axis=-1, keepdims=True), x.shape[-1], eps)
    xhat, y = K.rms_apply(x, rstd, w)
    return y, (xhat, rstd, w)


def rmsnorm_backward(dy: Any, cache: tuple) -> tuple[Any, Any]:
    """= layers.rmsnorm.backward: -> dx (..., D), dw (D,)."""
    K = _kernels()
    xhat, rstd, w = cache
    D = xhat.shape[-1]
    dw = K.colsum_mul(dy.reshape(-1, D), xhat.reshape(-1, D), axis=0)
    dot = K.rms_rowdot(dy, w, xhat, axis=-1, keepdims=True)
    return K.rms_dx(dy, w, xhat, rstd, dot, D), dw


# ---------------------------------------------------------------- RoPE
def _rotate(x: Any, cos: Any, sin: Any, sign: float) -> Any:
    import cupy
    hd, nh = x.shape[-1], x.shape[-2]
    rows = cos.size // (hd // 2)
    if x.ndim != 4 or cos.dtype != x.dtype or (x.shape[0] * x.shape[1]) % rows:
        raise ValueError(f"rope: tables {tuple(cos.shape)} {cos.dtype} do not fit x {tuple(x.shape)} {x.dtype}")
    y = cupy.empty(x.shape, dtype=x.dtype)
    _kernels().rope(x, cos, sin, hd, nh, rows, sign, y)
    return y


def rope_apply(x: Any, cos: Any, sin: Any) -> Any:
    """= layers.rope.apply: x (B, T, H, hd), tables (T, 1, hd/2) or (B, T, 1, hd/2)."""
    return _rotate(x, cos, sin, 1.0)


def rope_apply_backward(dy: Any, cos: Any, sin: Any) -> Any:
    """= layers.rope.apply_backward: the inverse rotation."""
    return _rotate(dy, cos, sin, -1.0)


# ---------------------------------------------------------------- SwiGLU
def swiglu_forward(g: Any, u: Any) -> tuple[Any, Any, Any]:
    """-> s = sigmoid(g), a = silu(g) = g s, h = a u (what layers.mlp computes between its linears)."""
    return _kernels().swiglu_fwd(g, u)


def swiglu_backward(dh: Any, g: Any, s: Any, u: Any, a: Any) -> tuple[Any, Any]:
    """-> dg = dh u silu'(g), du = dh a."""
    return _kernels().swiglu_bwd(dh, g, s, u, a)


# ---------------------------------------------------------------- softmax cross-entropy
def logsumexp_shifted(z: Any) -> Any:
    """log(sum(exp(z), axis=-1)) for z (N, V) -> (N,)."""
    return _kernels().logsumexp(z, axis=-1)


def xent_backward_(z: Any, lse: Any, tgt: Any, scale: Any) -> Any:
    """Overwrite z (N, V) with (exp(z - lse) - onehot(tgt)) * scale, per row; returns z."""
    _kernels().xent_bwd(lse[:, None], tgt[:, None], scale[:, None], z.shape[-1], z)
    return z
