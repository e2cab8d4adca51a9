"""Train a byte-level BPE vocabulary on a corpus, and save it as a Hugging Face tokenizer.json.

Like minbpe: split the text into chunks with the pre-tokenizer pattern, start from the 256
bytes, and repeatedly merge the most frequent adjacent pair into a new token. The corpus is
counted once as {chunk: frequency}, and pair counts are kept up to date incrementally: a merge
only touches the chunks that contain its pair, so training is seconds, not hours.
"""
from __future__ import annotations

import heapq
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .bpe import BYTE_TO_UNICODE
from .pretokenize import LLAMA3_PATTERN, regex_splitter


@dataclass
class TrainedBPE:
    """The result of training: byte strings per id, merges in rank order, special tokens after them."""

    token_bytes: list[bytes]
    merges: list[tuple[int, int]]
    special_tokens: list[str] = field(default_factory=list)
    pattern: str = LLAMA3_PATTERN

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self.token_bytes) + len(self.special_tokens)

    def to_json(self) -> dict:
        """The tokenizer.json document (BPE model, Split + ByteLevel pre-tokenizer, ByteLevel decoder)."""
        u = lambda b: "".join(BYTE_TO_UNICODE[x] for x in b)  # noqa: E731
        n = len(self.token_bytes)
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": n + k, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for k, s in enumerate(self.special_tokens)],
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {u(b): i for i, b in enumerate(self.token_bytes)},
                      "merges": [[u(self.token_bytes[a]), u(self.token_bytes[b])] for a, b in self.merges]},
        }

    def save(self, path: str) -> str:
        """Write tokenizer.json (into `path` if it is a directory); return the file written."""
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, ensure_ascii=False)
        return path

    def tokenizer(self):
        """A npllama Tokenizer for this vocabulary (the same one `save` + from_pretrained gives)."""
        from .loaders import tokenizer_from_json

        return tokenizer_from_json(self.to_json(), "<trained BPE>")


def train_bpe(text: str | Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (),
              pattern: str = LLAMA3_PATTERN, min_frequency: int = 2) -> TrainedBPE:
    """Learn byte-level BPE merges until the vocabulary (bytes + merges + specials) has vocab_size ids."""
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is smaller than 256 bytes + {len(special_tokens)} special tokens")
    split = regex_splitter(pattern)
    counts: Counter = Counter()
    for t in ([text] if isinstance(text, str) else text):
        counts.update(split(t))

    words = [list(chunk.encode("utf-8")) for chunk in counts]
    freq = list(counts.values())
    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> chunks that (may) hold it
    for wi, w in enumerate(words):
        for p in zip(w, w[1:]):
            pair_count[p] += freq[wi]
            where[p].add(wi)
    # max-heap by count, ties to the smallest pair; entries may be stale (counts only fall meanwhile)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)

    token_bytes = [bytes([b]) for b in range(256)]
    ids = {b: i for i, b in enumerate(token_bytes)}
    merges: list[tuple[int, int]] = []
    while len(token_bytes) < 256 + n_merges and heap:
        negc, pair = heapq.heappop(heap)
        c = pair_count.get(pair, 0)
        if -negc != c:
            if c > 0:
                heapq.heappush(heap, (-c, pair))
            continue
        if c < min_frequency:
            break
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        new = ids.get(merged)
        if new is None:  # two merges can spell the same bytes; they share one id, as in HF's trainer
            new = ids[merged] = len(token_bytes)
            token_bytes.append(merged)
        merges.append(pair)
        grown = set()
        for wi in where.pop(pair):
            w = words[wi]
            if len(w) < 2:
                continue
            nw = _merge_word(w, pair, new)
            if nw is None:
                continue  # stale: the pair had already left this chunk
            f = freq[wi]
            for p in zip(w, w[1:]):
                pair_count[p] -= f
            for p in zip(nw, nw[1:]):
                pair_count[p] += f
                where[p].add(wi)
                if new in p:
                    grown.add(p)
            words[wi] = nw
        pair_count.pop(pair, None)
        for p in grown:
            heapq.heappush(heap, (-pair_count[p], p))
    return TrainedBPE(token_bytes, merges, list(special_tokens), pattern)


def _merge_word(w: list[int], pair: tuple[int, int], new: int) -> list[int] | None:
    """w with every occurrence of `pair` (left to right) replaced by `new`; None if there is none."""
    a, b = pair
    out, i, n, hit = [], 0, len(w), False
    while i < n:
        if i + 1 < n and w[i] == a and w[i + 1] == b:
            out.append(new)
            i += 2
            hit = True
        else:
            out.append(w[i])
            i += 1
    return out if hit else None
