"""A CPU stand-in for CuPy, for dry-running npllama's GPU code paths without a GPU (a dev tool: the package never
imports it; tests/test_gpu_emulated.py runs tests/test_gpu.py under it).

    PYTHONPATH=tools/fakecupy:$PWD python -m pytest -q -p no:faulthandler tests/test_gpu.py   # ~5 min, g++ needed

What it checks: the glue (argument order, shapes, dtypes, what is captured), the math of every
ElementwiseKernel / ReductionKernel body and RawModule source, and CuPy's host/device boundary, as strictly
as CuPy draws it:
- `ndarray` is not a numpy.ndarray. Mixing it with a numpy.ndarray in a ufunc, an operator, a kernel or a
  cupy function raises TypeError ("Unsupported type <class 'numpy.ndarray'>"); `cupy.asarray` / `cupy.array`
  copy host data in, and index arrays may live on the host, as in CuPy.
- `np.asarray(x)`, `np.array(x)` and anything else that reaches `__array__` raise TypeError ("Implicit
  conversion to a NumPy array is not allowed"); `.get()` and `cupy.asnumpy` are the explicit ways out, and
  float()/int()/bool()/.item()/.tolist() work (they synchronize in CuPy).
- Reductions and full integer indexing give 0-d device arrays, never NumPy scalars.
- The module exposes only an allow-list of names (_FUNCTIONS, _UFUNCS, _NUMPY_NAMES): names CuPy has
  (checked against cupy/__init__.py) that npllama, its tests and bench/bench_gpu.py use. Anything else is an
  AttributeError, and a NumPy function called on a device array dispatches (as CuPy's __array_function__
  does) only to an allow-listed name; otherwise TypeError.
- During stream capture, what synchronizes (.get(), float(), .item(), ...) and cuBLAS calls (matmul, dot,
  vdot) raise RuntimeError, as they make CUDA graph capture fail.
What it cannot check: CuPy's own dtype rules (NumPy's apply here), NVRTC, streams, the memory pool, real CUDA
races or timing, TF32 (its test fails here).

An array holds a NumPy array (`_a`). ElementwiseKernel / ReductionKernel bodies are compiled with g++ as C++
loops; RawModule sources are compiled with g++ under a CUDA execution-model emulation (cooperative threads via
ucontext: __syncthreads and __shfl_down_sync are barriers). Stream capture records every operation (a new
result is recomputed into the same buffer on replay) and Graph.launch replays them on the same buffers.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import subprocess
import time
import types

import numpy as _np

__version__ = "0.0-fake"
BUILD = os.environ.get("FAKECUPY_BUILD") or os.path.join(os.path.expanduser("~"), ".cache", "npllama", "fakecupy")

# ------------------------------------------------------------------ capture
_capture = {"active": False, "ops": None}


def _record(fn):
    if _capture["active"]:
        _capture["ops"].append(fn)


def _no_sync(what):
    if _capture["active"]:
        raise RuntimeError(f"fakecupy: {what} synchronizes with the device, which fails during stream capture")


def _no_cublas(what):
    if _capture["active"]:
        raise RuntimeError(f"fakecupy: {what} calls cuBLAS, which fails during stream capture")


def _copy_into(dst, src):
    if isinstance(dst, (tuple, list)):
        for d, s in zip(dst, src):
            _np.copyto(d, s)
    else:
        _np.copyto(dst, src)


# ------------------------------------------------------------------ host/device boundary
_PY_SCALARS = (bool, int, float, complex)


def _is_scalar(x):
    return type(x) in _PY_SCALARS or isinstance(x, _np.generic)


def _unsupported(x, where):
    return TypeError(f"Unsupported type {type(x)} (fakecupy: {where} got a host array; CuPy does not convert "
                     "implicitly: copy it with cupy.asarray first)")


def _refuse_host(x, where):
    """TypeError for a numpy.ndarray anywhere in x (lists and tuples searched), as CuPy gives."""
    if isinstance(x, _np.ndarray):
        raise _unsupported(x, where)
    if isinstance(x, (list, tuple)):
        for y in x:
            _refuse_host(y, where)
    elif isinstance(x, dict):
        for y in x.values():
            _refuse_host(y, where)


def _unwrap(x):
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, tuple):
        return tuple(_unwrap(y) for y in x)
    if isinstance(x, list):
        return [_unwrap(y) for y in x]
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _arrays_in(x, acc):
    if isinstance(x, _np.ndarray):
        acc.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _arrays_in(y, acc)
    elif isinstance(x, dict):
        for y in x.values():
            _arrays_in(y, acc)
    return acc


def _new(a):
    o = ndarray.__new__(ndarray)
    o._a = a
    return o


def _device(r):
    """A numpy result as device arrays: arrays wrapped, NumPy scalars become 0-d arrays (CuPy never returns them)."""
    if isinstance(r, _np.ndarray):
        return r
    if isinstance(r, _np.generic):
        return _np.array(r)
    if isinstance(r, tuple):
        return tuple(_device(x) for x in r)
    if isinstance(r, list):
        return [_device(x) for x in r]
    return r


def _wrap(r):
    if isinstance(r, _np.ndarray):
        return _new(r)
    if isinstance(r, tuple):
        return tuple(_wrap(x) for x in r)
    if isinstance(r, list):
        return [_wrap(x) for x in r]
    return r


def _run(fn, uargs, ukw, replay=True):
    """fn(*uargs, **ukw) on host arrays; under capture, record how to redo it into the same buffers."""
    res = _device(fn(*uargs, **ukw))
    if _capture["active"] and replay:
        if res is None or "out" in ukw:                      # in place: redo the call itself
            _record(lambda: fn(*uargs, **ukw))
        else:
            inputs = _arrays_in((uargs, ukw, getattr(fn, "__self__", None)), [])
            outs = _arrays_in(res, [])
            if any(not any(_np.may_share_memory(o, i) for i in inputs) for o in outs):
                _record(lambda: _copy_into(res, _device(fn(*uargs, **ukw))))
    return _wrap(res)


def _index(key):
    """A getitem/setitem key on host arrays: device arrays unwrapped; host index arrays are fine (CuPy copies
    them over). A trailing Ellipsis keeps a full integer index a 0-d view, as CuPy's result is."""
    key = key if isinstance(key, tuple) else (key,)
    key = tuple(_unwrap(k) for k in key)
    if not any(k is Ellipsis for k in key):
        key = key + (Ellipsis,)
    return key


def _is_advanced(key):
    return any(isinstance(k, (_np.ndarray, list)) for k in key)


# ------------------------------------------------------------------ ndarray
def _method(name, host_ok=False, sync=False, cublas=False):
    def m(self, *args, **kw):
        if not host_ok:
            _refuse_host((args, kw), f"ndarray.{name}")
        if sync:
            _no_sync(f"ndarray.{name}")
        if cublas:
            _no_cublas(f"ndarray.{name}")
        return _run(getattr(self._a, name), _unwrap(args), _unwrap(kw))
    m.__name__ = name
    return m


def _binop(uf, reflected=False):
    def op(self, other):
        if isinstance(other, ndarray) or _is_scalar(other):
            f = _UFUNCS[uf]
            return f(other, self) if reflected else f(self, other)
        if getattr(other, "__array_ufunc__", 0) is None:
            return NotImplemented
        return _UFUNCS[uf](other, self) if reflected else _UFUNCS[uf](self, other)   # TypeError for host data
    return op


def _inplace(uf):
    def op(self, other):
        _UFUNCS[uf](self, other, out=self)
        return self
    return op


class ndarray:
    """A device array (here: a host numpy array behind CuPy's interface, with none of NumPy's conversions)."""
    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("fakecupy: ndarray(memptr=, strides=) is not emulated")
        self._a = _np.empty(shape, dtype=dtype, order=order)

    # -- the boundary
    def __array__(self, *args, **kw):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kw):
        f = _UFUNCS.get(ufunc.__name__)
        if f is None:
            return NotImplemented
        for x in inputs + (out or ()):
            if not (_is_scalar(x) or isinstance(x, (ndarray, _np.ndarray))):
                return NotImplemented
        if ufunc.__name__ in _COMPARISONS:       # as CuPy: a 0-d host array compares as its value
            inputs = tuple(x.item() if isinstance(x, _np.ndarray) and x.ndim == 0 else x for x in inputs)
        if out is not None:
            if len(out) != 1:
                raise ValueError("The 'out' parameter must have exactly one array value")
            kw["out"] = out[0]
        return (f if method == "__call__" else getattr(f, method))(*inputs, **kw)

    def __array_function__(self, func, types, args, kwargs):
        f = _FUNCTIONS.get(func.__name__) if func.__module__ == "numpy" else None
        if f is None or any(not issubclass(t, (ndarray, _np.ndarray)) for t in types):
            return NotImplemented
        return f(*args, **kwargs)

    def get(self, stream=None, order="C", out=None, blocking=True):
        _no_sync("ndarray.get()")
        if out is not None:
            out[...] = self._a
            return out
        return _np.array(self._a, order=order)

    def set(self, arr, stream=None):
        if not isinstance(arr, _np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if self.dtype != arr.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if self.shape != arr.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        self._a[...] = arr

    def item(self):
        _no_sync("ndarray.item()")
        if self.size != 1:
            raise ValueError("can only convert an array of size 1 to a Python scalar")
        return self._a.item()

    def tolist(self):
        _no_sync("ndarray.tolist()")
        return self._a.tolist()

    def tobytes(self, order="C"):
        _no_sync("ndarray.tobytes()")
        return self._a.tobytes(order)

    def __int__(self):
        _no_sync("int(array)")
        return int(self._a)

    def __float__(self):
        _no_sync("float(array)")
        return float(self._a)

    def __complex__(self):
        _no_sync("complex(array)")
        return complex(self._a)

    def __bool__(self):
        _no_sync("bool(array)")
        if self.size == 0:
            return False
        if self.size == 1:
            return bool(self._a)
        raise ValueError("The truth value of an array with more than one element is ambiguous. "
                         "Use a.any() or a.all()")

    def __repr__(self):
        return repr(self._a)

    def __str__(self):
        return str(self._a)

    def __format__(self, spec):
        _no_sync("format(array)")
        return format(self._a, spec)

    def __reduce__(self):
        return array, (self.get(),)

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    # -- attributes
    @property
    def shape(self):
        return self._a.shape

    @shape.setter
    def shape(self, v):
        a = self._a.view()
        a.shape = v
        self._a = a

    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: _new(self._a.T))
    mT = property(lambda self: _new(self._a.mT))
    real = property(lambda self: _new(self._a.real))
    imag = property(lambda self: _new(self._a.imag))
    data = property(lambda self: types.SimpleNamespace(ptr=self._a.ctypes.data))
    device = property(lambda self: _Device())

    # -- containers
    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of unsized object")
        return len(self._a)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self._a)))

    def __getitem__(self, key):
        k = _index(key)
        if any(isinstance(x, _np.ndarray) and x.dtype == bool for x in k):
            _no_sync("boolean mask indexing")
        return _run(self._a.__getitem__, (k,), {})

    def __setitem__(self, key, value):
        k = _index(key)
        if isinstance(value, ndarray):
            value = value._a
        elif isinstance(value, (_np.ndarray, list, tuple)) and not _is_advanced(k) and _np.ndim(value) != 0:
            # CuPy fills a basic slice from a host value only when it is a scalar (gh-2079)
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        self._a[k] = value
        _record(lambda: self._a.__setitem__(k, value))

    # -- arithmetic: every operator is a ufunc call (TypeError for host operands)
    __add__, __radd__, __iadd__ = _binop("add"), _binop("add", True), _inplace("add")
    __sub__, __rsub__, __isub__ = _binop("subtract"), _binop("subtract", True), _inplace("subtract")
    __mul__, __rmul__, __imul__ = _binop("multiply"), _binop("multiply", True), _inplace("multiply")
    __truediv__, __rtruediv__, __itruediv__ = (_binop("true_divide"), _binop("true_divide", True),
                                               _inplace("true_divide"))
    __floordiv__, __rfloordiv__, __ifloordiv__ = (_binop("floor_divide"), _binop("floor_divide", True),
                                                  _inplace("floor_divide"))
    __mod__, __rmod__, __imod__ = _binop("remainder"), _binop("remainder", True), _inplace("remainder")
    __pow__, __rpow__, __ipow__ = _binop("power"), _binop("power", True), _inplace("power")
    __matmul__, __rmatmul__ = _binop("matmul"), _binop("matmul", True)
    __and__, __rand__, __iand__ = _binop("bitwise_and"), _binop("bitwise_and", True), _inplace("bitwise_and")
    __or__, __ror__, __ior__ = _binop("bitwise_or"), _binop("bitwise_or", True), _inplace("bitwise_or")
    __xor__, __rxor__, __ixor__ = _binop("bitwise_xor"), _binop("bitwise_xor", True), _inplace("bitwise_xor")
    __lt__, __le__ = _binop("less"), _binop("less_equal")
    __gt__, __ge__ = _binop("greater"), _binop("greater_equal")

    def __eq__(self, other):
        if other is None or type(other).__eq__ is object.__eq__:
            return _FUNCTIONS["zeros"](self.shape, dtype=bool)
        return _binop("equal")(self, other)

    def __ne__(self, other):
        if other is None or type(other).__eq__ is object.__eq__:
            return _FUNCTIONS["ones"](self.shape, dtype=bool)
        return _binop("not_equal")(self, other)

    def __neg__(self):
        return _UFUNCS["negative"](self)

    def __pos__(self):
        return _UFUNCS["positive"](self)

    def __abs__(self):
        return _UFUNCS["absolute"](self)

    def __invert__(self):
        return _UFUNCS["invert"](self)

    # -- methods CuPy's ndarray has (numpy-only ones, e.g. itemset, tostring, __index__, are absent)
    all, any, argmax, argmin = _method("all"), _method("any"), _method("argmax"), _method("argmin")
    argpartition, argsort, astype = _method("argpartition"), _method("argsort"), _method("astype")
    clip, compress, conj, conjugate = _method("clip"), _method("compress"), _method("conj"), _method("conjugate")
    copy, cumprod, cumsum, diagonal = _method("copy"), _method("cumprod"), _method("cumsum"), _method("diagonal")
    dot = _method("dot", cublas=True)
    fill, flatten, max, mean, min = _method("fill"), _method("flatten"), _method("max"), _method("mean"), _method("min")
    nonzero = _method("nonzero", sync=True)
    partition, prod, put, ravel = _method("partition"), _method("prod"), _method("put"), _method("ravel")
    repeat, reshape, round = _method("repeat"), _method("reshape"), _method("round")
    searchsorted, sort, squeeze = _method("searchsorted"), _method("sort"), _method("squeeze")
    std, sum, swapaxes = _method("std"), _method("sum"), _method("swapaxes")
    take = _method("take", host_ok=True)                  # CuPy copies host indices over
    trace, transpose, var = _method("trace"), _method("transpose"), _method("var")

    def view(self, dtype=None):
        if isinstance(dtype, type) and issubclass(dtype, _np.ndarray):
            raise TypeError("fakecupy: a cupy.ndarray cannot be viewed as a numpy.ndarray: use .get()")
        return _new(self._a.view() if dtype is None else self._a.view(dtype))


# ------------------------------------------------------------------ ufuncs
_COMPARISONS = {"greater", "greater_equal", "less", "less_equal", "equal", "not_equal"}
_CUBLAS = {"matmul", "dot", "vdot", "tensordot", "einsum", "inner"}


class ufunc:
    """A CuPy ufunc: device arrays and scalars in, device arrays out; a host array is a TypeError."""

    def __init__(self, np_ufunc):
        self._f = np_ufunc
        self.__name__ = np_ufunc.__name__
        self.nin, self.nout, self.nargs = np_ufunc.nin, np_ufunc.nout, np_ufunc.nargs

    def _args(self, method, args, kw):
        for x in args:
            if not (isinstance(x, ndarray) or _is_scalar(x)):
                raise _unsupported(x, f"cupy.{self.__name__}") if isinstance(x, _np.ndarray) else \
                    TypeError(f"Unsupported type {type(x)}")
        out = kw.get("out")
        for o in (out if isinstance(out, tuple) else (out,)):
            if o is not None and not isinstance(o, ndarray):
                raise TypeError(f"Output arguments must be cupy.ndarray, got {type(o)} (cupy.{self.__name__})")
        if "where" in kw and isinstance(kw["where"], _np.ndarray):
            raise _unsupported(kw["where"], f"cupy.{self.__name__}")
        if self.__name__ in _CUBLAS:
            _no_cublas(f"cupy.{self.__name__}")
        return _unwrap(args), _unwrap(kw)

    def __call__(self, *args, **kw):
        uargs, ukw = self._args("__call__", args, kw)
        res = _run(self._f, uargs, ukw)
        return kw["out"] if kw.get("out") is not None else res         # CuPy hands back the out array itself

    def _method(self, method, *args, **kw):
        uargs, ukw = self._args(method, args, kw)
        return _run(getattr(self._f, method), uargs, ukw)

    def reduce(self, *a, **k):
        return self._method("reduce", *a, **k)

    def accumulate(self, *a, **k):
        return self._method("accumulate", *a, **k)

    def reduceat(self, *a, **k):
        return self._method("reduceat", *a, **k)

    def outer(self, *a, **k):
        return self._method("outer", *a, **k)

    def at(self, a, indices, b=None):
        if not isinstance(a, ndarray):
            raise TypeError(f"cupy.{self.__name__}.at needs a cupy.ndarray, got {type(a)}")
        if b is not None and not (isinstance(b, ndarray) or _is_scalar(b)):
            raise _unsupported(b, f"cupy.{self.__name__}.at")
        _run(self._f.at, (a._a, _unwrap(indices)) + (() if b is None else (_unwrap(b),)), {})


# the ufuncs behind Python's operators, and those npllama calls by name
_UFUNCS = {n: ufunc(getattr(_np, n)) for n in (
    "add", "subtract", "multiply", "true_divide", "divide", "floor_divide", "remainder", "power", "matmul",
    "negative", "positive", "absolute", "invert", "bitwise_and", "bitwise_or", "bitwise_xor",
    "less", "less_equal", "greater", "greater_equal", "equal", "not_equal",
    "exp", "log", "sqrt", "cos", "sin", "maximum", "isfinite", "isinf", "isnan")}
_UFUNCS["abs"] = _UFUNCS["absolute"]


# ------------------------------------------------------------------ functions
def _function(name, host_ok=(), cublas=False, replay=True):
    """cupy.<name> as numpy.<name> on device arrays; a host array in any argument (but those named in host_ok,
    by position or keyword) is a TypeError."""
    np_f = getattr(_np, name)

    def f(*args, **kw):
        for i, a in enumerate(args):
            if i not in host_ok:
                _refuse_host(a, f"cupy.{name}")
        for k, a in kw.items():
            if k not in host_ok:
                _refuse_host(a, f"cupy.{name}")
        if cublas:
            _no_cublas(f"cupy.{name}")
        return _run(np_f, _unwrap(args), _unwrap(kw), replay=replay)
    f.__name__ = f.__qualname__ = name
    return f


def asarray(a, dtype=None, order=None, *, blocking=False):
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == _np.dtype(dtype) else a.astype(dtype)
    return array(a, dtype=dtype, order=order)


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray):
        return _new(_np.array(obj._a, dtype=dtype, copy=copy or None, order=order, ndmin=ndmin))
    # host -> device is always a copy; nested lists may hold device arrays (CuPy gathers them)
    return _new(_np.array(_unwrap(obj), dtype=dtype, copy=True, order=order, ndmin=ndmin))


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    return _np.asarray(a, order=order)


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        raise TypeError(f"Argument 'a' has incorrect type (expected cupy.ndarray, got {type(a).__name__})")
    return _run(_np.ascontiguousarray, (a._a,), {"dtype": dtype})


def copyto(dst, src, casting="same_kind", where=None):
    if not isinstance(dst, ndarray):
        raise TypeError(f"copyto: dst must be a cupy.ndarray, got {type(dst)}")
    if isinstance(src, _np.ndarray) and src.size != 1:
        raise ValueError("non-scalar numpy.ndarray cannot be used for copyto")
    if isinstance(where, _np.ndarray):
        raise _unsupported(where, "cupy.copyto(where=)")
    _run(_np.copyto, (dst._a, _unwrap(src)), {"casting": casting, "where": True if where is None else where._a})


_FUNCTIONS = {
    "asarray": asarray, "array": array, "ascontiguousarray": ascontiguousarray, "copyto": copyto,
    **{n: _function(n) for n in (
        "arange", "concatenate", "stack", "where", "zeros", "ones", "full", "all", "allclose", "array_equal",
        "argmax", "argsort", "bincount", "cumsum", "diff", "flatnonzero", "mean", "partition", "prod", "roll",
        "repeat", "searchsorted", "shape", "take_along_axis", "put_along_axis")},
    **{n: _function(n, replay=False) for n in ("empty",)},
    "vdot": _function("vdot", cublas=True),
    # a prototype's shape and dtype are metadata: CuPy reads them from a host array too
    "empty_like": _function("empty_like", host_ok=(0, "prototype"), replay=False),
    "zeros_like": _function("zeros_like", host_ok=(0, "a")),
    "ones_like": _function("ones_like", host_ok=(0, "a")),
    **_UFUNCS,
}
# NumPy objects CuPy re-exports as they are (dtypes, constants)
_NUMPY_NAMES = ("bool_", "dtype", "finfo", "float16", "float32", "float64", "int8", "int16", "int32", "int64",
                "integer", "uint8", "uint16", "uint32", "uint64", "inf", "nan", "newaxis")
globals().update(_FUNCTIONS)
globals().update({n: getattr(_np, n) for n in _NUMPY_NAMES})


def __getattr__(name):
    raise AttributeError(f"fakecupy: module 'cupy' has no attribute {name!r} here: add it to the allow-list "
                         "(tools/fakecupy/cupy/__init__.py) only if CuPy has it")


# ------------------------------------------------------------------ cuda namespace
class _Stream:
    def __init__(self, non_blocking=False):
        self.ptr = 1234

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def synchronize(self):
        if _capture["active"]:
            raise RuntimeError("synchronize during capture")

    def begin_capture(self, mode=None):
        _capture.update(active=True, ops=[])

    def end_capture(self):
        ops = _capture["ops"]
        _capture.update(active=False, ops=None)
        return _Graph(ops)


class _Graph:
    def __init__(self, ops):
        self.ops = ops

    def launch(self, stream=None):
        for op in self.ops:
            op()


class _Event:
    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


class _Device:
    def __init__(self, i=0):
        pass

    compute_capability = "90"

    def synchronize(self):
        _no_sync("Device.synchronize()")

    def use(self):
        """Make this the current device (the emulation has one)."""


class _Pool:
    def malloc(self, n):
        return object()

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass


_pool = _Pool()


def get_default_memory_pool():
    return _pool


_alloc_stack = [_pool.malloc]


@contextlib.contextmanager
def _using_allocator(a=None):
    _alloc_stack.append(a)
    try:
        yield
    finally:
        _alloc_stack.pop()


cuda = types.SimpleNamespace(
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDeviceProperties=lambda i: {"name": b"FakeGPU"}),
    Device=_Device, Stream=_Stream, Graph=_Graph, Event=_Event,
    get_current_stream=lambda: _Stream(),
    get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3,
    using_allocator=_using_allocator,
    get_allocator=lambda: _alloc_stack[-1],
    device=types.SimpleNamespace(get_cublas_handle=lambda: 1),
)

# ------------------------------------------------------------------ C++ compilation
_CT = {"float32": "float", "float64": "double", "int32": "int", "int64": "long long", "bool": "bool",
       "uint64": "unsigned long long"}


def _compile(src: str):
    os.makedirs(BUILD, exist_ok=True)
    h = hashlib.sha1(src.encode()).hexdigest()[:16]
    so = os.path.join(BUILD, f"k{h}.so")
    if not os.path.exists(so):
        cpp = so[:-3] + ".cpp"
        with open(cpp, "w") as f:
            f.write(src)
        r = subprocess.run(["g++", "-O1", "-std=c++17", "-shared", "-fPIC", "-o", so, cpp], capture_output=True,
                           text=True)
        if r.returncode:
            raise RuntimeError("compile failed:\n" + r.stderr[:4000])
    return ctypes.CDLL(so)


def _parse(params: str):
    out = []
    for p in params.split(","):
        toks = p.split()
        raw = toks[0] == "raw"
        if raw:
            toks = toks[1:]
        out.append((raw, toks[0], toks[1]))
    return out


def _kernel_args(name, args):
    """CuPy's kernels take device arrays and scalars only."""
    for a in args:
        if not (isinstance(a, ndarray) or _is_scalar(a)):
            raise _unsupported(a, f"kernel {name}") if isinstance(a, _np.ndarray) else \
                TypeError(f"Unsupported type {type(a)} (kernel {name})")


def _bind(params, args, typemap):
    for (raw, t, n), a in zip(params, args):
        if len(t) == 1 and isinstance(a, ndarray):
            if t in typemap and typemap[t] != a.dtype:
                raise TypeError(f"type {t} bound to {typemap[t]} and {a.dtype}")
            typemap[t] = a.dtype


def _ctype(t, typemap):
    return _CT[_np.dtype(typemap[t]).name] if len(t) == 1 else _CT[t]


def _dtype(t, typemap):
    return _np.dtype(typemap[t]) if len(t) == 1 else _np.dtype(t)


_PRE = "#include <cmath>\n#include <cstddef>\nusing namespace std;\n"


def _scalar(v, dt):
    c = {"float": ctypes.c_float, "double": ctypes.c_double, "int": ctypes.c_int, "long long": ctypes.c_longlong,
         "bool": ctypes.c_bool}[dt]
    return c(v)


class ElementwiseKernel:
    def __init__(self, in_params, out_params, operation, name="k", **kw):
        self.inp, self.outp, self.op, self.name = _parse(in_params), _parse(out_params), operation, name

    def __call__(self, *args, size=None, **kw):
        nin = len(self.inp)
        ins, outs = list(args[:nin]), list(args[nin:])
        _kernel_args(self.name, args)
        typemap = {}
        _bind(self.outp, outs, typemap)
        _bind(self.inp, ins, typemap)
        arrays = [a for (raw, t, n), a in zip(self.inp + self.outp, ins + outs)
                  if not raw and isinstance(a, ndarray)]
        shape = _np.broadcast_shapes(*[a.shape for a in arrays])
        if not outs:
            outs = [_new(_np.empty(shape, dtype=_dtype(t, typemap))) for raw, t, n in self.outp]
        params, body_pre, call = [], [], []
        for k, ((raw, t, n), a) in enumerate(zip(self.inp + self.outp, ins + outs)):
            ct = _ctype(t, typemap)
            is_out = k >= nin
            if isinstance(a, ndarray):
                params.append(f"{ct}* _p{k}")
                if raw:
                    body_pre.append(f"{ct}* {n} = _p{k};")
                elif is_out:
                    body_pre.append(f"{ct}& {n} = _p{k}[i];")
                else:
                    body_pre.append(f"const {ct} {n} = _p{k}[i];")
            else:
                params.append(f"{ct} {n}")
        tdefs = "".join(f"typedef {_CT[_np.dtype(v).name]} {k};\n" for k, v in typemap.items())
        src = (_PRE + tdefs + f'extern "C" void run(long long _n, {", ".join(params)}) {{\n'
               f"  for (ptrdiff_t i = 0; i < _n; ++i) {{\n    {' '.join(body_pre)}\n    {self.op};\n  }}\n}}\n")
        lib = _compile(src)
        n = int(_np.prod(shape))

        def run():
            bufs, cargs = [], [ctypes.c_longlong(n)]
            for k, ((raw, t, nm), a) in enumerate(zip(self.inp + self.outp, ins + outs)):
                ct = _ctype(t, typemap)
                if isinstance(a, ndarray):
                    b = a._a
                    b = _np.ascontiguousarray(b if raw else _np.broadcast_to(b, shape), dtype=_dtype(t, typemap))
                    b = b.copy()
                    bufs.append((k, b))
                    cargs.append(ctypes.c_void_p(b.ctypes.data))
                else:
                    cargs.append(_scalar(a, ct))
            lib.run(*cargs)
            for k, b in bufs:
                if k >= nin:
                    outs[k - nin]._a[...] = b.reshape(outs[k - nin].shape)
        run()
        _record(run)
        return outs[0] if len(outs) == 1 else tuple(outs)


class ReductionKernel:
    def __init__(self, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, name="r", **kw):
        self.inp, self.outp = _parse(in_params), _parse(out_params)
        self.map, self.red, self.post, self.identity = map_expr, reduce_expr, post_map_expr, identity

    def __call__(self, *args, axis=None, keepdims=False, out=None):
        ins = list(args)
        _kernel_args("ReductionKernel", ins)
        if out is not None and not isinstance(out, ndarray):
            raise TypeError(f"Output argument must be cupy.ndarray, got {type(out)}")
        typemap = {}
        _bind(self.inp, ins, typemap)
        arrs = [a._a for a in ins]
        shape = _np.broadcast_shapes(*[a.shape for a in arrs])
        nd = len(shape)
        axes = tuple(range(nd)) if axis is None else tuple(x % nd for x in ((axis,) if isinstance(axis, int) else axis))
        keep = [d for d in range(nd) if d not in axes]
        M = int(_np.prod([shape[d] for d in keep])) if keep else 1
        K = int(_np.prod([shape[d] for d in axes]))
        oshape = tuple(1 if d in axes else shape[d] for d in range(nd)) if keepdims else tuple(shape[d] for d in keep)
        (_, ot, on), = self.outp
        rt = _ctype(ot, typemap)
        res = _new(_np.empty(oshape, dtype=_dtype(ot, typemap))) if out is None else out
        params = ", ".join(f"{_ctype(t, typemap)}* _p{k}" for k, (raw, t, n) in enumerate(self.inp))
        loads = " ".join(f"const {_ctype(t, typemap)} {n} = _p{k}[m * _K + kk];" for k, (raw, t, n) in enumerate(self.inp))
        tdefs = "".join(f"typedef {_CT[_np.dtype(v).name]} {k};\n" for k, v in typemap.items())
        src = (_PRE + tdefs + f'extern "C" void run(long long _M, long long _K, {params}, {rt}* _out) {{\n'
               f"  for (long long m = 0; m < _M; ++m) {{\n    {rt} a = ({rt})({self.identity});\n"
               f"    for (long long kk = 0; kk < _K; ++kk) {{ {loads} {rt} b = ({rt})({self.map}); a = ({self.red}); }}\n"
               f"    {rt}& {on} = _out[m]; {self.post};\n  }}\n}}\n")
        lib = _compile(src)

        def run():
            cargs, keepalive = [ctypes.c_longlong(M), ctypes.c_longlong(K)], []
            for a in arrs:
                b = _np.ascontiguousarray(_np.transpose(_np.broadcast_to(a, shape), keep + list(axes))).reshape(M, K)
                b = b.copy()
                keepalive.append(b)
                cargs.append(ctypes.c_void_p(b.ctypes.data))
            o = _np.empty(M, dtype=res.dtype)
            cargs.append(ctypes.c_void_p(o.ctypes.data))
            lib.run(*cargs)
            res._a[...] = o.reshape(oshape)
        run()
        _record(run)
        return res


_EMU = r"""
#include <ucontext.h>
#include <vector>
#include <functional>
#include <cmath>
#include <cstddef>
using namespace std;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
static dim3 blockIdx, blockDim, gridDim, threadIdx;
static ucontext_t _sched;
static vector<ucontext_t> _ctx;
static vector<dim3> _tid;
static vector<char> _done;
static vector<vector<char>> _stacks;
static int _cur;
static function<void()> _body;
static vector<double> _slot;
static void _yield() { swapcontext(&_ctx[_cur], &_sched); }
static void __syncthreads() { _yield(); }
static int _lin() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
template <class V> V __shfl_down_sync(unsigned, V v, int off) {
    int t = _lin();
    _slot[t] = (double)v;
    _yield();
    int lane = t % 32;
    V r = (lane + off < 32) ? (V)_slot[t + off] : v;
    _yield();
    return r;
}
static void _entry() { _body(); _done[_cur] = 1; }
static void _run_grid(dim3 g, dim3 b) {
    gridDim = g; blockDim = b;
    int n = b.x * b.y * b.z;
    _ctx.resize(n); _tid.resize(n); _done.resize(n); _slot.assign(n, 0.0);
    if ((int)_stacks.size() < n) _stacks.resize(n, vector<char>(1 << 16));
    for (unsigned bz = 0; bz < g.z; ++bz) for (unsigned by = 0; by < g.y; ++by) for (unsigned bx = 0; bx < g.x; ++bx) {
        blockIdx.x = bx; blockIdx.y = by; blockIdx.z = bz;
        int t = 0;
        for (unsigned z = 0; z < b.z; ++z) for (unsigned y = 0; y < b.y; ++y) for (unsigned x = 0; x < b.x; ++x, ++t) {
            getcontext(&_ctx[t]);
            _ctx[t].uc_stack.ss_sp = _stacks[t].data();
            _ctx[t].uc_stack.ss_size = _stacks[t].size();
            _ctx[t].uc_link = &_sched;
            makecontext(&_ctx[t], _entry, 0);
            _tid[t].x = x; _tid[t].y = y; _tid[t].z = z; _done[t] = 0;
        }
        int live = n;
        while (live) {
            for (int i = 0; i < n; ++i) {
                if (_done[i]) continue;
                _cur = i; threadIdx = _tid[i];
                swapcontext(&_sched, &_ctx[i]);
                if (_done[i]) --live;
            }
        }
    }
}
#define __global__
#define __device__
#define __shared__ static
#define __restrict__
"""


class RawModule:
    def __init__(self, code, options=(), name_expressions=None):
        self.code = code
        self.kernels = {}
        launchers = []
        for m in re.finditer(r"__global__\s+void\s+(\w+)\s*\(([^)]*)\)", code):
            name, params = m.group(1), m.group(2)
            types_ = []
            for p in params.split(","):
                p = p.replace("__restrict__", " ").strip()
                types_.append(p.rsplit(None, 1)[0] if "*" not in p else p[:p.rindex("*") + 1])
            self.kernels[name] = types_
            casts = ", ".join(f"*({t}*)_a[{i}]" for i, t in enumerate(types_))
            launchers.append(f'extern "C" void launch_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
                             f"unsigned by, unsigned bz, void** _a) {{ _body = [&]{{ {name}({casts}); }}; "
                             f"dim3 g, b; g.x = gx; g.y = gy; g.z = gz; b.x = bx; b.y = by; b.z = bz; _run_grid(g, b); }}")
        self.lib = _compile(_EMU + code + "\n" + "\n".join(launchers))

    def get_function(self, name):
        return _RawKernel(self, name)


class _RawKernel:
    def __init__(self, mod, name):
        self.mod, self.name, self.types = mod, name, mod.kernels[name]

    def __call__(self, grid, block, args, **kw):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        if len(args) != len(self.types):
            raise TypeError(f"{self.name}: {len(args)} args for {len(self.types)} params")
        holders = []
        for a, t in zip(args, self.types):
            if "*" in t:
                if not isinstance(a, ndarray):
                    raise _unsupported(a, f"kernel {self.name}") if isinstance(a, _np.ndarray) else \
                        TypeError(f"{self.name}: pointer param {t} got {type(a)}")
                holders.append(_np.array([a._a.ctypes.data], dtype=_np.uint64))   # storage holding the pointer
            else:
                if isinstance(a, (ndarray, _np.ndarray)) or isinstance(a, (int, float)) and not isinstance(a, _np.generic):
                    raise TypeError(f"{self.name}: scalar param {t} needs a numpy scalar, got {type(a)}")
                holders.append(_np.array(a))          # by value: same bytes as the numpy scalar
        ptrs = (ctypes.c_void_p * len(args))(*[h.ctypes.data for h in holders])
        # scalar size must match the C type
        for a, t in zip(args, self.types):
            if "*" not in t:
                sz = {"int": 4, "T": _np.dtype(type(a)).itemsize, "float": 4, "double": 8, "long long": 8}[t.replace("const ", "")]
                if _np.dtype(type(a)).itemsize != sz:
                    raise TypeError(f"{self.name}: scalar {t} got {type(a)}")
        fn = getattr(self.mod.lib, "launch_" + self.name)

        def run(holders=holders, ptrs=ptrs, args=args):   # a graph keeps its buffers (npllama's allocator does)
            fn(*[ctypes.c_uint(v) for v in grid + block], ptrs)
        run()
        _record(run)
