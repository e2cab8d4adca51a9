"""Byte-level BPE (GPT-2 / tiktoken / Llama 3): pre-split, merge by rank, bytes at the edges.

A chunk of text becomes UTF-8 bytes, each byte a base token; then the adjacent pair with the
lowest merge rank is merged (leftmost on ties) until no pair has a rank. Chunks repeat a lot
in natural text, so each chunk's ids are cached.
"""
from __future__ import annotations

import heapq
from typing import Callable, Hashable, Sequence

_INF = float("inf")
_LONG = 48  # above this many symbols the heap version wins over rescanning


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (bytes that print stay themselves)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_TO_UNICODE = bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def unicode_to_bytes(token: str) -> bytes | None:
    """Undo the GPT-2 alphabet; None if `token` has a character outside it."""
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in token)
    except KeyError:
        return None


class PairTable(dict):
    """(left, right) -> (rank, merged); a missing pair reads as None instead of raising."""

    def __missing__(self, key):
        return None


class RankPairTable(dict):
    """tiktoken's rule: a pair merges if its concatenated bytes are a token; rank = that token's rank.

    Filled lazily, so a 128k rank file costs nothing until a chunk misses the cache.
    """

    def __init__(self, token_bytes: Sequence[bytes], encoder: dict[bytes, int]):
        super().__init__()
        self._bytes = token_bytes
        self._encoder = encoder

    def __missing__(self, key):
        i = self._encoder.get(self._bytes[key[0]] + self._bytes[key[1]])
        value = None if i is None else (i, i)
        self[key] = value
        return value


def merge(symbols: list[Hashable], pairs: PairTable) -> list[Hashable]:
    """Merge adjacent pairs lowest rank first (leftmost on ties) until none is in `pairs`."""
    if len(symbols) < 2:
        return symbols
    if len(symbols) > _LONG:
        return _merge_heap(symbols, pairs)
    ranks, merged = [], []
    for p in zip(symbols, symbols[1:]):
        m = pairs[p]
        ranks.append(_INF if m is None else m[0])
        merged.append(None if m is None else m[1])
    while True:
        best = min(ranks)
        if best == _INF:
            return symbols
        i = ranks.index(best)
        symbols[i] = merged[i]
        del symbols[i + 1], ranks[i], merged[i]
        # only the two pairs touching the new symbol changed
        for j in (i - 1, i):
            if 0 <= j < len(ranks):
                m = pairs[(symbols[j], symbols[j + 1])]
                ranks[j] = _INF if m is None else m[0]
                merged[j] = None if m is None else m[1]
        if not ranks:
            return symbols


def _merge_heap(symbols: list[Hashable], pairs: PairTable) -> list[Hashable]:
    """Same result as `merge`, in O(n log n): a heap of candidate pairs over a linked list."""
    n = len(symbols)
    sym = list(symbols)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        m = pairs[(sym[i], sym[i + 1])]
        if m is not None:
            heap.append((m[0], i, sym[i], sym[i + 1], m[1]))
    heapq.heapify(heap)
    gone = object()
    while heap:
        _, i, a, b, new = heapq.heappop(heap)
        j = nxt[i]
        if sym[i] != a or j >= n or sym[j] != b:
            continue  # stale: one side was merged since this pair was pushed
        sym[i], sym[j] = new, gone
        k = nxt[j]
        nxt[i] = k
        if k < n:
            prv[k] = i
        h = prv[i]
        if h >= 0:
            m = pairs[(sym[h], new)]
            if m is not None:
                heapq.heappush(heap, (m[0], h, sym[h], new, m[1]))
        if k < n:
            m = pairs[(new, sym[k])]
            if m is not None:
                heapq.heappush(heap, (m[0], i, new, sym[k], m[1]))
    return [s for s in sym if s is not gone]


class ByteLevelBPE:
    """Byte-level BPE over a vocabulary of byte strings; `encode` takes text without special tokens."""

    def __init__(self, token_bytes: list[bytes], pairs: PairTable, split: Callable[[str], list],
                 whole_chunk_lookup: bool = False, encoder: dict[bytes, int] | None = None):
        self.token_bytes = token_bytes
        self.encoder = encoder if encoder is not None else _first_ids(token_bytes)
        # Some vocabularies (SmolLM2) lack a few byte tokens; like HF tokenizers without an unk
        # token, those bytes are dropped.
        self.byte_ids = [self.encoder.get(bytes([b])) for b in range(256)]
        self.missing_bytes = frozenset(b for b in range(256) if self.byte_ids[b] is None)
        self.pairs = pairs
        self.split = split
        self.whole_chunk_lookup = whole_chunk_lookup  # tiktoken / llama-bpe: a chunk that is a token is emitted as is
        self.cache: dict[str, list[int]] = {}
        self.cache_limit = 1 << 20

    def encode(self, text: str, at_start: bool = True) -> list[int]:
        """Token ids for `text` (special-token text is treated as plain text)."""
        cache = self.cache
        get = cache.get
        out: list[int] = []
        extend = out.extend
        for chunk in self.split(text):
            ids = get(chunk)
            if ids is None:
                ids = self.encode_chunk(chunk)
                if len(cache) >= self.cache_limit:
                    cache.clear()
                cache[chunk] = ids
            extend(ids)
        return out

    def encode_chunk(self, chunk: str) -> list[int]:
        """BPE of one pre-split chunk."""
        raw = chunk.encode("utf-8")
        if self.whole_chunk_lookup:
            i = self.encoder.get(raw)
            if i is not None:
                return [i]
        byte_ids = self.byte_ids
        if self.missing_bytes:
            return merge([byte_ids[b] for b in raw if byte_ids[b] is not None], self.pairs)
        return merge([byte_ids[b] for b in raw], self.pairs)


def _first_ids(token_bytes: Sequence[bytes]) -> dict[bytes, int]:
    enc: dict[bytes, int] = {}
    for i, b in enumerate(token_bytes):
        enc.setdefault(b, i)
    return enc
