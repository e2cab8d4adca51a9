"""Look inside the model for one prompt: the tokens, every layer's and head's attention weights, the logit
lens (the residual stream after each layer read out through the final norm and lm_head) and the next-token
distribution. Computed with the reference layers (npllama.layers), which keep each head's attention
matrix P in their caches; the result is plain lists and floats (JSON-able), drawn by npllama.explain_html.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from npllama import transformer
from npllama.backend import to_host
from npllama.errors import NpllamaError
from npllama.transformer import ReferenceOps

MAX_TOKENS = 64        # 30 layers x 9 heads x T x T weights: 64 tokens keep the page a few MB
LENS_TOP = 3           # tokens the logit lens keeps per layer and position


class PromptTooLong(NpllamaError, ValueError):
    """The prompt has more tokens than explain draws."""


def token_text(tokenizer: Any, i: int) -> str:
    """Token i's own text; bytes that are not whole UTF-8 characters are shown as \\xNN escapes."""
    return tokenizer.id_to_bytes(int(i)).decode("utf-8", errors="backslashreplace")


def _top(logits: Any, k: int) -> list[dict[str, list]]:
    """Per row of logits (T, V): the k most likely tokens, most likely first, {"ids", "probs" (4 digits)}."""
    z = to_host(logits)
    k = min(k, z.shape[-1])
    m = z.max(axis=-1, keepdims=True)
    logz = m[:, 0].astype(np.float64) + np.log(np.exp(z - m).sum(axis=-1, dtype=np.float64))   # (T,)
    idx = np.argpartition(-z, k - 1, axis=-1)[:, :k]                                               # (T, k)
    top = np.take_along_axis(z, idx, axis=-1).astype(np.float64)
    order = np.argsort(-top, axis=-1, kind="stable")
    idx, top = np.take_along_axis(idx, order, axis=-1), np.take_along_axis(top, order, axis=-1)
    probs = np.exp(top - logz[:, None])
    return [{"ids": [int(i) for i in r], "probs": [float(f"{p:.4g}") for p in pr]} for r, pr in zip(idx, probs)]


def explain(model: Any, tokenizer: Any, prompt: str | Sequence[int], top: int = 10,
            lens_top: int = LENS_TOP, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """Tokens, attention (layer, head, query, key), logit lens and next-token top-`top` of one prompt (text or ids)."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, bos=bool(getattr(tokenizer, "add_bos", False)))
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise PromptTooLong("the prompt is empty: it has no tokens to explain")
    if len(ids) > max_tokens:
        raise PromptTooLong(f"the prompt has {len(ids)} tokens; explain draws at most {max_tokens} "
                            f"(shorten the prompt)")
    c = model.config
    x_ids = model._check_ids(np.array([ids], dtype=np.int64))                        # (1, T)
    ops = ReferenceOps(c)    # the textbook layers keep P (B, H, T, S) in each attention cache
    w = model.weights()
    ctx = model._context(x_ids.shape, None, 0, None, None)
    x, _ = ops.embedding(x_ids, w.embed_tokens)                                      # (1, T, D)
    attention, lens = [], []
    last = None
    for i, lw in enumerate(w.layers):
        x, cb = transformer.block_forward(ops, x, lw, i, ctx)
        attention.append(to_host(cb.self_attn.P[0]).astype(np.float64).tolist())     # (H, T, T)
        del cb
        # the logit lens: read this layer's residual stream as if it were the last one
        h, _ = ops.rmsnorm(x, w.norm)
        logits, _ = ops.linear(h, w.lm_head)                                         # (1, T, V)
        lens.append(_top(logits[0], lens_top))
        last = logits[0, -1:]
    nxt = _top(last, top)[0]                # the last layer's lens is the model's own output
    shown = set(ids) | set(nxt["ids"]) | {t for row in lens for cell in row for t in cell["ids"]}
    return {
        "prompt": prompt if isinstance(prompt, str) else tokenizer.decode(ids),
        "ids": ids,
        "tokens": [token_text(tokenizer, i) for i in ids],
        "num_layers": c.num_hidden_layers,
        "num_heads": c.num_attention_heads,
        "num_kv_heads": c.num_key_value_heads,
        "attention": attention,                        # [layer][head][query][key], each row sums to 1
        "lens": lens,                                  # [layer][position] {"ids", "probs"}, top `lens_top`
        "next": nxt,
        "pieces": {str(i): token_text(tokenizer, i) for i in sorted(shown)},
    }
