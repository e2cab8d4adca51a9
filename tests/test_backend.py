"""The package never imports torch; backends are per model; asking for CuPy without it is a clear error."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import npllama
from npllama.backend import BackendError, get_array_module, get_backend, scatter_add
from conftest import REPO


def test_import_npllama_never_imports_torch():
    # torch is installed in the test environment; block it and exercise the whole package
    code = textwrap.dedent("""
        import sys, importlib.abc, pkgutil, importlib
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split('.')[0] in ('torch', 'transformers', 'tiktoken', 'tokenizers', 'sentencepiece'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        import numpy as np, npllama
        names = [m.name for m in pkgutil.walk_packages(npllama.__path__, 'npllama.')]
        for n in names:
            importlib.import_module(n)
        cfg = npllama.LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, vocab_size=5)
        m = npllama.Llama.init(cfg)
        m.loss_and_grads(np.array([[1, 2]]), np.array([[2, 3]]))
        assert not any(k.split('.')[0] == 'torch' for k in sys.modules)
        print('ok', len(names))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_cupy_missing_is_a_clear_error():
    with pytest.raises(BackendError, match=r"backend='cupy' needs CuPy"):
        get_backend("cupy")
    cfg = npllama.LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, vocab_size=5)
    with pytest.raises(BackendError, match="CuPy"):
        npllama.Llama.init(cfg, backend="cupy")


def test_two_models_keep_their_own_dtype_and_backend():
    cfg = npllama.LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, vocab_size=5)
    a = npllama.Llama.init(cfg, seed=1, dtype="float32")
    b = npllama.Llama.init(cfg, seed=1, dtype="float64")
    ids = np.array([[1, 2, 3]])
    assert a.forward(ids).dtype == np.float32 and b.forward(ids).dtype == np.float64
    assert a.forward(ids).dtype == np.float32    # b did not change a global
    np.testing.assert_allclose(a.forward(ids), b.forward(ids), atol=1e-5)
    _, g = a.loss_and_grads(ids, ids)
    assert all(v.dtype == np.float32 for v in g.values())   # no float64 leaks in a float32 run


def test_get_array_module_and_scatter_add():
    assert get_array_module(np.zeros(2), 3.0) is np
    dst = np.zeros((4, 2))
    scatter_add(dst, np.array([1, 3, 1, 1]), np.arange(8.0).reshape(4, 2))
    expect = np.zeros((4, 2))
    np.add.at(expect, np.array([1, 3, 1, 1]), np.arange(8.0).reshape(4, 2))
    np.testing.assert_array_equal(dst, expect)
