"""A layer's named projection ('q_proj', 'gate_proj', ...): a linear layer, plus its LoRA update when the
layer's weights hold one ('q_proj.lora_A.weight', 'q_proj.lora_B.weight' and the shared 'lora' settings).

A layer's weights may also name, under 'frozen', the weights that learn nothing; their gradients are
never computed.
"""
from __future__ import annotations

from typing import Any

from npllama.backend import get_array_module
from npllama.layers import linear, lora


def is_frozen(p: dict[str, Any], name: str) -> bool:
    """True when projection `name` of p needs no weight (and bias) gradient."""
    frozen = p.get("frozen", ())
    return name + ".weight" in frozen and (name + ".bias" not in p or name + ".bias" in frozen)


def forward(x: Any, p: dict[str, Any], name: str) -> tuple[Any, Any]:
    """x (..., in) -> y (..., out) through p's projection `name`."""
    W, b, frozen = p[name + ".weight"], p.get(name + ".bias"), is_frozen(p, name)
    if name + ".lora_A.weight" not in p:
        return linear.forward(x, W, b, frozen=frozen)
    s: lora.Settings = p["lora"]
    keep = lora.keep_mask(s, x.shape, x.dtype, get_array_module(x))
    return lora.forward(x, W, b, p[name + ".lora_A.weight"], p[name + ".lora_B.weight"], s.scale, keep, frozen)


def backward(dy: Any, cache: Any, name: str, grads: dict[str, Any]) -> Any:
    """-> dx; adds the gradients of projection `name`'s learning weights to grads."""
    if isinstance(cache, lora.LoraCache):
        dx, dW, db, grads[name + ".lora_A.weight"], grads[name + ".lora_B.weight"] = lora.backward(dy, cache)
    else:
        dx, dW, db = linear.backward(dy, cache)
    if dW is not None:
        grads[name + ".weight"] = dW
    if db is not None:
        grads[name + ".bias"] = db
    return dx
