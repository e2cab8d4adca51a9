"""Long inputs: one pre-tokenizer chunk of 20-200 KB must give the reference ids, quickly.

A run of one character (or of letters, spaces, punctuation) is a single chunk, which used to
make the merge loop quadratic. npllama merges long chunks in whole-array rounds (see
bpe.merge_rounds); these tests compare against tiktoken, HF tokenizers and sentencepiece, and
check merge_rounds against a plain lowest-rank-first loop on small random tables whose ranks
are out of order (where a merge creates a pair of lower rank than its own).
"""
from __future__ import annotations

import random
import time

import numpy as np
import pytest

from tokenizer_fixtures import LLAMA_BPE, LLAMA_SPM, hf_smollm2, npl, sentencepiece_llama2, smollm2_path, tiktoken_llama3

from npllama.tokenizer import bpe


def _mixed(alphabet: str, n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(n))


LONG = {
    "one letter": "a" * 100_000,
    "one capital": "Q" * 50_000,
    "spaces": " " * 100_000,
    "newlines": "\n" * 50_000,
    "tabs and spaces": " \t" * 30_000,
    "one punctuation": "!" * 60_000,
    "one accented letter": "é" * 40_000,
    "one CJK character": "中" * 20_000,
    "two letters": "ab" * 50_000,
    "long word": "abcdefghij" * 5_000,
    "digits": "1234567890" * 10_000,
    "one digit": "7" * 60_000,
    "random letters": _mixed("abcdefghijklmnopqrstuvwxyz", 20_000, 1),
    "random aeiou": _mixed("aeiou", 40_000, 2),
    "random whitespace": _mixed(" \t\n", 30_000, 3),
    "random letters and spaces": _mixed("ab  c", 60_000, 4),
    "random punctuation": _mixed("!?.,;:-", 30_000, 5),
    "random digits": _mixed("0123456789", 30_000, 6),
}


@pytest.mark.parametrize("name", list(LONG))
def test_llama3_long_runs_match_tiktoken(name):
    s = LONG[name]
    tok = npl(LLAMA_BPE)
    tok.model.cache.clear()
    assert tok.encode(s) == tiktoken_llama3().encode_ordinary(s)


@pytest.mark.parametrize("name", list(LONG))
def test_smollm2_long_runs_match_hf(name):
    s = LONG[name]
    tok = npl(smollm2_path())
    tok.model.cache.clear()
    assert tok.encode(s) == hf_smollm2().backend_tokenizer.encode(s, add_special_tokens=False).ids


SPM_LONG = ["one letter", "spaces", "one punctuation", "two letters", "digits", "random aeiou",
            "random letters and spaces", "one accented letter"]


@pytest.mark.parametrize("name", SPM_LONG)
def test_sentencepiece_long_runs_match(name):
    s = LONG[name][:20_000]
    assert npl(LLAMA_SPM).encode(s) == sentencepiece_llama2().encode(s)


def test_long_run_is_fast():
    """200 KB of one letter in well under the 56 s/4 MB rate of the quadratic loop (a loose bound: shared CI)."""
    tok = npl(LLAMA_BPE)
    tok.encode("b" * 5000)  # builds the pair arrays once
    tok.model.cache.clear()
    t = time.perf_counter()
    tok.encode("a" * 200_000)
    assert time.perf_counter() - t < 2.0  # the quadratic loop took ~3 s for this


# ---- merge_rounds against the textbook loop --------------------------------------------------
def _reference(symbols, pairs):
    """Lowest rank first, leftmost on ties, one merge at a time (minbpe's loop)."""
    symbols = list(symbols)
    while len(symbols) > 1:
        ranked = [(pairs[(a, b)][0], i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if (a, b) in pairs]
        if not ranked:
            return symbols
        _, i = min(ranked)
        symbols[i:i + 2] = [pairs[(symbols[i], symbols[i + 1])][1]]
    return symbols


@pytest.mark.parametrize("seed", range(30))
def test_merge_rounds_matches_reference_loop(seed):
    rng = random.Random(seed)
    n_base = rng.randint(2, 4)
    pairs, n_ids = bpe.PairTable(), n_base
    for _ in range(rng.randint(3, 25)):  # merged ids get ranks in random order: inversions happen
        a, b = rng.randrange(n_ids), rng.randrange(n_ids)
        if (a, b) not in pairs:
            pairs[(a, b)] = (rng.randrange(30), n_ids)  # ties too
            n_ids += 1
    table = bpe.PairArrays.from_table(pairs, [b""] * n_ids, {})
    length = rng.choice([300, 500])
    run = rng.random() < 0.5
    symbols = [rng.randrange(n_base)] * length if run else [rng.randrange(n_base) for _ in range(length)]
    assert bpe.merge_rounds(np.array(symbols), table, pairs) == _reference(symbols, pairs)
