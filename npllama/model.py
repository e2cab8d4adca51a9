"""The Llama model: a config, a flat dict of parameters keyed by Hugging Face names, loading, and the
entry points (forward, loss_and_grads, generate). The math itself is `npllama.transformer`, run with the
reference layers (`reference=True`) or the speed layer (the default).
"""
from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from npllama import blasthreads, transformer
from npllama.backend import backend_name, get_backend, int_range, is_cupy, resolve_dtype, tf32, to_host
from npllama.config import LlamaConfig
from npllama.errors import InputError, InputTypeError
from npllama.fast import storage
from npllama.fast.ops import FastOps
from npllama.fast.infer import InferOps, StepOps
from npllama.hostmem import keep_freed_memory
from npllama.kvcache import KVCache
from npllama.layers import lora, rope
from npllama.transformer import Context, LayerWeights, ReferenceOps, Weights


def param_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's HF name and PyTorch-layout shape, in the order transformers lists them."""
    D, I, V, hd = c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    H, KV = c.num_attention_heads, c.num_key_value_heads
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(c.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        for name, out, inp in (("q_proj", H * hd, D), ("k_proj", KV * hd, D), ("v_proj", KV * hd, D),
                               ("o_proj", D, H * hd)):
            s[a + name + ".weight"] = (out, inp)
            if c.attention_bias:
                s[a + name + ".bias"] = (out,)
        for name, out, inp in (("gate_proj", I, D), ("up_proj", I, D), ("down_proj", D, I)):
            s[m + name + ".weight"] = (out, inp)
            if c.mlp_bias:
                s[m + name + ".bias"] = (out,)
        s[f"model.layers.{i}.input_layernorm.weight"] = (D,)
        s[f"model.layers.{i}.post_attention_layernorm.weight"] = (D,)
    s["model.norm.weight"] = (D,)
    if not c.tie_word_embeddings:
        s["lm_head.weight"] = (V, D)
    return s


def _tf32_scope(method: Any) -> Any:
    """Run a model method with the model's TF32 setting in force (and the previous one restored after)."""
    @functools.wraps(method)
    def wrapper(self: Llama, *args: Any, **kwargs: Any) -> Any:
        with tf32(self.xp, self.tf32):
            return method(self, *args, **kwargs)
    return wrapper


class Llama:
    """A Llama causal LM on NumPy or CuPy; `params` are keyed and shaped as in transformers.

    reference: run the reference layers (npllama.layers: the textbook math) with plain storage, one array
    per HF name. The default is the speed layer (npllama.fast), equal to the reference in float64.
    fused: use the fused CUDA kernels (RMSNorm, RoPE, SwiGLU, attention softmax) on CuPy; default True there
    (not with reference). False forces the plain array code, which is always what runs on NumPy.
    tf32: let CuPy's float32 matmuls use TF32 tensor cores (faster, ~1e-3 relative error); off by default.

    The model keeps its own copy of the weights (on the fast path q/k/v and gate/up share a matrix per
    layer and params holds HF-named views: npllama.fast.storage). On NumPy it also raises glibc's malloc
    thresholds (npllama.hostmem) and sets BLAS's thread count to the free cores (npllama.blasthreads).
    """

    def __init__(self, config: LlamaConfig, params: dict[str, Any], backend: str = "numpy",
                 dtype: str = "float32", fused: bool | None = None, tf32: bool = False,
                 reference: bool = False) -> None:
        self._setup(config, backend, dtype, fused, tf32, reference)
        self._fill(params)

    def _fill(self, params: dict[str, Any], consume: bool = False) -> None:
        """Check `params` against the config, then copy (and cast) each into the model's storage.

        consume: pop each entry once copied, so a loader's temporary arrays go one at a time
        and the weights never exist twice in full.
        """
        expected = param_shapes(self.config)
        missing = [k for k in expected if k not in params]
        if missing:
            raise InputError(f"missing parameter {missing[0]!r}")
        unexpected = [k for k in params if k not in expected]
        if unexpected:
            raise InputError(f"unexpected parameter {unexpected[0]!r} for this config")
        for k, shape in expected.items():
            if tuple(params[k].shape) != shape:
                raise InputError(f"parameter {k!r} has shape {list(params[k].shape)}, expected {list(shape)}")
        for k, dst in self.params.items():
            src = params.pop(k) if consume else params[k]
            if self.xp is np:
                storage.fill(dst, to_host(src))
            else:
                dst[...] = self.xp.asarray(src, dtype=self.dtype)
            del src

    def _setup(self, config: LlamaConfig, backend: str, dtype: str, fused: bool | None, tf32: bool,
               reference: bool) -> None:
        self.config = config
        self.xp = get_backend(backend)
        if self.xp is np:
            keep_freed_memory()                # a forward's temporaries are then reused, not page-faulted anew
            blasthreads.apply()                # BLAS threads = cores other processes leave free
        self.dtype = resolve_dtype(dtype)
        self.reference = bool(reference)
        self.fused = (self.xp is not np and not self.reference) if fused is None else bool(fused)
        self.tf32 = bool(tf32)
        self.ops = ReferenceOps(config) if self.reference else FastOps(config, self.fused)
        # forward() on the host keeps nothing for a backward: the same math in fewer passes and NumPy calls,
        # and fewer still for one token per row through the KV cache (decoding)
        host = self.xp is np and not self.reference
        self._infer_ops, self._step_ops = (InferOps(config), StepOps(config)) if host else (self.ops, self.ops)
        self._rope_cache: tuple[Any, Any] | None = None
        self._graph_decoder: Any = None        # built by generate(..., cuda_graph=True), kept for reuse
        shapes = param_shapes(config)
        if self.reference:                     # plain storage: one array per HF name
            self.params = {k: self.xp.empty(shape, dtype=self.dtype) for k, shape in shapes.items()}
            self._stacks: list = []
        else:
            self.params, self._stacks = storage.allocate(shapes, config.num_hidden_layers, self.dtype, self.xp)
        self.trainable: set[str] = set(self.params)   # the names loss_and_grads returns gradients for
        self.lora: Any = None                  # npllama.lora.LoraConfig once an adapter is added or loaded
        self._lora_draws = 0                   # dropout masks drawn so far (each loss_and_grads draws anew)
        self._index_layers()

    def _index_layers(self) -> None:
        """Per layer and part, the (short name, full name) pairs of its params: each forward picks a layer's
        weights by lookup. Called again when params gain or lose entries (npllama.lora)."""
        self._layer_keys = [{part: [(k[len(pre + part):], k) for k in self.params if k.startswith(pre + part)]
                             for part in ("self_attn.", "mlp.")}
                            for pre in (f"model.layers.{i}." for i in range(self.config.num_hidden_layers))]

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", backend: str = "numpy", fused: bool | None = None,
                        tf32: bool = False, reference: bool = False) -> Llama:
        """Load an HF export (dir with config.json and model.safetensors or shards) or a .gguf file."""
        path = os.fspath(path)
        resolve_dtype(dtype)
        get_backend(backend)  # fail on a bad backend before reading gigabytes
        model = cls.__new__(cls)
        if path.endswith(".gguf"):
            from npllama.io.gguf import load_gguf
            config, params = load_gguf(path)
            model._setup(config, backend, dtype, fused, tf32, reference)
            model._fill(params, consume=True)
            return model
        from npllama.io.safetensors import WeightsError, check_checkpoint, load_params
        if not os.path.isdir(path):
            raise WeightsError(f"{path}: not a model directory or .gguf file")
        config = LlamaConfig.from_json(os.path.join(path, "config.json"))
        check_checkpoint(path, config)  # names and shapes against the headers, before anything is allocated
        # transformers may write lm_head.weight even when tied; it is the same tensor, so it is not needed
        optional = ["lm_head.weight"] if config.tie_word_embeddings else []
        model._setup(config, backend, dtype, fused, tf32, reference)
        if model.xp is np:
            # on the host the file is read straight into the model's storage: nothing stays mapped
            load_params(path, param_shapes(config), model.dtype, optional=optional, out=model.params)
        else:
            model._fill(load_params(path, param_shapes(config), model.dtype, optional=optional), consume=True)
        return model

    @classmethod
    def init(cls, config: LlamaConfig, seed: int = 0, dtype: str = "float32", backend: str = "numpy",
             std: float = 0.02, fused: bool | None = None, tf32: bool = False, reference: bool = False) -> Llama:
        """A fresh model: weights ~ N(0, std), norms 1, biases 0 (transformers' init), reproducible from `seed`."""
        rng = np.random.default_rng(seed)
        dt = resolve_dtype(dtype)
        params = {}
        for name, shape in param_shapes(config).items():
            if name.endswith("norm.weight"):
                params[name] = np.ones(shape, dtype=dt)
            elif name.endswith(".bias"):
                params[name] = np.zeros(shape, dtype=dt)
            else:  # drawn in float64 so the same seed gives the same model in either dtype
                params[name] = (rng.standard_normal(shape) * std).astype(dt)
        model = cls.__new__(cls)
        model._setup(config, backend, dtype, fused, tf32, reference)
        model._fill(params, consume=True)
        return model

    def save_pretrained(self, path: str) -> None:
        """Write config.json + model.safetensors (HF layout) into `path`, replacing them only when complete
        (other files already in the folder, a tokenizer say, are kept)."""
        from npllama.io.atomic import atomic_dir
        from npllama.io.safetensors import save_file
        if self.lora is not None:
            raise InputError("the model carries a LoRA adapter: npllama.lora.save(model, dir) writes the adapter, "
                             "npllama.lora.merge(model) folds it in so that save_pretrained writes a plain model")
        with atomic_dir(os.fspath(path), existing="merge") as tmp:
            save_file(self.params, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            self.config.save(os.path.join(tmp, "config.json"))

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """Preallocated K/V buffers for `batch_size` sequences of up to `max_len` tokens."""
        c = self.config
        max_len = max_len or c.max_position_embeddings
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim,
                       self.dtype, self.xp)

    @property
    def backend(self) -> str:
        """'numpy' or 'cupy'."""
        return backend_name(self.xp)

    @property
    def num_params(self) -> int:
        """Total parameter count."""
        return sum(int(np.prod(p.shape)) for p in self.params.values())

    # ---------------------------------------------------------------- forward
    def _rope_tables(self, T: int, start_pos: int, positions: Any) -> tuple[Any, Any]:
        c = self.config
        if positions is None and c.rope_type != "dynamic":
            # every position's table is fixed: compute once, grow by doubling, slice per call
            need = start_pos + T
            if self._rope_cache is None or self._rope_cache[0].shape[0] < need:
                n = max(need, 2 * (0 if self._rope_cache is None else self._rope_cache[0].shape[0]), 256)
                self._rope_cache = rope.tables(c, np.arange(n), self.dtype, self.xp)
            cos, sin = self._rope_cache
            return cos[start_pos:start_pos + T], sin[start_pos:start_pos + T]
        if positions is None:
            positions = np.arange(start_pos, start_pos + T)
        return rope.tables(c, positions, self.dtype, self.xp)

    def _check_ids(self, ids: Any) -> Any:
        # host ids are checked on the host, before the copy: no GPU round trip per decoding step
        ids = ids if is_cupy(ids) else np.asarray(ids)
        if ids.ndim != 2:
            raise InputError(f"ids must be a 2-D (batch, seq) integer array, got shape {tuple(ids.shape)}")
        if ids.dtype.kind not in "iu":
            raise InputTypeError(f"ids must be integers, got dtype {ids.dtype}")
        if ids.size:
            lo, hi = int_range(ids)
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise InputError(f"token id {bad} is out of range for vocab_size={self.config.vocab_size}")
        return self.xp.asarray(ids)

    @_tf32_scope
    def forward(self, ids: Any, cache: KVCache | None = None, start_pos: int = 0, positions: Any = None,
                attn_mask: Any = None, last_only: bool = False) -> Any:
        """ids (B, T) -> logits (B, T, V) (or (B, 1, V) with last_only) on the model's backend.

        With a cache, K/V of these tokens are stored at [start_pos, start_pos + T) and attention
        sees [0, start_pos + T). positions (B, T) override the rotary positions (left padding);
        attn_mask (B, start_pos + T) marks real tokens (True) among the keys.
        """
        ids = self._check_ids(ids)
        ctx = self._context(ids.shape, cache, start_pos, positions, attn_mask)
        ops = self._step_ops if ids.shape[1] == 1 and cache is not None else self._infer_ops
        return transformer.forward(ops, self.weights(), ids, ctx, last_only=last_only)[0]

    def _context(self, shape: tuple, cache: KVCache | None, start_pos: int, positions: Any,
                 attn_mask: Any) -> Context:
        B, T = shape
        if cache is not None:
            if start_pos + T > cache.max_len:
                raise InputError(f"sequence of {start_pos + T} tokens does not fit the KV cache ({cache.max_len})")
            if B > cache.batch_size:
                raise InputError(f"batch of {B} does not fit the KV cache (batch_size={cache.batch_size})")
        if attn_mask is not None:
            attn_mask = self.xp.asarray(attn_mask, dtype=bool)
            if attn_mask.shape != (B, start_pos + T):
                raise InputError(f"attn_mask must have shape {(B, start_pos + T)}, got {tuple(attn_mask.shape)}")
        cos, sin = self._rope_tables(T, start_pos, positions)
        return Context(cos, sin, cache, start_pos, attn_mask)

    def layer(self, i: int, settings: lora.Settings | None = None) -> LayerWeights:
        """Layer i's weights by role; on the fast path with the stacked q/k/v and gate/up matrices.

        A part's dict also holds, where they apply, the LoRA settings ('lora') and the short names of its
        frozen weights ('frozen')."""
        p = self.params
        pre = f"model.layers.{i}."
        parts = []
        for part, stack in (("self_attn.", "self_attn"), ("mlp.", "mlp")):
            w = {short: p[full] for short, full in self._layer_keys[i][part]}
            if len(self.trainable) != len(self.params):   # something is frozen: name it for the backward
                frozen = frozenset(short for short, full in self._layer_keys[i][part] if full not in self.trainable)
                if frozen:
                    w["frozen"] = frozen
            if any(".lora_A." in short for short in w):
                # an adapted projection adds its own update: it runs on its own, not inside a stacked product
                w["lora"] = settings if settings is not None else self._lora_settings(train=False)
            elif self._stacks:
                w = storage.with_stacked(w, self._stacks[i][stack])
            parts.append(w)
        return LayerWeights(p[pre + "input_layernorm.weight"], parts[0], p[pre + "post_attention_layernorm.weight"],
                            parts[1])

    def weights(self, train: bool = False, rows: tuple[int, int, int] | None = None) -> Weights:
        """Every weight the forward reads, by role (what npllama.transformer takes). train: LoRA dropout on;
        rows (a, b, n): the batch is rows [a, b) of one of n rows (the dropout masks are the whole batch's)."""
        p = self.params
        settings = self._lora_settings(train, rows) if self.lora is not None else None
        return Weights(p["model.embed_tokens.weight"],
                       [self.layer(i, settings) for i in range(self.config.num_hidden_layers)],
                       p["model.norm.weight"], self.lm_head, frozenset(p) - self.trainable)

    def _lora_settings(self, train: bool, rows: tuple[int, int, int] | None = None) -> lora.Settings:
        c = self.lora
        rng = None
        if train and c.dropout > 0:     # a fresh, reproducible draw per training call
            rng = np.random.default_rng([c.seed, self._lora_draws])
            self._lora_draws += 1
        return lora.Settings(c.scale, c.dropout, rng, rows)

    @property
    def lm_head(self) -> Any:
        """The output projection (V, D): the embedding matrix itself when the embeddings are tied."""
        return self.params["model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"]

    @_tf32_scope
    def loss_and_grads(self, ids: Any, targets: Any, ignore_index: int = -100, on_grads: Any = None,
                       rows: tuple[int, int, int] | None = None) -> tuple[float, dict[str, Any]]:
        """Mean cross-entropy of `targets` (already the next tokens; ignore_index skipped) and the gradient of
        every trainable parameter (`model.trainable`; LoRA dropout, if any, is applied here only).
        on_grads: called with each layer's final gradients during the backward (npllama.transformer.backward);
        rows (a, b, n): ids are rows [a, b) of a data-parallel batch of n rows (LoRA dropout masks its rows alone)."""
        targets = self._check_targets(ids, targets)
        ids = self._check_ids(ids)
        unknown = sorted(self.trainable - set(self.params))
        if unknown:
            raise InputError(f"model.trainable names {unknown[0]!r}, which is not a parameter")
        if not self.trainable:
            raise InputError("model.trainable is empty: nothing would get a gradient")
        logits, cache = transformer.forward(self.ops, self.weights(train=True, rows=rows), ids,
                                            self._context(ids.shape, None, 0, None, None), keep=True)
        B, T, V = logits.shape
        loss, lcache = self.ops.loss(logits.reshape(B * T, V), targets.reshape(-1), ignore_index)
        del logits                                             # the loss keeps what its backward needs
        dlogits = self.ops.loss_backward(1.0, lcache).reshape(B, T, V)
        grads = transformer.backward(self.ops, dlogits, cache, self.config.tie_word_embeddings, on_grads)
        return loss, {k: grads[k] for k in self.params if k in self.trainable}   # same order as params

    def loss(self, ids: Any, targets: Any, ignore_index: int = -100) -> float:
        """Mean cross-entropy only (no backward)."""
        targets = self._check_targets(ids, targets)
        logits = self.forward(ids)
        B, T, V = logits.shape
        return self.ops.loss(logits.reshape(B * T, V), targets.reshape(-1), ignore_index)[0]

    def _check_targets(self, ids: Any, targets: Any) -> Any:
        targets = self.xp.asarray(targets)
        if tuple(targets.shape) != tuple(np.shape(ids)):
            raise InputError(f"targets shape {tuple(targets.shape)} does not match ids shape {tuple(np.shape(ids))}")
        if targets.dtype.kind not in "iu":
            raise InputTypeError(f"targets must be integers, got dtype {targets.dtype}")
        return targets

    # ---------------------------------------------------------------- generation
    def generate(self, prompt_ids: Any, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 cuda_graph: bool = False, **kwargs: Any) -> list:
        """New token ids after the prompt (see npllama.generate.generate for every option).

        cuda_graph=True (CuPy only): each single-token step replays one captured CUDA graph
        (npllama.fast.decode.GraphDecoder); same tokens, far less host overhead per token.
        """
        from npllama.generate import generate
        if self.xp is np:
            blasthreads.apply()                # the machine may have got busier (or quieter) since load
        target: Any = self
        if cuda_graph:
            if self._graph_decoder is None:
                from npllama.fast.decode import GraphDecoder
                self._graph_decoder = GraphDecoder(self, graph=True)
            target = self._graph_decoder
        return generate(target, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, **kwargs)

    def __repr__(self) -> str:
        c = self.config
        return (f"Llama({self.num_params / 1e6:.1f}M params, {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                f"heads {c.num_attention_heads}/{c.num_key_value_heads}, {self.dtype.name}, {self.backend}"
                f"{', reference' if self.reference else ''})")

