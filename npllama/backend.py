"""The array backend: NumPy on the CPU, CuPy on an NVIDIA GPU, chosen per model.

Layer code never imports either module directly; it asks `get_array_module(x)` for the
module its inputs live in, so one body serves both. Host/device copies happen only here.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np
from npllama.errors import InputError, NpllamaError

BACKENDS = ("numpy", "cupy")
DTYPES = {"float32": np.float32, "float64": np.float64}


class BackendError(NpllamaError, RuntimeError):
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
    raise InputError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


def get_array_module(*arrays: Any) -> ModuleType:
    """The module (numpy or cupy) that owns the given arrays; numpy for plain Python values."""
    for a in arrays:
        if is_cupy(a):
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
        raise InputError(f"unsupported dtype {dtype!r}: npllama computes in float32 or float64")
    return np.dtype(DTYPES[key])


def to_host(x: Any) -> np.ndarray:
    """A NumPy array with the same values (a no-op for NumPy input)."""
    if is_cupy(x):
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


def is_cupy(x: Any) -> bool:
    """True for a CuPy array (checked by type, so NumPy-only installs never import cupy)."""
    return type(x).__module__.split(".")[0] == "cupy"


def fused_kernels(x: Any, fused: bool) -> ModuleType | None:
    """The fused CUDA kernel module when `fused` is asked for and `x` lives on CuPy; None means: take the
    plain array path (always the case on NumPy). Layers call this so their dispatch stays two lines."""
    if not fused or not is_cupy(x):
        return None
    from npllama.fast import cuda
    return cuda


def int_range(x: Any) -> tuple[int, int]:
    """(min, max) of a non-empty integer array as Python ints, with one device->host transfer on CuPy
    (two separate `int(x.min())`, `int(x.max())` would each wait for the GPU)."""
    if not is_cupy(x):
        a = np.asarray(x)
        return int(a.min()), int(a.max())
    import cupy
    lo, hi = cupy.stack([x.min(), x.max()]).get()
    return int(lo), int(hi)


# cuBLAS math mode that lets single-precision routines use TF32 tensor cores (cublasMath_t in
# cublas_api.h); CuPy's cublas module names only CUBLAS_DEFAULT_MATH (0) and CUBLAS_TENSOR_OP_MATH (1).
_CUBLAS_TF32_TENSOR_OP_MATH = 3


def tf32_enabled(xp: ModuleType) -> bool:
    """Whether float32 matmuls on `xp` may use TF32 (never on NumPy; on CuPy off unless asked for)."""
    if xp is np:
        return False
    from cupy._core import _routines_linalg as linalg
    return linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_TF32


def set_tf32(xp: ModuleType, enabled: bool) -> None:
    """Allow (or forbid) TF32 tensor-core math in CuPy's float32 matmuls; a no-op on NumPy.

    CuPy has two float32 GEMM paths and each needs its own switch: 2-D products (`x @ W.T`) go through
    cublasGemmEx with the compute type from `cupy._core.set_compute_type` (what the CUPY_TF32=1
    environment variable sets), while batched products (attention) go through
    cublasGemmStridedBatchedEx, which follows the cuBLAS handle's math mode. This is process state
    (per device and thread for the handle): prefer the `tf32()` context manager, which restores it.
    """
    if xp is np:
        return
    from cupy._core import _routines_linalg as linalg
    from cupy_backends.cuda.libs import cublas
    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT)
    cublas.setMathMode(xp.cuda.device.get_cublas_handle(),
                       _CUBLAS_TF32_TENSOR_OP_MATH if enabled else cublas.CUBLAS_DEFAULT_MATH)


@contextlib.contextmanager
def tf32(xp: ModuleType, enabled: bool) -> Iterator[None]:
    """Run the body with TF32 float32 matmuls on or off, then restore exactly what was there before."""
    if xp is np:
        yield
        return
    from cupy._core import _routines_linalg as linalg
    from cupy_backends.cuda.libs import cublas
    handle = xp.cuda.device.get_cublas_handle()
    before = (linalg.get_compute_type(np.float32), cublas.getMathMode(handle))
    set_tf32(xp, enabled)
    try:
        yield
    finally:
        linalg.set_compute_type(np.float32, before[0])
        cublas.setMathMode(handle, before[1])
