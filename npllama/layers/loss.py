"""Softmax cross-entropy over the vocabulary, mean over the targets that are not ignore_index."""
from __future__ import annotations

from typing import Any

from npllama.backend import get_array_module


def forward(logits: Any, targets: Any, ignore_index: int = -100) -> tuple[float, tuple]:
    """logits (N, V), targets (N,) ints -> mean negative log-likelihood (NaN when nothing is counted, as torch)."""
    xp = get_array_module(logits)
    N, V = logits.shape
    valid = targets != ignore_index
    tgt = xp.where(valid, targets, 0)
    if bool(((tgt < 0) | (tgt >= V)).any()):
        bad = int(tgt[(tgt < 0) | (tgt >= V)][0])
        raise ValueError(f"target id {bad} is out of range for a vocabulary of {V} (and is not ignore_index={ignore_index})")
    z = logits - logits.max(axis=-1, keepdims=True)          # shifted logits: exp cannot overflow
    z_tgt = z[xp.arange(N), tgt]                             # read before z turns into exp(z) below
    # z is ours: exponentiate it in place (the (N, V) array is the largest of a training step, and
    # backward needs exactly exp(z) / sum, so neither a second array nor a second exp is spent)
    e = xp.exp(z, out=z)
    sumexp = e.sum(axis=-1)                                  # (N,)
    nll = xp.log(sumexp) - z_tgt
    count = valid.sum()
    loss = (nll * valid).sum() / count if int(count) else xp.asarray(float("nan"), dtype=logits.dtype)
    return float(loss), (e, sumexp, tgt, valid, count)


def backward(dloss: float, cache: tuple) -> Any:
    """-> dlogits (N, V) = (softmax - onehot) * dloss / count on counted rows, 0 elsewhere. Reuses exp(z)'s memory."""
    e, sumexp, tgt, valid, count = cache
    xp = get_array_module(e)
    N = e.shape[0]
    # one pass: softmax = exp(z) / sum, scaled by each row's share of the mean (0 on ignored rows)
    scale = valid.astype(e.dtype) * (dloss / max(int(count), 1))
    d = e
    d *= (scale / sumexp)[:, None]
    d[xp.arange(N), tgt] -= scale
    return d
