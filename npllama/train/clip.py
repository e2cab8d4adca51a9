"""Global gradient-norm clipping, the same result as torch.nn.utils.clip_grad_norm_.

The total norm is the 2-norm of the per-tensor 2-norms (as if every gradient were one long
vector). Gradients are then scaled by min(max_norm / (total + 1e-6), 1): torch's eps, and its
habit of always multiplying (by 1.0 when no clipping is needed), are both kept.
"""
from __future__ import annotations

import math
from typing import Any

from npllama.backend import get_array_module


def grad_norm(grads: dict[str, Any]) -> float:
    """The global 2-norm of all gradients, computed in their own dtype."""
    if not grads:
        return 0.0
    first = next(iter(grads.values()))
    xp = get_array_module(first)
    norms = xp.stack([xp.sqrt(xp.vdot(g.ravel(), g.ravel())).astype(first.dtype) for g in grads.values()])
    return float(xp.sqrt(xp.vdot(norms, norms)))


def clip_grad_norm(grads: dict[str, Any], max_norm: float) -> float:
    """Scale `grads` in place so their global norm is at most `max_norm`; return the norm before clipping."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    total = grad_norm(grads)
    if not grads:
        return total
    first = next(iter(grads.values()))
    dt = first.dtype.type
    # in the gradients' dtype, like torch: a float32 run computes the coefficient in float32
    coef = dt(max_norm) / (dt(total) + dt(1e-6))
    coef = min(coef, dt(1.0)) if not math.isnan(coef) else coef
    for g in grads.values():
        g *= coef
    return total
