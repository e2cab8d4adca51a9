"""tools/fakecupy draws CuPy's host/device line as CuPy does, so the emulated GPU tests catch what a real GPU would:
mixing a NumPy array into a device operation, converting a device array to NumPy implicitly, and calling a NumPy
function CuPy does not have. The explicit ways across (cupy.asarray, .get(), cupy.asnumpy, float()/int()/.item())
still work.

The emulation is imported in a child process (PYTHONPATH), so no other test ever sees a fake `cupy` module.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

CAPTURED = "s = cupy.cuda.Stream()\ns.begin_capture()\ntry:\n    {}\nfinally:\n    s.end_capture()"
# name -> statement run in the child with np, cupy, h (host float64 (3,)), c (the same values on the "device")
CASES = {
    # mixing host and device arrays
    "device + host": "c + h",
    "host + device": "h + c",
    "device += host": "c += h",
    "cupy ufunc, a host operand": "cupy.maximum(c, h)",
    "numpy ufunc, mixed operands": "np.multiply(h, c)",
    "cupy function, a host array": "cupy.concatenate([c, h])",
    "cupy function, only host arrays": "cupy.exp(h)",
    "kernel, a host array": "cupy.ElementwiseKernel('T x', 'T y', 'y = x', 'k')(h)",
    "basic slice set from a host array": "c[:] = h",
    # implicit device -> host conversion
    "np.asarray(device)": "np.asarray(c)",
    "np.array(device)": "np.array(c)",
    "host slice set from a device array": "h[:] = c",
    "np.testing on device arrays": "np.testing.assert_array_equal(c, c)",
    "view as numpy.ndarray": "c.view(np.ndarray)",
    # NumPy names CuPy lacks (nanpercentile is in NumPy, not in cupy/__init__.py)
    "cupy.nanpercentile": "cupy.nanpercentile(c, 50)",
    "np.nanpercentile(device)": "np.nanpercentile(c, 50)",
    # what CuPy does not allow while a CUDA graph is being captured
    "get() during capture": CAPTURED.format("c.get()"),
    "matmul during capture": CAPTURED.format("c @ c"),
}
EXPECTED = {
    "device + host": ("TypeError", "Unsupported type <class 'numpy.ndarray'>"),
    "host + device": ("TypeError", "Unsupported type <class 'numpy.ndarray'>"),
    "device += host": ("TypeError", "Unsupported type <class 'numpy.ndarray'>"),
    "cupy ufunc, a host operand": ("TypeError", "Unsupported type <class 'numpy.ndarray'>"),
    "numpy ufunc, mixed operands": ("TypeError", "Unsupported type <class 'numpy.ndarray'>"),
    "cupy function, a host array": ("TypeError", "Unsupported type <class 'numpy.ndarray'>"),
    "cupy function, only host arrays": ("TypeError", "Unsupported type <class 'numpy.ndarray'>"),
    "kernel, a host array": ("TypeError", "Unsupported type <class 'numpy.ndarray'>"),
    "basic slice set from a host array": ("ValueError", "non-scalar numpy.ndarray cannot be used for fill"),
    "np.asarray(device)": ("TypeError", "Implicit conversion to a NumPy array is not allowed"),
    "np.array(device)": ("TypeError", "Implicit conversion to a NumPy array is not allowed"),
    "host slice set from a device array": ("TypeError", "Implicit conversion to a NumPy array is not allowed"),
    "np.testing on device arrays": ("TypeError", "Implicit conversion to a NumPy array is not allowed"),
    "view as numpy.ndarray": ("TypeError", "use .get()"),
    "cupy.nanpercentile": ("AttributeError", "nanpercentile"),
    "np.nanpercentile(device)": ("TypeError", "no implementation found for 'numpy.nanpercentile'"),
    "get() during capture": ("RuntimeError", "stream capture"),
    "matmul during capture": ("RuntimeError", "cuBLAS"),
}

# the explicit crossings and device-only work still run: statement -> expected repr of its value
ALLOWED = {
    "type(cupy.asarray(h)).__module__, type(cupy.asarray(h)).__name__": "('cupy', 'ndarray')",
    "type(c.get()).__module__, c.get().tolist()": "('numpy', [1.0, 2.0, 3.0])",
    "type(cupy.asnumpy(c)).__name__": "'ndarray'",
    "float(c.sum()), int(c[1]), bool(c[0] == 1), c[2].item()": "(6.0, 2, True, 3.0)",
    "type(c.sum()).__module__, c.sum().shape": "('cupy', ())",           # a 0-d device array, not np.float64
    "(c * 2 + 1 - c).get().tolist()": "[2.0, 3.0, 4.0]",
    "np.exp(c).get().round(3).tolist()": "[2.718, 7.389, 20.086]",                 # NumPy ufunc -> cupy.exp
    "c[np.array([2, 0])].get().tolist()": "[3.0, 1.0]",                            # host index arrays are copied over
}

CHILD = r"""
import json, sys
import numpy as np
import cupy
assert cupy.__version__ == "0.0-fake", cupy.__file__
cases, allowed = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = {"refused": {}, "allowed": {}}
for name, stmt in cases.items():
    h = np.array([1.0, 2.0, 3.0]); c = cupy.asarray(h)
    try:
        exec(stmt)
        out["refused"][name] = ["no error", ""]
    except Exception as e:
        out["refused"][name] = [type(e).__name__, str(e)]
for expr in allowed:
    h = np.array([1.0, 2.0, 3.0]); c = cupy.asarray(h)
    try:
        out["allowed"][expr] = repr(eval(expr))
    except Exception as e:
        out["allowed"][expr] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def child() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tools", "fakecupy"), REPO]))
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CASES), json.dumps(list(ALLOWED))],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", CASES)
def test_emulation_refuses_what_cupy_refuses(child, name):
    kind, msg = child["refused"][name]
    want_kind, want_msg = EXPECTED[name]
    assert kind == want_kind and want_msg in msg, f"{CASES[name]!r} gave {kind}: {msg}"


@pytest.mark.parametrize("expr", ALLOWED)
def test_emulation_allows_the_explicit_ways(child, expr):
    assert child["allowed"][expr] == ALLOWED[expr]
