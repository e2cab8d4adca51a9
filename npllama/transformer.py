"""The transformer, written once against a small set of layer operations (`ops`):

    ids -> embed -> [ x += attn(rms_norm(x)); x += mlp(rms_norm(x)) ] * n_layers -> rms_norm -> lm_head -> logits

and its backward, the same steps read in reverse. These op sets run it: `ReferenceOps` (the textbook
layers in `npllama.layers`), `npllama.fast.ops.FastOps` (the speed layer), `npllama.fast.infer.InferOps`
and `StepOps` (host forwards that keep nothing for a backward; one decoded token per row) and, for one
decoded token captured as a CUDA graph, `npllama.fast.decode.CudaOps`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

from npllama.layers import attention, embedding, linear, loss, mlp, rmsnorm


class LayerWeights(NamedTuple):
    """One block's weights; the attention and MLP dicts are keyed like 'q_proj.weight'."""
    input_layernorm: Any
    self_attn: dict
    post_attention_layernorm: Any
    mlp: dict


class Weights(NamedTuple):
    """Every weight the forward reads, by role (`Llama.weights()` builds it from the params)."""
    embed_tokens: Any
    layers: list
    norm: Any
    lm_head: Any       # = embed_tokens when the embeddings are tied
    frozen: frozenset = frozenset()   # HF names of the weights that learn nothing (no gradient is computed)


class Context(NamedTuple):
    """What attention needs besides its input and weights, the same for every layer of one call."""
    cos: Any           # rotary tables for these positions
    sin: Any
    cache: Any         # a KVCache, or None
    start_pos: Any     # position of the first token (CudaOps: a device int32 buffer)
    key_mask: Any      # bool (B, start_pos + T): False for padding keys; or None
    grad: bool = True  # a backward will follow: layers keep what it needs (transformer.forward sets it)


class BlockCache(NamedTuple):
    input_layernorm: Any
    self_attn: Any
    post_attention_layernorm: Any
    mlp: Any


class Cache(NamedTuple):
    embed_tokens: Any
    layers: list       # one BlockCache per layer
    norm: Any
    lm_head: Any
    frozen: frozenset  # Weights.frozen


class ReferenceOps:
    """The layer operations of `npllama.layers`: the textbook math, plain storage (one array per HF name)."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def embedding(self, ids: Any, W: Any) -> tuple[Any, Any]:
        return embedding.forward(ids, W)

    def embedding_backward(self, dy: Any, cache: Any) -> Any:
        return embedding.backward(dy, cache)

    def rmsnorm(self, x: Any, w: Any) -> tuple[Any, Any]:
        return rmsnorm.forward(x, w, self.config.rms_norm_eps)

    def rmsnorm_backward(self, dy: Any, cache: Any) -> tuple[Any, Any]:
        return rmsnorm.backward(dy, cache)

    def attention(self, x: Any, w: dict, i: int, ctx: Context) -> tuple[Any, Any]:
        c = self.config
        kv = None if ctx.cache is None else ctx.cache.layer(i)
        return attention.forward(x, w, ctx.cos, ctx.sin, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                 kv=kv, start_pos=ctx.start_pos, key_mask=ctx.key_mask)

    def attention_backward(self, dy: Any, cache: Any) -> tuple[Any, dict]:
        return attention.backward(dy, cache)

    def mlp(self, x: Any, w: dict) -> tuple[Any, Any]:
        return mlp.forward(x, w)

    def mlp_backward(self, dy: Any, cache: Any) -> tuple[Any, dict]:
        return mlp.backward(dy, cache)

    def linear(self, x: Any, W: Any, frozen: bool = False) -> tuple[Any, Any]:
        return linear.forward(x, W, frozen=frozen)

    def linear_backward(self, dy: Any, cache: Any) -> tuple[Any, Any, Any]:
        return linear.backward(dy, cache)

    def loss(self, logits: Any, targets: Any, ignore_index: int) -> tuple[float, Any]:
        return loss.forward(logits, targets, ignore_index)

    def loss_backward(self, dloss: float, cache: Any) -> Any:
        return loss.backward(dloss, cache)


def block_forward(ops: Any, x: Any, w: LayerWeights, i: int, ctx: Context) -> tuple[Any, BlockCache]:
    """One transformer block (layer i): x (B, T, D) -> x (B, T, D)."""
    h, cn1 = ops.rmsnorm(x, w.input_layernorm)
    a, ca = ops.attention(h, w.self_attn, i, ctx)
    x = x + a
    h, cn2 = ops.rmsnorm(x, w.post_attention_layernorm)
    m, cm = ops.mlp(h, w.mlp)
    return x + m, BlockCache(cn1, ca, cn2, cm)


def block_backward(ops: Any, dx: Any, cache: BlockCache) -> tuple[Any, dict[str, Any]]:
    """-> dx, grads keyed by the names inside a layer ('self_attn.q_proj.weight', 'input_layernorm.weight')."""
    grads: dict[str, Any] = {}
    dh, g = ops.mlp_backward(dx, cache.mlp)                    # x = x + mlp(norm(x)): both paths carry dx
    grads.update({"mlp." + k: v for k, v in g.items()})
    dxn, grads["post_attention_layernorm.weight"] = ops.rmsnorm_backward(dh, cache.post_attention_layernorm)
    dx = dx + dxn
    dh, g = ops.attention_backward(dx, cache.self_attn)
    grads.update({"self_attn." + k: v for k, v in g.items()})
    dxn, grads["input_layernorm.weight"] = ops.rmsnorm_backward(dh, cache.input_layernorm)
    return dx + dxn, grads


def forward(ops: Any, w: Weights, ids: Any, ctx: Context, keep: bool = False,
            last_only: bool = False) -> tuple[Any, Cache | None]:
    """ids (B, T) -> logits (B, T, V) (or (B, 1, V) with last_only); the Cache for backward when keep."""
    ctx = ctx._replace(grad=keep)   # inference: attention need not hold its (T, S) weights for a backward
    x, ce = ops.embedding(ids, w.embed_tokens)                                # (B, T, D)
    blocks = []
    for i, lw in enumerate(w.layers):
        x, cb = block_forward(ops, x, lw, i, ctx)
        if keep:
            blocks.append(cb)
        del cb                  # inference keeps nothing: a layer's activations go before the next makes its own
    if last_only:
        x = x[:, -1:]
    h, cn = ops.rmsnorm(x, w.norm)
    head = "model.embed_tokens.weight" if w.lm_head is w.embed_tokens else "lm_head.weight"
    logits, cl = ops.linear(h, w.lm_head, frozen=head in w.frozen)           # (B, T, V)
    return logits, (Cache(ce, blocks, cn, cl, w.frozen) if keep else None)


def backward(ops: Any, dlogits: Any, cache: Cache, tied: bool,
             on_grads: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Gradients of every weight from dlogits (B, T, V), keyed by Hugging Face names: the forward in reverse.

    Frozen weights (cache.frozen) get none; the products that would only serve them are skipped.
    on_grads, if given, is called with each group of final gradients as soon as it is done (the final
    norm and untied head, then each layer from the top, then the embedding): data parallel training
    starts reducing them while the layers below are still being differentiated."""
    grads: dict[str, Any] = {}
    dh, dW_head, _ = ops.linear_backward(dlogits, cache.lm_head)             # dW_head None when frozen
    dx, grads["model.norm.weight"] = ops.rmsnorm_backward(dh, cache.norm)
    if not tied and dW_head is not None:
        grads["lm_head.weight"] = dW_head
    _deliver(on_grads, grads, cache.frozen)                 # the final norm and an untied head are done
    for i in reversed(range(len(cache.layers))):
        dx, g = block_backward(ops, dx, cache.layers[i])
        g = {f"model.layers.{i}.{k}": v for k, v in g.items()}
        grads.update(g)
        _deliver(on_grads, g, cache.frozen)
    if "model.embed_tokens.weight" not in cache.frozen:
        dW_emb = ops.embedding_backward(dx, cache.embed_tokens)
        if tied:   # one matrix, two uses: the gradients add (into the head's, laid out like the matrix)
            dW_head += dW_emb
            dW_emb = dW_head
        grads["model.embed_tokens.weight"] = dW_emb
        _deliver(on_grads, {"model.embed_tokens.weight": dW_emb}, cache.frozen)
    return {k: v for k, v in grads.items() if k not in cache.frozen}


def _deliver(on_grads: Callable[[dict[str, Any]], None] | None, grads: dict[str, Any], frozen: frozenset) -> None:
    """Hand finished gradients (less the frozen ones) to on_grads, when there is one."""
    if on_grads is not None:
        on_grads({k: v for k, v in grads.items() if k not in frozen})
