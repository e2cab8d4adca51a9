"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)), silu(g) = g * sigmoid(g)."""
from __future__ import annotations

from typing import Any, NamedTuple

from npllama.backend import get_array_module
from npllama.layers import linear


class MLPCache(NamedTuple):
    gate_proj: linear.LinearCache
    up_proj: linear.LinearCache
    down_proj: linear.LinearCache
    g: Any            # gate(x) (B, T, I)
    s: Any            # sigmoid(g)
    u: Any            # up(x)
    a: Any            # silu(g) = g * s


def forward(x: Any, p: dict[str, Any]) -> tuple[Any, MLPCache]:
    """x (B, T, D) -> y (B, T, D); p keyed 'gate_proj.weight', 'up_proj.weight', 'down_proj.weight' (+ biases)."""
    xp = get_array_module(x)
    g, cg = linear.forward(x, p["gate_proj.weight"], p.get("gate_proj.bias"))   # (B, T, I)
    u, cu = linear.forward(x, p["up_proj.weight"], p.get("up_proj.bias"))       # (B, T, I)
    s = 1.0 / (1.0 + xp.exp(-g))                                                 # sigmoid(g)
    a = g * s                                                                    # silu(g)
    y, cd = linear.forward(a * u, p["down_proj.weight"], p.get("down_proj.bias"))
    return y, MLPCache(cg, cu, cd, g, s, u, a)


def backward(dy: Any, cache: MLPCache) -> tuple[Any, dict[str, Any]]:
    """-> dx (B, T, D), grads keyed like p."""
    c = cache
    grads: dict[str, Any] = {}
    dh, grads["down_proj.weight"], db = linear.backward(dy, c.down_proj)
    if db is not None:
        grads["down_proj.bias"] = db
    du = dh * c.a
    dg = dh * c.u * (c.s * (1.0 + c.g * (1.0 - c.s)))    # silu'(g) = s + g s (1 - s)
    dx = 0
    for name, d, lc in (("gate_proj", dg, c.gate_proj), ("up_proj", du, c.up_proj)):
        dxi, grads[f"{name}.weight"], db = linear.backward(d, lc)
        if db is not None:
            grads[f"{name}.bias"] = db
        dx = dx + dxi
    return dx, grads
