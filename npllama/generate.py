"""Autoregressive generation: a prefill over the prompt, then one token at a time with the KV cache.

Sampling follows Hugging Face's definitions and order, applied to the last position's logits
(in float64 on the host, so the sampled token does not depend on the backend):

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> sample (or argmax when temperature == 0)

A batch of prompts of different lengths is left-padded; rotary positions start at 0 at each
prompt's first real token and the padding slots are masked out of attention, so every row gives
what its prompt gives alone. Each row draws from its own generator seeded with `seed`, for the same reason.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from npllama.backend import to_host
from npllama.errors import NpllamaError


class NonFiniteLogits(NpllamaError, ValueError):
    """The model produced NaN or infinite logits (broken weights or an overflow); nothing is sampled from them."""


def _check_finite(rows: np.ndarray, live: Sequence[bool], step: int) -> None:
    """Refuse to sample from a row of (B, V) logits that holds a NaN or an infinity (rows already done are skipped)."""
    if np.isfinite(rows).all():
        return
    for b, alive in enumerate(live):
        if alive and not np.isfinite(rows[b]).all():
            v = rows[b][~np.isfinite(rows[b])][0]
            which = f" of prompt {b}" if len(live) > 1 else ""
            raise NonFiniteLogits(f"the model's logits are not finite ({v}) at new token {step + 1}{which}: "
                                  "the model's weights hold NaN or infinite values, or its computation overflowed")


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked from the logits; the defaults are greedy decoding."""
    temperature: float = 0.0           # 0 = greedy (argmax)
    top_k: int | None = None           # keep the k most likely tokens
    top_p: float | None = None         # keep the smallest set whose probability reaches top_p
    min_p: float | None = None         # drop tokens less likely than min_p * p(most likely)
    repetition_penalty: float = 1.0    # > 1 discourages tokens already in the prompt or output

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise GenerationError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
            raise GenerationError(f"top_k must be a positive integer or None, got {k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise GenerationError(f"top_p must be in (0, 1] or None, got {p!r}")
        m = self.min_p
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m <= 1):
            raise GenerationError(f"min_p must be in [0, 1] or None, got {m!r}")
        r = self.repetition_penalty
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            raise GenerationError(f"repetition_penalty must be a finite number > 0 (1 = off), got {r!r}")

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax."""
        return self.temperature == 0


class GenerationError(NpllamaError, ValueError):
    """A bad sampling setting or prompt given to generate/stream; the message names the setting."""


class PromptTooLong(GenerationError):
    """The prompt leaves no room in the model's context for a new token."""


# ---------------------------------------------------------------- logits processors (B, V) float64
def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """HF's definition: for every token already seen, a logit l becomes l / penalty if l > 0 else l * penalty."""
    if penalty == 1.0:
        return logits
    return np.where(seen, np.where(logits < 0, logits * penalty, logits / penalty), logits)


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits per row (ties with the k-th are kept, as in HF); the rest become -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[..., -k:].min(axis=-1, keepdims=True)
    return np.where(logits < kth, -np.inf, logits)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filtering as HF does it: drop the least likely tokens whose total probability is <= 1 - p."""
    if p >= 1.0:
        return logits
    order = np.argsort(logits, axis=-1, kind="stable")                # ascending
    probs = softmax(np.take_along_axis(logits, order, axis=-1))
    remove_sorted = np.cumsum(probs, axis=-1) <= (1 - p)
    remove_sorted[..., -1] = False                                    # the most likely token always stays
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, logits)


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below min_p times the most likely token's (HF's MinPLogitsWarper)."""
    if min_p <= 0:
        return logits
    probs = softmax(logits)
    remove = probs < min_p * probs.max(axis=-1, keepdims=True)
    return np.where(remove, -np.inf, logits)


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax; -inf entries get probability exactly 0."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def process_logits(logits: np.ndarray, seen: np.ndarray | None, s: Sampling) -> np.ndarray:
    """Every processor of `s`, in HF's order, on (B, V) logits; `seen` (B, V) bool marks earlier tokens."""
    x = np.asarray(logits, dtype=np.float64)
    if seen is not None:
        x = apply_repetition_penalty(x, seen, s.repetition_penalty)
    if s.greedy:
        return x
    x = x / s.temperature
    if s.top_k is not None:
        x = apply_top_k(x, s.top_k)
    if s.top_p is not None:
        x = apply_top_p(x, s.top_p)
    if s.min_p is not None:
        x = apply_min_p(x, s.min_p)
    return x


def sample(logits: np.ndarray, s: Sampling, rngs: Sequence[np.random.Generator], seen: np.ndarray | None = None
           ) -> np.ndarray:
    """Next token per row of (B, V) logits: argmax when greedy, else a draw from the filtered distribution."""
    x = process_logits(logits, seen, s)
    if s.greedy:
        return x.argmax(axis=-1)
    probs = softmax(x)
    out = np.empty(len(x), dtype=np.int64)
    for b, rng in enumerate(rngs):
        cdf = np.cumsum(probs[b])
        i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        # a token with probability 0 never owns a step of the cdf; rounding at the top end must not pick one
        out[b] = min(i, int(np.flatnonzero(probs[b])[-1]))
    return out


# ---------------------------------------------------------------- the decoding loop
def _as_prompts(prompt_ids: Any) -> tuple[list[list[int]], bool]:
    """(list of prompts, batched?) from one prompt (list / 1-D array) or several (list of lists / 2-D array)."""
    a = prompt_ids
    if hasattr(a, "ndim") and not isinstance(a, list):
        a = to_host(a)
        if a.ndim == 1:
            return [[int(t) for t in a]], False
        if a.ndim == 2:
            return [[int(t) for t in row] for row in a], True
        raise GenerationError(f"prompt_ids must be 1-D (one prompt) or 2-D (a batch), got shape {a.shape}")
    a = list(a)
    if a and all(isinstance(r, (list, tuple)) or getattr(r, "ndim", 0) >= 1 for r in a):
        return [[int(t) for t in r] for r in a], True
    if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in a):
        raise TypeError("prompt_ids must be a list of token ids or a list of such lists")
    return [[int(t) for t in a]], False


def iter_tokens(model: Any, prompts: list[list[int]], max_new_tokens: int = 32, sampling: Sampling = Sampling(),
                seed: int | None = None, eos_ids: Sequence[int] | None = None) -> Iterator[list[int | None]]:
    """Yield, per step, each row's new token (None once the row has hit EOS); ends when all rows are done.

    The EOS token itself is yielded (the caller decides whether to keep it).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise GenerationError(f"seed must be an integer >= 0 or None, got {seed!r}")
    c = model.config
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    for p in prompts:
        bad = [t for t in p if not 0 <= t < c.vocab_size]
        if bad:
            raise GenerationError(f"token id {bad[0]} is out of range for vocab_size={c.vocab_size}")
    B, L = len(prompts), max(len(p) for p in prompts)
    ctx = c.max_position_embeddings
    if L >= ctx:
        raise PromptTooLong(f"the prompt has {L} tokens but the model's context is {ctx}: "
                         f"shorten it (at most {ctx - 1} tokens leave room for one new token)")
    steps = min(int(max_new_tokens), ctx - L)       # generation stops at the end of the context
    if steps == 0:
        return
    eos = set(c.eos_token_ids if eos_ids is None else eos_ids)
    rngs = [np.random.default_rng(seed) for _ in range(B)]     # one per row: a row does not depend on its batch
    pads = [L - len(p) for p in prompts]
    padded = np.array([[0] * n + p for n, p in zip(pads, prompts)], dtype=np.int64)
    mask = np.zeros((B, L + steps), dtype=bool)
    for b, n in enumerate(pads):
        mask[b, n:] = True
    ragged = any(pads)
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = np.zeros((B, c.vocab_size), dtype=bool)
        for b, p in enumerate(prompts):
            seen[b, p] = True

    cache = model.new_cache(B, L + steps)
    # positions count from each prompt's first real token; the padding slots (masked) get 0
    pos = np.maximum(np.arange(L)[None, :] - np.array(pads)[:, None], 0) if ragged else None
    logits = model.forward(padded, cache=cache, start_pos=0, positions=pos,
                           attn_mask=mask[:, :L] if ragged else None, last_only=True)
    done = [False] * B
    for t in range(steps):
        rows = to_host(logits)[:, -1, :]              # the host copy the sampler reads anyway: no extra sync
        _check_finite(rows, [not d for d in done], t)
        nxt = sample(rows, sampling, rngs, seen)
        out: list[int | None] = []
        for b in range(B):
            if done[b]:
                out.append(None)
                continue
            tok = int(nxt[b])
            out.append(tok)
            if seen is not None:
                seen[b, tok] = True
            if tok in eos:
                done[b] = True
        yield out
        if all(done) or t == steps - 1:
            return
        # finished rows keep decoding (their output is ignored) so the batch stays rectangular
        step_ids = np.array([[tok if tok is not None else 0] for tok in out], dtype=np.int64)
        p = L + t
        step_pos = np.array([[p - n] for n in pads]) if ragged else None
        logits = model.forward(step_ids, cache=cache, start_pos=p, positions=step_pos,
                               attn_mask=mask[:, :p + 1] if ragged else None, last_only=True)


def _stop_hit(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else -1


def generate(model: Any, prompt_ids: Any, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             min_p: float | None = None, repetition_penalty: float = 1.0, eos_ids: Sequence[int] | None = None,
             stop: Sequence[str] = (), tokenizer: Any = None,
             on_token: Callable[[int, int], None] | None = None) -> list:
    """New token ids after the prompt (a list; a list of lists for a batch). The EOS id that ends a row is NOT included.

    prompt_ids: one prompt (list of ids / 1-D array) or a batch (list of lists / 2-D array; rows may differ in length).
    eos_ids: ids that end a row (default: the model config's). stop: strings that end a row once the decoded
    output contains one (needs `tokenizer`; the ids up to and including the token that completed it are returned).
    on_token(row, id) is called for every new id as it is produced. The prompt plus the new tokens must fit
    the model's context: a prompt that fills it is an error, and generation stops at its end.
    """
    prompts, batched = _as_prompts(prompt_ids)
    s = Sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    stop = [stop] if isinstance(stop, str) else list(stop)
    if stop and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer to decode the output: pass tokenizer=")
    if any(not isinstance(x, str) or not x for x in stop):
        raise GenerationError("stop strings must be non-empty strings")
    eos = set(model.config.eos_token_ids if eos_ids is None else eos_ids)
    outs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for step in iter_tokens(model, prompts, max_new_tokens, s, seed, eos_ids):
        for b, tok in enumerate(step):
            if tok is None or finished[b]:
                continue
            if tok in eos:
                finished[b] = True
                continue
            outs[b].append(tok)
            if on_token is not None:
                on_token(b, tok)
            if stop and _stop_hit(tokenizer.decode(outs[b]), stop) >= 0:
                finished[b] = True
        if all(finished):
            break
    return outs if batched else outs[0]


def stream(model: Any, tokenizer: Any, prompt_ids: Sequence[int], max_new_tokens: int = 32,
           stop: Sequence[str] = (), on_token: Callable[[int], None] | None = None, **kw: Any) -> Iterator[str]:
    """Yield the continuation of one prompt as text, piece by piece, as soon as each piece is final.

    Text is held back while it ends in an incomplete UTF-8 character or could be the start of a
    stop string; the output ends before a stop string (which is not yielded) or at EOS.
    on_token(id) is called as each id is produced (the EOS id included), e.g. to time the first token.
    Keyword arguments are generate()'s sampling options (temperature, top_k, top_p, min_p, ...).
    """
    prompts, batched = _as_prompts(prompt_ids)
    if batched:
        raise ValueError("stream() takes one prompt; use generate() for a batch")
    s = Sampling(kw.pop("temperature", 0.0), kw.pop("top_k", None), kw.pop("top_p", None),
                 kw.pop("min_p", None), kw.pop("repetition_penalty", 1.0))
    seed, eos_ids = kw.pop("seed", None), kw.pop("eos_ids", None)
    if kw:
        raise TypeError(f"stream() got an unexpected keyword argument {next(iter(kw))!r}")
    stop = [stop] if isinstance(stop, str) else list(stop)
    if any(not isinstance(x, str) or not x for x in stop):
        raise GenerationError("stop strings must be non-empty strings")
    eos = set(model.config.eos_token_ids if eos_ids is None else eos_ids)
    ids: list[int] = []
    sent = 0
    for (tok,) in iter_tokens(model, prompts, max_new_tokens, s, seed, eos_ids):
        if on_token is not None and tok is not None:
            on_token(tok)
        if tok is None or tok in eos:
            break
        ids.append(tok)
        text = tokenizer.decode(ids)
        cut = _stop_hit(text, stop)
        if cut >= 0:
            if cut > sent:
                yield text[sent:cut]
            return
        safe = len(text.rstrip("\ufffd"))                     # an unfinished multi-byte character
        safe -= max((n for x in stop for n in range(1, min(len(x) - 1, safe) + 1)
                     if text[:safe].endswith(x[:n])), default=0)   # a stop string that may be starting
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    text = tokenizer.decode(ids)
    if len(text) > sent:
        yield text[sent:]
