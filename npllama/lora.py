"""LoRA adapters on a Llama, in Hugging Face PEFT's format: add, save, load, merge.

The math is `npllama.layers.lora`. An adapter's matrices live in `model.params` under PEFT's saved names
less the 'base_model.model.' prefix ('model.layers.0.self_attn.q_proj.lora_A.weight' (r, in), '...lora_B.weight'
(out, r)), and `model.trainable` then names only them: the base weights get no gradient at all.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from npllama.errors import NpllamaError

# the projections an adapter may target, and the part of the block each belongs to
TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."          # PEFT's saved names start with it


class LoraError(NpllamaError, ValueError):
    """An adapter that does not fit the model, a bad LoRA option, or one npllama does not support."""


@dataclass(frozen=True)
class LoraConfig:
    """One adapter's settings (PEFT's names in adapter_config.json in brackets)."""
    r: int                       # rank (r)
    alpha: float                 # (lora_alpha)
    modules: tuple[str, ...]     # the adapted projections, full names: 'model.layers.0.self_attn.q_proj'
    target_modules: Any          # as given: a list of names or one regex (target_modules)
    dropout: float = 0.0         # (lora_dropout)
    rslora: bool = False         # scale alpha / sqrt(r) instead of alpha / r (use_rslora)
    seed: int = 0                # the init's and the dropout masks' seed

    @property
    def scale(self) -> float:
        """s in y = x W^T + s (x A^T) B^T."""
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


def _modules(model: Any) -> list[str]:
    return [f"model.layers.{i}.{part}.{name}" for i in range(model.config.num_hidden_layers)
            for name, part in TARGETS.items()]


def _resolve(model: Any, targets: Any) -> tuple[str, ...]:
    """PEFT's matching: a list entry names a module or a suffix after a dot; a string is one regex that must
    match a module's whole name."""
    every = _modules(model)
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise LoraError(f"target_modules: {targets!r} is not a valid regular expression ({e})") from None
        found = [m for m in every if pattern.fullmatch(m)]
        if not found:
            raise LoraError(f"target_modules: regex {targets!r} matches none of the projections "
                            f"({', '.join(TARGETS)} of each layer)")
        return tuple(found)
    if not isinstance(targets, (list, tuple, set, frozenset)) or not targets \
            or not all(isinstance(t, str) for t in targets):
        raise LoraError(f"target_modules must be a non-empty list of names or a regex string, got {targets!r}")
    found = []
    for t in targets:
        hits = [m for m in every if m == t or m.endswith("." + t)]
        if not hits:
            raise LoraError(f"target_modules: {t!r} is not a projection LoRA can adapt here "
                            f"(one of {', '.join(TARGETS)})")
        found += hits
    return tuple(m for m in every if m in set(found))          # model order, once each


def _shape(model: Any, module: str) -> tuple[int, int]:
    out, inp = model.params[module + ".weight"].shape
    return int(out), int(inp)


def _check_settings(r: Any, alpha: Any, dropout: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r <= 0:
        raise LoraError(f"r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise LoraError(f"lora_alpha must be a positive finite number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise LoraError(f"lora_dropout must be a number in [0, 1), got {dropout!r}")


def _install(model: Any, cfg: LoraConfig, tensors: dict[str, np.ndarray]) -> None:
    """Put the checked matrices into model.params (each after its base weight) and make them the trainable set."""
    xp = model.xp
    params: dict[str, Any] = {}
    for k, v in model.params.items():
        params[k] = v
        if k.endswith(".weight") and k[:-len(".weight")] in cfg.modules:
            m = k[:-len(".weight")]
            for ab in ("lora_A", "lora_B"):
                params[f"{m}.{ab}.weight"] = xp.asarray(tensors[f"{m}.{ab}.weight"], dtype=model.dtype)
    model.params = params
    model.lora = cfg
    model.trainable = {f"{m}.{ab}.weight" for m in cfg.modules for ab in ("lora_A", "lora_B")}
    model._lora_draws = 0
    model._index_layers()


def add(model: Any, r: int = 8, alpha: float = 16, targets: Any = ("q_proj", "v_proj"), dropout: float = 0.0,
        rslora: bool = False, seed: int = 0) -> LoraConfig:
    """Add a fresh adapter, initialised as PEFT does (A Kaiming-uniform, B zeros: the logits do not change)."""
    if model.lora is not None:
        raise LoraError("the model already carries a LoRA adapter (npllama.lora.merge(model) folds it in)")
    _check_settings(r, alpha, dropout)
    modules = _resolve(model, list(targets) if isinstance(targets, (tuple, set, frozenset)) else targets)
    rng = np.random.default_rng(seed)
    tensors = {}
    for m in modules:
        out, inp = _shape(model, m)
        # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix: bound = sqrt(6 / ((1 + 5) in)) = 1 / sqrt(in)
        bound = 1.0 / math.sqrt(inp)
        tensors[m + ".lora_A.weight"] = rng.uniform(-bound, bound, (int(r), inp))   # drawn in float64
        tensors[m + ".lora_B.weight"] = np.zeros((out, int(r)))
    cfg = LoraConfig(int(r), float(alpha), modules, list(targets) if not isinstance(targets, str) else targets,
                     float(dropout), bool(rslora), int(seed))
    _install(model, cfg, tensors)
    return cfg


def _peft_config(cfg: LoraConfig) -> dict[str, Any]:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "inference_mode": True,
            "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": cfg.target_modules,
            "use_rslora": cfg.rslora, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
            "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}}


def save(model: Any, path: str) -> None:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's format (PeftModel.from_pretrained reads it)."""
    import json

    from npllama.io.atomic import atomic_dir
    from npllama.io.safetensors import save_file
    if model.lora is None:
        raise LoraError("the model carries no LoRA adapter to save (npllama.lora.add or npllama.lora.load first)")
    names = [f"{m}.{ab}.weight" for m in model.lora.modules for ab in ("lora_A", "lora_B")]
    with atomic_dir(os.fspath(path), existing="merge") as tmp:
        save_file({PREFIX + k: model.params[k] for k in names}, os.path.join(tmp, WEIGHTS_NAME),
                  metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(_peft_config(model.lora), f, indent=2)


# adapter_config.json keys whose only value npllama can honour, or that do not change the math of a loaded
# adapter; any other key must hold a neutral value (None, False, empty), else the load is refused naming it
# (init-only settings, metadata, and settings read only together with an option refused here)
_NEUTRAL_OK = {"peft_type", "task_type", "base_model_name_or_path", "inference_mode", "r", "lora_alpha",
               "lora_dropout", "target_modules", "use_rslora", "bias", "init_lora_weights", "loftq_config",
               "revision", "auto_mapping", "peft_version", "fan_in_fan_out", "layers_pattern", "megatron_core",
               "qalora_group_size"}


def _read_config(path: str) -> dict[str, Any]:
    from npllama.io import jsonfile
    from npllama.io.paths import inside
    f = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path):
        raise LoraError(f"{path}: not an adapter folder")
    if not os.path.lexists(f):
        raise LoraError(f"{path}: no {CONFIG_NAME} (not a PEFT adapter folder)")
    try:
        data = jsonfile.read(inside(path, CONFIG_NAME, path))
    except (OSError, ValueError) as e:
        raise LoraError(f"{f}: {e}") from None
    if not isinstance(data, dict):
        raise LoraError(f"{f}: must hold a JSON object")
    if data.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{f}: peft_type {data.get('peft_type')!r} is not supported (only LORA)")
    if data.get("bias", "none") != "none":
        raise LoraError(f"{f}: bias {data['bias']!r} is not supported (only \"none\")")
    if data.get("fan_in_fan_out", False) is not False:
        raise LoraError(f"{f}: fan_in_fan_out is not supported (Llama's projections are nn.Linear)")
    for k, v in data.items():
        if k not in _NEUTRAL_OK and v not in (None, False, {}, [], ""):
            raise LoraError(f"{f}: option {k!r} = {v!r} is not supported by npllama")
    for k in ("r", "lora_alpha", "target_modules"):
        if k not in data:
            raise LoraError(f"{f}: missing {k!r}")
    if not isinstance(data.get("use_rslora", False), bool):
        raise LoraError(f"{f}: use_rslora must be true or false, got {data['use_rslora']!r}")
    return data


def load(model: Any, path: str) -> LoraConfig:
    """Read a PEFT adapter folder into the model (checked whole first: a failed load changes nothing)."""
    from npllama.io.paths import inside
    from npllama.io.safetensors import SafetensorsFile, WeightsError
    path = os.fspath(path)
    if model.lora is not None:
        raise LoraError("the model already carries a LoRA adapter (npllama.lora.merge(model) folds it in)")
    data = _read_config(path)
    where = os.path.join(path, CONFIG_NAME)
    r, alpha, dropout = data["r"], data["lora_alpha"], data.get("lora_dropout", 0.0)
    try:
        _check_settings(r, alpha, dropout)
        modules = _resolve(model, data["target_modules"])
    except LoraError as e:
        raise LoraError(f"{where}: {e}") from None
    wfile = os.path.join(path, WEIGHTS_NAME)
    if not os.path.lexists(wfile):
        other = " (adapter_model.bin is a pickle: npllama does not read pickles; save with safe_serialization)" \
            if os.path.lexists(os.path.join(path, "adapter_model.bin")) else ""
        raise LoraError(f"{path}: no {WEIGHTS_NAME}{other}")
    try:
        f = SafetensorsFile(inside(path, WEIGHTS_NAME, path))
    except WeightsError as e:
        raise LoraError(str(e)) from None
    want = {}
    for m in modules:
        out, inp = _shape(model, m)
        want[f"{m}.lora_A.weight"], want[f"{m}.lora_B.weight"] = (int(r), inp), (out, int(r))
    have = set(f.keys())
    for k, shape in want.items():
        if PREFIX + k not in have:
            raise LoraError(f"{wfile}: missing tensor {PREFIX + k!r} (target_modules names {k.rsplit('.', 2)[0]})")
        got = tuple(f.header[PREFIX + k]["shape"])
        if got != shape:
            raise LoraError(f"{wfile}: tensor {PREFIX + k!r} has shape {list(got)}, this model needs {list(shape)} "
                            f"(an adapter made for another model, or another r?)")
    extra = sorted(have - {PREFIX + k for k in want})
    if extra:
        raise LoraError(f"{wfile}: unexpected tensor {extra[0]!r} (not a LoRA matrix of the targeted projections)")
    tensors = {k: np.asarray(f.get(PREFIX + k, np.dtype(np.float64))) for k in want}
    bad = [k for k, v in tensors.items() if not np.isfinite(v).all()]
    if bad:
        raise LoraError(f"{wfile}: tensor {PREFIX + bad[0]!r} holds NaN or inf")
    cfg = LoraConfig(int(r), float(alpha), modules, data["target_modules"], float(dropout),
                     bool(data.get("use_rslora", False)))
    _install(model, cfg, tensors)
    return cfg


def merge(model: Any) -> None:
    """Fold s · B A into each adapted base weight and drop the adapter: the model is a plain Llama again."""
    cfg = model.lora
    if cfg is None:
        raise LoraError("the model carries no LoRA adapter to merge")
    p = model.params
    for m in cfg.modules:
        W = p[m + ".weight"]
        W += (cfg.scale * (p[m + ".lora_B.weight"] @ p[m + ".lora_A.weight"])).astype(W.dtype)  # in place: views stay
    model.params = {k: v for k, v in p.items() if ".lora_A." not in k and ".lora_B." not in k}
    model.lora = None
    model.trainable = set(model.params)
    model._index_layers()


def unload(model: Any) -> None:
    """Drop the adapter without merging it: the base model as it was."""
    if model.lora is None:
        raise LoraError("the model carries no LoRA adapter")
    model.params = {k: v for k, v in model.params.items() if ".lora_A." not in k and ".lora_B." not in k}
    model.lora = None
    model.trainable = set(model.params)
    model._index_layers()


def lora_params(model: Any) -> dict[str, Any]:
    """The adapter's matrices by name (empty without one)."""
    return {k: v for k, v in model.params.items() if ".lora_A." in k or ".lora_B." in k}


__all__: Sequence[str] = ("LoraConfig", "LoraError", "TARGETS", "add", "load", "save", "merge", "unload",
                          "lora_params")
