"""The array backend: NumPy on the CPU, CuPy on an NVIDIA GPU, chosen per model.

Layer code never imports either module directly; it asks `get_array_module(x)` for the
module its inputs live in, so one body serves both. Host/device copies happen only here.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

BACKENDS = ("numpy", "cupy")
DTYPES = {"float32": np.float32, "float64": np.float64}


class BackendError(RuntimeError):
    """A backend was asked for that cannot be used here (CuPy missing, no GPU)."""


def get_backend(name: str) -> ModuleType:
    """Return the array module for a backend name ('numpy' or 'cupy')."""
    if name == "numpy":
        return np
    if name == "cupy":
        try:
            import cupy
        except ImportError as e:
            raise BackendError(
                "backend='cupy' needs CuPy: pip install 'npllama[gpu]' (cupy-cuda12x) on a machine "
                f"with an NVIDIA GPU ({e})") from None
        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # CUDA driver missing or no device
            raise BackendError(f"backend='cupy': CuPy is installed but no usable GPU was found ({e})") from None
        return cupy
    raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


def get_array_module(*arrays: Any) -> ModuleType:
    """The module (numpy or cupy) that owns the given arrays; numpy for plain Python values."""
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            import cupy
            return cupy
    return np


def backend_name(xp: ModuleType) -> str:
    """'numpy' or 'cupy' for an array module."""
    return "numpy" if xp is np else "cupy"


def resolve_dtype(dtype: Any) -> np.dtype:
    """Accept 'float32' / 'float64' / a numpy dtype; refuse anything else by name."""
    key = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if key not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: npllama computes in float32 or float64")
    return np.dtype(DTYPES[key])


def to_host(x: Any) -> np.ndarray:
    """A NumPy array with the same values (a no-op for NumPy input)."""
    if type(x).__module__.split(".")[0] == "cupy":
        return x.get()
    return np.asarray(x)


def to_device(x: Any, xp: ModuleType, dtype: Any = None) -> Any:
    """Copy host data onto the backend `xp` (no copy when it is already there with that dtype)."""
    if xp is np:
        return np.asarray(to_host(x), dtype=dtype)
    return xp.asarray(x, dtype=dtype)


def scatter_add(dst: Any, index: Any, src: Any) -> None:
    """dst[index[i]] += src[i] along axis 0, with repeated indices summed (unlike `dst[index] += src`)."""
    xp = get_array_module(dst)
    if xp is not np:
        import cupyx
        cupyx.scatter_add(dst, index, src)
        return
    index = np.asarray(index).reshape(-1)
    src = src.reshape(index.shape[0], *dst.shape[1:])
    # np.add.at is unbuffered and slow; sorting the rows and summing runs with reduceat is
    # the same sum (each row added once) at matmul-like speed.
    order = np.argsort(index, kind="stable")
    sorted_idx = index[order]
    starts = np.flatnonzero(np.r_[True, sorted_idx[1:] != sorted_idx[:-1]])
    dst[sorted_idx[starts]] += np.add.reduceat(src[order], starts, axis=0)
