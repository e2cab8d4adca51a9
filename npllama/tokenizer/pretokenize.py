"""Pre-tokenization: cut text into chunks that BPE merges never cross.

The patterns are the ones the reference tokenizers use; they are compiled with the `regex`
module, whose \\s, \\p{L} and \\p{N} follow the Unicode properties as Rust's regex does.
A tokenizer.json pipeline (Split / ByteLevel / Digits / Sequence; Metaspace
belongs to the SentencePiece model) is mapped onto one compiled
pattern when it is one of the known shapes, and run step by step otherwise.
"""
from __future__ import annotations

from typing import Callable

import re

import regex

# GPT-2 (and the ByteLevel pre-tokenizer of HF tokenizers with use_regex=true)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Llama 3 (tiktoken cl100k-like; digits in groups of up to three, newlines kept apart)
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# SmolLM2 / StarCoder: every digit is its own chunk, then GPT-2's pattern on the rest.
# Folded into one pattern: a digit ends the text the GPT-2 pattern sees, so whitespace right
# before a digit is taken whole (as `\s+(?!\S)` would at the end of a segment).
DIGITS_GPT2_PATTERN = (
    r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
)

# The same three patterns for pure-ASCII text, where \p{L} is [A-Za-z], \p{N} is [0-9] and \s is
# [ \t\n\r\f\v]: the standard `re` module runs them about twice as fast as `regex` runs the originals.
_ASCII_TWINS = {
    LLAMA3_PATTERN: r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{1,3}"""
                    r"""| ?[^\sA-Za-z0-9]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    GPT2_PATTERN: r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""",
    DIGITS_GPT2_PATTERN: r"""[0-9]|'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[^\sA-Za-z0-9]+|\s+(?=[0-9])|\s+(?!\S)|\s+""",
}
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")

# tokenizer.ggml.pre -> (pattern, whole-chunk lookup before merges)
GGUF_PRE = {
    "llama-bpe": (LLAMA3_PATTERN, True),
    "llama3": (LLAMA3_PATTERN, True),
    "gpt2": (GPT2_PATTERN, False),
    "default": (GPT2_PATTERN, False),
    "mpt": (GPT2_PATTERN, False),
    "olmo": (GPT2_PATTERN, False),
    "smollm": (DIGITS_GPT2_PATTERN, False),
    "starcoder": (DIGITS_GPT2_PATTERN, False),
    "refact": (DIGITS_GPT2_PATTERN, False),
    "codeshell": (DIGITS_GPT2_PATTERN, False),
}

Splitter = Callable[[str], list]


def regex_splitter(pattern: str) -> Splitter:
    """A splitter that returns every match of `pattern` (the pattern must cover all text)."""
    if pattern in _ASCII_TWINS:
        return AsciiFastSplitter(pattern)
    return regex.compile(pattern).findall


class AsciiFastSplitter:
    """findall of a known pattern, with ASCII stretches of the text run by its faster ASCII twin.

    Cutting the text is exact at a position b where text[b] is a space and text[b-1] is not
    whitespace: in all three patterns no chunk holds a non-space followed by a space, and no
    chunk that ends at b looks ahead. So each non-ASCII run is widened to such cut points on
    both sides and matched with the full pattern; everything between is ASCII.
    """

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.full = regex.compile(pattern).findall
        self.fast = re.compile(_ASCII_TWINS[pattern], re.ASCII).findall

    def __call__(self, text: str) -> list:
        if text.isascii():
            return self.fast(text)
        out: list = []
        pos, n = 0, len(text)
        for m in _NON_ASCII.finditer(text):
            if m.end() <= pos:
                continue
            a = _cut_before(text, pos, m.start())
            b = _cut_after(text, m.end(), n)
            if a > pos:
                out += self.fast(text[pos:a])
            out += self.full(text[a:b])
            pos = b
            if len(out) > 64 and 4 * (b - a) > n:  # mostly non-ASCII text: no gain, finish plainly
                break
        if pos < n:
            out += self.fast(text[pos:]) if text[pos:].isascii() else self.full(text[pos:])
        return out


def _cut_before(text: str, lo: int, i: int) -> int:
    """Largest cut point in [lo, i] (lo itself if none)."""
    j = text.rfind(" ", lo, i + 1)
    while j > lo:
        if not text[j - 1].isspace():
            return j
        j = text.rfind(" ", lo, j)
    return lo


def _cut_after(text: str, i: int, n: int) -> int:
    """Smallest cut point in [i, n] (n if none)."""
    j = text.find(" ", i)
    while j != -1:
        if not text[j - 1].isspace():
            return j
        j = text.find(" ", j + 1)
    return n


def _split_keep(pattern: "regex.Pattern", behavior: str, invert: bool) -> Callable[[str], list]:
    """HF `Split`: matches and the gaps between them, combined as `behavior` says."""
    behavior = behavior.lower()

    def split(piece: str) -> list:
        spans, last = [], 0  # (text, is_match)
        for m in pattern.finditer(piece):
            if m.start() > last:
                spans.append((piece[last:m.start()], False))
            if m.end() > m.start():
                spans.append((m.group(), True))
            last = m.end()
        if last < len(piece):
            spans.append((piece[last:], False))
        if invert:
            spans = [(s, not d) for s, d in spans]
        out: list = []
        if behavior == "removed":
            return [s for s, d in spans if not d]
        if behavior == "isolated":
            return [s for s, _ in spans]
        # a delimiter joins its neighbour only when that neighbour is not a delimiter itself
        if behavior == "mergedwithprevious":
            prev_match = False
            for s, d in spans:
                if d and out and not prev_match:
                    out[-1] += s
                else:
                    out.append(s)
                prev_match = d
            return out
        if behavior == "mergedwithnext":
            next_match = False
            for s, d in reversed(spans):
                if d and out and not next_match:
                    out[-1] = s + out[-1]
                else:
                    out.append(s)
                next_match = d
            return out[::-1]
        if behavior == "contiguous":
            for s, d in spans:
                if out and d and out[-1][1]:
                    out[-1] = (out[-1][0] + s, True)
                else:
                    out.append((s, d))
            return [s for s, _ in out]
        raise ValueError(f"unknown Split behavior {behavior!r}")

    return split


_BEHAVIORS = ("removed", "isolated", "mergedwithprevious", "mergedwithnext", "contiguous")


def pipeline_splitter(steps: list[Callable[[str], list]]) -> Splitter:
    """Run split steps one after the other, each on every piece the previous one made."""

    def split(text: str) -> list:
        pieces = [text]
        for step in steps:
            pieces = [p for piece in pieces for p in step(piece)]
        return [p for p in pieces if p]

    return split


def from_hf_pretokenizer(spec: dict | None) -> tuple[Splitter | None, bool]:
    """Map a tokenizer.json `pre_tokenizer` to (splitter, byte_level); None splitter = whole text."""
    if spec is None:
        return None, False
    items = spec.get("pretokenizers") if spec.get("type") == "Sequence" else [spec]
    if not isinstance(items, list):
        raise ValueError("pre_tokenizer Sequence has no 'pretokenizers' list")
    kinds = []
    for k, it in enumerate(items):
        if not isinstance(it, dict):
            raise ValueError(f"pre_tokenizer #{k} {it!r:.60} is not an object")
        t = it.get("type")
        flags = {f: it[f] for f in ("invert", "use_regex", "add_prefix_space", "individual_digits") if f in it}
        for f, v in flags.items():
            if not isinstance(v, bool):
                raise ValueError(f"pre_tokenizer {t!r:.40} {f} is {v!r:.40}, not true or false")
        if t == "Split":
            pat = it.get("pattern", {})
            src = pat.get("Regex") if isinstance(pat, dict) and "Regex" in pat else (
                regex.escape(pat["String"]) if isinstance(pat, dict) and isinstance(pat.get("String"), str) else None)
            if not isinstance(src, str):
                raise ValueError(f"pre_tokenizer Split pattern {pat!r:.60} is not {{'Regex': str}} or {{'String': str}}")
            behavior = it.get("behavior", "Isolated")
            if not isinstance(behavior, str) or behavior.lower() not in _BEHAVIORS:
                raise ValueError(f"pre_tokenizer Split behavior {behavior!r:.40} is not supported")
            try:
                regex.compile(src)
            except regex.error as e:
                raise ValueError(f"pre_tokenizer Split pattern {src!r:.60} is not a valid regex ({e})") from None
            kinds.append(("split", src, behavior, it.get("invert", False)))
        elif t == "ByteLevel":
            kinds.append(("bytelevel", it.get("use_regex", True), it.get("add_prefix_space", False)))
        elif t == "Digits":
            kinds.append(("digits", it.get("individual_digits", False)))
        else:
            raise ValueError(f"unsupported pre_tokenizer type {t!r:.40}")
    byte_level = any(k[0] == "bytelevel" for k in kinds)
    if any(k[0] == "bytelevel" and k[2] for k in kinds):
        raise ValueError("ByteLevel add_prefix_space=true is not supported")
    # Known shapes compile to one pattern (fast path).
    shape = [(k[0], k[1] if k[0] != "split" else k[2].lower() == "isolated" and not k[3]) for k in kinds]
    if shape == [("bytelevel", True)]:
        return regex_splitter(GPT2_PATTERN), True
    if shape == [("digits", True), ("bytelevel", True)]:
        return regex_splitter(DIGITS_GPT2_PATTERN), True
    if shape == [("split", True), ("bytelevel", False)] and kinds[0][1] in (LLAMA3_PATTERN, GPT2_PATTERN):
        return regex_splitter(kinds[0][1]), True
    steps = []
    for k in kinds:
        if k[0] == "split":
            steps.append(_split_keep(regex.compile(k[1]), k[2], k[3]))
        elif k[0] == "bytelevel":
            if k[1]:
                steps.append(regex.compile(GPT2_PATTERN).findall)
        elif k[0] == "digits":
            steps.append(_split_keep(regex.compile(r"\p{N}" if k[1] else r"\p{N}+"), "isolated", False))
    return pipeline_splitter(steps), byte_level
