"""SentencePiece BPE (Llama 2 / TinyLlama), as sentencepiece and llama.cpp run it.

Spaces become `▁`, a `▁` is put in front of the text (the dummy prefix), the text is cut into
characters, and adjacent pieces merge while their concatenation is a vocabulary piece, highest
score first (leftmost on ties). A character with no piece falls back to its UTF-8 bytes as
`<0xNN>` tokens, or to the unknown token when the vocabulary has no byte tokens.
"""
from __future__ import annotations

import re

from .bpe import PairTable, merge

SPACE = "\u2581"  # ▁
# A piece made of ▁s then no ▁ ("▁the", "▁▁", "ing"): if every piece looks like this, no merge can
# join a non-▁ character to a following ▁, so the text can be cut there and the cuts cached.
_WORD_SHAPE = re.compile(SPACE + "*[^" + SPACE + "]*")
_WORDS = re.compile(SPACE + "+[^" + SPACE + "]*|[^" + SPACE + "]+")


class ScorePairTable(dict):
    """sentencepiece's rule: (a, b) merges if a+b is a mergeable piece; rank = -score. Filled lazily."""

    def __init__(self, piece_ids: dict[str, int], scores: list[float]):
        super().__init__()
        self._ids = piece_ids
        self._scores = scores

    def __missing__(self, key):
        s = key[0] + key[1]
        i = self._ids.get(s)
        value = None if i is None else (-self._scores[i], s)
        self[key] = value
        return value


class SentencePieceBPE:
    """Merges over characters; `pairs` is a ScorePairTable (GGUF / .model) or a merges PairTable (tokenizer.json)."""

    def __init__(self, piece_ids: dict[str, int], pairs: PairTable, byte_ids: list[int] | None,
                 unk_id: int | None, prefix: str = "always", fuse_unk: bool = False, prefix_unless_space: bool = False):
        self.piece_ids = piece_ids  # mergeable pieces only (no control / byte tokens)
        self.pairs = pairs
        self.byte_ids = byte_ids
        self.unk_id = unk_id
        self.prefix = prefix  # "always": before every text run; "first": only at the start of the input; "never"
        self.fuse_unk = fuse_unk
        self.prefix_unless_space = prefix_unless_space  # HF Metaspace: no prefix if the text starts with a space
        self.cache: dict[str, list[int]] | None = (
            {} if not fuse_unk and all(_WORD_SHAPE.fullmatch(p) for p in piece_ids) else None)

    def encode(self, text: str, at_start: bool = True) -> list[int]:
        """Token ids for one run of plain text (no special tokens inside)."""
        if not text:
            return []
        s = text.replace(" ", SPACE)
        if self.prefix == "always" or (self.prefix == "first" and at_start):
            if not (self.prefix_unless_space and s[0] == SPACE):
                s = SPACE + s
        if self.cache is None:
            return self._encode_word(s)
        cache, out = self.cache, []
        for w in _WORDS.findall(s):
            ids = cache.get(w)
            if ids is None:
                if len(cache) >= 1 << 20:
                    cache.clear()
                ids = cache[w] = self._encode_word(w)
            out += ids
        return out

    def _encode_word(self, s: str) -> list[int]:
        pieces = merge(list(s), self.pairs)
        ids = self.piece_ids
        out: list[int] = []
        for p in pieces:
            i = ids.get(p)
            if i is not None:
                out.append(i)
            elif self.byte_ids is not None:
                out.extend(self.byte_ids[b] for b in p.encode("utf-8"))
            elif self.unk_id is None:
                raise ValueError(f"character {p!r} is not in the vocabulary and there is no unknown token")
            elif not (self.fuse_unk and out and out[-1] == self.unk_id):
                out.append(self.unk_id)
        return out
