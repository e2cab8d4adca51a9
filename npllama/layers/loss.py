"""Softmax cross-entropy over the vocabulary, mean over the targets that are not ignore_index."""
from __future__ import annotations

from typing import Any, NamedTuple

from npllama.backend import get_array_module
from npllama.errors import InputError


class LossCache(NamedTuple):
    probs: Any        # softmax(logits) (N, V)
    targets: Any      # (N,) with ignored rows set to 0
    valid: Any        # (N,) bool: rows that count
    count: int        # how many rows count


def check_targets(targets: Any, V: int, ignore_index: int) -> Any:
    """targets with ignored rows set to 0; an id outside [0, V) that is not ignore_index is an error."""
    xp = get_array_module(targets)
    tgt = xp.where(targets != ignore_index, targets, 0)
    if bool(((tgt < 0) | (tgt >= V)).any()):
        bad = int(tgt[(tgt < 0) | (tgt >= V)][0])
        raise InputError(f"target id {bad} is out of range for a vocabulary of {V} (and is not ignore_index={ignore_index})")
    return tgt


def forward(logits: Any, targets: Any, ignore_index: int = -100) -> tuple[float, LossCache]:
    """logits (N, V), targets (N,) ints -> mean negative log-likelihood (NaN when nothing is counted, as torch)."""
    xp = get_array_module(logits)
    N, V = logits.shape
    valid = targets != ignore_index
    tgt = check_targets(targets, V, ignore_index)
    z = logits - logits.max(axis=-1, keepdims=True)                 # shifted: exp cannot overflow
    logp = z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))        # log-softmax (N, V)
    nll = -logp[xp.arange(N), tgt]                                  # (N,)
    count = int(valid.sum())
    loss = float((nll * valid).sum() / count) if count else float("nan")
    return loss, LossCache(xp.exp(logp), tgt, valid, count)


def backward(dloss: float, cache: LossCache) -> Any:
    """-> dlogits (N, V) = (softmax - onehot) * dloss / count on counted rows, 0 elsewhere."""
    xp = get_array_module(cache.probs)
    N = cache.probs.shape[0]
    onehot = xp.zeros_like(cache.probs)
    onehot[xp.arange(N), cache.targets] = 1.0
    scale = cache.valid.astype(cache.probs.dtype) * (dloss / max(cache.count, 1))
    return (cache.probs - onehot) * scale[:, None]
