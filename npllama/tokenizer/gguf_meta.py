"""A small reader of GGUF key/value metadata, so the tokenizer works without the `gguf` package.

GGUF layout (little-endian): magic b"GGUF", uint32 version, uint64 n_tensors, uint64 n_kv,
then n_kv entries of (string key, uint32 type, value). Only the key/value section is read;
tensor data is never touched, so a multi-GB model file costs only its header.
"""
from __future__ import annotations

import mmap
import struct
from typing import Any

from .errors import TokenizerError
from .files import check_file

_MAX_NESTING = 8  # arrays of arrays: real files nest at most once; each level is a Python call

# value type -> struct code (scalars); 8 = string, 9 = array
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: str) -> dict[str, Any]:
    """Return the GGUF key/value metadata of `path` as a dict (arrays become lists)."""
    check_file(path, None)  # a FIFO or device is refused before open; mmap reads only what is used
    try:
        with open(path, "rb") as f:
            try:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # empty file cannot be mapped
                buf = b""
            try:
                return _parse(buf, path)
            finally:
                if isinstance(buf, mmap.mmap):
                    buf.close()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read GGUF file ({e.strerror or e})") from e


def _parse(buf, path: str) -> dict[str, Any]:
    if len(buf) < 24 or buf[:4] != b"GGUF":
        raise TokenizerError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
    (version,) = struct.unpack_from("<I", buf, 4)
    if version not in (2, 3):
        raise TokenizerError(f"{path}: unsupported GGUF version {version} (2 and 3 are read)")
    n_kv = struct.unpack_from("<Q", buf, 16)[0]
    pos = 24
    out: dict[str, Any] = {}
    unpack_from = struct.unpack_from

    def read_str(pos: int) -> tuple[str, int]:
        (n,) = unpack_from("<Q", buf, pos)
        end = pos + 8 + n
        if end > len(buf):
            raise struct.error("string runs past end of file")
        return str(buf[pos + 8:end], "utf-8", "replace"), end

    def read_value(t: int, pos: int, depth: int = 0) -> tuple[Any, int]:
        if t in _SCALAR:
            code = _SCALAR[t]
            return unpack_from("<" + code, buf, pos)[0], pos + struct.calcsize(code)
        if t == _STRING:
            return read_str(pos)
        if t == _ARRAY:
            et, n = unpack_from("<IQ", buf, pos)
            pos += 12
            if et in _SCALAR:
                code = _SCALAR[et]
                size = struct.calcsize(code) * n
                if pos + size > len(buf):
                    raise struct.error("array runs past end of file")
                return list(unpack_from(f"<{n}{code}", buf, pos)), pos + size
            if et == _STRING:  # the hot path: 100k+ vocabulary strings
                items = []
                append = items.append
                for _ in range(n):
                    (k,) = unpack_from("<Q", buf, pos)
                    append(str(buf[pos + 8:pos + 8 + k], "utf-8", "replace"))
                    pos += 8 + k
                if pos > len(buf):
                    raise struct.error("string array runs past end of file")
                return items, pos
            if depth >= _MAX_NESTING:
                raise TokenizerError(f"{path}: GGUF arrays nested more than {_MAX_NESTING} deep")
            items = []
            for _ in range(n):
                v, pos = read_value(et, pos, depth + 1)
                items.append(v)
            return items, pos
        raise TokenizerError(f"{path}: unknown GGUF value type {t}")

    try:
        for _ in range(n_kv):
            key, pos = read_str(pos)
            (t,) = unpack_from("<I", buf, pos)
            value, pos = read_value(t, pos + 4)
            out[key] = value
    except struct.error as e:
        raise TokenizerError(f"{path}: truncated or corrupt GGUF metadata ({e})") from e
    return out
