"""Token-for-token parity with the reference tokenizers.

- llama-bpe vocabulary vs a tiktoken.Encoding built from it (ranks = ids, Llama 3's pattern)
- SmolLM2 (GGUF, pre = smollm) vs Hugging Face tokenizers via transformers
- llama-spm vocabulary vs the sentencepiece library (ModelProto written from the GGUF)
on every distinct line of the Shakespeare corpus and on hypothesis strings.
"""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from tokenizer_fixtures import (LLAMA_BPE, LLAMA_SPM, hf_smollm2, npl, sentencepiece_llama2, shakespeare_lines,
                                smollm2_path, text_strategy, tiktoken_llama3)

FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _first_mismatch(lines, ours, ref):
    for line in lines:
        a, b = ours(line), ref(line)
        if a != b:
            return line, a, b
    return None


# ---- Llama 3 (llama-bpe) vs tiktoken -------------------------------------------------------
def test_llama3_shakespeare_vs_tiktoken():
    enc, tok = tiktoken_llama3(), npl(LLAMA_BPE)
    lines = shakespeare_lines()
    assert _first_mismatch(lines, tok.encode, enc.encode_ordinary) is None
    text = "".join(lines[:3000])  # and as one long text, where chunks cross line ends
    assert tok.encode(text) == enc.encode_ordinary(text)


@FUZZ
@given(text_strategy())
def test_llama3_fuzz_vs_tiktoken(s):
    assert npl(LLAMA_BPE).encode(s) == tiktoken_llama3().encode_ordinary(s)


def test_llama3_special_tokens_vs_tiktoken():
    enc, tok = tiktoken_llama3(), npl(LLAMA_BPE)
    s = "<|begin_of_text|>Hi<|eot_id|> there<|start_header_id|>"
    assert tok.encode(s) == enc.encode_ordinary(s)  # default: plain text
    assert tok.encode(s, allowed_special="all") == enc.encode(s, allowed_special="all")
    assert tok.encode(s, allowed_special={"<|eot_id|>"}) == enc.encode(s, allowed_special={"<|eot_id|>"}, disallowed_special=())


# ---- SmolLM2 vs Hugging Face tokenizers ----------------------------------------------------
def _hf_ids(hf):
    backend = hf.backend_tokenizer
    return lambda s: backend.encode(s, add_special_tokens=False).ids


def test_smollm2_shakespeare_vs_hf():
    tok, hf = npl(smollm2_path()), hf_smollm2()
    assert _first_mismatch(shakespeare_lines(), tok.encode, _hf_ids(hf)) is None


@FUZZ
@given(text_strategy())
def test_smollm2_fuzz_vs_hf(s):
    assert npl(smollm2_path()).encode(s) == _hf_ids(hf_smollm2())(s)


def test_smollm2_digits_split_one_by_one():
    """llama.cpp's `smollm` pre-tokenizer splits digits; transformers' GGUF conversion forgets to."""
    tok = npl(smollm2_path())
    ids = tok.encode("In 1603, 42 kings")
    digits = [tok.id_to_token(i) for i in ids if tok.id_to_token(i).strip("Ġ").isdigit()]
    assert digits == ["1", "6", "0", "3", "4", "2"]
    # whitespace before a digit is where the pipelines part: the digit ends the text ByteLevel sees
    s = "        1. Then  42"
    ours = [tok.id_to_token(i) for i in tok.encode(s)]
    assert ours == ["ĠĠĠĠĠĠĠĠ", "1", ".", "ĠThen", "ĠĠ", "4", "2"]
    assert tok.encode(s) == _hf_ids(hf_smollm2())(s)
    assert tok.encode(s) != _hf_ids(hf_smollm2(patched=False))(s)  # the unpatched conversion is the wrong reference


# ---- Llama 2 (llama-spm) vs sentencepiece --------------------------------------------------
def test_llama2_shakespeare_vs_sentencepiece():
    sp, tok = sentencepiece_llama2(), npl(LLAMA_SPM)
    lines = shakespeare_lines()[::2]  # half: sentencepiece itself is the slow side here
    assert _first_mismatch(lines, tok.encode, sp.encode) is None


@settings(max_examples=800, deadline=None)
@given(text_strategy())
def test_llama2_fuzz_vs_sentencepiece(s):
    assert npl(LLAMA_SPM).encode(s) == sentencepiece_llama2().encode(s)


# ---- round trips ---------------------------------------------------------------------------
@FUZZ
@given(text_strategy())
def test_roundtrip_llama3(s):
    tok = npl(LLAMA_BPE)
    assert tok.decode(tok.encode(s)) == s


@FUZZ
@given(text_strategy())
def test_roundtrip_smollm2(s):
    tok = npl(smollm2_path())
    missing = tok.model.missing_bytes  # SmolLM2 has no token for a few bytes; those are dropped, as HF does
    if any(b in missing for b in s.encode()):
        return
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=300, deadline=None)
@given(text_strategy())
def test_roundtrip_llama2(s):
    tok = npl(LLAMA_SPM)
    assert tok.decode(tok.encode(s)) == s  # byte fallback keeps every character


def test_llama3_whole_chunk_lookup():
    """588 Llama 3 tokens cannot be reached by merges; llama-bpe (like tiktoken) looks the chunk up first."""
    tok, enc = npl(LLAMA_BPE), tiktoken_llama3()
    for word, token_id in [(" việc", 100769), (" Việt", 101798), ("ektedir", 101673), (" ایران", 101848)]:
        assert tok.encode(word) == enc.encode_ordinary(word) == [token_id]
        assert tok.model.encode_chunk(word) == [token_id]
        tok.model.whole_chunk_lookup = False
        try:
            assert tok.model.encode_chunk(word) != [token_id]  # merges alone give something else
        finally:
            tok.model.whole_chunk_lookup = True


def _mostly_ascii():
    from hypothesis import strategies as st

    return st.lists(st.one_of(st.sampled_from(["the ", "King", " 42", ".\n", "  ", "\n\n", "'s ", "?! ", "\t"]),
                              text_strategy()), max_size=20).map("".join)


@settings(max_examples=700, deadline=None)
@given(_mostly_ascii())
def test_fast_splitter_is_exact(s):
    """The ASCII fast path cuts the text only where the full pattern's chunks would end anyway."""
    import regex

    from npllama.tokenizer.pretokenize import DIGITS_GPT2_PATTERN, GPT2_PATTERN, LLAMA3_PATTERN, regex_splitter

    for pattern in (LLAMA3_PATTERN, GPT2_PATTERN, DIGITS_GPT2_PATTERN):
        assert regex_splitter(pattern)(s) == regex.compile(pattern).findall(s)


def test_digits_pattern_equals_two_stage_split():
    """SmolLM2's one-pattern pre-split equals the two steps (isolate digits, then GPT-2's pattern)."""
    import regex
    from hypothesis import given as g

    from npllama.tokenizer.pretokenize import DIGITS_GPT2_PATTERN, GPT2_PATTERN

    def two_stage(s):
        return [c for piece in regex.split(r"(\p{N})", s) if piece for c in regex.findall(GPT2_PATTERN, piece)]

    @settings(max_examples=700, deadline=None)
    @g(_mostly_ascii())
    def check(s):
        assert regex.findall(DIGITS_GPT2_PATTERN, s) == two_stage(s)

    check()
