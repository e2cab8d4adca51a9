"""Without a GPU, run the GPU tests anyway, under tools/fakecupy: a CPU stand-in for CuPy that
compiles every kernel body with g++ and emulates CUDA threads and graph capture.

It proves the glue and the kernels' arithmetic (NumPy vs "CuPy", fused vs plain, graph decoding
vs plain decoding) on every CI run, under CuPy's host/device rules (no mixing, no implicit conversion, no
NumPy-only functions: tests/test_fakecupy_strict.py); only the rest of CuPy's own behaviour and TF32 (which
the emulation cannot have) wait for a real device, where tests/test_gpu.py runs directly.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(importlib.util.find_spec("cupy") is not None,
                                reason="real CuPy present: tests/test_gpu.py runs directly")


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CuPy emulation compiles kernels with g++")
def test_gpu_suite_under_cupy_emulation():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tools", "fakecupy"), REPO]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:faulthandler", "-p", "no:cacheprovider",
                        "tests/test_gpu.py", "-k", "not tf32"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    tail = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], tail
