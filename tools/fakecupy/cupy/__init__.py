"""A CPU stand-in for CuPy, for dry-running npllama's GPU code paths without a GPU (a dev tool: nothing in
the package, the tests or CI uses it).

    PYTHONPATH=tools/fakecupy:$PWD python -m pytest -q -p no:faulthandler tests/test_gpu.py   # ~5 min, g++ needed

What it checks: the glue (argument order, shapes, dtypes, what is captured), the math of every
ElementwiseKernel / ReductionKernel body and RawModule source. What it cannot: CuPy's own behaviour
(type rules, NVRTC, streams, the memory pool), real CUDA races or timing, TF32 (its test fails here).

Arrays are a numpy subclass living in module 'cupy'. ElementwiseKernel / ReductionKernel bodies are compiled
with g++ as C++ loops; RawModule sources are compiled with g++ under a CUDA execution-model emulation
(cooperative threads via ucontext: __syncthreads and __shfl_down_sync are barriers). Stream capture records
every kernel and ufunc call and Graph.launch replays them on the same buffers.
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


class ndarray(_np.ndarray):
    def get(self):
        return _np.array(self.view(_np.ndarray))

    def set(self, a):
        self.view(_np.ndarray)[...] = a

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kw):
        base = lambda x: x.view(_np.ndarray) if isinstance(x, _np.ndarray) else x  # noqa: E731
        args = tuple(base(x) for x in inputs)
        if out is not None:
            kw["out"] = tuple(base(o) for o in out)
        res = getattr(ufunc, method)(*args, **kw)
        if _capture["active"]:
            if method != "__call__":
                raise RuntimeError(f"ufunc.{method} during capture (would sync in CuPy?)")
            outs = kw.get("out") or ((res,) if not isinstance(res, tuple) else res)
            kw2 = dict(kw, out=tuple(outs))
            _record(lambda: ufunc(*args, **kw2))
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(res)


def _wrap(r):
    if isinstance(r, _np.ndarray) and not isinstance(r, ndarray):
        return r.view(ndarray)
    if isinstance(r, tuple):
        return tuple(_wrap(x) for x in r)
    if isinstance(r, list):
        return [_wrap(x) for x in r]
    return r


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray) and (dtype is None or a.dtype == _np.dtype(dtype)):
        return a
    if isinstance(a, ndarray):
        return a.astype(dtype)
    return _np.array(a, dtype=dtype, copy=True).view(ndarray)       # host -> device is a copy


array = asarray


def __getattr__(name):
    obj = getattr(_np, name)
    if callable(obj) and not isinstance(obj, type):
        def f(*a, **k):
            if _capture["active"] and name not in ("empty", "empty_like", "zeros", "ones"):
                raise RuntimeError(f"cupy.{name} during capture")
            return _wrap(obj(*a, **k))
        return f
    return obj


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
        pass


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


def _bind(params, args, typemap):
    for (raw, t, n), a in zip(params, args):
        if len(t) == 1 and isinstance(a, _np.ndarray):
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
        typemap = {}
        _bind(self.outp, outs, typemap)
        _bind(self.inp, ins, typemap)
        arrays = [a for (raw, t, n), a in zip(self.inp + self.outp, ins + outs)
                  if not raw and isinstance(a, _np.ndarray)]
        shape = _np.broadcast_shapes(*[a.shape for a in arrays])
        if not outs:
            outs = [_np.empty(shape, dtype=_dtype(t, typemap)).view(ndarray) for raw, t, n in self.outp]
        params, body_pre, call = [], [], []
        for k, ((raw, t, n), a) in enumerate(zip(self.inp + self.outp, ins + outs)):
            ct = _ctype(t, typemap)
            is_out = k >= nin
            if isinstance(a, _np.ndarray):
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
                if isinstance(a, _np.ndarray):
                    b = a.view(_np.ndarray)
                    b = _np.ascontiguousarray(b if raw else _np.broadcast_to(b, shape), dtype=_dtype(t, typemap))
                    b = b.copy()
                    bufs.append((k, b))
                    cargs.append(ctypes.c_void_p(b.ctypes.data))
                else:
                    cargs.append(_scalar(a, ct))
            lib.run(*cargs)
            for k, b in bufs:
                if k >= nin:
                    outs[k - nin].view(_np.ndarray)[...] = b.reshape(outs[k - nin].shape)
        run()
        _record(run)
        return outs[0] if len(outs) == 1 else tuple(outs)


class ReductionKernel:
    def __init__(self, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, name="r", **kw):
        self.inp, self.outp = _parse(in_params), _parse(out_params)
        self.map, self.red, self.post, self.identity = map_expr, reduce_expr, post_map_expr, identity

    def __call__(self, *args, axis=None, keepdims=False, out=None):
        ins = list(args)
        typemap = {}
        _bind(self.inp, ins, typemap)
        arrs = [a.view(_np.ndarray) for a in ins]
        shape = _np.broadcast_shapes(*[a.shape for a in arrs])
        nd = len(shape)
        axes = tuple(range(nd)) if axis is None else tuple(x % nd for x in ((axis,) if isinstance(axis, int) else axis))
        keep = [d for d in range(nd) if d not in axes]
        M = int(_np.prod([shape[d] for d in keep])) if keep else 1
        K = int(_np.prod([shape[d] for d in axes]))
        oshape = tuple(1 if d in axes else shape[d] for d in range(nd)) if keepdims else tuple(shape[d] for d in keep)
        (_, ot, on), = self.outp
        rt = _ctype(ot, typemap)
        res = _np.empty(oshape, dtype=_dtype(ot, typemap)).view(ndarray) if out is None else out
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
            res.view(_np.ndarray)[...] = o.reshape(oshape)
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
                if not isinstance(a, _np.ndarray):
                    raise TypeError(f"{self.name}: pointer param {t} got {type(a)}")
                holders.append(_np.array([a.ctypes.data], dtype=_np.uint64))   # storage holding the pointer
            else:
                if isinstance(a, _np.ndarray) or isinstance(a, (int, float)) and not isinstance(a, _np.generic):
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
