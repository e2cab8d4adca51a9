"""The tensors a config calls for, compared with the tensors a file's headers list, before any storage exists.

A config.json or GGUF metadata that asks for a million layers or a vocabulary of 10**12 must fail
here, naming the key, and not after gigabytes have been allocated; only headers are read.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable

from npllama.config import LlamaConfig

_LAYER = re.compile(r"^model\.layers\.(\d{1,9})\.")
# which config keys size each axis of a parameter (by the name's second-to-last part)
_AXIS_KEYS = {
    "embed_tokens": ("vocab_size", "hidden_size"), "lm_head": ("vocab_size", "hidden_size"),
    "q_proj": ("num_attention_heads*head_dim", "hidden_size"),
    "k_proj": ("num_key_value_heads*head_dim", "hidden_size"),
    "v_proj": ("num_key_value_heads*head_dim", "hidden_size"),
    "o_proj": ("hidden_size", "num_attention_heads*head_dim"),
    "gate_proj": ("intermediate_size", "hidden_size"), "up_proj": ("intermediate_size", "hidden_size"),
    "down_proj": ("hidden_size", "intermediate_size"),
}


def _more(items: list[str]) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def check_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
                  where: Callable[[str], str], error: type[Exception], source: str,
                  optional: Iterable[str] = (), hint: Callable[[str, int], str] | None = None) -> None:
    """Raise `error` for the first missing, unexpected or misshapen tensor; `where(name)` names its file."""
    optional = set(optional)
    ignorable = lambda k: k.endswith("rotary_emb.inv_freq")  # old exports saved this buffer
    unexpected = sorted(k for k in found if k not in expected and k not in optional and not ignorable(k))
    if unexpected:
        raise error(f"{where(unexpected[0])}: unexpected tensor {unexpected[0]!r}{_more(unexpected)}"
                    " - not part of this model's config")
    missing = [k for k in expected if k not in found]
    if missing:
        raise error(f"{source}: missing tensor {missing[0]!r}{_more(missing)}")
    for name, shape in expected.items():
        got = tuple(found[name])
        if got != tuple(shape):
            axes = [i for i in range(max(len(got), len(shape))) if i >= len(got) or i >= len(shape)
                    or got[i] != shape[i]]
            why = f" (config: {hint(name, axes[0])})" if hint and len(got) == len(shape) else ""
            raise error(f"{where(name)}: tensor {name!r} has shape {list(got)}, expected {list(shape)}{why}")


def check_config(config: LlamaConfig, found: dict[str, tuple[int, ...]], where: Callable[[str], str],
                 error: type[Exception], source: str, config_source: str, optional: Iterable[str] = ()) -> None:
    """Check that the tensors `found` (name -> shape, from headers) are what `config` calls for, naming the key."""
    from npllama.model import param_shapes  # model.py imports io lazily: no cycle
    layers = {int(m.group(1)) for k in found if (m := _LAYER.match(k))}
    n = config.num_hidden_layers
    if n > len(layers):  # checked before param_shapes, which would list every one of a huge count
        first = min(set(range(len(layers) + 1)) - layers)
        raise error(f"{config_source}: num_hidden_layers={n}, but {source} holds {len(layers)} layer(s) "
                    f"(no tensor 'model.layers.{first}.*')")

    def hint(name: str, axis: int) -> str:
        keys = _AXIS_KEYS.get(name.split(".")[-2], ("hidden_size",))
        key = keys[axis] if axis < len(keys) else keys[-1]
        return " x ".join(f"{k}={getattr(config, k)}" for k in key.split("*")) + f" in {config_source}"

    check_tensors(param_shapes(config), found, where, error, source, optional, hint)


def shapes_of(files: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """name -> shape from a name -> SafetensorsFile map (headers only)."""
    return {k: f.shape(k) for k, f in files.items()}
