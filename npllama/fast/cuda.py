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

import numpy as np

# Block-wide max or sum of one value per thread (NT threads, a power of two); every thread gets the
# result. Shared by the RawModule sources here and in decode.py.
BLOCK_REDUCE = r"""
__device__ T block_reduce(T v, T* red, bool take_max) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (int st = NT / 2; st > 0; st >>= 1) {
        if (threadIdx.x < st) {
            const T a = red[threadIdx.x], o = red[threadIdx.x + st];
            red[threadIdx.x] = take_max ? (o > a ? o : a) : a + o;
        }
        __syncthreads();
    }
    const T r = red[0];
    __syncthreads();                        // red is reused by the next call
    return r;
}
"""

CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


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
    )


# ---------------------------------------------------------------- attention softmax
_SOFTMAX_THREADS = 256
_SOFTMAX_SOURCE = r"""
#define NT 256
extern "C" {
""" + BLOCK_REDUCE + r"""
// One block per row of scores (B, KV, n*G, S), in place: P = softmax of scores * scale over the keys the
// row's query may see (key j <= start_pos + t, and km[b, j] when has_mask), 0 for the others. Rows run
// over (t, g) for the queries t = t0 .. t0 + n - 1 (a block of fast.attention). A row that may see no
// key gets 1/S everywhere, as the plain code's large finite mask value gives.
__global__ void causal_softmax(T* __restrict__ s, const bool* __restrict__ km, int has_mask,
                               long long rows_per_slab, int KV, int G, int t0, int S, int kms, int start_pos,
                               T scale) {
    __shared__ T red[NT];
    const long long r = blockIdx.x;
    const int last = start_pos + t0 + (int)((r % rows_per_slab) / G);
    const bool* kmb = has_mask ? km + (r / (rows_per_slab * KV)) * kms : km;
    T* row = s + r * S;
    const T lowest = (T)-3.0e38;                         // below any real score
    T m = lowest;
    for (int j = threadIdx.x; j < S; j += NT) {
        if (j <= last && (!has_mask || kmb[j])) {
            const T v = row[j] * scale;
            row[j] = v;
            m = v > m ? v : m;
        }
    }
    m = block_reduce(m, red, true);
    const bool none = m == lowest;
    T sum = 0;
    for (int j = threadIdx.x; j < S; j += NT) {
        const T e = none ? (T)1 : ((j <= last && (!has_mask || kmb[j])) ? exp(row[j] - m) : (T)0);
        row[j] = e;
        sum += e;
    }
    sum = block_reduce(sum, red, false);
    for (int j = threadIdx.x; j < S; j += NT) row[j] = row[j] / sum;
}

// One block per row, in place on dp: dS = P * (dP - sum_j dP_j P_j) * scale.
__global__ void softmax_backward(T* __restrict__ dp, const T* __restrict__ p, int S, T scale) {
    __shared__ T red[NT];
    const long long r = blockIdx.x;
    T* d = dp + r * S;
    const T* q = p + r * S;
    T acc = 0;
    for (int j = threadIdx.x; j < S; j += NT) acc += d[j] * q[j];
    acc = block_reduce(acc, red, false);
    for (int j = threadIdx.x; j < S; j += NT) d[j] = q[j] * (d[j] - acc) * scale;
}
}  // extern "C"
"""


@functools.lru_cache(maxsize=None)
def _softmax_module(ctype: str) -> Any:
    import cupy
    return cupy.RawModule(code=f"typedef {ctype} T;\n" + _SOFTMAX_SOURCE)


def _check_rows(*arrays: Any) -> None:
    for a in arrays:
        if not a.flags.c_contiguous or a.dtype not in CTYPES:
            raise ValueError(f"attention softmax kernels need C-contiguous float32/float64 rows, got {a.dtype} "
                             f"{'contiguous' if a.flags.c_contiguous else 'strided'}")


def causal_softmax_(scores: Any, scale: float, start_pos: int, t0: int, G: int, key_mask: Any = None) -> Any:
    """In place on scores (B, KV, n*G, S) = q k^T (unscaled), rows (t, g) for queries t0 .. t0 + n - 1:
    the attention weights P that fast.attention computes with its mask, max shift, exp and
    normalization. key_mask (B, >= S) marks real keys. Returns scores."""
    import cupy
    _check_rows(scores)
    B, KV, nG, S = scores.shape
    km = cupy.zeros(1, dtype=bool) if key_mask is None else cupy.ascontiguousarray(key_mask, dtype=bool)
    fn = _softmax_module(CTYPES[scores.dtype]).get_function("causal_softmax")
    fn((B * KV * nG,), (_SOFTMAX_THREADS,),
       (scores, km, np.int32(key_mask is not None), np.int64(nG), np.int32(KV), np.int32(G), np.int32(t0),
        np.int32(S), np.int32(km.shape[-1]), np.int32(start_pos), scores.dtype.type(scale)))
    return scores


def softmax_backward_(dP: Any, P: Any, scale: float) -> Any:
    """In place on dP (rows of S): dS = P * (dP - sum(dP * P)) * scale, as fast.attention.backward. Returns dP."""
    _check_rows(dP, P)
    S = dP.shape[-1]
    fn = _softmax_module(CTYPES[dP.dtype]).get_function("softmax_backward")
    fn((dP.size // S,), (_SOFTMAX_THREADS,), (dP, P, np.int32(S), dP.dtype.type(scale)))
    return dP


# ---------------------------------------------------------------- RMSNorm
def rmsnorm_forward(x: Any, w: Any, eps: float) -> tuple[Any, tuple]:
    """= layers.rmsnorm.forward: x (..., D), w (D,) -> y, RMSNormCache (xhat, rstd (..., 1), w)."""
    from npllama.layers.rmsnorm import RMSNormCache
    K = _kernels()
    rstd = K.rstd(K.sumsq(x, axis=-1, keepdims=True), x.shape[-1], eps)
    xhat, y = K.rms_apply(x, rstd, w)
    return y, RMSNormCache(xhat, rstd, w)


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
