"""Softmax cross-entropy, computed in less memory than its reference `npllama.layers.loss` (same results):
exp(z) is taken in place of the shifted logits and reused as the gradient's storage."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from npllama.backend import get_array_module
from npllama.fast import threads
from npllama.layers.loss import check_targets


class FastLossCache(NamedTuple):
    e: Any            # exp(logits - row max) (N, V), becomes dlogits in backward
    sumexp: Any       # (N,)
    targets: Any      # (N,) with ignored rows set to 0
    valid: Any        # (N,) bool
    count: Any        # how many rows count


def forward(logits: Any, targets: Any, ignore_index: int = -100) -> tuple[float, FastLossCache]:
    """= layers.loss.forward: logits (N, V), targets (N,) ints -> mean NLL (NaN when nothing is counted)."""
    xp = get_array_module(logits)
    N, V = logits.shape
    valid = targets != ignore_index
    tgt = check_targets(targets, V, ignore_index)
    if xp is np and logits.size >= PARALLEL_MIN:
        e, z_tgt, sumexp = _exp_shared(logits, tgt)
    else:
        z = logits - logits.max(axis=-1, keepdims=True)      # shifted logits: exp cannot overflow
        z_tgt = z[xp.arange(N), tgt]                         # read before z turns into exp(z) below
        # z is ours: exponentiate it in place (the (N, V) array is the largest of a training step, and
        # backward needs exactly exp(z) / sum, so neither a second array nor a second exp is spent)
        e = xp.exp(z, out=z)
        sumexp = e.sum(axis=-1)                              # (N,)
    nll = xp.log(sumexp) - z_tgt
    count = valid.sum()
    loss = (nll * valid).sum() / count if int(count) else xp.asarray(float("nan"), dtype=logits.dtype)
    return float(loss), FastLossCache(e, sumexp, tgt, valid, count)


PARALLEL_MIN = 1 << 20   # logits from which the rows are shared out over the free cores


def _exp_shared(logits: np.ndarray, tgt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(exp(z), z[target], sum exp(z)) with z = logits - row max, as the plain lines give them, in row
    blocks on the free cores (npllama.fast.threads): the exp over (N, V) is the costliest loop of a step."""
    N = logits.shape[0]
    e, z_tgt, sumexp = np.empty_like(logits), np.empty(N, dtype=logits.dtype), np.empty(N, dtype=logits.dtype)

    def rows(r: slice) -> None:
        z = e[r]
        np.subtract(logits[r], logits[r].max(axis=-1, keepdims=True), out=z)
        z_tgt[r] = z[np.arange(z.shape[0]), tgt[r]]
        np.exp(z, out=z)
        sumexp[r] = z.sum(axis=-1)
    threads.share_rows(rows, N, 8)
    return e, z_tgt, sumexp


def backward(dloss: float, cache: FastLossCache) -> Any:
    """= layers.loss.backward: -> dlogits (N, V), written over the cache's exp(z)."""
    e, sumexp, tgt, valid, count = cache
    xp = get_array_module(e)
    N = e.shape[0]
    # one pass: softmax = exp(z) / sum, scaled by each row's share of the mean (0 on ignored rows)
    scale = valid.astype(e.dtype) * (dloss / max(int(count), 1))
    d = e
    d *= (scale / sumexp)[:, None]
    d[xp.arange(N), tgt] -= scale
    return d
