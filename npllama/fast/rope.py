"""RoPE with the fused CUDA kernel on CuPy; elsewhere the rotation as two products over (2, hd/2) views."""
from __future__ import annotations

from typing import Any

from npllama.backend import fused_kernels, get_array_module


def apply(x: Any, cos: Any, sin: Any, fused: bool = False) -> Any:
    """= layers.rope.apply: rotate x (B, T, H, hd) by the tables (T, 1, hd/2) or (B, T, 1, hd/2)."""
    if k := fused_kernels(x, fused):
        return k.rope_apply(x, cos, sin)
    return rotate(x, *pair_tables(cos, sin))


def pair_tables(cos: Any, sin: Any) -> tuple[Any, Any]:
    """The tables (..., hd/2) as [c, c] and [-s, s] (..., 1, 2, hd/2), for `rotate`."""
    xp = get_array_module(cos)
    c, s = cos[..., None, :], sin[..., None, :]
    return xp.concatenate([c, c], axis=-2), xp.concatenate([-s, s], axis=-2)


def rotate(x: Any, cs: Any, sn: Any) -> Any:
    """x (..., H, hd) rotated by pair_tables: [x1, x2] [c, c] + [x2, x1] [-s, s]. This is the reference's
    x1 c - x2 s and x2 c + x1 s bit for bit (x2 (-s) is -(x2 s) exactly), in three passes instead of six."""
    h = x.shape[-1] // 2
    x4 = x.reshape(*x.shape[:-1], 2, h)                                      # (..., H, 2, hd/2)
    r = x4 * cs
    r += x4[..., ::-1, :] * sn
    return r.reshape(x.shape)


def apply_backward(dy: Any, cos: Any, sin: Any, fused: bool = False) -> Any:
    """= layers.rope.apply_backward: the inverse rotation."""
    if k := fused_kernels(dy, fused):
        return k.rope_apply_backward(dy, cos, sin)
    cs, sn = pair_tables(cos, sin)
    return rotate(dy, cs, -sn)          # [dy1, dy2] [c, c] + [dy2, dy1] [s, -s]: the reference's, bit for bit
