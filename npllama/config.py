"""LlamaConfig: the model's hyper-parameters, read from (and written to) a Hugging Face config.json."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any
from npllama.errors import NpllamaError
from npllama.io import jsonfile
from npllama.io.atomic import atomic_path
from npllama.io.paths import inside

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
        # every check runs before anything is derived from the values (head_dim) or sized by them
        for name in _REQUIRED:
            _positive_int(name, getattr(self, name))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _positive_int("num_key_value_heads", self.num_key_value_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                                  f"{self.num_attention_heads} (give head_dim explicitly if that is intended)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _positive_int("head_dim", self.head_dim)
        _positive_int("max_position_embeddings", self.max_position_embeddings)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        self.rms_norm_eps = _positive_number("rms_norm_eps", self.rms_norm_eps)
        self.rope_theta = _positive_number("rope_theta", self.rope_theta)
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config key {name!r} must be true or false, got {getattr(self, name)!r:.80}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r:.80} is not supported (Llama uses 'silu')")
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not _is_int(v):
                raise ConfigError(f"config key {name!r} must be a token id (an integer) or null, got {v!r:.80}")
        e = self.eos_token_id
        if e is not None and not _is_int(e) and not (isinstance(e, list) and all(_is_int(i) for i in e)):
            raise ConfigError(f"config key 'eos_token_id' must be a token id, a list of them, or null, got {e!r:.80}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ConfigError(f"config key 'rope_scaling' must be an object or null, got {self.rope_scaling!r:.80}")
            self.rope_scaling = _normalize_rope(dict(self.rope_scaling))
            if self.rope_scaling["rope_type"] == "default":
                self.rope_scaling = None
            elif self.rope_scaling["rope_type"] == "dynamic" and self.head_dim <= 2:
                raise ConfigError(f"head_dim={self.head_dim}: dynamic rope scaling needs head_dim > 2")

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
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required key {missing[0]!r}")
        arch = d.get("model_type")
        if arch not in (None, "llama"):
            raise ConfigError(f"{source}: model_type {arch!r:.80} is not 'llama'")
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
        """Read a Hugging Face config.json (a bounded regular file, not a symlink out of its folder)."""
        path = os.fspath(path)
        # a config.json inside a model folder must not be a symlink out of it
        inside(os.path.dirname(path) or ".", os.path.basename(path), path)
        try:
            d = jsonfile.read(path)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
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
        """Write config.json (whole or not at all)."""
        with atomic_path(os.fspath(path), suffix=".json") as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(name: str, v: Any) -> int:
    """`v` if it is an int > 0 (not a bool, not a float such as 64.0, which transformers would refuse too)."""
    if not _is_int(v) or v <= 0:
        kind = f" (a {type(v).__name__})" if not _is_int(v) and v is not None else ""
        raise ConfigError(f"config key {name!r} must be a positive integer, got {v!r:.80}{kind}")
    return v


def _positive_number(name: str, v: Any) -> float:
    """float(v) if `v` is a finite number > 0 (JSON's NaN and Infinity included in what is refused)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"config key {name!r} must be a finite positive number, got {v!r:.80}")
    return float(v)


def _read_rope(d: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either config dialect; a theta is never silently defaulted."""
    params = d.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{source}: config key 'rope_parameters' must be an object, got {params!r:.80}")
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
    try:
        theta = _positive_number("rope_theta", theta)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise ConfigError(f"{source}: config key 'rope_scaling' must be an object or null, got {scaling!r:.80}")
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
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise ConfigError(f"unknown rope type {rope_type!r:.80} in rope_scaling (supported: {', '.join(ROPE_TYPES)})")
    for k in _ROPE_KEYS[rope_type]:
        if k not in s:
            raise ConfigError(f"rope_scaling of type {rope_type!r} is missing key {k!r}")
        if k == "original_max_position_embeddings":
            _positive_int(f"rope_scaling.{k}", s[k])
        else:
            s[k] = _positive_number(f"rope_scaling.{k}", s[k])
    if rope_type == "llama3" and s["high_freq_factor"] <= s["low_freq_factor"]:
        # the smoothing band divides by their difference
        raise ConfigError(f"rope_scaling.high_freq_factor={s['high_freq_factor']} must exceed "
                          f"low_freq_factor={s['low_freq_factor']}")
    return {"rope_type": rope_type, **s}
