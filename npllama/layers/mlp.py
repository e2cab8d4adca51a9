"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)), silu(g) = g * sigmoid(g)."""
from __future__ import annotations

from typing import Any, NamedTuple

from npllama.backend import get_array_module
from npllama.layers import projection


class MLPCache(NamedTuple):
    gate_proj: Any    # each projection's cache (npllama.layers.projection)
    up_proj: Any
    down_proj: Any
    g: Any            # gate(x) (B, T, I)
    s: Any            # sigmoid(g)
    u: Any            # up(x)
    a: Any            # silu(g) = g * s


def forward(x: Any, p: dict[str, Any]) -> tuple[Any, MLPCache]:
    """x (B, T, D) -> y (B, T, D); p keyed 'gate_proj.weight', 'up_proj.weight', 'down_proj.weight' (+ biases)."""
    xp = get_array_module(x)
    g, cg = projection.forward(x, p, "gate_proj")   # (B, T, I)
    u, cu = projection.forward(x, p, "up_proj")     # (B, T, I)
    s = 1.0 / (1.0 + xp.exp(-g))                                                 # sigmoid(g)
    a = g * s                                                                    # silu(g)
    y, cd = projection.forward(a * u, p, "down_proj")
    return y, MLPCache(cg, cu, cd, g, s, u, a)


def backward(dy: Any, cache: MLPCache) -> tuple[Any, dict[str, Any]]:
    """-> dx (B, T, D), grads keyed like p."""
    c = cache
    grads: dict[str, Any] = {}
    dh = projection.backward(dy, c.down_proj, "down_proj", grads)
    du = dh * c.a
    dg = dh * c.u * (c.s * (1.0 + c.g * (1.0 - c.s)))    # silu'(g) = s + g s (1 - s)
    return projection.backward(dg, c.gate_proj, "gate_proj", grads) + projection.backward(du, c.up_proj, "up_proj", grads), grads
