"""Training checkpoints: all or nothing on disk.

A checkpoint is a directory `<out>/checkpoints/step_000123/` holding
    model.safetensors      the parameters (HF names; with config.json the dir loads as a model)
    config.json            the model config
    optimizer.safetensors  the optimizer buffers, keyed '<buffer>/<param name>'
    state.json             step, optimizer type/hyperparameters/per-parameter steps, data positions and
                           RNG states, the run's settings, and a manifest (every file's size, every tensor's name)
It is written into a temporary sibling and renamed into place only when every file is complete;
then the one-line file `<out>/checkpoints/latest` is replaced (write + rename) to point at it.
A crash at any moment leaves `latest` naming a complete checkpoint. Loading checks the manifest.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from npllama.errors import NpllamaError
from npllama.io.atomic import atomic_dir, atomic_path, fsync_dir
from npllama.io.paths import OutsideFolderError, inside

FORMAT = "npllama-checkpoint-v1"
_FILES = ("model.safetensors", "config.json", "optimizer.safetensors")


class CheckpointError(NpllamaError, RuntimeError):
    """A checkpoint that is missing, incomplete or inconsistent; the message names the file."""


def _save_tensors(tensors: dict[str, Any], path: str) -> None:
    from npllama.io.safetensors import save_file
    save_file(tensors, path)


def _atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path, fsync=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def first_nonfinite(params: dict[str, Any]) -> str | None:
    """The name of the first parameter holding a NaN or an infinity, or None when all are finite."""
    from npllama.backend import get_array_module
    for name, p in params.items():
        if not bool(get_array_module(p).isfinite(p).all()):
            return name
    return None


def save_checkpoint(root: str, step: int, params: dict[str, Any], optimizer_state: dict[str, Any],
                    config: Any, state: dict[str, Any], keep: int = 2) -> str:
    """Write checkpoint `step` under `root` (the checkpoints dir), point `latest` at it, keep the last `keep`."""
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:06d}"
    final = os.path.join(root, name)
    # a re-run of the same step replaces the old copy only once the new one is complete
    with atomic_dir(final, fsync=True) as tmp:
        _save_tensors(params, os.path.join(tmp, "model.safetensors"))
        config.save(os.path.join(tmp, "config.json"))
        opt_tensors, opt_meta = {}, {"type": optimizer_state["type"], "hyper": optimizer_state["hyper"], "steps": {}}
        for pname, s in optimizer_state["state"].items():
            opt_meta["steps"][pname] = int(s["step"])
            for key, val in s.items():
                if key != "step" and val is not None:
                    opt_tensors[f"{key}/{pname}"] = val
        _save_tensors(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
        files = {f: os.path.getsize(os.path.join(tmp, f)) for f in _FILES}
        doc = {"format": FORMAT, "step": step, "optimizer": opt_meta, **state,
               "manifest": {"files": files, "params": sorted(params), "optimizer_tensors": sorted(opt_tensors)}}
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
    _atomic_write_text(os.path.join(root, "latest"), name + "\n")
    fsync_dir(root)
    _prune(root, keep, protect=name)
    return final


def _prune(root: str, keep: int, protect: str) -> None:
    if keep <= 0:
        return
    done = sorted(d for d in os.listdir(root) if d.startswith("step_") and os.path.isdir(os.path.join(root, d)))
    for d in done[:-keep]:
        if d != protect:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def _inside(root: str, name: str, ptr: str) -> str:
    """root/name for the name read from the pointer file `ptr`: one plain entry of `root`, never a way out of it."""
    if any(c in name for c in ("/", "\\")) or name in (".", ".."):
        raise CheckpointError(f"{ptr} holds {name[:200]!r}: not the name of a checkpoint inside {root}")
    try:
        return inside(root, name, ptr)
    except OutsideFolderError as e:
        raise CheckpointError(str(e)) from None


def latest_checkpoint(root: str) -> str | None:
    """The checkpoint dir that `root/latest` points at, or None when there is none yet."""
    ptr = os.path.join(root, "latest")
    if not os.path.exists(ptr):
        return None
    try:
        with open(ptr, encoding="utf-8") as f:
            name = f.read(256).strip()
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise CheckpointError(f"{ptr}: not a checkpoint pointer ({e})") from None
    path = _inside(root, name, ptr)
    if not os.path.isdir(path):
        raise CheckpointError(f"{ptr} points at {name!r}, which does not exist")
    return path


def _manifest(state: dict[str, Any], sp: str) -> dict[str, Any]:
    """state.json's manifest, its shape checked: only the checkpoint's own file names, lists of tensor names."""
    man, om = state.get("manifest"), state.get("optimizer")
    ok = (isinstance(man, dict) and isinstance(man.get("files"), dict) and isinstance(om, dict)
          and isinstance(om.get("steps"), dict) and all(isinstance(v, int) for v in om["steps"].values())
          and all(isinstance(man.get(k), list) and all(isinstance(n, str) for n in man[k])
                  for k in ("params", "optimizer_tensors"))
          and all("/" in n for n in man["optimizer_tensors"]) and isinstance(state.get("step"), int))
    if not ok:
        raise CheckpointError(f"{sp}: the manifest, step or optimizer entry is malformed (edited or corrupt)")
    stray = sorted(set(man["files"]) - set(_FILES))
    if stray:
        raise CheckpointError(f"{sp}: the manifest lists {stray[0]!r}, which is not a checkpoint file")
    bad = [f for f, size in man["files"].items() if not isinstance(size, int)]
    if bad:
        raise CheckpointError(f"{sp}: the manifest's size of {bad[0]!r} is not an integer")
    return man


def load_checkpoint(path: str, dtype: Any = None) -> dict[str, Any]:
    """Read a checkpoint dir (or a checkpoints root, following `latest`); verify it is complete.

    Returns {'state': state.json dict, 'params': {name: np.ndarray}, 'optimizer': an optimizer state_dict,
    'config_path': path of config.json}. Arrays are host NumPy, at `dtype` if given.
    """
    from npllama.io.safetensors import SafetensorsFile, WeightsError
    if os.path.exists(os.path.join(path, "latest")):
        path = latest_checkpoint(path)  # type: ignore[assignment]
    sp = os.path.join(path, "state.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    try:
        with open(sp, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{sp}: missing (an incomplete checkpoint)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{sp}: corrupt ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{sp}: format {got!r} is not {FORMAT!r}")
    man = _manifest(state, sp)
    for fname, size in man["files"].items():
        fp = os.path.join(path, fname)
        if not os.path.exists(fp):
            raise CheckpointError(f"{fp}: missing from the checkpoint")
        if os.path.getsize(fp) != size:
            raise CheckpointError(f"{fp}: {os.path.getsize(fp)} bytes, the manifest says {size}: truncated or altered")
    try:
        mf = SafetensorsFile(os.path.join(path, "model.safetensors"))
        of = SafetensorsFile(os.path.join(path, "optimizer.safetensors"))
    except WeightsError as e:
        raise CheckpointError(str(e)) from None
    for f, names in ((mf, man["params"]), (of, man["optimizer_tensors"])):
        missing = sorted(set(names) - set(f.keys()))
        if missing:
            raise CheckpointError(f"{f.path}: tensor {missing[0]!r} listed in the manifest is missing")

    def get(f: Any, k: str) -> np.ndarray:
        return np.array(f.get(k, dtype))           # a private copy: the optimizer updates it in place

    params = {k: get(mf, k) for k in man["params"]}
    om = state["optimizer"]
    opt_state: dict[str, dict[str, Any]] = {p: {"step": s} for p, s in om["steps"].items()}
    for key in man["optimizer_tensors"]:
        buf, pname = key.split("/", 1)
        opt_state.setdefault(pname, {"step": 0})[buf] = get(of, key)
    return {"state": state, "params": params, "path": path, "config_path": os.path.join(path, "config.json"),
            "optimizer": {"type": om["type"], "hyper": om["hyper"], "state": opt_state}}


__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "first_nonfinite"]
