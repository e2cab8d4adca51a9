"""Tokenizer API: special tokens, ids, errors, streaming, and every loader path."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys

import pytest
from hypothesis import given, settings

from tokenizer_fixtures import (LLAMA_BPE, LLAMA_SPM, ROOT, gguf_meta, hf_from_gguf, hf_smollm2, llamacpp_vectors, npl,
                                sentencepiece_model_bytes, shakespeare_lines, smollm2_path, text_strategy,
                                tiktoken_llama3)

from npllama import Tokenizer
from npllama.tokenizer import TokenizerError


# ---- special tokens ------------------------------------------------------------------------
def test_special_text_is_plain_by_default():
    tok = npl(LLAMA_BPE)
    ids = tok.encode("<|eot_id|>")
    assert 128009 not in ids and len(ids) > 1
    assert tok.encode("<|eot_id|>", allowed_special="all") == [128009]
    assert tok.encode("a<|eot_id|>b<|begin_of_text|>", allowed_special={"<|eot_id|>"}) == \
        tok.encode("a") + [128009] + tok.encode("b<|begin_of_text|>")


def test_special_tokens_sentencepiece_follow_llamacpp_and_hf():
    tok, hf = npl(LLAMA_SPM), hf_from_gguf("llama-spm")
    for s in ["<s>", "a<s>b", "Hi</s><s> [INST] x", "<unk>x", " <s>"]:
        assert tok.encode(s, allowed_special="all") == hf.encode(s, add_special_tokens=False), s
    assert 1 not in tok.encode("<s>")


def test_unknown_allowed_special_is_an_error():
    with pytest.raises(TokenizerError, match="<nope>"):
        npl(LLAMA_BPE).encode("x", allowed_special={"<nope>"})


def test_bos_eos_and_ids():
    tok = npl(LLAMA_BPE)
    assert tok.vocab_size == 128256 and tok.bos_id == 128000 and tok.eos_id == 128001
    assert tok.encode("Hi", bos=True, eos=True) == [128000, 13347, 128001]
    assert 128009 in tok.eos_ids and 128001 in tok.eos_ids
    assert tok.id_to_token(9906) == "Hello" and tok.token_to_id("Hello") == 9906
    spm = npl(LLAMA_SPM)
    assert (spm.vocab_size, spm.bos_id, spm.eos_id, spm.eos_ids) == (32000, 1, 2, [2])
    assert spm.encode("Hello", bos=True) == [1, 15043]
    smol = npl(smollm2_path())
    assert smol.vocab_size == 49152 and smol.tokens[2] == "<|im_end|>" and 2 in smol.eos_ids and 0 in smol.eos_ids


def test_lone_surrogates_replaced_like_tiktoken():
    s = "a\ud800b"
    assert npl(LLAMA_BPE).encode(s) == tiktoken_llama3().encode_ordinary(s)


# ---- decoding and errors on ids ------------------------------------------------------------
@pytest.mark.parametrize("bad", [128256, -1, 10**9])
def test_decode_out_of_range_names_the_id(bad):
    tok = npl(LLAMA_BPE)
    with pytest.raises(TokenizerError, match=str(bad)):
        tok.decode([1, 2, bad])
    with pytest.raises(TokenizerError, match=str(bad)):
        tok.id_to_token(bad)
    with pytest.raises(TokenizerError, match=str(bad)):
        tok.stream_decoder().push(bad)


def test_decode_skip_special():
    tok = npl(LLAMA_BPE)
    ids = tok.encode("Hi", bos=True, eos=True)
    assert tok.decode(ids) == "<|begin_of_text|>Hi<|end_of_text|>"
    assert tok.decode(ids, skip_special=True) == "Hi"


# ---- streaming -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", [LLAMA_BPE, LLAMA_SPM], ids=["llama-bpe", "llama-spm"])
def test_stream_decoder_emits_whole_characters(path):
    tok = npl(path)
    s = "🦙 llamas say 😶‍🌫️ and 東京 ok"
    ids = tok.encode(s)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids) == s
    assert not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces)  # some ids only held bytes back


@settings(max_examples=300, deadline=None)
@given(text_strategy())
def test_stream_decoder_matches_decode(s):
    for path in (LLAMA_BPE, LLAMA_SPM):
        tok = npl(path)
        ids = tok.encode(s)
        dec = tok.stream_decoder()
        assert "".join([dec.push(i) for i in ids]) + dec.flush() == tok.decode(ids)


# ---- loaders -------------------------------------------------------------------------------
def _vectors_pass(tok, path):
    for text, ids in llamacpp_vectors(path):
        assert tok.encode(text) == ids, text


def test_tokenizer_json_smollm2(tmp_path):
    hf_smollm2().backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    tok, ref = Tokenizer.from_pretrained(str(tmp_path)), npl(smollm2_path())
    for line in shakespeare_lines()[::20]:
        assert tok.encode(line) == ref.encode(line)
    s = "<|im_start|>user 42  x<|im_end|>"
    assert tok.encode(s) == ref.encode(s)
    assert tok.encode(s, allowed_special="all") == hf_smollm2().encode(s, add_special_tokens=False)


def test_tokenizer_json_llama3(tmp_path):
    hf_from_gguf("llama-bpe").backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": "x<|start_header_id|>"}))
    tok = Tokenizer.from_pretrained(str(tmp_path))
    _vectors_pass(tok, LLAMA_BPE)
    assert tok.model.whole_chunk_lookup and tok.bos_id == 128000 and tok.eos_id == 128009
    assert tok.chat_format == "llama3"


@pytest.mark.parametrize("official", [True, False], ids=["prepend-normalizer", "metaspace-first"])
def test_tokenizer_json_llama2(tmp_path, official):
    hf = hf_from_gguf("llama-spm", official)
    hf.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(str(tmp_path / "tokenizer.json"))
    if official:
        _vectors_pass(tok, LLAMA_SPM)
    for s in ["Hello world", " a<s>b", "<s>[INST] Hi [/INST]", "x\n\n  y 🦙", "Ærø"]:
        ids = hf.encode(s, add_special_tokens=False)
        assert tok.encode(s, allowed_special="all") == ids, s
        assert tok.decode(ids) == hf.decode(ids), s


def _write_rank_file(path):
    meta = gguf_meta(LLAMA_BPE)
    from npllama.tokenizer.bpe import unicode_to_bytes

    with open(path, "wb") as f:
        for i, (t, ty) in enumerate(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"])):
            if ty == 1:
                f.write(base64.b64encode(unicode_to_bytes(t)) + b" %d\n" % i)


def test_tiktoken_rank_file(tmp_path):
    _write_rank_file(tmp_path / "tokenizer.model")
    tok = Tokenizer.from_pretrained(str(tmp_path))
    _vectors_pass(tok, LLAMA_BPE)
    ref = npl(LLAMA_BPE)
    assert tok.vocab_size == 128256 and tok.tokens[128009] == "<|eot_id|>" == ref.tokens[128009]
    assert tok.id_to_token(9906) == "Hello"
    for line in shakespeare_lines()[::50]:
        assert tok.encode(line) == ref.encode(line)


def test_sentencepiece_model_file(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model_bytes())
    tok = Tokenizer.from_pretrained(str(tmp_path / "tokenizer.model"))
    assert tok.kind == "sentencepiece" and (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
    _vectors_pass(tok, LLAMA_SPM)


def test_directory_prefers_tokenizer_json_then_model_then_gguf(tmp_path):
    shutil.copy(LLAMA_SPM, tmp_path / "only.gguf")
    assert Tokenizer.from_pretrained(str(tmp_path)).kind == "sentencepiece"
    _write_rank_file(tmp_path / "tokenizer.model")
    assert Tokenizer.from_pretrained(str(tmp_path)).vocab_size == 128256


def test_gguf_reader_matches_gguf_package():
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(LLAMA_SPM)
    ours = gguf_meta(LLAMA_SPM)
    for key, field in r.fields.items():
        if key.startswith("GGUF."):
            continue
        theirs = field.contents()
        if isinstance(theirs, float) or (isinstance(theirs, list) and theirs and isinstance(theirs[0], float)):
            assert ours[key] == pytest.approx(theirs), key
        else:
            assert ours[key] == theirs, key


def test_package_imports_no_reference_library():
    code = ("import sys, npllama; t = npllama.Tokenizer.from_pretrained(%r); t.encode('hi'); "
            "t.apply_chat_template([{'role': 'user', 'content': 'x'}]); "
            "bad = [m for m in ('torch', 'tiktoken', 'tokenizers', 'sentencepiece', 'transformers', 'gguf', 'jinja2') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)") % LLAMA_BPE
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stdout + r.stderr


# ---- malformed and missing files -----------------------------------------------------------
def test_missing_path_is_named(tmp_path):
    p = str(tmp_path / "nope.gguf")
    with pytest.raises(TokenizerError, match="nope.gguf"):
        Tokenizer.from_pretrained(p)
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        Tokenizer.from_pretrained(str(tmp_path))  # empty directory


def test_bad_gguf_files(tmp_path):
    bad_magic = tmp_path / "bad.gguf"
    bad_magic.write_bytes(b"GGML" + b"\0" * 40)
    with pytest.raises(TokenizerError, match=r"bad\.gguf.*not a GGUF"):
        Tokenizer.from_pretrained(str(bad_magic))
    truncated = tmp_path / "cut.gguf"
    with open(LLAMA_SPM, "rb") as f:
        truncated.write_bytes(f.read(200_000))
    with pytest.raises(TokenizerError, match=r"cut\.gguf.*truncated"):
        Tokenizer.from_pretrained(str(truncated))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(TokenizerError, match="empty.gguf"):
        Tokenizer.from_pretrained(str(empty))


def test_gguf_without_tokenizer(tmp_path):
    gguf = pytest.importorskip("gguf")
    p = str(tmp_path / "notok.gguf")
    w = gguf.GGUFWriter(p, "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(TokenizerError, match=r"notok\.gguf.*no tokenizer"):
        Tokenizer.from_pretrained(p)


def test_bad_tokenizer_json(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text("{ not json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json.*not valid JSON"):
        Tokenizer.from_pretrained(str(tmp_path))
    p.write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(TokenizerError, match=r"tokenizer\.json.*Unigram"):
        Tokenizer.from_pretrained(str(p))
    p.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b c"]},
                             "pre_tokenizer": {"type": "ByteLevel"}, "decoder": None}))
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        Tokenizer.from_pretrained(str(p))
    p.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "c": 2}, "merges": []}}))
    with pytest.raises(TokenizerError, match=r"tokenizer\.json.*gaps"):
        Tokenizer.from_pretrained(str(p))


def test_bad_rank_file(tmp_path):
    p = tmp_path / "tokenizer.model"
    p.write_bytes(b"YQ== 0\nYg== 1\n!!notbase64 2\n")
    with pytest.raises(TokenizerError, match=r"tokenizer\.model.*line 3"):
        Tokenizer.from_pretrained(str(p))
    p.write_bytes(b"\x0a\x03garbage that is not a proto")
    with pytest.raises(TokenizerError, match=r"tokenizer\.model"):
        Tokenizer.from_pretrained(str(p))
