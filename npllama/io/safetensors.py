"""safetensors files in the Hugging Face layout: read (F32/F16/BF16/F64, as memory-mapped views or straight
into arrays the caller owns) and write (atomically).

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw bytes. It is parsed here directly so that BF16 (which NumPy lacks)
can be widened from its bits and every failure can name the file and the tensor.
"""
from __future__ import annotations

import os
import stat
import struct
from typing import Any, Iterable

import numpy as np

from npllama.backend import to_host
from npllama.io import jsonfile
from npllama.io.atomic import atomic_path
from npllama.io.expected import check_config, check_tensors, shapes_of
from npllama.io.paths import inside
from npllama.config import LlamaConfig
from npllama.errors import NpllamaError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_FLOAT = ("F64", "F32", "F16", "BF16")


class WeightsError(NpllamaError, ValueError):
    """A weights file or directory that cannot be loaded; the message names the file and the tensor."""


# bytes per element of every dtype the safetensors format defines (npllama reads the _DTYPES subset)
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
             "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "C64": 8}
MAX_HEADER = 100_000_000  # the safetensors library's own limit


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entry(path: str, name: str, info: object) -> tuple[str, list[int], int, int]:
    """(dtype, shape, begin, end) of one header entry, or a WeightsError naming the file and the tensor."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise WeightsError(f"{where}: header entry is {type(info).__name__}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise WeightsError(f"{where}: header entry has no {key!r}")
    dt, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dt, str) or dt not in _ITEMSIZE:
        raise WeightsError(f"{where}: unknown dtype {dt!r:.40} (safetensors dtypes: {', '.join(_ITEMSIZE)})")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise WeightsError(f"{where}: shape {shape!r:.80} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(n) for n in offsets)):
        raise WeightsError(f"{where}: data_offsets {offsets!r:.80} is not a pair of integers")
    return dt, shape, offsets[0], offsets[1]


class SafetensorsFile:
    """The header of one .safetensors file and memory-mapped, lazily widened access to its tensors.

    The header is validated whole before any tensor is touched: dtypes, shapes and offsets are typed,
    every tensor's byte count agrees with its dtype and shape, and the tensors tile the data region.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        header, n, size = self._read_header(path)
        meta = header.pop("__metadata__", None)
        if meta is not None and not (isinstance(meta, dict)
                                     and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
            raise WeightsError(f"{path}: __metadata__ must map strings to strings")
        self.metadata = meta or {}
        self.data_start = 8 + n
        self.size = size
        data_size = size - self.data_start
        spans = []
        for name, info in header.items():
            dt, shape, a, b = _check_entry(path, name, info)
            if not 0 <= a <= b:
                raise WeightsError(f"{path}: tensor {name!r}: data_offsets [{a}, {b}] are not 0 <= begin <= end")
            if b > data_size:
                raise WeightsError(f"{path}: truncated file: tensor {name!r} ends at byte {self.data_start + b}, "
                                   f"file has {size}")
            if b - a != int(np.prod(shape, dtype=object)) * _ITEMSIZE[dt]:
                raise WeightsError(f"{path}: corrupt header: tensor {name!r} has {b - a} bytes for shape {shape} {dt}")
            spans.append((a, b, name))
        # as the safetensors library requires: sorted by offset, each tensor starts where the last ended.
        # Shared bytes are looked for first: they are the worse fault, and the one to name.
        spans.sort()
        for (a0, b0, n0), (a, b, name) in zip(spans, spans[1:]):
            if a < b0 or (a, b) == (a0, b0) and a < b:
                what = "has the same data_offsets as" if (a, b) == (a0, b0) else "overlaps"
                raise WeightsError(f"{path}: corrupt header: tensor {name!r} (data_offsets [{a}, {b}]) {what} "
                                   f"tensor {n0!r} ([{a0}, {b0}])")
        end, last = 0, None
        for a, b, name in spans:
            if a != end:
                raise WeightsError(f"{path}: corrupt header: tensor {name!r} (data_offsets [{a}, {b}]) leaves a gap "
                                   f"of {a - end} bytes after " + (repr(last) if last else "the header"))
            end, last = b, name
        if end != data_size:
            raise WeightsError(f"{path}: corrupt file: {data_size - end} bytes after the last tensor's data")
        self.header = header
        self._mm: np.memmap | None = None

    @staticmethod
    def _read_header(path: str) -> tuple[dict[str, Any], int, int]:
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise WeightsError(f"{path}: not a regular file")
            size = st.st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise WeightsError(f"{path}: truncated file ({size} bytes, no safetensors header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise WeightsError(f"{path}: corrupt or truncated header (says {n} bytes, file has {size - 8})")
                if n > MAX_HEADER:
                    raise WeightsError(f"{path}: corrupt header: {n} bytes, more than the {MAX_HEADER} allowed")
                raw = f.read(n)
        except FileNotFoundError:
            raise WeightsError(f"{path}: file not found") from None
        try:
            header = jsonfile.loads(raw)
        except ValueError as e:
            raise WeightsError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
        return header, n, size

    def keys(self) -> list[str]:
        """Tensor names in this file."""
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of a tensor."""
        return tuple(self.header[name]["shape"])

    def get(self, name: str, dtype: Any = None) -> np.ndarray:
        """The tensor as NumPy, widened to `dtype` if given (a view of the mapped file when no conversion is needed)."""
        info = self.header[name]
        dt = info["dtype"]
        if dt not in _DTYPES:
            raise WeightsError(f"{self.path}: tensor {name!r} has dtype {dt}, which npllama cannot read "
                               f"(supported: {', '.join(_DTYPES)})")
        if dtype is not None and dt not in _FLOAT:
            raise WeightsError(f"{self.path}: tensor {name!r} has dtype {dt}, expected a float tensor")
        if self._mm is None:
            # copy-on-write: in-place updates (an optimizer step) never write back to the file
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="c")
        a, b = info["data_offsets"]
        raw = self._mm[self.data_start + a:self.data_start + b]
        shape = tuple(info["shape"])
        if dt == "BF16":
            # bfloat16 is the top half of a float32: put the 16 bits back in place
            bits = raw.view(np.uint16).astype(np.uint32) << 16
            arr = bits.view(np.float32).reshape(shape)
            return arr if dtype is None else arr.astype(dtype, copy=False)
        arr = raw.view(_DTYPES[dt]).reshape(shape)
        if dtype is None or arr.dtype == np.dtype(dtype):
            return arr
        return arr.astype(dtype)


    def read_into(self, name: str, out: np.ndarray) -> None:
        """Read a float tensor into `out` (its shape; any float dtype) with file reads: nothing stays mapped."""
        info = self.header[name]
        dt = info["dtype"]
        if dt not in _DTYPES:
            raise WeightsError(f"{self.path}: tensor {name!r} has dtype {dt}, which npllama cannot read "
                               f"(supported: {', '.join(_DTYPES)})")
        if dt not in _FLOAT:
            raise WeightsError(f"{self.path}: tensor {name!r} has dtype {dt}, expected a float tensor")
        a, b = info["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + a)
            if dt != "BF16" and out.dtype == _DTYPES[dt] and out.flags.c_contiguous:
                n = f.readinto(memoryview(out).cast("B"))
            else:
                raw = np.empty(b - a, dtype=np.uint8)
                n = f.readinto(memoryview(raw))
                if dt == "BF16":
                    raw = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
                from npllama.fast.storage import fill   # a transposed `out` is filled in row blocks
                fill(out, raw.view(_DTYPES[dt] if dt != "BF16" else np.float32).reshape(out.shape))
        if n != b - a:  # the file shrank since its header was read
            raise WeightsError(f"{self.path}: truncated file: tensor {name!r} is cut short")


def open_checkpoint(path: str) -> dict[str, SafetensorsFile]:
    """Map tensor name -> the file holding it, for a dir (single file or sharded index) or a .safetensors path.

    Shards named by an index must lie inside the folder (npllama.io.paths.inside).
    """
    if os.path.isfile(path):
        f = SafetensorsFile(path)
        return {k: f for k in f.keys()}
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: no such file or directory")
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.lexists(index):
        index = inside(path, "model.safetensors.index.json", path)
        try:
            data = jsonfile.read(index)
        except (OSError, ValueError) as e:
            raise WeightsError(f"{index}: not a valid sharded-checkpoint index ({e})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index}: not a valid sharded-checkpoint index ('weight_map' must be an object "
                               f"of tensor name -> shard file)")
        files: dict[str, SafetensorsFile] = {}
        out: dict[str, SafetensorsFile] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or shard not in files:
                shard_path = inside(path, shard, f"{index}: weight_map[{name!r}]")
                files[shard] = SafetensorsFile(shard_path)
            if name not in files[shard].header:
                raise WeightsError(f"{files[shard].path}: tensor {name!r} listed in the index is not in this shard")
            out[name] = files[shard]
        return out
    if os.path.lexists(single):
        f = SafetensorsFile(inside(path, "model.safetensors", path))
        return {k: f for k in f.keys()}
    raise WeightsError(f"{path}: no model.safetensors or model.safetensors.index.json found")


def load_params(path: str, expected: dict[str, tuple[int, ...]], dtype: Any, optional: Iterable[str] = (),
                out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Read every expected tensor (name -> shape) at `dtype`; errors name the missing, unexpected or misshapen tensor.

    Without `out`, tensors are views of the mapped files (widened copies where the dtype differs);
    with `out` (name -> preallocated host array), each is read into its array, which is returned.
    """
    files = open_checkpoint(path)
    # every name and shape is checked before a byte is read
    check_tensors(expected, shapes_of(files), lambda k: files[k].path, WeightsError, path, optional)
    if out is not None:
        for name in expected:
            files[name].read_into(name, out[name])
        return out
    return {name: files[name].get(name, dtype) for name in expected}


def check_checkpoint(path: str, config: LlamaConfig) -> None:
    """Compare what `config` calls for with the checkpoint's headers at `path`, before any storage is allocated."""
    files = open_checkpoint(path)
    # transformers may write lm_head.weight even when tied; it is the same tensor, so it is not needed
    optional = ["lm_head.weight"] if config.tie_word_embeddings else []
    check_config(config, shapes_of(files), lambda k: files[k].path, WeightsError, path,
                 os.path.join(path, "config.json"), optional)


def save_file(tensors: dict[str, Any], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (NumPy or CuPy) to a .safetensors file via a temp file and a rename (never half-written)."""
    from safetensors.numpy import save_file as _save
    host = {k: np.ascontiguousarray(to_host(v)) for k, v in tensors.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        _save(host, tmp, metadata=metadata)
