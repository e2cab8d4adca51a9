"""llama.cpp's tokenizer test vectors (test-tokenizer-0), both vocabularies, exactly."""
from __future__ import annotations

import pytest

from tokenizer_fixtures import LLAMA_BPE, LLAMA_SPM, llamacpp_vectors, npl


@pytest.mark.parametrize("path", [LLAMA_BPE, LLAMA_SPM], ids=["llama-bpe", "llama-spm"])
def test_llamacpp_vectors(path):
    tok = npl(path)
    cases = llamacpp_vectors(path)
    wrong = [(text, tok.encode(text), ids) for text, ids in cases if tok.encode(text) != ids]
    assert not wrong, f"{len(wrong)}/{len(cases)} differ; first: {wrong[0]!r}"


@pytest.mark.parametrize("path", [LLAMA_BPE, LLAMA_SPM], ids=["llama-bpe", "llama-spm"])
def test_llamacpp_vectors_decode(path):
    tok = npl(path)
    for text, ids in llamacpp_vectors(path):
        # SentencePiece decoding drops the dummy-prefix space only: a leading space of the text survives
        assert tok.decode(ids) == text, (text, ids)


def test_vectors_are_not_vacuous():
    """The two vocabularies disagree on every non-empty case, so a test that passes cannot be trivial."""
    bpe, spm = dict(llamacpp_vectors(LLAMA_BPE)), dict(llamacpp_vectors(LLAMA_SPM))
    assert sum(bpe[s] != spm[s] for s in bpe if s) >= 40
    assert npl(LLAMA_BPE).encode("Hello world") == [9906, 1917]
    assert npl(LLAMA_SPM).encode("Hello world") == [15043, 3186]
