"""The merge loop itself: the short (rescan) and long (heap) versions against the textbook rule."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from npllama.tokenizer.bpe import BYTE_TO_UNICODE, UNICODE_TO_BYTE, PairTable, _merge_heap, merge, unicode_to_bytes


def textbook(symbols, pairs):
    """Merge the lowest-rank adjacent pair, leftmost on ties, one at a time, until none is left."""
    symbols = list(symbols)
    while True:
        cands = [(pairs[(a, b)][0], i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if pairs[(a, b)]]
        if not cands:
            return symbols
        _, i = min(cands)
        symbols[i:i + 2] = [pairs[(symbols[i], symbols[i + 1])][1]]


@st.composite
def merge_problem(draw):
    n_base = draw(st.integers(2, 4))
    table, next_id = PairTable(), n_base
    for _ in range(draw(st.integers(0, 12))):
        a, b = draw(st.integers(0, next_id - 1)), draw(st.integers(0, next_id - 1))
        if (a, b) not in table:
            rank = draw(st.integers(0, 5))  # small ranks: many ties
            table[(a, b)] = (rank, next_id)
            next_id += 1
    seq = draw(st.lists(st.integers(0, n_base - 1), max_size=120))
    return seq, table


@settings(max_examples=2000, deadline=None)
@given(merge_problem())
def test_merge_versions_agree_with_textbook(problem):
    seq, table = problem
    want = textbook(seq, table)
    assert merge(list(seq), table) == want
    assert _merge_heap(list(seq), table) == want


def test_gpt2_byte_alphabet():
    assert len(BYTE_TO_UNICODE) == 256 == len(set(BYTE_TO_UNICODE.values()))
    assert BYTE_TO_UNICODE[ord(" ")] == "Ġ" and BYTE_TO_UNICODE[ord("\n")] == "Ċ" and BYTE_TO_UNICODE[ord("a")] == "a"
    assert all(UNICODE_TO_BYTE[c] == b for b, c in BYTE_TO_UNICODE.items())
    assert unicode_to_bytes("Ġhello") == b" hello" and unicode_to_bytes("<|x|> y") is None
