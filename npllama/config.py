"""LlamaConfig: the model's hyper-parameters, read from (and written to) a Hugging Face config.json."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any
from npllama.errors import NpllamaError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_ROPE_KEYS = {  # what each scaling type needs besides rope_theta
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


class ConfigError(NpllamaError, ValueError):
    """A config.json that cannot describe a Llama model; the message names the key."""


@dataclass
class LlamaConfig:
    """Hyper-parameters of a Llama model, named as in Hugging Face's LlamaConfig."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": ..., "factor": ..., ...}; None = default
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # keys npllama does not use

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in _REQUIRED + ("num_key_value_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config key {name!r} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported (Llama uses 'silu')")
        if self.rope_scaling is not None:
            self.rope_scaling = _normalize_rope(dict(self.rope_scaling))
            if self.rope_scaling["rope_type"] == "default":
                self.rope_scaling = None

    @property
    def rope_type(self) -> str:
        """'default', 'linear', 'dynamic' or 'llama3'."""
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @property
    def eos_token_ids(self) -> list[int]:
        """EOS ids as a list (config.json may give one id or several)."""
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> LlamaConfig:
        """Build from a config.json dict, in either dialect (rope_theta/rope_scaling or rope_parameters)."""
        d = dict(d)
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required key {missing[0]!r}")
        arch = d.get("model_type")
        if arch not in (None, "llama"):
            raise ConfigError(f"{source}: model_type {arch!r} is not 'llama'")
        rope = _read_rope(d, source)
        kw: dict[str, Any] = {}
        for f in cls.__dataclass_fields__:
            if f in d and f not in ("rope_theta", "rope_scaling", "extra"):
                kw[f] = d[f]
        kw["rope_theta"], kw["rope_scaling"] = rope
        if kw.get("head_dim") is None:
            kw.pop("head_dim", None)
        kw["extra"] = {k: v for k, v in d.items() if k not in cls.__dataclass_fields__ and k != "rope_parameters"}
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> LlamaConfig:
        """Read a Hugging Face config.json file."""
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict that transformers' LlamaConfig reads (both rope dialects written)."""
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        d.update({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
        params = {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        params["rope_type"] = self.rope_type
        d["rope_parameters"] = params
        return d

    def save(self, path: str | os.PathLike) -> None:
        """Write config.json."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)


def _read_rope(d: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either config dialect; a theta is never silently defaulted."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = params["rope_theta"]
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    elif "rope_theta" in d:
        theta = d["rope_theta"]
        scaling = d.get("rope_scaling")
    elif isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters has no 'rope_theta'")
    else:
        # Hugging Face's LlamaConfig has always defaulted to 10000.0 when neither key exists.
        theta, scaling = 10000.0, d.get("rope_scaling")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ConfigError(f"{source}: rope_theta must be a positive number, got {theta!r}")
    if scaling is not None:
        try:
            scaling = _normalize_rope(dict(scaling))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        if scaling["rope_type"] == "default":
            scaling = None
    return float(theta), scaling


def _normalize_rope(s: dict[str, Any]) -> dict[str, Any]:
    rope_type = s.pop("rope_type", None) or s.pop("type", None) or "default"
    s.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"unknown rope type {rope_type!r} in rope_scaling (supported: {', '.join(ROPE_TYPES)})")
    for k in _ROPE_KEYS[rope_type]:
        if k not in s:
            raise ConfigError(f"rope_scaling of type {rope_type!r} is missing key {k!r}")
    return {"rope_type": rope_type, **s}
