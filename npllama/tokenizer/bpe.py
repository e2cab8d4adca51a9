"""Byte-level BPE (GPT-2 / tiktoken / Llama 3): pre-split, merge by rank, bytes at the edges.

A chunk of text becomes UTF-8 bytes, each byte a base token; then the adjacent pair with the
lowest merge rank is merged (leftmost on ties) until no pair has a rank. Chunks repeat a lot
in natural text, so each chunk's ids are cached.
"""
from __future__ import annotations

import heapq
from typing import Callable, Hashable, Sequence

import numpy as np

_INF = float("inf")
_LONG = 48  # above this many symbols the heap version wins over rescanning
_ROUNDS = 2048  # above this many bytes, whole-array merge rounds (numpy) win over the heap
_NONE = np.int32(2**31 - 1)  # "no merge" rank in the arrays (ids and ranks are int32 there)


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


class PairArrays:
    """A pair table as sorted int64 keys (left * V + right), for looking up many pairs at once."""

    def __init__(self, left, right, rank, merged, n_ids: int):
        self.n = np.int64(max(n_ids, 1))
        keys = np.asarray(left, np.int64) * self.n + np.asarray(right, np.int64)
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.rank = np.asarray(rank, np.int32)[order]
        self.merged = np.asarray(merged, np.int32)[order]

    @classmethod
    def from_table(cls, pairs: dict, token_bytes: Sequence[bytes], encoder: dict[bytes, int]) -> "PairArrays":
        """From a PairTable (every pair listed) or a RankPairTable (pairs implied by the vocabulary)."""
        if isinstance(pairs, RankPairTable):
            # every (a, b) with bytes a + b a token: try each cut of each token
            left, right, rank = [], [], []
            get = encoder.get
            for t, i in encoder.items():
                for k in range(1, len(t)):
                    a, b = get(t[:k]), get(t[k:])
                    if a is not None and b is not None:
                        left.append(a), right.append(b), rank.append(i)
            return cls(left, right, rank, rank, len(token_bytes))
        items = list(pairs.items())
        return cls([k[0] for k, _ in items], [k[1] for k, _ in items], [v[0] for _, v in items],
                   [v[1] for _, v in items], len(token_bytes))

    def lookup(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rank, merged id) of each pair (a[i], b[i]); rank _NONE where the pair does not merge."""
        if not len(self.keys):
            return np.full(len(a), _NONE), np.full(len(a), -1, np.int32)
        k = a.astype(np.int64) * self.n + b
        if len(k) > 64:
            # long runs of one pair (e.g. "aaaa") are common in long chunks: look each run up once
            starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
            if len(starts) * 4 < len(k):
                rank, merged = self.lookup(a[starts], b[starts])
                lengths = np.diff(np.r_[starts, len(k)])
                return np.repeat(rank, lengths), np.repeat(merged, lengths)
        idx = np.minimum(np.searchsorted(self.keys, k), len(self.keys) - 1)
        hit = self.keys[idx] == k
        return np.where(hit, self.rank[idx], _NONE), np.where(hit, self.merged[idx], -1)


def merge_rounds(ids: np.ndarray, table: PairArrays, pairs: PairTable, first=None) -> list[int]:
    """Same result as `merge` for a long run of ids, in a few whole-array passes.

    Sequential BPE merges the lowest-rank pair, leftmost first. One pass here merges every
    occurrence of the lowest rank r at once (left to right, skipping overlaps as in "aaaa").
    That is what the sequential order does too, unless a merge creates a pair of rank <= r:
    sequential BPE would take that pair next, before the occurrences further right. So the pass
    stops just after the first such merge, and the next pass starts from the lowest rank again.
    A long run of one character needs only a handful of passes. When a pass would merge few
    pairs (text with many distinct pairs), the heap (`_merge_heap`, O(n log n)) finishes the job.
    `first`: the (rank, merged id) arrays of the starting pairs, when the caller has them.
    """
    sym = np.asarray(ids, np.int32)
    if len(sym) < 2:
        return sym.tolist()
    rank, new = first if first is not None else table.lookup(sym[:-1], sym[1:])
    # rank[i], new[i]: the rank and merged id of the pair (sym[i], sym[i+1]); the last has none
    rank, new = np.append(rank, _NONE).astype(np.int32), np.append(new, -1).astype(np.int32)
    while True:
        n = len(sym)
        r = rank.min()
        if r == _NONE:
            return sym.tolist()
        pos = np.flatnonzero(rank == r)
        if len(pos) > 1:  # overlapping occurrences (runs of consecutive positions): every other one
            j = np.arange(len(pos))
            start = np.maximum.accumulate(np.where(np.r_[True, pos[1:] != pos[:-1] + 1], j, 0))
            pos = pos[(j - start) % 2 == 0]
        plan = _plan(sym, pos, new, table, n) if len(pos) * 64 >= n else None
        if plan is not None:
            first_bad = np.flatnonzero((plan[0] <= r) | (plan[1] <= r))
            if len(first_bad):
                pos = pos[:first_bad[0] + 1]
                plan = _plan(sym, pos, new, table, n) if len(pos) * 64 >= n else None
        if plan is None:
            # A pass costs O(n); one that merges fewer than n/64 pairs is not worth it. Every pass
            # taken shrinks the text by n/64 at least, so the passes cost O(n) in all, and the
            # heap finishes in O(n log n) from the exact state reached so far.
            return _merge_heap(sym.tolist(), pairs)
        _, _, after, lp, ok, rl, nl, rb, nb = plan
        sym = after
        rank[lp[ok]], new[lp[ok]] = rl[ok], nl[ok]
        rank[pos], new[pos] = rb, nb
        keep = np.ones(n, bool)
        keep[pos + 1] = False
        sym, rank, new = sym[keep], rank[keep], new[keep]


def _plan(sym, pos, new, table, n):
    """Symbols after merging at `pos`, and the ranks of the pairs those merges create.

    Returns (left rank, right rank as sequential BPE sees it, symbols, left neighbour index,
    has-left mask, left rank/id, right rank/id as this pass leaves it).
    """
    after = sym.copy()
    after[pos] = new[pos]
    sel = np.zeros(n + 2, bool)
    sel[pos] = True
    # left neighbour: p-1, or the merged symbol at p-2 when that pair merged too (p-1 is gone)
    both = sel[np.maximum(pos - 2, 0)] & (pos >= 2)
    lp = np.where(both, pos - 2, pos - 1)
    ok = lp >= 0
    rl = np.full(len(pos), _NONE)
    nl = np.full(len(pos), -1, np.int32)
    rl[ok], nl[ok] = table.lookup(after[lp[ok]], after[pos[ok]])
    # right neighbour: sequential BPE merges at p before anything to its right, so it sees sym[p+2];
    # this pass leaves after[p+2] there, which differs only when p+2 merged too (then its left pair is ours)
    has_r = pos + 2 < n
    rs = np.full(len(pos), _NONE)
    ns = np.full(len(pos), -1, np.int32)
    rs[has_r], ns[has_r] = table.lookup(after[pos[has_r]], sym[pos[has_r] + 2])
    rb, nb = rs.copy(), ns.copy()
    nxt = np.flatnonzero(both) - 1  # k where pos[k + 1] == pos[k] + 2
    rb[nxt], nb[nxt] = rl[nxt + 1], nl[nxt + 1]
    return rl, rs, after, lp, ok, rl, nl, rb, nb


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
        self._arrays: PairArrays | None = None  # built on the first long chunk

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
        if len(raw) > _ROUNDS:
            if self._arrays is None:
                self._arrays = PairArrays.from_table(self.pairs, self.token_bytes, self.encoder)
                ids = np.array([-1 if i is None else i for i in byte_ids], np.int32)
                # every byte pair's (rank, merged id), so a chunk's first pairs are one gather
                a, b = np.divmod(np.arange(1 << 16), 256)
                ok = (ids[a] >= 0) & (ids[b] >= 0)
                r, m = np.full(1 << 16, _NONE), np.full(1 << 16, -1, np.int32)
                r[ok], m[ok] = self._arrays.lookup(ids[a[ok]], ids[b[ok]])
                self._byte_table = (ids, r, m)
            ids, r, m = self._byte_table
            raw8 = np.frombuffer(raw, np.uint8)
            if self.missing_bytes:
                ids = ids[raw8]
                return merge_rounds(ids[ids >= 0], self._arrays, self.pairs)
            k = raw8[:-1].astype(np.int32) * 256 + raw8[1:]
            return merge_rounds(ids[raw8], self._arrays, self.pairs, (r[k], m[k]))
        if self.missing_bytes:
            return merge([byte_ids[b] for b in raw if byte_ids[b] is not None], self.pairs)
        return merge([byte_ids[b] for b in raw], self.pairs)


def _first_ids(token_bytes: Sequence[bytes]) -> dict[bytes, int]:
    enc: dict[bytes, int] = {}
    for i, b in enumerate(token_bytes):
        enc.setdefault(b, i)
    return enc
