"""Stacked weight storage: a layer's q/k/v projections (and gate/up) are row blocks of one matrix, and the
params entries are views of those blocks. One matrix product then does the three (or two) while every weight
keeps its Hugging Face name and shape, with no second copy.

On the host, a tall matrix (out >= 2 in: gate/up, a tied or untied head) is kept in (in, out) memory order,
its param a transposed view: still (out, in) to every reader, but `x @ W.T` then streams it the way
OpenBLAS's matrix-vector kernels read fastest (measured in bench/README.md). NPLLAMA_WEIGHT_LAYOUT=out_in
keeps every matrix as the file stores it.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from npllama.errors import NpllamaError

# the projections that read the same input, stored as one matrix: (part, stacked name, members)
STACKED = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
           ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))


def transposed_layout(xp: Any) -> bool:
    """Whether tall matrices are stored (in, out): on the host unless NPLLAMA_WEIGHT_LAYOUT=out_in."""
    v = os.environ.get("NPLLAMA_WEIGHT_LAYOUT", "auto").strip().lower() or "auto"
    if v not in ("auto", "out_in"):
        raise NpllamaError(f"NPLLAMA_WEIGHT_LAYOUT must be 'auto' or 'out_in', got {v!r}")
    return xp is np and v == "auto"


def _empty(shape: tuple[int, ...], dtype: Any, xp: Any, transpose: bool) -> Any:
    """An uninitialised (out, in) matrix, laid out (in, out) in memory when `transpose` and it is tall."""
    if transpose and len(shape) == 2 and shape[0] >= 2 * shape[1]:
        return xp.empty(shape[::-1], dtype=dtype).T
    return xp.empty(shape, dtype=dtype)


def fill(dst: np.ndarray, src: np.ndarray) -> None:
    """np.copyto(dst, src, casting="unsafe"), in row blocks when dst is a transposed view: a plain copy
    into a transposed destination strides across memory for every element (7x slower, measured)."""
    if dst.ndim != 2 or dst.flags.c_contiguous:
        np.copyto(dst, src, casting="unsafe")
        return
    for a in range(0, dst.shape[0], 256):
        np.copyto(dst[a:a + 256], src[a:a + 256], casting="unsafe")


def allocate(shapes: dict[str, tuple[int, ...]], n_layers: int, dtype: Any, xp: Any) -> tuple[dict, list]:
    """Uninitialised storage for every parameter of `shapes` (in its order), stacked where STACKED says.

    Returns (params, stacks): stacks[i][part] lists (stacked name, matrix, [(short name, view)]).
    """
    transpose = transposed_layout(xp)
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
                buf = _empty((sum(rows),) + shapes[keys[0]][1:], dtype, xp, transpose)
                bounds = np.cumsum([0] + rows)
                views = [(k[len(pre):], buf[a:b]) for k, a, b in zip(keys, bounds[:-1], bounds[1:])]
                params.update({pre + short: v for short, v in views})
                stacks[i][part].append((f"{stacked}.{kind}", buf, views))
    for k, shape in shapes.items():
        if k not in params:
            # an embedding that is not also the head is read by rows: it stays (vocab, hidden)
            tall = transpose and not (k == "model.embed_tokens.weight" and "lm_head.weight" in shapes)
            params[k] = _empty(shape, dtype, xp, tall)
    return {k: params[k] for k in shapes}, stacks


def with_stacked(w: dict[str, Any], stacks: list) -> dict[str, Any]:
    """A part's weights plus its stacked matrices, offered only while `w` still holds the views
    (an entry rebound to a new array wins, and the layer falls back to separate products)."""
    for stacked, buf, views in stacks:
        if all(w[short] is v for short, v in views):
            w[stacked] = buf
    return w
