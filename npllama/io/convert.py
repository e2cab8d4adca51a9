"""Write a model as a Hugging Face export (config.json + model.safetensors) at a chosen storage dtype.

float32 / float64 / float16 go through numpy; bfloat16 has no numpy dtype, so its bits are made
here (round to nearest even, as torch's .to(torch.bfloat16) does) and the file is written by hand:
an 8-byte header length, a JSON header, then the raw tensors.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any

import numpy as np

from npllama.backend import to_host
from npllama.io.atomic import atomic_dir, atomic_path
from npllama.config import LlamaConfig

STORE_DTYPES = {"float32": ("F32", np.float32), "float64": ("F64", np.float64), "float16": ("F16", np.float16),
                "bfloat16": ("BF16", None)}


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bit patterns (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def write_safetensors(tensors: dict[str, Any], path: str, dtype: str = "float32",
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors at `dtype` ('float32', 'float64', 'float16', 'bfloat16') to a .safetensors file."""
    if dtype not in STORE_DTYPES:
        raise ValueError(f"unsupported storage dtype {dtype!r}: choose one of {', '.join(STORE_DTYPES)}")
    tag, np_dtype = STORE_DTYPES[dtype]
    blobs, header, offset = [], {}, 0
    for name, a in tensors.items():
        a = to_host(a)
        raw = to_bf16_bits(a) if np_dtype is None else np.ascontiguousarray(a, dtype=np_dtype)
        data = raw.tobytes()
        header[name] = {"dtype": tag, "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = dict(metadata)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)                       # the data starts 8-byte aligned
    with atomic_path(path, suffix=".safetensors") as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


def save_hf(config: LlamaConfig, params: dict[str, Any], out: str, dtype: str = "float32") -> None:
    """Write `out`/config.json + `out`/model.safetensors; the folder's other files are kept, ours replaced whole."""
    with atomic_dir(out, existing="merge") as tmp:
        write_safetensors(params, os.path.join(tmp, "model.safetensors"), dtype, metadata={"format": "pt"})
        d = config.to_dict()
        d["dtype"] = dtype
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2)
