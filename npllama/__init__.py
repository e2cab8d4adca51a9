"""npllama: LLaMA from scratch in NumPy, with the same code running on CuPy.

The public names are imported lazily so that `import npllama` stays cheap and never
pulls in optional pieces (gguf, cupy) until they are used.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Llama": "npllama.model",
    "LlamaConfig": "npllama.config",
    "KVCache": "npllama.kvcache",
    "Tokenizer": "npllama.tokenizer",
    "AdamW": "npllama.train.optim",
    "SGD": "npllama.train.optim",
    "get_array_module": "npllama.backend",
    "NpllamaError": "npllama.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'npllama' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
