"""Bad tokenizer files: each row one malformed input -> a TokenizerError naming the file and the entry.

The inputs are small files written here: a hand-made byte-level tokenizer.json (printable ASCII
plus a few merges), a GGUF vocabulary, a tiktoken rank file and a SentencePiece model.
"""
from __future__ import annotations

import base64
import copy
import json
import math
import os
import struct

import pytest

from npllama import Tokenizer
from npllama.errors import NpllamaError
from npllama.tokenizer import TokenizerError

# ---- a small valid tokenizer.json --------------------------------------------------------------
CHARS = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ"]  # GPT-2's alphabet spells a space 'Ġ'
MERGES = ["h e", "l l", "he ll", "Ġ w"]


def base_json() -> dict:
    vocab = {c: i for i, c in enumerate(CHARS)}
    for m in MERGES:
        vocab[m.replace(" ", "")] = len(vocab)
    return {
        "version": "1.0",
        "added_tokens": [{"id": len(vocab), "content": "<|endoftext|>", "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True, "trim_offsets": True},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab, "merges": list(MERGES), "ignore_merges": False},
    }


def write_json(folder, doc, name="tokenizer.json") -> str:
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_base_json_is_valid(tmp_path):
    doc = base_json()
    write_json(tmp_path, doc)
    tok = Tokenizer.from_pretrained(str(tmp_path))
    v = doc["model"]["vocab"]
    assert tok.encode("hello world") == [v["hell"], v["o"], v["Ġw"], v["o"], v["r"], v["l"], v["d"]]
    assert tok.encode("<|endoftext|>", allowed_special="all") == [len(v)]


def _set(path, value):
    def f(d):
        node = d
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return f


def _del(path):
    def f(d):
        node = d
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]
    return f


def _swap_vocab_id(token, new_id):
    return _set(("model", "vocab", token), new_id)


def _added(entry, where=0):
    def f(d):
        d["added_tokens"].insert(where, entry)
    return f


def _both(*fs):
    def f(d):
        for g in fs:
            g(d)
    return f


N = len(base_json()["model"]["vocab"])  # the added token's id

# (row id, change to the document, text the message must contain besides the file name)
JSON_ROWS = [
    ("vocab id a string", _swap_vocab_id("a", "5"), "model.vocab['a']"),
    ("vocab id a bool", _swap_vocab_id("a", True), "model.vocab['a']"),
    ("vocab id a float", _swap_vocab_id("a", 5.0), "model.vocab['a']"),
    ("vocab id negative", _swap_vocab_id("a", -1), "model.vocab['a']"),
    ("vocab id huge", _swap_vocab_id("a", 10 ** 18), "model.vocab['a']"),
    ("two tokens on one id", _swap_vocab_id("a", 0), "id 0"),
    ("vocab has a gap", _both(_del(("model", "vocab", "Ġw")), _del(("model", "merges", 3))), "dense"),
    ("vocab not an object", _set(("model", "vocab"), [["a", 0]]), "vocab"),
    ("added_tokens not a list", _set(("added_tokens",), {"<|endoftext|>": N}), "added_tokens"),
    ("added token not an object", _added("<x>"), "added_tokens[0]"),
    ("added token without id", _added({"content": "<x>"}), "added_tokens[0]"),
    ("added token id a string", _added({"id": str(N + 1), "content": "<x>"}), "added_tokens[0]"),
    ("added token id a bool", _added({"id": True, "content": "<x>"}), "added_tokens[0]"),
    ("added token id huge", _added({"id": 2 ** 40, "content": "<x>"}), "added_tokens[0]"),
    ("added token content not a string", _added({"id": N + 1, "content": 7}), "added_tokens[0]"),
    ("added token overwrites a vocab id", _added({"id": 0, "content": "<x>"}), "added_tokens[0]"),
    ("added token gives a vocab token another id", _added({"id": N + 1, "content": "a"}), "added_tokens[0]"),
    ("added token declared twice", _added({"id": N, "content": "<|endoftext|>", "special": True}, 1),
     "added_tokens[1]"),
    ("added token special not a bool", _added({"id": N + 1, "content": "<x>", "special": "no"}),
     "added_tokens[0]"),
    ("merges not a list", _set(("model", "merges"), "h e"), "merges"),
    ("merge of three", _set(("model", "merges", 0), "h e l"), "merge #0"),
    ("merge not strings", _set(("model", "merges", 0), ["h", 5]), "merge #0"),
    ("merge token not in vocab", _set(("model", "merges", 1), "l é"), "merge #1"),
    ("merge result not in vocab", _set(("model", "merges", 1), "l o"), "merge #1"),
    ("model type WordPiece", _set(("model", "type"), "WordPiece"), "WordPiece"),
    ("model missing", _del(("model",)), "model"),
    ("ignore_merges a string", _set(("model", "ignore_merges"), "false"), "ignore_merges"),
    ("byte_fallback a string", _set(("model", "byte_fallback"), "false"), "byte_fallback"),
    ("continuing_subword_prefix", _set(("model", "continuing_subword_prefix"), "##"), "continuing_subword_prefix"),
    ("dropout", _set(("model", "dropout"), 0.1), "dropout"),
    ("unk_token not a string", _set(("model", "unk_token"), 3), "unk_token"),
    ("unsupported normalizer", _set(("normalizer",), {"type": "NFKC"}), "NFKC"),
    ("normalizer not an object", _set(("normalizer",), "NFKC"), "normalizer"),
    ("unsupported pre_tokenizer", _set(("pre_tokenizer",), {"type": "Whitespace"}), "Whitespace"),
    ("pre_tokenizer Sequence without a list", _set(("pre_tokenizer",), {"type": "Sequence", "pretokenizers": 3}),
     "pretokenizers"),
    ("pre_tokenizer Split with a bad regex",
     _set(("pre_tokenizer",), {"type": "Sequence", "pretokenizers": [
         {"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated"},
         {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}), "(unclosed"),
    ("pre_tokenizer Split pattern not an object",
     _set(("pre_tokenizer",), {"type": "Sequence", "pretokenizers": [
         {"type": "Split", "pattern": "x", "behavior": "Isolated"}, {"type": "ByteLevel", "use_regex": False}]}),
     "Split pattern"),
    ("ByteLevel use_regex a string", _set(("pre_tokenizer", "use_regex"), "false"), "use_regex"),
    ("Metaspace split a string",
     _both(_set(("pre_tokenizer",), {"type": "Metaspace", "replacement": "▁", "split": "no"}),
           _set(("decoder",), None)), "split"),
]


@pytest.mark.parametrize("change,needle", [r[1:] for r in JSON_ROWS], ids=[r[0] for r in JSON_ROWS])
def test_bad_tokenizer_json(tmp_path, change, needle):
    doc = base_json()
    change(doc)
    path = write_json(tmp_path, doc)
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_pretrained(str(tmp_path))
    assert path in str(e.value) and needle in str(e.value)


# raw-text rows: JSON that the json module parses into something other than what was written
RAW_ROWS = [
    ("duplicate vocab key", lambda s: s.replace('"a": ', '"a": 0, "a": ', 1), "'a'"),
    ("nested 100000 deep", lambda s: "[" * 100_000 + "]" * 100_000, "nested"),
    ("not JSON", lambda s: "\x00\x01garbage", "JSON"),
    ("not UTF-8", lambda s: s.replace('"a"', '"\udcff"', 1), "JSON"),
]


@pytest.mark.parametrize("change,needle", [r[1:] for r in RAW_ROWS], ids=[r[0] for r in RAW_ROWS])
def test_bad_tokenizer_json_text(tmp_path, change, needle):
    text = change(json.dumps(base_json(), ensure_ascii=False))
    path = os.path.join(tmp_path, "tokenizer.json")
    with open(path, "wb") as f:
        f.write(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_pretrained(path)
    assert path in str(e.value) and needle in str(e.value)


# ---- tokenizer_config.json beside it -------------------------------------------------------------
CONFIG_ROWS = [
    ("add_bos_token a string", {"add_bos_token": "false"}, "add_bos_token"),
    ("bos_token a number", {"bos_token": 3}, "bos_token"),
    ("chat_template a number", {"chat_template": 3}, "chat_template"),
    ("config not an object", [1, 2], "tokenizer_config.json"),
]


@pytest.mark.parametrize("cfg,needle", [r[1:] for r in CONFIG_ROWS], ids=[r[0] for r in CONFIG_ROWS])
def test_bad_tokenizer_config(tmp_path, cfg, needle):
    write_json(tmp_path, base_json())
    path = write_json(tmp_path, cfg, "tokenizer_config.json")
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_pretrained(str(tmp_path))
    assert path in str(e.value) and needle in str(e.value)


# ---- files that are not files, too big, or outside the folder ------------------------------------
def _fifo(tmp_path):
    p = os.path.join(tmp_path, "tokenizer.json")
    os.mkfifo(p)
    return str(tmp_path), p


def _dir_as_file(tmp_path):
    p = os.path.join(tmp_path, "tokenizer.json")
    os.mkdir(p)
    return p, p


def _huge(tmp_path):
    p = os.path.join(tmp_path, "tokenizer.json")
    with open(p, "wb") as f:
        f.truncate((1 << 30) + 1)  # sparse: no disk used
    return str(tmp_path), p


def _symlink_out(name):
    def make(tmp_path):
        outside = tmp_path / "elsewhere"
        inner = tmp_path / "model"
        outside.mkdir(), inner.mkdir()
        write_json(outside, base_json(), name)
        if name != "tokenizer.json":
            write_json(inner, base_json())
        if name == "chat_template.jinja":
            write_json(inner, {"bos_token": "<|endoftext|>"}, "tokenizer_config.json")
        os.symlink(outside / name, inner / name)
        return str(inner), str(inner / name)
    return make


def _dev_zero(tmp_path):
    return "/dev/zero", "/dev/zero"


def _dev_zero_json(tmp_path):
    os.symlink("/dev/zero", tmp_path / "x.json")
    return str(tmp_path / "x.json"), str(tmp_path / "x.json")


FILE_ROWS = [
    ("/dev/zero", _dev_zero, "regular file"),
    ("a .json link to /dev/zero", _dev_zero_json, "regular file"),
    ("a FIFO as tokenizer.json", _fifo, "regular file"),
    ("a directory named tokenizer.json", _dir_as_file, "directory"),
    ("a file over 1 GiB", _huge, "1 GiB"),
    ("tokenizer.json linked outside the folder", _symlink_out("tokenizer.json"), "outside"),
    ("tokenizer_config.json linked outside the folder", _symlink_out("tokenizer_config.json"), "outside"),
    ("chat_template.jinja linked outside the folder", _symlink_out("chat_template.jinja"), "outside"),
]


@pytest.mark.parametrize("make,needle", [r[1:] for r in FILE_ROWS], ids=[r[0] for r in FILE_ROWS])
def test_bad_tokenizer_file_kind(tmp_path, make, needle):
    arg, culprit = make(tmp_path)
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_pretrained(arg)
    assert culprit in str(e.value) and needle in str(e.value)


# ---- GGUF vocabularies ---------------------------------------------------------------------------
_U32, _I32, _F32, _BOOL, _STR, _ARR = 4, 5, 6, 7, 8, 9


def _gguf_value(t, v) -> bytes:
    if t == _STR:
        b = v.encode("utf-8")
        return struct.pack("<Q", len(b)) + b
    if t == _ARR:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(_gguf_value(et, x) for x in items)
    return struct.pack({_U32: "<I", _I32: "<i", _F32: "<f", _BOOL: "<?"}[t], v)


def write_gguf(path, kv: dict) -> str:
    """A GGUF v3 file with metadata only: kv maps key -> (type, value)."""
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv))
    for k, (t, v) in kv.items():
        out += _gguf_value(_STR, k) + struct.pack("<I", t) + _gguf_value(t, v)
    with open(path, "wb") as f:
        f.write(out)
    return str(path)


def gguf_bpe() -> dict:
    toks = CHARS + [m.replace(" ", "") for m in MERGES] + ["<|endoftext|>"]
    return {
        "tokenizer.ggml.model": (_STR, "gpt2"),
        "tokenizer.ggml.pre": (_STR, "gpt2"),
        "tokenizer.ggml.tokens": (_ARR, (_STR, toks)),
        "tokenizer.ggml.token_type": (_ARR, (_I32, [1] * (len(toks) - 1) + [3])),
        "tokenizer.ggml.merges": (_ARR, (_STR, list(MERGES))),
        "tokenizer.ggml.bos_token_id": (_U32, len(toks) - 1),
    }


def gguf_spm() -> dict:
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "a", "▁a"]
    types = [2, 3, 3] + [6] * 256 + [1, 1, 1]
    return {
        "tokenizer.ggml.model": (_STR, "llama"),
        "tokenizer.ggml.tokens": (_ARR, (_STR, toks)),
        "tokenizer.ggml.token_type": (_ARR, (_I32, types)),
        "tokenizer.ggml.scores": (_ARR, (_F32, [0.0] * len(toks))),
        "tokenizer.ggml.bos_token_id": (_U32, 1),
    }


def _kv(key, t, v, base=gguf_bpe):
    def make():
        kv = base()
        kv[key] = (t, v)
        return kv
    return make


def _kv_list(key, i, v, base=gguf_bpe):
    def make():
        kv = base()
        t, (et, items) = kv[key]
        items = list(items)
        items[i] = v
        kv[key] = (t, (et, items))
        return kv
    return make


def _deep_array():
    # an array of arrays of ... of strings, 200 levels: the reader must not recurse without bound
    def build(d):
        return (_STR, ["x"]) if d == 0 else (_ARR, [build(d - 1)])
    kv = gguf_bpe()
    kv["general.deep"] = (_ARR, build(200))
    return kv


GGUF_ROWS = [
    ("valid BPE base", gguf_bpe, None),
    ("valid SPM base", gguf_spm, None),
    ("tokens not strings", _kv("tokenizer.ggml.tokens", _ARR, (_I32, [1, 2, 3])), "tokenizer.ggml.tokens[0]"),
    ("token type out of range", _kv_list("tokenizer.ggml.token_type", 5, 9), "token_type[5]"),
    ("token types not ints", _kv("tokenizer.ggml.token_type", _ARR, (_F32, [1.0] * 99)), "token_type[0]"),
    ("one token twice", _kv_list("tokenizer.ggml.tokens", 1, "!"), "tokens[1]"),
    ("bos id out of range", _kv("tokenizer.ggml.bos_token_id", _U32, 10 ** 6), "bos_token_id"),
    ("bos id a bool", _kv("tokenizer.ggml.bos_token_id", _BOOL, True), "bos_token_id"),
    ("bos id a string", _kv("tokenizer.ggml.bos_token_id", _STR, "1"), "bos_token_id"),
    ("GGUF add_bos_token a string", _kv("tokenizer.ggml.add_bos_token", _STR, "false"), "add_bos_token"),
    ("pre not a string", _kv("tokenizer.ggml.pre", _U32, 3), "tokenizer.ggml.pre"),
    ("model not a string", _kv("tokenizer.ggml.model", _U32, 3), "tokenizer.ggml.model"),
    ("merge token missing", _kv_list("tokenizer.ggml.merges", 1, "l é"), "merge #1"),
    ("merges not strings", _kv("tokenizer.ggml.merges", _ARR, (_U32, [1, 2])), "merge #0"),
    ("chat template not a string", _kv("tokenizer.chat_template", _U32, 1), "chat_template"),
    ("GGUF SPM score NaN", _kv_list("tokenizer.ggml.scores", 260, math.nan, gguf_spm), "piece #260"),
    ("SPM byte piece twice", _kv_list("tokenizer.ggml.tokens", 4, "<0x00>", gguf_spm), "tokens[4]"),
    ("SPM scores missing", lambda: {k: v for k, v in gguf_spm().items() if k != "tokenizer.ggml.scores"},
     "tokenizer.ggml.scores"),
    ("arrays nested 200 deep", _deep_array, "nested"),
]


@pytest.mark.parametrize("make,needle", [r[1:] for r in GGUF_ROWS], ids=[r[0] for r in GGUF_ROWS])
def test_bad_gguf_vocab(tmp_path, make, needle):
    path = write_gguf(tmp_path / "vocab.gguf", make())
    if needle is None:  # the base files load: the rows below differ from them in one entry
        assert Tokenizer.from_pretrained(path).vocab_size > 90
        return
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_pretrained(path)
    assert path in str(e.value) and needle in str(e.value)


# ---- tiktoken rank files and SentencePiece models ------------------------------------------------
def _tiktoken_lines(extra=b""):
    lines = [base64.b64encode(bytes([b])) + b" %d" % b for b in range(256)]
    return b"\n".join(lines) + b"\n" + extra


def _pb_varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n >> 7 else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _pb(num, wire, payload):
    key = _pb_varint(num << 3 | wire)
    return key + (_pb_varint(len(payload)) + payload if wire == 2 else payload)


def _spm(pieces, trainer_type=2):
    """A SentencePiece ModelProto: pieces = [(bytes piece, score, type) or raw piece bytes]."""
    body = b""
    for p in pieces:
        if isinstance(p, bytes):
            body += _pb(1, 2, p)
        else:
            t, s, ty = p
            body += _pb(1, 2, _pb(1, 2, t) + _pb(2, 5, struct.pack("<f", s)) + _pb(3, 0, _pb_varint(ty)))
    trainer = _pb(3, 0, _pb_varint(trainer_type)) + _pb(40, 0, _pb_varint(0)) + _pb(41, 0, _pb_varint(1))
    normalizer = _pb(1, 2, b"identity") + _pb(3, 0, _pb_varint(1)) + _pb(4, 0, _pb_varint(0))
    return body + _pb(2, 2, trainer) + _pb(3, 2, normalizer)


SPM_OK = [(b"<unk>", 0.0, 2), (b"<s>", 0.0, 3), (b"</s>", 0.0, 3), ("▁".encode(), -1.0, 1), (b"a", -2.0, 1)]

MODEL_ROWS = [
    ("valid SentencePiece", lambda: _spm(SPM_OK), None),
    ("valid tiktoken", lambda: _tiktoken_lines(), None),
    ("tiktoken token twice", lambda: _tiktoken_lines(base64.b64encode(b"a") + b" 256\n"), "line 257"),
    ("tiktoken ranks with a gap", lambda: _tiktoken_lines(base64.b64encode(b"ab") + b" 300\n"), "ranks"),
    ("tiktoken rank not a number", lambda: _tiktoken_lines(base64.b64encode(b"ab") + b" x\n"), "line 257"),
    ("SPM piece text as a varint", lambda: _spm(SPM_OK + [_pb(1, 0, _pb_varint(5))]), "piece #5"),
    ("SPM score NaN", lambda: _spm(SPM_OK + [(b"b", math.nan, 1)]), "piece #5"),
    ("SPM piece type 9", lambda: _spm(SPM_OK + [(b"b", 0.0, 9)]), "piece #5"),
    ("SPM piece twice", lambda: _spm(SPM_OK + [(b"a", 0.0, 1)]), "piece #5"),
    ("SPM unigram model", lambda: _spm(SPM_OK, trainer_type=1), "unigram"),
]


@pytest.mark.parametrize("make,needle", [r[1:] for r in MODEL_ROWS], ids=[r[0] for r in MODEL_ROWS])
def test_bad_tokenizer_model(tmp_path, make, needle):
    path = str(tmp_path / "tokenizer.model")
    with open(path, "wb") as f:
        f.write(make())
    if needle is None:
        assert Tokenizer.from_pretrained(path).vocab_size >= 5
        return
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_pretrained(path)
    assert path in str(e.value) and needle in str(e.value)


def test_tiktoken_config_ids_bounded(tmp_path):
    """added_tokens_decoder ids far past the ranks would make a list of that length."""
    (tmp_path / "tokenizer.model").write_bytes(_tiktoken_lines())
    path = write_json(tmp_path, {"added_tokens_decoder": {str(10 ** 11): {"content": "<x>"}}}, "tokenizer_config.json")
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_pretrained(str(tmp_path))
    assert path in str(e.value) and str(10 ** 11) in str(e.value)


def test_chat_template_file_is_read(tmp_path):
    """tokenizer_config.json without a template, chat_template.jinja beside it (newer transformers)."""
    write_json(tmp_path, base_json())
    write_json(tmp_path, {"eos_token": "<|endoftext|>"}, "tokenizer_config.json")
    template = "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}"
    (tmp_path / "chat_template.jinja").write_text(template)
    assert Tokenizer.from_pretrained(str(tmp_path)).chat_template == template


def test_errors_are_npllama_errors():
    assert issubclass(TokenizerError, NpllamaError)


def test_rows_are_distinct():
    ids = [r[0] for r in JSON_ROWS + RAW_ROWS + CONFIG_ROWS + FILE_ROWS + GGUF_ROWS + MODEL_ROWS]
    assert len(ids) == len(set(ids))
    assert copy.deepcopy(base_json()) == base_json()


# ---- random mutations: only TokenizerError may come out ------------------------------------------
def _paths(node, prefix=()):
    """Every (container path, key) in a JSON document."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


def _json_values():
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.sampled_from([0, 1, 99, 100, -1]),
                        st.floats(allow_nan=False), st.text(max_size=4), st.sampled_from(["h e", "Ġ", "<|endoftext|>",
                                                                                          "BPE", "ByteLevel", "Split"]))
    return st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                     st.dictionaries(st.sampled_from(["id", "content", "type", "special",
                                                                                      "pattern", "Regex"]), c, max_size=3)),
                        max_leaves=6)


def test_random_mutations_only_tokenizer_errors(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=150, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(st.data())
    def run(data):
        doc = base_json()
        for _ in range(data.draw(st.integers(1, 3))):
            paths = list(_paths(doc))
            path = data.draw(st.sampled_from(paths))
            parent = doc
            for k in path[:-1]:
                parent = parent[k]
            action = data.draw(st.sampled_from(["set", "set", "delete", "copy"]))
            if action == "set":
                parent[path[-1]] = data.draw(_json_values())
            elif action == "delete":
                del parent[path[-1]]
            elif isinstance(parent, list):
                parent.append(copy.deepcopy(parent[path[-1]]))  # duplicate an entry (a merge, an added token)
            else:
                parent[str(path[-1]) + "x"] = copy.deepcopy(parent[path[-1]])  # a second key, same value (same id)
        write_json(tmp_path, doc)
        try:
            tok = Tokenizer.from_pretrained(str(tmp_path))
            tok.decode(tok.encode("hello world <|endoftext|>!", allowed_special="all"))
        except TokenizerError as e:
            assert str(tmp_path) in str(e) or "token" in str(e)

    run()
