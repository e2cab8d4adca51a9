"""Stacked weight storage: a layer's q/k/v projections (and gate/up) are row blocks of one matrix, and the
params entries are views of those blocks. One matrix product then does the three (or two) while every weight
keeps its Hugging Face name and shape, with no second copy.
"""
from __future__ import annotations

from typing import Any

import numpy as np

# the projections that read the same input, stored as one matrix: (part, stacked name, members)
STACKED = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
           ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))


def allocate(shapes: dict[str, tuple[int, ...]], n_layers: int, dtype: Any, xp: Any) -> tuple[dict, list]:
    """Uninitialised storage for every parameter of `shapes` (in its order), stacked where STACKED says.

    Returns (params, stacks): stacks[i][part] lists (stacked name, matrix, [(short name, view)]).
    """
    params: dict[str, Any] = {}
    stacks: list[dict[str, list]] = []
    for i in range(n_layers):
        stacks.append({})
        for part, stacked, names in STACKED:
            pre = f"model.layers.{i}.{part}."
            stacks[i][part] = []
            for kind in ("weight", "bias"):
                keys = [f"{pre}{n}.{kind}" for n in names]
                if keys[0] not in shapes:
                    continue
                rows = [shapes[k][0] for k in keys]
                buf = xp.empty((sum(rows),) + shapes[keys[0]][1:], dtype=dtype)
                bounds = np.cumsum([0] + rows)
                views = [(k[len(pre):], buf[a:b]) for k, a, b in zip(keys, bounds[:-1], bounds[1:])]
                params.update({pre + short: v for short, v in views})
                stacks[i][part].append((f"{stacked}.{kind}", buf, views))
    for k, shape in shapes.items():
        if k not in params:
            params[k] = xp.empty(shape, dtype=dtype)
    return {k: params[k] for k in shapes}, stacks


def with_stacked(w: dict[str, Any], stacks: list) -> dict[str, Any]:
    """A part's weights plus its stacked matrices, offered only while `w` still holds the views
    (an entry rebound to a new array wins, and the layer falls back to separate products)."""
    for stacked, buf, views in stacks:
        if all(w[short] is v for short, v in views):
            w[stacked] = buf
    return w
