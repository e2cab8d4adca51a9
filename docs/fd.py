"""Central finite differences and the relative error every backward page of the course asserts on.

    df/dx_i ~ (f(x + h e_i) - f(x - h e_i)) / 2h        error O(h^2) from the Taylor series, O(eps/h) from rounding

In float64 with h = 1e-5 both terms sit near 1e-10 of the gradient's size, far below the 1e-6 the pages ask.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

TOL = 1e-6      # the course's bar: float64 analytic vs numerical gradient, max relative error


def numerical_grad(f: Callable[[], float], x: np.ndarray, h: float = 1e-5,
                   coords: Sequence[int] | None = None) -> np.ndarray:
    """df/dx by central differences; f() reads x, which is nudged in place and restored.

    coords: flat indices to probe (-> a 1-D array of those entries); None: every entry (-> x's shape)."""
    if x.dtype != np.float64:
        raise TypeError(f"finite differences need float64 (got {x.dtype}): float32 rounding swamps the O(h^2) term")
    flat = x.reshape(-1)
    if not np.shares_memory(flat, x):
        raise ValueError("x must be contiguous: the nudges have to reach the array f() reads")
    idx = range(x.size) if coords is None else coords
    out = np.empty(len(idx))
    for n, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + h
        up = f()
        flat[i] = old - h
        down = f()
        flat[i] = old
        out[n] = (up - down) / (2 * h)
    return out.reshape(x.shape) if coords is None else out


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b| (b the numerical reference); 0 when both are exactly zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    scale = np.abs(b).max()
    diff = np.abs(a - b).max()
    return float(diff / scale) if scale > 0 else float(diff)


def check(name: str, analytic: np.ndarray, numerical: np.ndarray, tol: float = TOL) -> float:
    """Print and assert rel_error(analytic, numerical) <= tol; returns the error."""
    err = rel_error(analytic, numerical)
    print(f"{name:<36} relative error {err:.1e}")
    assert err <= tol, f"{name}: analytic gradient is off by {err:.2e} relative (tolerance {tol:.0e})"
    return err
