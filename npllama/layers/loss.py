"""Softmax cross-entropy over the vocabulary, mean over the targets that are not ignore_index."""
from __future__ import annotations

from typing import Any

from npllama.backend import fused_kernels, get_array_module


def forward(logits: Any, targets: Any, ignore_index: int = -100, fused: bool = False) -> tuple[float, tuple]:
    """logits (N, V), targets (N,) ints -> mean negative log-likelihood (NaN when nothing is counted, as torch)."""
    xp = get_array_module(logits)
    N, V = logits.shape
    valid = targets != ignore_index
    tgt = xp.where(valid, targets, 0)
    if bool(((tgt < 0) | (tgt >= V)).any()):
        bad = int(tgt[(tgt < 0) | (tgt >= V)][0])
        raise ValueError(f"target id {bad} is out of range for a vocabulary of {V} (and is not ignore_index={ignore_index})")
    z = logits - logits.max(axis=-1, keepdims=True)          # shifted logits: exp cannot overflow
    k = fused_kernels(z, fused)
    lse = k.logsumexp_shifted(z) if k else xp.log(xp.exp(z).sum(axis=-1))   # (N,)
    nll = lse - z[xp.arange(N), tgt]
    count = valid.sum()
    loss = (nll * valid).sum() / count if int(count) else xp.asarray(float("nan"), dtype=logits.dtype)
    return float(loss), (z, lse, tgt, valid, count)


def backward(dloss: float, cache: tuple, fused: bool = False) -> Any:
    """-> dlogits (N, V) = (softmax - onehot) * dloss / count on counted rows, 0 elsewhere. Reuses z's memory."""
    z, lse, tgt, valid, count = cache
    xp = get_array_module(z)
    N = z.shape[0]
    scale = valid.astype(z.dtype) * (dloss / max(int(count), 1))
    if k := fused_kernels(z, fused):
        return k.xent_backward_(z, lse, tgt, scale)
    d = z
    d -= lse[:, None]
    xp.exp(d, out=d)                                         # softmax
    d[xp.arange(N), tgt] -= 1.0
    d *= scale[:, None]
    return d
