"""The layer operations of the speed layer, as the transformer calls them (see npllama.transformer)."""
from __future__ import annotations

from typing import Any

from npllama.fast import attention, linear, loss, mlp, rmsnorm
from npllama.transformer import Context, ReferenceOps


class FastOps(ReferenceOps):
    """`npllama.fast`'s layers: stacked weights (fast.storage), blocked attention, and the fused CUDA kernels
    on CuPy when `fused`. Embedding and the head's forward are the reference functions: nothing to gain there."""

    def __init__(self, config: Any, fused: bool = False) -> None:
        super().__init__(config)
        self.fused = fused

    def rmsnorm(self, x: Any, w: Any) -> tuple[Any, Any]:
        return rmsnorm.forward(x, w, self.config.rms_norm_eps, self.fused)

    def rmsnorm_backward(self, dy: Any, cache: Any) -> tuple[Any, Any]:
        return rmsnorm.backward(dy, cache, self.fused)

    def attention(self, x: Any, w: dict, i: int, ctx: Context) -> tuple[Any, Any]:
        c = self.config
        kv = None if ctx.cache is None else ctx.cache.layer(i)
        return attention.forward(x, w, ctx.cos, ctx.sin, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                 kv=kv, start_pos=ctx.start_pos, key_mask=ctx.key_mask, fused=self.fused,
                                 keep=ctx.grad)

    def attention_backward(self, dy: Any, cache: Any) -> tuple[Any, dict]:
        return attention.backward(dy, cache, self.fused)

    def mlp(self, x: Any, w: dict) -> tuple[Any, Any]:
        return mlp.forward(x, w, self.fused)

    def mlp_backward(self, dy: Any, cache: Any) -> tuple[Any, dict]:
        return mlp.backward(dy, cache, self.fused)

    def linear_backward(self, dy: Any, cache: Any) -> tuple[Any, Any, Any]:
        return linear.backward(dy, cache)

    def loss(self, logits: Any, targets: Any, ignore_index: int) -> tuple[float, Any]:
        return loss.forward(logits, targets, ignore_index)

    def loss_backward(self, dloss: float, cache: Any) -> Any:
        return loss.backward(dloss, cache)
