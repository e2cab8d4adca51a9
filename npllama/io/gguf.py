"""Read a llama.cpp GGUF file into an npllama model: config from `llama.*` metadata, tensors
dequantized to float32 and renamed to Hugging Face names.

Two things differ from the HF layout and are undone here:
- llama.cpp's converter permutes the rows of q_proj / k_proj from HF's rotate-half layout
  (first half / second half of each head) to interleaved pairs (0,1), (2,3), ...; we invert it.
- A model with tied embeddings simply has no `output.weight`.
The `gguf` package (pip install 'npllama[gguf]') is imported only when a GGUF is read.
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from npllama.config import ConfigError, LlamaConfig
from npllama.errors import NpllamaError
from npllama.io.expected import check_config


class GGUFError(NpllamaError, ValueError):
    """A GGUF file npllama cannot read; the message names the file and the key or tensor."""


# GGUF tensor name (after blk.N.) -> HF name (after model.layers.N.)
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise GGUFError("reading .gguf files needs the gguf package: pip install 'npllama[gguf]'") from None
    return gguf


def open_reader(path: str) -> Any:
    """A gguf.GGUFReader for `path`, with file errors turned into one clear GGUFError."""
    gguf = _import_gguf()
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: file not found")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError / struct errors / IndexError on junk
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def metadata(reader: Any, max_array: int = 1024) -> dict[str, Any]:
    """Metadata fields as Python values; arrays longer than `max_array` (the vocabulary) are skipped."""
    out = {}
    for key, field in reader.fields.items():
        if len(field.data) > max_array:
            continue
        try:
            out[key] = field.contents()
        except Exception:  # an exotic field type the reader cannot decode: not one we need
            continue
    return out


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, interleaved pairs -> rotate-half halves."""
    # llama.cpp wrote w.reshape(n_heads, 2, hd // 2, ...).swapaxes(1, 2): row 2i is half 0's row i,
    # row 2i+1 is half 1's row i. Reading it back as (n_heads, hd // 2, 2) and swapping returns the halves.
    shape = w.shape
    hd = shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def config_from_metadata(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], source: str) -> LlamaConfig:
    """A LlamaConfig from `llama.*` metadata and tensor shapes (numpy order); tied when there is no output.weight."""
    tensor_names = set(shapes)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{source}: general.architecture is {arch!r}, npllama reads only 'llama' models")

    def get(key: str, default: Any = KeyError, kind: type = int) -> Any:
        """llama.`key`, of the type `kind` (int: not a bool; float: any finite real); `default` when absent."""
        if "llama." + key not in meta:
            if default is KeyError:
                raise GGUFError(f"{source}: missing metadata key 'llama.{key}'")
            return default
        v = meta["llama." + key]
        ok = (isinstance(v, int) and not isinstance(v, bool)) if kind is int else \
            (isinstance(v, (int, float)) and not isinstance(v, bool)) if kind is float else isinstance(v, kind)
        if not ok:
            raise GGUFError(f"{source}: metadata key 'llama.{key}' must be {kind.__name__}, got {v!r:.80}")
        return float(v) if kind is float else v

    def token_id(key: str) -> int | None:
        v = meta.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise GGUFError(f"{source}: metadata key {key!r} must be a token id, got {v!r:.80}")
        return v

    n_heads = get("attention.head_count")
    hidden = get("embedding_length")
    vocab = get("vocab_size", None)
    if vocab is None:  # older files: the vocabulary's length is the embedding's row count
        if "token_embd.weight" not in shapes:
            raise GGUFError(f"{source}: missing tensor 'token_embd.weight'")
        vocab = shapes["token_embd.weight"][0]
    # head_dim: key_length, else the rope dimension, else LlamaConfig derives it (after checking the heads)
    head_dim = get("attention.key_length", get("rope.dimension_count", None))
    if "rope_freqs.weight" in tensor_names:
        # Llama 3.1-style scaling is stored as a per-frequency factor tensor, not as its parameters
        raise GGUFError(f"{source}: tensor 'rope_freqs.weight' (Llama 3 rope scaling) is not supported")
    scaling = None
    kind = get("rope.scaling.type", None, str)
    if kind not in (None, "none"):
        if kind != "linear":
            raise GGUFError(f"{source}: rope scaling type {kind!r:.80} is not supported (npllama reads 'linear')")
        scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor", KeyError, float)}
    eos_ids = [i for i in (token_id("tokenizer.ggml.eos_token_id"), token_id("tokenizer.ggml.eot_token_id"))
               if i is not None]
    eos_ids = sorted(set(eos_ids), key=eos_ids.index)
    d = dict(
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=n_heads,
        num_key_value_heads=get("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        vocab_size=vocab,
        # llama.cpp stores eps as float32; HF's GGUF loader reads that same float32 value
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5, float),
        rope_theta=get("rope.freq_base", 10000.0, float),
        rope_scaling=scaling,
        max_position_embeddings=get("context_length", 2048),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        mlp_bias="blk.0.ffn_up.bias" in tensor_names,
        bos_token_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id=(eos_ids[0] if len(eos_ids) == 1 else eos_ids) if eos_ids else None,
        pad_token_id=token_id("tokenizer.ggml.padding_token_id"),
    )
    try:
        return LlamaConfig(**d)
    except ConfigError as e:
        raise GGUFError(f"{source}: {e}") from None


def hf_name(name: str) -> str | None:
    """The Hugging Face parameter name for a GGUF tensor name (None for tensors with no HF twin)."""
    m = _BLOCK.match(name)
    if m:
        i, part, kind = m.groups()
        return f"model.layers.{i}.{_LAYER_NAMES[part]}.{kind}" if part in _LAYER_NAMES else None
    base, _, kind = name.rpartition(".")
    return f"{_TOP_NAMES[base]}.{kind}" if base in _TOP_NAMES else None


def load_gguf(path: str) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """(config, params): every tensor dequantized to float32, HF names, HF q/k row layout."""
    path = os.fspath(path)
    gguf = _import_gguf()
    reader = open_reader(path)
    # ggml lists dimensions fastest-first; numpy's order is the reverse
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    config = config_from_metadata(metadata(reader), shapes, path)
    names: dict[str, str] = {}  # HF name -> GGUF name
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            raise GGUFError(f"{path}: tensor {t.name!r} has no counterpart in a Llama model")
        if name in names:
            raise GGUFError(f"{path}: tensors {names[name]!r} and {t.name!r} both hold {name!r}")
        names[name] = t.name
    # every tensor's name and shape against the config, before anything is dequantized
    where = lambda k: f"{path} (GGUF tensor {names.get(k, k)!r})"
    check_config(config, {k: shapes[g] for k, g in names.items()}, where, GGUFError, path, path)
    params: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:  # an unsupported quantization type, or a truncated tensor
            raise GGUFError(f"{path}: cannot dequantize tensor {t.name!r} "
                            f"({getattr(t.tensor_type, 'name', t.tensor_type)}: {e})") from None
        if w.shape != shapes[t.name]:
            raise GGUFError(f"{path}: tensor {t.name!r} dequantized to shape {list(w.shape)}, "
                            f"its header says {list(shapes[t.name])}")
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rotary(w, config.num_attention_heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rotary(w, config.num_key_value_heads)
        params[name] = w
    return config, params


def write_tokenizer_gguf(src: str, out: str) -> None:
    """Copy the `tokenizer.*` metadata of GGUF `src` into a small tensor-free GGUF `out` (a tokenizer file)."""
    from npllama.io.atomic import atomic_path
    gguf = _import_gguf()
    reader = open_reader(src)
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in fields:
        raise GGUFError(f"{src}: no tokenizer metadata (tokenizer.ggml.tokens) to copy")
    with atomic_path(out, suffix=".gguf") as tmp:           # never a half-written tokenizer
        w = gguf.GGUFWriter(tmp, metadata(reader).get("general.architecture", "llama"))
        for key, f in fields.items():
            vtype = f.types[0]
            sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
            w.add_key_value(key, f.contents(), vtype, sub)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
