"""Shared test helpers: tiny transformers Llama models built and saved by the test itself."""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Without CuPy the GPU tests run under the CPU emulation instead (tests/test_gpu_emulated.py),
# so collecting them here would only add a skip.
collect_ignore = [] if importlib.util.find_spec("cupy") else ["test_gpu.py"]

# Configurations the parity and gradient tests sweep: every attention layout, both embedding
# modes, a head_dim that is not hidden/heads, biases, and every rope scaling type.
CONFIGS = {
    "mha-untied-default": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4),
    "gqa-tied-linear": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "mqa-headdim-dynamic": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                                rope_parameters={"rope_type": "dynamic", "factor": 3.0, "rope_theta": 10000.0}),
    "bias-llama3": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, attention_bias=True,
                        mlp_bias=True,
                        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                         "rope_theta": 500000.0}),
    "gqa6-headdim-tied-theta": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=12,
                                    tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "mqa-untied-bias": dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, attention_bias=True,
                            rope_parameters={"rope_type": "linear", "factor": 0.5, "rope_theta": 100.0}),
}


def hf_config(**overrides):
    """A small transformers LlamaConfig; `overrides` change any field."""
    from transformers import LlamaConfig
    kw = dict(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=97, max_position_embeddings=32, rms_norm_eps=1e-5,
              tie_word_embeddings=False, attn_implementation="eager")
    kw.update(overrides)
    return LlamaConfig(**kw)


def hf_model(seed: int = 0, std: float = 0.15, **overrides):
    """A transformers LlamaForCausalLM with random weights (larger than init so every path matters)."""
    import torch
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    m = LlamaForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, std)
    return m


@pytest.fixture
def save_hf(tmp_path):
    """save_hf(model, **kw) -> directory holding the model's save_pretrained export."""
    def _save(model, name="model", **kw):
        d = tmp_path / name
        model.save_pretrained(str(d), **kw)
        return str(d)
    return _save


def rel_err(a, b) -> float:
    """max|a - b| / max|b|."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture()
def two_blas_threads():
    """NumPy's OpenBLAS at 2 threads for the test (the shared-work paths need more than one), then as it was."""
    from npllama import blasthreads
    before = blasthreads.get_threads(use_threadpoolctl=False)
    assert before is not None, "NumPy's OpenBLAS was not found through ctypes"
    blasthreads.set_threads(2, use_threadpoolctl=False)
    yield blasthreads
    blasthreads.set_threads(before, use_threadpoolctl=False)
