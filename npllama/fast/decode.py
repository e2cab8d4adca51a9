"""Decoding one token at a time on static buffers, so that the GPU step can be captured once as a
CUDA graph and replayed per token.

Why: an eager decode step on CuPy launches ~25 kernels per layer, each costing tens of microseconds of
Python and launch overhead, so the host, not the GPU, sets the speed. A CUDA graph launches the whole
step at once. Capture needs a step whose every buffer address and shape is fixed, and CuPy cannot
capture cuBLAS calls ("calling cuBLAS API during stream capture is currently unsupported"), so:

- the position and token ids live in a device buffer (`DecodeStep.inp`) that kernels read, instead of
  Python ints baked into slices;
- attention reads the preallocated KV cache up to that position;
- the matrix-vector products are a RawKernel of our own (`gemv`), not cuBLAS.

`DecodeStep` runs the one transformer definition (`npllama.transformer.forward`) with `CudaOps`: the layer
operations as CUDA kernels, for one token per row at a position held on the device. With kernels off it
runs the model's own ops (any backend, testable on the CPU). `GraphDecoder` looks like the model to
`npllama.generate` (config, new_cache, forward): the prompt runs through the model's ordinary forward,
each single-token step through the captured graph.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from npllama import transformer
from npllama.backend import is_cupy, to_host
from npllama.errors import InputError
from npllama.fast import cuda
from npllama.fast.cuda import BLOCK_REDUCE
from npllama.kvcache import KVCache
from npllama.layers import rope
from npllama.transformer import Context


def decode_tables(config: Any, max_len: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (max_len, head_dim // 2) on the host: row p is what a plain forward uses at position p."""
    if config.rope_type == "dynamic":
        # a plain decoding step at position p computes its table for a sequence of p + 1 tokens
        rows = [rope.tables(config, np.array([p]), dtype) for p in range(max_len)]
        cos, sin = np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])
    else:
        cos, sin = rope.tables(config, np.arange(max_len), dtype)
    h = config.head_dim // 2
    return np.ascontiguousarray(cos.reshape(max_len, h)), np.ascontiguousarray(sin.reshape(max_len, h))


# One CUDA source, compiled once per dtype with T bound by a typedef (simpler than C++ templates).
_CUDA_SOURCE = r"""
#define NT 128   // threads per block of `attend`, a power of two

extern "C" {

// y[b, r] = sum_j W[r, j] x[b, j]. W (n_out, n_in) row-major. One warp per output row: the warp's 32
// lanes stride along the row (coalesced reads), then a shuffle reduction.
// blockDim (32, ROWS), grid (ceil(n_out / ROWS), B).
__global__ void gemv(const T* __restrict__ W, const T* __restrict__ x, T* __restrict__ y, int n_out, int n_in) {
    const int r = blockIdx.x * blockDim.y + threadIdx.y;
    const int b = blockIdx.y;
    if (r >= n_out) return;                 // r is the same for the whole warp, so the warp leaves together
    const T* w = W + (long long)r * n_in;
    const T* xb = x + (long long)b * n_in;
    T acc = 0;
    for (int j = threadIdx.x; j < n_in; j += 32) acc += w[j] * xb[j];
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (threadIdx.x == 0) y[(long long)b * n_out + r] = acc;
}

// x[b, :] = W[tok[b], :]; one thread per output element
__global__ void embed(const T* __restrict__ W, const int* __restrict__ tok, T* __restrict__ x, int B, int D) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * D) return;
    x[i] = W[(long long)tok[i / D] * D + i % D];
}

// rotate each head of x (B, nh * hd) in place by table row pos[0] (cos, sin: (max_len, hd / 2));
// one thread per pair (d, d + hd/2), so no two threads touch the same element
__global__ void rope_at(T* __restrict__ x, const T* __restrict__ cos_t, const T* __restrict__ sin_t,
                        const int* __restrict__ pos, int B, int nh, int hd) {
    const int half = hd / 2;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * nh * half) return;
    const int j = i % half;
    T* v = x + (i / half) * hd;             // this (row, head)'s vector
    const T c = cos_t[(long long)pos[0] * half + j];
    const T s = sin_t[(long long)pos[0] * half + j];
    const T x1 = v[j], x2 = v[j + half];
    v[j] = x1 * c - x2 * s;
    v[j + half] = x2 * c + x1 * s;
}

// buf (B_cache, KV, L, hd): buf[b, kh, pos[0], d] = x[b, kh * hd + d] for b < B
__global__ void kv_write(T* __restrict__ buf, const T* __restrict__ x, const int* __restrict__ pos,
                         int B, int KV, int L, int hd) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * KV * hd) return;
    const long long bk = i / hd;               // b * KV + kh
    buf[(bk * L + pos[0]) * hd + i % hd] = x[i];
}

""" + BLOCK_REDUCE + r"""
// One query per (b, head) against keys 0..pos[0] of the cache: out = softmax(q k^T * scale) v.
// Head h reads KV head h / (H / KV) (grouped-query). scores: scratch (B, H, L).
// blockDim NT, grid (H, B).
__global__ void attend(const T* __restrict__ q, const T* __restrict__ kbuf, const T* __restrict__ vbuf,
                       const int* __restrict__ pos, T* __restrict__ scores, T* __restrict__ out,
                       int H, int KV, int L, int hd, T scale) {
    __shared__ T red[NT];
    const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
    const int n = pos[0] + 1;
    const long long kvoff = ((long long)b * KV + h / (H / KV)) * L * hd;
    const T* qv = q + ((long long)b * H + h) * hd;
    const T* K = kbuf + kvoff;
    const T* V = vbuf + kvoff;
    T* s = scores + ((long long)b * H + h) * L;
    T m = (T)-3.0e38;                       // below any real score; every block has at least key 0
    for (int j = tid; j < n; j += NT) {
        T acc = 0;
        for (int d = 0; d < hd; ++d) acc += qv[d] * K[(long long)j * hd + d];
        acc *= scale;
        s[j] = acc;
        m = acc > m ? acc : m;
    }
    m = block_reduce(m, red, true);
    T sum = 0;
    for (int j = tid; j < n; j += NT) {
        const T e = exp(s[j] - m);
        s[j] = e;
        sum += e;
    }
    sum = block_reduce(sum, red, false);    // its __syncthreads also publishes every s[j] to the block
    for (int d = tid; d < hd; d += NT) {
        T acc = 0;
        for (int j = 0; j < n; ++j) acc += s[j] * V[(long long)j * hd + d];
        out[((long long)b * H + h) * hd + d] = acc / sum;
    }
}

}  // extern "C"
"""

_GEMV_ROWS = 4        # warps (output rows) per block of gemv
_ATTEND_THREADS = 128  # = NT in the source
_THREADS = 256        # threads per block of the one-thread-per-element kernels


@functools.lru_cache(maxsize=None)
def _module(ctype: str) -> Any:
    import cupy
    return cupy.RawModule(code=f"typedef {ctype} T;\n" + _CUDA_SOURCE)


class CudaOps:
    """The transformer's layer operations (see npllama.transformer) for one token per row, as CUDA kernels:
    no cuBLAS and no host synchronization, so a step made of them can be captured into a CUDA graph.

    x is (B, 1, D); ctx.start_pos is the device int32 buffer holding the position, ctx.cos / ctx.sin the
    whole tables (max_len, hd / 2). Forward only: the caches returned are None. RMSNorm and SwiGLU are the
    fused layer kernels (npllama.fast.cuda).
    """

    def __init__(self, config: Any, dtype: Any) -> None:
        import cupy
        self.cp = cupy
        self.config = config
        self.dtype = np.dtype(dtype)
        mod = _module({np.float32: "float", np.float64: "double"}[self.dtype.type])
        self.k = {name: mod.get_function(name) for name in ("gemv", "embed", "rope_at", "kv_write", "attend")}

    @staticmethod
    def _blocks(n: int) -> tuple[int]:
        return ((n + _THREADS - 1) // _THREADS,)

    def embedding(self, ids: Any, W: Any) -> tuple[Any, None]:
        """Rows W[ids] -> (B, 1, D); ids (B, 1) int32 on the device."""
        B, D = ids.shape[0], W.shape[1]
        x = self.cp.empty((B, 1, D), dtype=W.dtype)
        self.k["embed"](self._blocks(B * D), (_THREADS,), (W, ids, x, np.int32(B), np.int32(D)))
        return x, None

    def gemv(self, x: Any, W: Any, b: Any = None) -> Any:
        """x (B, in) -> x W^T + b (B, out), one warp per output row."""
        (B, n_in), n_out = x.shape, W.shape[0]
        if not (x.flags.c_contiguous and W.flags.c_contiguous) or W.shape[1] != n_in:
            # the kernel indexes raw row-major memory: anything else would read the wrong numbers
            raise ValueError(f"gemv needs C-contiguous x (B, in) and W (out, in), got {x.shape} and {W.shape}")
        y = self.cp.empty((B, n_out), dtype=x.dtype)
        grid = ((n_out + _GEMV_ROWS - 1) // _GEMV_ROWS, B)
        self.k["gemv"](grid, (32, _GEMV_ROWS), (W, x, y, np.int32(n_out), np.int32(n_in)))
        if b is not None:
            y += b
        return y

    def linear(self, x: Any, W: Any, frozen: bool = False) -> tuple[Any, None]:
        B = x.shape[0]
        return self.gemv(x.reshape(B, -1), W).reshape(B, 1, -1), None

    def rmsnorm(self, x: Any, w: Any) -> tuple[Any, None]:
        return cuda.rmsnorm_forward(x, w, self.config.rms_norm_eps)[0], None

    def rope_at(self, x: Any, ctx: Context, n_heads: int) -> Any:
        """Rotate each head of x (B, n_heads * hd) in place by the table row at the position."""
        B, hd = x.shape[0], x.shape[1] // n_heads
        self.k["rope_at"](self._blocks(B * n_heads * (hd // 2)), (_THREADS,),
                          (x, ctx.cos, ctx.sin, ctx.start_pos, np.int32(B), np.int32(n_heads), np.int32(hd)))
        return x

    def kv_write(self, buf: Any, x: Any, pos: Any) -> None:
        """buf[b, :, pos[0]] = x[b] as (KV, hd), for the B rows of x."""
        B, KV, L, hd = x.shape[0], buf.shape[1], buf.shape[2], buf.shape[3]
        self.k["kv_write"](self._blocks(B * KV * hd), (_THREADS,),
                           (buf, x, pos, np.int32(B), np.int32(KV), np.int32(L), np.int32(hd)))

    def attend(self, q: Any, kbuf: Any, vbuf: Any, pos: Any) -> Any:
        """Causal GQA attention of one query per row (B, H hd) over the cached keys 0 .. pos[0]."""
        H = self.config.num_attention_heads
        B, KV, L, hd = q.shape[0], kbuf.shape[1], kbuf.shape[2], kbuf.shape[3]
        scores = self.cp.empty((B, H, L), dtype=q.dtype)
        out = self.cp.empty((B, H * hd), dtype=q.dtype)
        self.k["attend"]((H, B), (_ATTEND_THREADS,),
                         (q, kbuf, vbuf, pos, scores, out, np.int32(H), np.int32(KV), np.int32(L),
                          np.int32(hd), self.dtype.type(hd ** -0.5)))
        return out

    def attention(self, x: Any, w: dict, i: int, ctx: Context) -> tuple[Any, None]:
        c = self.config
        B = x.shape[0]
        h = x.reshape(B, -1)
        # the HF-named entries are C-contiguous row blocks of the stacked matrix: the kernel reads them as they are
        q = self.gemv(h, w["q_proj.weight"], w.get("q_proj.bias"))                    # (B, H hd)
        k = self.gemv(h, w["k_proj.weight"], w.get("k_proj.bias"))                    # (B, KV hd)
        v = self.gemv(h, w["v_proj.weight"], w.get("v_proj.bias"))
        q = self.rope_at(q, ctx, c.num_attention_heads)
        k = self.rope_at(k, ctx, c.num_key_value_heads)
        kbuf, vbuf = ctx.cache.layer(i)
        self.kv_write(kbuf, k, ctx.start_pos)
        self.kv_write(vbuf, v, ctx.start_pos)
        o = self.attend(q, kbuf, vbuf, ctx.start_pos)                                  # (B, H hd)
        return self.gemv(o, w["o_proj.weight"], w.get("o_proj.bias")).reshape(B, 1, -1), None

    def mlp(self, x: Any, w: dict) -> tuple[Any, None]:
        B = x.shape[0]
        h = x.reshape(B, -1)
        gate = self.gemv(h, w["gate_proj.weight"], w.get("gate_proj.bias"))
        up = self.gemv(h, w["up_proj.weight"], w.get("up_proj.bias"))
        y = self.gemv(cuda.swiglu_forward(gate, up)[2], w["down_proj.weight"], w.get("down_proj.bias"))
        return y.reshape(B, 1, -1), None


class DecodeStep:
    """One decoding step for all rows of a KV cache at one shared position, on static buffers.

    Write [pos, tok_0, ..., tok_{B-1}] into `inp` (int32), call the step: it stores each row's K/V at
    `pos` and returns the logits (B, V) of the next token. With CudaOps nothing in a call depends on Python
    values that change between tokens, which is what lets `GraphDecoder` capture it; with ops=None it runs
    the model's own layer operations at the position read back from `inp`.
    """

    def __init__(self, model: Any, cache: KVCache, ops: CudaOps | None = None) -> None:
        xp, c = model.xp, model.config
        self.model, self.cache, self.ops = model, cache, ops
        self.inp = xp.zeros(cache.batch_size + 1, dtype=xp.int32)
        self.pos, self.tok = self.inp[:1], self.inp[1:]
        cos, sin = decode_tables(c, cache.max_len, model.dtype)
        self.cos, self.sin = xp.asarray(cos), xp.asarray(sin)

    def set_input(self, tok: Any, pos: int) -> None:
        """Token ids (B,) and their position, copied to the device in one transfer."""
        host = np.empty(self.inp.shape[0], dtype=np.int32)
        host[0], host[1:] = pos, tok
        if is_cupy(self.inp):
            self.inp.set(host)
        else:
            self.inp[...] = host

    def __call__(self) -> Any:
        B = self.tok.shape[0]
        if self.ops is not None:
            ops, ctx = self.ops, Context(self.cos, self.sin, self.cache, self.pos, None)
        else:   # the model's ops, at the position as a Python int
            p = int(to_host(self.pos)[0])
            ops, ctx = self.model.ops, Context(self.cos[p:p + 1, None], self.sin[p:p + 1, None], self.cache, p, None)
        logits, _ = transformer.forward(ops, self.model.weights(), self.tok.reshape(B, 1), ctx)
        return logits.reshape(B, -1)                                                   # (B, V)


class GraphDecoder:
    """Stands in for a Llama in `npllama.generate`: prompts go through `model.forward`, single-token steps
    through `DecodeStep`, captured once as a CUDA graph and replayed per token (on CuPy).

        dec = GraphDecoder(model)                       # or model.generate(..., cuda_graph=True)
        out = npllama.generate.generate(dec, prompt_ids, max_new_tokens=128)

    graph=False runs the same static step eagerly (any backend; on NumPy this is the only choice).
    kernels=False (eager only) runs the model's own layer operations instead of the CUDA kernels. The graph reads the model's
    parameter arrays by address: in-place updates (the optimizer's) are seen; replaced arrays trigger a
    new capture. Left-padded batches (positions / attn_mask) fall back to the model's own forward.
    """

    def __init__(self, model: Any, graph: bool | None = None, kernels: bool | None = None) -> None:
        on_gpu = model.xp is not np
        self.graph = on_gpu if graph is None else bool(graph)
        self.kernels = on_gpu if kernels is None else bool(kernels)
        if (self.graph or self.kernels) and not on_gpu:
            raise InputError("CUDA graphs and decode kernels need backend='cupy'")
        if self.graph and not self.kernels:
            raise InputError("a CUDA graph cannot capture cuBLAS: graph=True needs kernels=True")
        if self.kernels and getattr(model, "lora", None) is not None:
            # the kernels read each projection's base weight only; folding the adapter in keeps them exact
            raise InputError("the CUDA decode kernels do not apply a LoRA adapter: npllama.lora.merge(model) first")
        self.model = model
        self.config = model.config
        self.cache: KVCache | None = None
        self.step: DecodeStep | None = None
        self.captures = 0                  # how many times a graph was captured (for tests and benchmarks)
        self._graph: Any = None
        self._logits: Any = None
        self._keep: list = []
        self._params: dict[str, Any] = {}

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """The decoder's own KV cache (reused, with its captured graph, when the shape is the same)."""
        max_len = max_len or self.config.max_position_embeddings
        if self.cache is None or (self.cache.batch_size, self.cache.max_len) != (batch_size, max_len):
            self._release()
            self.cache = self.model.new_cache(batch_size, max_len)
            ops = CudaOps(self.config, self.model.dtype) if self.kernels else None
            self.step = DecodeStep(self.model, self.cache, ops)
        return self.cache

    def forward(self, ids: Any, cache: KVCache | None = None, start_pos: int = 0, positions: Any = None,
                attn_mask: Any = None, last_only: bool = False) -> Any:
        """Llama.forward's contract; one token per row of the decoder's own cache takes the static step."""
        shape = np.shape(ids)
        if (cache is not None and cache is self.cache and positions is None and attn_mask is None
                and len(shape) == 2 and shape[1] == 1 and shape[0] == cache.batch_size):
            return self.decode(ids, start_pos)[:, None, :]
        return self.model.forward(ids, cache=cache, start_pos=start_pos, positions=positions,
                                  attn_mask=attn_mask, last_only=last_only)

    def decode(self, tok: Any, pos: int) -> Any:
        """Logits (B, V) of one step: tok (B,) or (B, 1) ids at position `pos` (earlier K/V already cached)."""
        if self.step is None or self.cache is None:
            raise RuntimeError("call new_cache(batch_size, max_len) first")
        tok = np.asarray(to_host(tok)).reshape(-1)
        if tok.shape[0] != self.cache.batch_size:
            raise InputError(f"{tok.shape[0]} token ids for a cache of batch {self.cache.batch_size}")
        if tok.size and (tok.min() < 0 or tok.max() >= self.config.vocab_size):
            raise InputError(f"token id out of range for vocab_size={self.config.vocab_size}")
        if not 0 <= pos < self.cache.max_len:
            raise InputError(f"position {pos} does not fit the KV cache ({self.cache.max_len})")
        self.step.set_input(tok, pos)
        if not self.graph:
            return self.step()
        if self._graph is None or any(self.model.params.get(k) is not v for k, v in self._params.items()):
            self._capture()
        self._graph.launch()
        return self._logits.copy()         # the graph overwrites its output buffer at the next replay

    def _capture(self) -> None:
        import cupy
        self._release()
        cupy.cuda.get_current_stream().synchronize()       # the prompt's K/V writes are done
        stream = cupy.cuda.Stream(non_blocking=True)       # capture needs a stream other than the default
        base = cupy.cuda.get_allocator()
        keep: list = []

        def alloc(nbytes: int) -> Any:
            # every buffer the captured kernels use stays allocated as long as the graph exists;
            # otherwise the pool would hand it to other arrays while replays keep writing into it
            mem = base(nbytes)
            keep.append(mem)
            return mem

        with stream:
            self.step()          # warm-up outside the capture: compiles and loads every kernel
            stream.synchronize()
            with cupy.cuda.using_allocator(alloc):
                stream.begin_capture()
                try:
                    logits = self.step()
                except BaseException:
                    try:
                        stream.end_capture()
                    except Exception:
                        pass
                    raise
                graph = stream.end_capture()
        self._graph, self._logits, self._keep = graph, logits, keep
        self._params = dict(self.model.params)
        self.captures += 1

    def __getattr__(self, name: str) -> Any:
        # anything else a caller may ask a model for (xp, dtype, params, ...) is the model's
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def _release(self) -> None:
        self._graph, self._logits, self._keep, self._params = None, None, [], {}
