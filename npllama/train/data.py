"""Training data: text files -> token ids -> a memory-mapped token file -> packed (B, T+1) batches.

The token file is raw little-endian uint16 (vocab <= 65536) or uint32 ids, one document after
another (separated by an EOS id when the tokenizer has one), with a JSON sidecar `<file>.json`
saying the dtype, the count and where it came from. Batches are windows of T+1 tokens at random
offsets (nanoGPT style), read from the memory map, so only the pages a batch touches are ever in
RAM: a corpus larger than memory trains the same way. The offsets come from a seeded NumPy
Generator whose state is part of `state_dict()`, so a resumed run draws the very same batches.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterable, Iterator

import numpy as np

from npllama.io.atomic import atomic_path
from npllama.errors import NpllamaError

FORMAT = "npllama-tokens-v1"
CHUNK_CHARS = 1 << 20          # encode big files in ~1 MB pieces, each ending at a line break
CHECK_CHUNK = 1 << 24          # ids checked 16 Mi at a time: a bounded scratch array for any file size


class DataError(NpllamaError, ValueError):
    """A data file or setting that cannot be used; the message names the file or the argument."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits (vocab <= 65536), else uint32."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise DataError(f"vocab_size={vocab_size} does not fit in uint32 token ids")


def text_files(paths: str | Iterable[str]) -> list[str]:
    """Expand files and directories (every *.txt below them, sorted) into a list of text files."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in map(os.fspath, paths):
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "**", "*.txt"), recursive=True))
            if not found:
                raise DataError(f"{p}: directory has no *.txt files")
            out += found
        elif os.path.isfile(p):
            if p.endswith(".bin"):    # never tokenized as text: say what is wrong with it as a token file
                TokenFile(p)
                raise DataError(f"{p}: a token file is given alone as --data, not mixed with other files")
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    return out


def _chunks(path: str) -> Iterator[str]:
    """The text of a file in pieces of about CHUNK_CHARS characters, each ending at a newline."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rest = ""
        while True:
            block = f.read(CHUNK_CHARS)
            if not block:
                break
            block = rest + block
            cut = block.rfind("\n") + 1
            if cut == 0:                      # no newline yet: keep reading
                rest = block
                continue
            rest = block[cut:]
            yield block[:cut]
        if rest:
            yield rest


def _vocab_size(tokenizer: Any) -> int:
    for attr in ("vocab_size", "n_vocab"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    try:
        return len(tokenizer)
    except TypeError:
        raise DataError("the tokenizer has no vocab_size: cannot choose uint16 or uint32 token ids") from None


def _eos_id(tokenizer: Any) -> int | None:
    for attr in ("eos_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return None


def build_token_file(paths: str | Iterable[str], tokenizer: Any, out: str, eos_id: int | None | str = "auto",
                     vocab_size: int | None = None) -> TokenFile:
    """Encode text files into the token file `out` (+ `out.json`), written whole or not at all."""
    files = text_files(paths)
    vocab_size = vocab_size or _vocab_size(tokenizer)
    eos = _eos_id(tokenizer) if eos_id == "auto" else eos_id
    dt = token_dtype(vocab_size)
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    n = 0
    # both are written before either is renamed; the data goes into place first (the inner block ends
    # first), then the sidecar that vouches for it
    with atomic_path(out + ".json") as tmp_meta, atomic_path(out, suffix=".bin") as tmp:
        with open(tmp, "wb") as f:
            for path in files:
                for text in _chunks(path):
                    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
                    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                        raise DataError(f"{path}: tokenizer produced id {int(ids.max())} >= vocab_size {vocab_size}")
                    f.write(ids.astype(dt.newbyteorder("<")).tobytes())
                    n += ids.size
                if eos is not None:
                    f.write(np.array([eos], dtype=dt.newbyteorder("<")).tobytes())
                    n += 1
        meta = {"format": FORMAT, "dtype": dt.name, "num_tokens": n, "vocab_size": vocab_size,
                "eos_id": eos, "sources": files}
        with open(tmp_meta, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
    return TokenFile(out)


def write_token_file(ids: Any, out: str, vocab_size: int) -> TokenFile:
    """Write an in-memory id sequence as a token file (tests, pre-tokenized data)."""
    ids = np.asarray(ids)
    dt = token_dtype(vocab_size)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise DataError(f"token ids must be in [0, {vocab_size}), got {int(ids.min())}..{int(ids.max())}")
    # as in build_token_file: the data goes into place before the sidecar that vouches for it
    with atomic_path(out + ".json") as tmp_meta, atomic_path(out, suffix=".bin") as tmp:
        ids.astype(dt.newbyteorder("<")).tofile(tmp)
        with open(tmp_meta, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "dtype": dt.name, "num_tokens": int(ids.size), "vocab_size": vocab_size,
                       "eos_id": None, "sources": []}, f, indent=1)
    return TokenFile(out)


def is_token_file(path: str) -> bool:
    """True when `path` is a token file (it has a JSON sidecar of our format)."""
    try:
        with open(path + ".json", encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class TokenFile:
    """A token file opened as a read-only memory map: `tokens` (1-D uint16/uint32), `vocab_size`."""

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        side = self.path + ".json"
        try:
            with open(side, encoding="utf-8") as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise DataError(f"{self.path}: not a token file (no sidecar {side})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{side}: corrupt token-file sidecar ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise DataError(f"{side}: format {got!r} is not {FORMAT!r}")
        self.meta = meta
        try:
            self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
            self.vocab_size, n = int(meta["vocab_size"]), int(meta["num_tokens"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{side}: bad or missing dtype / vocab_size / num_tokens "
                            f"({type(e).__name__}: {e})") from None
        if self.dtype not in (np.dtype("<u2"), np.dtype("<u4")) or n < 0 or self.vocab_size <= 0:
            raise DataError(f"{side}: dtype {meta['dtype']!r}, num_tokens {n} and vocab_size {self.vocab_size} "
                            "must be uint16/uint32, >= 0 and > 0")
        size = os.path.getsize(self.path) if os.path.exists(self.path) else -1
        if size != n * self.dtype.itemsize:
            raise DataError(f"{self.path}: has {size} bytes, its sidecar promises {n} {self.dtype.name} tokens "
                            f"({n * self.dtype.itemsize} bytes): truncated or mismatched")
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def check_ids(self, vocab_size: int, chunk: int = CHECK_CHUNK) -> None:
        """Refuse an id >= `vocab_size`, naming the file and the first bad token's offset (reads in chunks)."""
        t = self.tokens
        for start in range(0, len(t), chunk):
            block = t[start:start + chunk]                   # a view of the map: no copy of the file
            if int(block.max()) >= vocab_size:
                i = start + int(np.argmax(block >= vocab_size))
                raise DataError(f"{self.path}: token {i} (byte offset {i * self.dtype.itemsize}) is id {int(t[i])}, "
                                f"not below the model's vocab_size {vocab_size}")

    def split(self, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) views: the last `val_fraction` of the tokens is held out for validation."""
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        n_val = int(round(len(self) * val_fraction))
        return self.tokens[:len(self) - n_val], self.tokens[len(self) - n_val:]


class Batcher:
    """Packed (B, T+1) int64 batches from random offsets into a token array, deterministic from `seed`."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, name: str = "train") -> None:
        if batch_size <= 0 or seq_len <= 0:
            raise DataError(f"batch_size={batch_size} and seq_len={seq_len} must be positive")
        if len(tokens) < seq_len + 1:
            raise DataError(f"the {name} split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}: "
                            f"use more data, a shorter --seq-len or a different --val-fraction")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.batches = 0                                    # how many batches have been drawn

    def next(self) -> np.ndarray:
        """The next (B, T+1) batch; row b is tokens[o_b : o_b + T + 1] for a random offset o_b."""
        T1 = self.seq_len + 1
        offsets = self.rng.integers(0, len(self.tokens) - T1 + 1, size=self.batch_size)
        self.batches += 1
        return np.stack([np.asarray(self.tokens[o:o + T1], dtype=np.int64) for o in offsets])

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next()

    def state_dict(self) -> dict[str, Any]:
        """Seed, generator state and batch count (JSON-serializable)."""
        return {"seed": self.seed, "batches": self.batches, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue exactly where `state_dict()` was taken."""
        self.seed = sd["seed"]
        self.batches = int(sd["batches"])
        self.rng.bit_generator.state = sd["rng"]


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, n: int) -> Iterator[np.ndarray]:
    """Up to `n` fixed (B, T+1) batches of consecutive windows from the start of `tokens` (the same every eval)."""
    T1 = seq_len + 1
    windows = (len(tokens) - 1) // seq_len                     # windows overlap by one token (input/target)
    if windows <= 0:
        raise DataError(f"the validation split has {len(tokens)} tokens, fewer than seq_len + 1 = {T1}")
    rows = [np.asarray(tokens[i * seq_len:i * seq_len + T1], dtype=np.int64) for i in range(min(windows, n * batch_size))]
    for i in range(0, len(rows) - batch_size + 1, batch_size):
        yield np.stack(rows[i:i + batch_size])
    if len(rows) < batch_size:                                 # a small split: one short batch rather than none
        yield np.stack(rows)
