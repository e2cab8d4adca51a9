"""Export a PyTorch Llama checkpoint to what npllama loads: a folder with config.json + model.safetensors (HF layout).

Three sources, detected from what SRC is:
  - an HF model folder (config.json + *.safetensors or pytorch_model*.bin): re-saved, tied lm_head dropped;
  - a LlamaForCausalLM state dict file (.pt / .bin / .pth / .safetensors) plus --config config.json;
  - a Meta checkpoint folder (consolidated.*.pth + params.json): renamed to HF names, shards merged, and
    wq / wk rows un-interleaved. Meta applies rotary embeddings to interleaved pairs (x0, x1), (x2, x3), ...
    while HF's rotate-half pairs x_i with x_{i + hd/2}; the same permutation transformers'
    convert_llama_weights_to_hf applies makes the two compute the same thing.

Usage:  python weights/export.py SRC OUT [--config config.json] [--dtype float32|float16|bfloat16|float64]
Checkpoints are read with torch.load(weights_only=True): no pickled code runs. Needs torch >= 2.6 (this tool only;
older versions' weights_only loader could be made to run code). Tensors with NaN or inf are refused unless
--allow-nonfinite is given (then each one is named in a warning).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from npllama.config import LlamaConfig  # noqa: E402
from npllama.errors import NpllamaError  # noqa: E402
from npllama.io.convert import STORE_DTYPES, save_hf  # noqa: E402
from npllama.io.gguf import unpermute_rotary  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.gguf", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


class ExportError(NpllamaError, ValueError):
    """A checkpoint that cannot be exported; the message names the file or tensor."""


MIN_TORCH = (2, 6)   # torch.load(weights_only=True) is safe against crafted pickles from 2.6 on (CVE-2025-32434)


def _torch() -> Any:
    """The torch module, or an ExportError saying what to install."""
    try:
        import torch
    except ImportError:
        raise ExportError("weights/export.py needs PyTorch to read checkpoints: pip install 'torch>=2.6'") from None
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2] if x.isdigit())
    if version < MIN_TORCH:
        raise ExportError(f"torch {torch.__version__} is too old: weights_only=True loading is safe only from "
                          f"torch 2.6 on (pip install 'torch>=2.6')")
    return torch


def _numpy(t: Any, dtype: str) -> np.ndarray:
    torch = _torch()
    return t.detach().to(torch.float64 if dtype == "float64" else torch.float32).cpu().numpy()


def _load_torch(path: str) -> dict[str, Any]:
    torch = _torch()
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"{path}: cannot read as a weights-only torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ExportError(f"{path}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    return sd


# ---------------------------------------------------------------- (a) HF layout
def check_finite(params: dict[str, np.ndarray], allow: bool = False) -> None:
    """Refuse (or, with allow, warn about) tensors holding NaN or inf, naming the first bad tensor."""
    bad = [name for name, a in params.items() if not np.isfinite(a).all()]
    if bad and not allow:
        raise ExportError(f"tensor {bad[0]!r} holds NaN or inf values ({len(bad)} tensor(s) in all); pass "
                          f"--allow-nonfinite to export anyway")
    for name in bad:
        print(f"export: warning: tensor {name!r} holds NaN or inf values", file=sys.stderr)


def export_state_dict(state_dict: dict[str, Any], config: Any, out: str, dtype: str = "float32",
                      allow_nonfinite: bool = False) -> None:
    """A LlamaForCausalLM state dict + its config (HF LlamaConfig, dict or npllama LlamaConfig) -> `out`."""
    if not isinstance(config, LlamaConfig):
        config = LlamaConfig.from_dict(config if isinstance(config, dict) else config.to_dict())
    from npllama.model import param_shapes
    expected = param_shapes(config)
    params = {}
    for name, shape in expected.items():
        if name not in state_dict:
            raise ExportError(f"state dict has no tensor {name!r}")
        a = _numpy(state_dict[name], dtype)
        if tuple(a.shape) != shape:
            raise ExportError(f"tensor {name!r} has shape {list(a.shape)}, the config expects {list(shape)}")
        params[name] = a
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    extra = [k for k in state_dict if k not in expected and k not in ignorable and not k.endswith("inv_freq")]
    if extra:
        raise ExportError(f"state dict has tensor {extra[0]!r}, which is not part of this Llama config")
    check_finite(params, allow_nonfinite)
    save_hf(config, params, out, dtype)


def export_hf_dir(src: str, out: str, dtype: str = "float32", allow_nonfinite: bool = False) -> None:
    """An HF model folder (safetensors or pytorch_model*.bin, sharded or not) -> `out`, tokenizer files copied."""
    config = LlamaConfig.from_json(os.path.join(src, "config.json"))
    files = sorted(glob.glob(os.path.join(src, "*.safetensors"))) or \
        sorted(glob.glob(os.path.join(src, "pytorch_model*.bin")))
    if not files:
        raise ExportError(f"{src}: no *.safetensors or pytorch_model*.bin files")
    sd: dict[str, Any] = {}
    for f in files:
        sd.update(_load_torch(f))
    export_state_dict(sd, config, out, dtype, allow_nonfinite)
    if os.path.abspath(src) != os.path.abspath(out):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(out, name))


# ---------------------------------------------------------------- (b) Meta layout
_META = {  # Meta name (after layers.N.) -> (HF name after model.layers.N., axis the shards split, rotary heads)
    "attention.wq.weight": ("self_attn.q_proj.weight", 0, "q"),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0, "k"),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0, None),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1, None),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0, None),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1, None),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0, None),
    "attention_norm.weight": ("input_layernorm.weight", None, None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None, None),
}


def meta_config(params: dict[str, Any], vocab_size: int, intermediate_size: int,
                max_position_embeddings: int = 4096) -> LlamaConfig:
    """The HF config of a Meta checkpoint from its params.json (vocab/FFN sizes come from the tensors)."""
    dim, n_heads = params["dim"], params["n_heads"]
    scaling = None
    if params.get("use_scaled_rope"):  # Llama 3.1's defaults (Meta's params.json has only the flag)
        scaling = {"rope_type": "llama3", "factor": params.get("rope_scaling_factor", 8.0), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return LlamaConfig(hidden_size=dim, intermediate_size=intermediate_size, num_hidden_layers=params["n_layers"],
                       num_attention_heads=n_heads, num_key_value_heads=params.get("n_kv_heads") or n_heads,
                       vocab_size=vocab_size, rms_norm_eps=params.get("norm_eps", 1e-5),
                       rope_theta=float(params.get("rope_theta", 10000.0)), rope_scaling=scaling,
                       max_position_embeddings=max_position_embeddings, tie_word_embeddings=False)


def convert_meta(shards: list[dict[str, Any]], params: dict[str, Any], dtype: str = "float32",
                 max_position_embeddings: int = 4096) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Meta state dict shards (model-parallel parts, in order) + params.json -> (config, HF-named params)."""
    dim = params["dim"]
    n_heads = params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads

    def merged(name: str, axis: int | None) -> np.ndarray:
        parts = []
        for i, s in enumerate(shards):
            if name not in s:
                raise ExportError(f"shard {i} has no tensor {name!r}")
            parts.append(_numpy(s[name], dtype))
        return parts[0] if axis is None or len(parts) == 1 else np.concatenate(parts, axis=axis)

    emb_parts = [_numpy(s["tok_embeddings.weight"], dtype) for s in shards] if all(
        "tok_embeddings.weight" in s for s in shards) else None
    if emb_parts is None:
        raise ExportError("checkpoint has no tensor 'tok_embeddings.weight'")
    # Llama 1/2 split the embedding across its columns, Llama 3 across its rows
    emb = np.concatenate(emb_parts, axis=1 if emb_parts[0].shape[1] != dim else 0) if len(shards) > 1 else emb_parts[0]
    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": emb}
    for i in range(params["n_layers"]):
        for meta, (hf, axis, rot) in _META.items():
            w = merged(f"layers.{i}.{meta}", axis)
            if rot == "q":
                w = unpermute_rotary(w, n_heads)
            elif rot == "k":
                w = unpermute_rotary(w, n_kv)
            out[f"model.layers.{i}.{hf}"] = w
    out["model.norm.weight"] = merged("norm.weight", None)
    out["lm_head.weight"] = merged("output.weight", 0)
    config = meta_config(params, emb.shape[0], out["model.layers.0.mlp.gate_proj.weight"].shape[0],
                         max_position_embeddings)
    from npllama.model import param_shapes
    for name, shape in param_shapes(config).items():
        if out[name].shape != shape:
            raise ExportError(f"tensor {name!r} has shape {list(out[name].shape)} after merging, "
                              f"params.json implies {list(shape)}")
    return config, out


def check_params(params: Any, path: str) -> None:
    """Validate a Meta params.json before use: the sizes are positive ints, the floats finite and positive."""
    if not isinstance(params, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(params).__name__}")
    for key, required in (("dim", True), ("n_heads", True), ("n_layers", True), ("n_kv_heads", False)):
        v = params.get(key)
        if v is None and not required:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ExportError(f"{path}: {key!r} must be a positive integer, got {v!r}")
    for key in ("norm_eps", "rope_theta", "rope_scaling_factor"):
        v = params.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0):
            raise ExportError(f"{path}: {key!r} must be a finite number > 0, got {v!r}")
    if params["dim"] % params["n_heads"] or params["n_heads"] % (params.get("n_kv_heads") or params["n_heads"]):
        raise ExportError(f"{path}: n_heads must divide dim and n_kv_heads must divide n_heads "
                          f"(dim {params['dim']}, n_heads {params['n_heads']}, n_kv_heads {params.get('n_kv_heads')})")


def export_meta_dir(src: str, out: str, dtype: str = "float32", max_position_embeddings: int = 4096,
                    allow_nonfinite: bool = False) -> None:
    """A Meta folder (consolidated.*.pth + params.json) -> `out` in HF layout."""
    shard_files = sorted(glob.glob(os.path.join(src, "consolidated.*.pth")))
    if not shard_files:
        raise ExportError(f"{src}: no consolidated.*.pth files")
    try:
        with open(os.path.join(src, "params.json"), encoding="utf-8") as f:
            params = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{src}/params.json: cannot read ({e})") from None
    check_params(params, os.path.join(src, "params.json"))
    shards = [_load_torch(f) for f in shard_files]
    config, hf = convert_meta(shards, params, dtype, max_position_embeddings)
    check_finite(hf, allow_nonfinite)
    save_hf(config, hf, out, dtype)
    for name in ("tokenizer.model",):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(out, name))


def export(src: str, out: str, config: str | None = None, dtype: str = "float32",
           max_position_embeddings: int = 4096, allow_nonfinite: bool = False) -> str:
    """Detect what `src` is and export it; returns which kind it was."""
    if os.path.isdir(src):
        if os.path.exists(os.path.join(src, "params.json")):
            export_meta_dir(src, out, dtype, max_position_embeddings, allow_nonfinite)
            return "meta"
        if os.path.exists(os.path.join(src, "config.json")):
            export_hf_dir(src, out, dtype, allow_nonfinite)
            return "hf"
        raise ExportError(f"{src}: neither an HF folder (config.json) nor a Meta folder (params.json)")
    if os.path.isfile(src):
        if config is None:
            raise ExportError(f"{src}: a state dict file needs --config config.json")
        try:
            with open(config, encoding="utf-8") as f:
                cfg = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ExportError(f"{config}: not a JSON config ({e})") from None
        if not isinstance(cfg, dict):
            raise ExportError(f"{config}: expected a JSON object, got {type(cfg).__name__}")
        export_state_dict(_load_torch(src), cfg, out, dtype, allow_nonfinite)
        return "state dict"
    raise ExportError(f"{src}: no such file or directory")


def main(argv: list[str] | None = None) -> int:
    """Command line of the export tool."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="HF folder, Meta folder (consolidated.*.pth + params.json) or a state dict file")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--config", help="config.json for a state dict file")
    ap.add_argument("--dtype", choices=sorted(STORE_DTYPES), default="float32")
    ap.add_argument("--max-position-embeddings", type=int, default=4096, help="context length for a Meta checkpoint "
                    "(params.json does not say; default 4096)")
    ap.add_argument("--allow-nonfinite", action="store_true", help="export tensors holding NaN/inf (with a warning)")
    args = ap.parse_args(argv)
    if args.max_position_embeddings <= 0:
        ap.error(f"--max-position-embeddings must be > 0, got {args.max_position_embeddings}")
    try:
        kind = export(args.src, args.out, args.config, args.dtype, args.max_position_embeddings, args.allow_nonfinite)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the CLI's policy: NpllamaError or an OSError naming a file is a user mistake
        if isinstance(e, NpllamaError) or (isinstance(e, OSError) and e.filename is not None):
            print(f"export: error: {e}", file=sys.stderr)
            return 2
        print(f"export: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"exported {kind} checkpoint {args.src} -> {args.out} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
