"""Opening tokenizer files a user hands over: regular files of sane size, and names kept in their folder.

A tokenizer "file" may be /dev/zero, a FIFO or a directory, which would read forever, block, or
fail with a stray OSError; a folder's tokenizer.json / tokenizer_config.json may be a symlink to
anywhere (npllama.io.paths decides what stays inside). Everything is stat-ed before it is opened, and every failure is a TokenizerError
naming the file.
"""
from __future__ import annotations

import os
import stat

from npllama.io import paths

from .errors import TokenizerError

# Llama 3's tokenizer.json is 9 MB and the largest vocabularies' files stay well under 100 MB;
# a GiB is generous and still refuses a mistaken multi-GB file before it is read into memory.
MAX_BYTES = 1 << 30


def check_file(path: str, max_bytes: int | None = MAX_BYTES) -> int:
    """Size of `path`, refused unless it is a regular file of at most `max_bytes` (None: any size)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise TokenizerError(f"{path}: is a directory, not a tokenizer file")
    if not stat.S_ISREG(st.st_mode):
        raise TokenizerError(f"{path}: not a regular file (a device, FIFO or socket); a tokenizer must be a file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise TokenizerError(f"{path}: {st.st_size} bytes, more than the {max_bytes} bytes (1 GiB) a tokenizer file may have")
    return st.st_size


def read_bytes(path: str) -> bytes:
    """The whole file, after `check_file` (a file that grows past the limit while read is refused too)."""
    check_file(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > MAX_BYTES:
        raise TokenizerError(f"{path}: more than the {MAX_BYTES} bytes (1 GiB) a tokenizer file may have")
    return data


def inside(folder: str, name: str) -> str:
    """= npllama.io.paths.inside (no absolute path, no '..', no symlink out), raising a TokenizerError."""
    try:
        return paths.inside(folder, name, os.path.join(folder, name))
    except paths.OutsideFolderError as e:
        raise TokenizerError(str(e)) from None
