"""RoPE with the fused CUDA kernel on CuPy; the plain rotation (layers.rope) elsewhere."""
from __future__ import annotations

from typing import Any

from npllama.backend import fused_kernels
from npllama.layers import rope


def apply(x: Any, cos: Any, sin: Any, fused: bool = False) -> Any:
    """= layers.rope.apply: rotate x (B, T, H, hd) by the tables (T, 1, hd/2) or (B, T, 1, hd/2)."""
    if k := fused_kernels(x, fused):
        return k.rope_apply(x, cos, sin)
    return rope.apply(x, cos, sin)


def apply_backward(dy: Any, cos: Any, sin: Any, fused: bool = False) -> Any:
    """= layers.rope.apply_backward: the inverse rotation."""
    if k := fused_kernels(dy, fused):
        return k.rope_apply_backward(dy, cos, sin)
    return rope.apply_backward(dy, cos, sin)
