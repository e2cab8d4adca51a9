"""The byte-level BPE trainer: same merges as a naive recount, and a tokenizer.json that HF encodes identically."""
from __future__ import annotations

import time
from collections import Counter

import pytest
from hypothesis import given, settings

from tokenizer_fixtures import shakespeare_lines, shakespeare_text, text_strategy

from npllama import Tokenizer
from npllama.tokenizer.pretokenize import GPT2_PATTERN, LLAMA3_PATTERN, regex_splitter
from npllama.tokenizer.trainer import train_bpe


def naive_train(text, n_merges, pattern):
    """minbpe-style reference: recount every pair after every merge."""
    words = Counter(regex_splitter(pattern)(text))
    seqs = {w: list(w.encode()) for w in words}
    merges, nxt = [], 256
    token = {i: bytes([i]) for i in range(256)}
    ids = {bytes([i]): i for i in range(256)}
    for _ in range(n_merges):
        counts = Counter()
        for w, s in seqs.items():
            for p in zip(s, s[1:]):
                counts[p] += words[w]
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        if counts[best] < 2:
            break
        b = token[best[0]] + token[best[1]]
        if b not in ids:
            ids[b] = nxt
            token[nxt] = b
            nxt += 1
        new = ids[b]
        merges.append(best)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


@pytest.mark.parametrize("pattern", [LLAMA3_PATTERN, GPT2_PATTERN], ids=["llama3", "gpt2"])
def test_incremental_counts_equal_naive_recount(pattern):
    text = "".join(shakespeare_lines()[5000:5600]) + " aaaa aaa abab ababab 1234 12341234 naïve naïveté"
    trained = train_bpe(text, 256 + 150, pattern=pattern)
    assert trained.merges == naive_train(text, 150, pattern)


@pytest.fixture(scope="module")
def shakespeare_bpe(tmp_path_factory):
    text = shakespeare_text()
    t0 = time.perf_counter()
    trained = train_bpe(text, 2048, special_tokens=["<|endoftext|>", "<|pad|>"])
    seconds = time.perf_counter() - t0
    path = trained.save(str(tmp_path_factory.mktemp("bpe")))
    return trained, path, seconds, len(text.encode()) / 1e6


def test_trains_fast_and_full(shakespeare_bpe):
    trained, _, seconds, mb = shakespeare_bpe
    assert mb > 5 and seconds < 60, f"{mb:.1f} MB took {seconds:.1f} s"
    assert trained.vocab_size == 2048 and len(set(trained.token_bytes)) == len(trained.token_bytes)


def test_saved_json_encodes_identically_in_hf(shakespeare_bpe):
    tokenizers = pytest.importorskip("tokenizers")
    trained, path, _, _ = shakespeare_bpe
    hf, ours = tokenizers.Tokenizer.from_file(path), Tokenizer.from_pretrained(path)
    assert hf.get_vocab_size() == ours.vocab_size == 2048
    for line in shakespeare_lines()[::3]:
        assert ours.encode(line) == hf.encode(line, add_special_tokens=False).ids, line
    assert trained.tokenizer().encode("To be, or not to be") == ours.encode("To be, or not to be")
    s = "THE END<|endoftext|>"
    assert ours.encode(s, allowed_special="all") == hf.encode(s, add_special_tokens=False).ids
    assert ours.encode(s, allowed_special="all")[-1] == 2046


@settings(max_examples=500, deadline=None)
@given(text_strategy())
def test_saved_json_fuzz_vs_hf(s):
    hf, ours = _small_pair()
    assert ours.encode(s) == hf.encode(s, add_special_tokens=False).ids
    assert ours.decode(ours.encode(s)) == s


_SMALL = {}


def _small_pair():
    """A 600-token vocabulary trained on part of the corpus, loaded by HF and by npllama."""
    if "pair" not in _SMALL:
        import tempfile

        tokenizers = pytest.importorskip("tokenizers")
        trained = train_bpe("".join(shakespeare_lines()[:20000]) + "東京 🦙 ½ naïve", 600)
        path = trained.save(tempfile.mkdtemp())
        _SMALL["pair"] = tokenizers.Tokenizer.from_file(path), Tokenizer.from_pretrained(path)
    return _SMALL["pair"]


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="smaller than 256"):
        train_bpe("abc", 200)


PIPELINES = {
    "gpt2-bytelevel": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "digits-groups": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    "split-merged-with-next": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithNext", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
    "split-merged-with-previous": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "[.,;:!?]"}, "behavior": "MergedWithPrevious", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    "split-contiguous": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "[0-9]"}, "behavior": "Contiguous", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
    "split-invert-removed": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "[A-Za-z]+"}, "behavior": "Removed", "invert": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_generic_pretokenizer_pipelines_vs_hf(name, tmp_path):
    """tokenizer.json pre-tokenizers that are not one of the known patterns run step by step, like HF."""
    import json

    from hypothesis import strategies as st

    tokenizers = pytest.importorskip("tokenizers")
    hf0, _ = _small_pair()
    doc = json.loads(hf0.to_str())
    doc["pre_tokenizer"] = PIPELINES[name]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(doc))
    hf, ours = tokenizers.Tokenizer.from_file(str(path)), Tokenizer.from_pretrained(str(path))
    for line in shakespeare_lines()[:3000:7]:
        assert ours.encode(line) == hf.encode(line, add_special_tokens=False).ids, line

    ascii_text = st.text(st.sampled_from(list("ab cd,.!?19\n\t'")), max_size=30)

    @settings(max_examples=150, deadline=None)
    @given(st.one_of(ascii_text, text_strategy()))
    def check(s):
        assert ours.encode(s) == hf.encode(s, add_special_tokens=False).ids

    check()
