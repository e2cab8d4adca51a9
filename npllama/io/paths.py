"""Names a file refers to (a shard in an index, a checkpoint pointer, a tokenizer file) stay inside its folder.

A model folder is input that may come from anyone: its index or pointer names other files, and
those names must never reach outside the folder the user gave, neither by an absolute path, nor
by `..`, nor through a symlink. The one exception is the Hugging Face hub cache, whose
`snapshots/<revision>/` folders hold symlinks into the same repository's `blobs/` folder.
"""
from __future__ import annotations

import os

from npllama.errors import NpllamaError


class OutsideFolderError(NpllamaError, ValueError):
    """A file reference that is not a plain relative name inside its folder; the message names both."""


def _roots(folder: str) -> list[str]:
    real = os.path.realpath(folder)
    roots = [real]
    snapshots = os.path.dirname(real)
    if os.path.basename(snapshots) == "snapshots":  # HF hub cache: snapshots/<rev>/x -> ../../blobs/<hash>
        roots.append(os.path.join(os.path.dirname(snapshots), "blobs"))
    return roots


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def inside(folder: str, name: object, what: str) -> str:
    """`folder`/`name`, refused unless `name` is a relative path that stays in `folder` (symlinks resolved).

    `what` names the reference in errors, e.g. "model.safetensors.index.json: weight_map['lm_head.weight']".
    """
    folder = os.fspath(folder)
    if not isinstance(name, str):
        raise OutsideFolderError(f"{what}: a file name must be a string, got {type(name).__name__} {name!r:.80}")
    if not name or "\x00" in name:
        raise OutsideFolderError(f"{what}: {name!r:.80} is not a file name")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise OutsideFolderError(f"{what}: {name!r} is an absolute path; only names inside {folder} are allowed")
    if ".." in parts:
        raise OutsideFolderError(f"{what}: {name!r} climbs out with '..'; only names inside {folder} are allowed")
    path = os.path.join(folder, name)
    real = os.path.realpath(path)
    if not any(_within(real, root) for root in _roots(folder)):
        raise OutsideFolderError(f"{what}: {name!r} resolves to {real}, outside {folder} (through a symlink)")
    return path
