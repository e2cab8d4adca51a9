"""Build a Tokenizer from what models ship: tokenizer.json, tokenizer.model, or GGUF metadata.

- HF `tokenizer.json`: a BPE model (byte-level, or SentencePiece-style with byte_fallback), its
  pre-tokenizer / normalizer / decoder and added tokens; tokenizer_config.json beside it gives
  BOS/EOS and the chat template.
- `tokenizer.model`: either Llama 3's tiktoken rank file (base64 token + rank per line) or a
  SentencePiece BPE model (protobuf, read here by hand).
- GGUF: `tokenizer.ggml.*` (model gpt2 or llama, tokens, token types, merges, scores, pre).
Every failure is a TokenizerError that names the file and the problem.
"""
from __future__ import annotations

import base64
import json
import math
import os
import re
import struct
import warnings

import regex

from .bpe import BYTE_TO_UNICODE, ByteLevelBPE, PairTable, RankPairTable, unicode_to_bytes
from .errors import TokenizerError
from .files import check_file, inside, read_bytes
from .gguf_meta import read_gguf_metadata
from .pretokenize import GGUF_PRE, GPT2_PATTERN, LLAMA3_PATTERN, from_hf_pretokenizer, regex_splitter
from .sentencepiece import SPACE, ScorePairTable, SentencePieceBPE
from .tokenizer import Tokenizer

# GGUF / sentencepiece token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def load(path: str) -> Tokenizer:
    """Pick the loader for `path`: a .gguf, tokenizer.json, tokenizer.model, or a directory with one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.lexists(os.path.join(path, name)):
                return load(inside(path, name))
        try:
            ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        except OSError as e:
            raise TokenizerError(f"{path}: cannot list ({e.strerror or e})") from None
        if len(ggufs) == 1:
            return load(inside(path, ggufs[0]))
        raise TokenizerError(f"{path}: no tokenizer.json, tokenizer.model or single .gguf file in this directory")
    if not os.path.lexists(path):
        raise TokenizerError(f"{path}: no such file or directory")
    check_file(path, None)  # before any open: a FIFO would block, /dev/zero read forever
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from None
    if head[:4] == b"GGUF" or path.endswith(".gguf"):
        return load_gguf(path)  # only its header is read (a model GGUF may be many GB)
    check_file(path)
    if path.endswith(".json"):
        return load_tokenizer_json(path)
    if re.match(rb"[A-Za-z0-9+/=]+ \d+\r?\n", head):
        return load_tiktoken(path)
    return load_sentencepiece_model(path)


# ---- GGUF ----------------------------------------------------------------------------------
def load_gguf(path: str) -> Tokenizer:
    """Tokenizer from the `tokenizer.ggml.*` metadata of a GGUF file."""
    check_file(path, None)
    meta = read_gguf_metadata(path)
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or not isinstance(tokens, list) or not tokens:
        raise TokenizerError(f"{path}: GGUF file has no tokenizer (tokenizer.ggml.model / tokens missing)")
    _check_list(path, "tokenizer.ggml.tokens", tokens, str, "a string")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    _check_list(path, "tokenizer.ggml.token_type", types, int, "an int")
    if len(types) != len(tokens):
        raise TokenizerError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    for i, ty in enumerate(types):
        if not 0 <= ty <= BYTE:
            raise TokenizerError(f"{path}: tokenizer.ggml.token_type[{i}] = {ty} is not a token type (0..6)")
    seen: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty != UNUSED and seen.setdefault(t, i) != i:
            raise TokenizerError(f"{path}: tokenizer.ggml.tokens[{i}] {t!r} repeats tokens[{seen[t]}]"
                                 " (one id per token string)")
    ids = {}
    for k, key in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("unk_id", "unknown_token_id"),
                   ("pad_id", "padding_token_id")):
        v = meta.get("tokenizer.ggml." + key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(tokens)):
            raise TokenizerError(f"{path}: tokenizer.ggml.{key} {v!r} is not an id in the vocabulary of {len(tokens)} tokens")
        ids[k] = v
    for key in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix"):
        if key in meta and not isinstance(meta[key], bool):
            raise TokenizerError(f"{path}: {key} is {meta[key]!r}, not a bool")
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{path}: tokenizer.chat_template is not a string")
    if not isinstance(model, str):
        raise TokenizerError(f"{path}: tokenizer.ggml.model {model!r} is not a string")
    common = dict(chat_template=template, source=path, **ids)
    if model == "gpt2":
        return _gguf_byte_level(path, meta, tokens, types, common)
    if model == "llama":
        return _gguf_sentencepiece(path, meta, tokens, types, common)
    raise TokenizerError(f"{path}: tokenizer.ggml.model {model!r} is not supported (gpt2 and llama are)")


def _gguf_byte_level(path, meta, tokens, types, common) -> Tokenizer:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str):
        raise TokenizerError(f"{path}: tokenizer.ggml.pre {pre!r} is not a string")
    if pre not in GGUF_PRE:
        warnings.warn(f"{path}: unknown tokenizer.ggml.pre {pre!r}; using GPT-2's pre-tokenizer")
    pattern, whole = GGUF_PRE.get(pre, (GPT2_PATTERN, False))
    token_bytes, encoder, special, added = [], {}, {}, {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (NORMAL, BYTE):
            b = unicode_to_bytes(t)
            if b is None:
                b = t.encode("utf-8")
            encoder.setdefault(b, i)
        else:
            b = t.encode("utf-8")
            if ty in (CONTROL, UNKNOWN):
                special[t] = i
            elif ty == USER_DEFINED:
                added[t] = i
        token_bytes.append(b)
    merges = meta.get("tokenizer.ggml.merges")
    if not merges or not isinstance(merges, list):
        raise TokenizerError(f"{path}: byte-level GGUF vocabulary has no tokenizer.ggml.merges")
    pairs = _pairs_from_merges(path, merges, {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (NORMAL, BYTE)})
    bpe = ByteLevelBPE(token_bytes, pairs, regex_splitter(pattern), whole, encoder)
    return Tokenizer(bpe, list(tokens), token_bytes, special, added,
                     add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)), kind="bpe", **common)


def _pairs_from_merges(path: str, merges, token_ids: dict[str, int]) -> PairTable:
    """HF / GGUF merges ("a b" or [a, b]) -> {(id_a, id_b): (rank, id_ab)}."""
    pairs = PairTable()
    get = token_ids.get
    for rank, m in enumerate(merges):
        a, b = _merge_pair(path, rank, m)
        ia, ib, iab = get(a), get(b), get(a + b)
        if ia is None or ib is None or iab is None:
            # HF tokenizers refuses such a file (MergeTokenOutOfVocabulary); so do we
            missing = next(t for t, i in ((a, ia), (b, ib), (a + b, iab)) if i is None)
            raise TokenizerError(f"{path}: merge #{rank} {m!r}: token {missing!r} is not in the vocabulary")
        pairs.setdefault((ia, ib), (rank, iab))
    return pairs


def _check_list(path: str, key: str, value, kind: type, what: str) -> None:
    """`value` is a list whose items are all `kind` (bools are not ints here)."""
    if not isinstance(value, list):
        raise TokenizerError(f"{path}: {key} is {type(value).__name__}, not a list")
    for i, x in enumerate(value):
        if not isinstance(x, kind) or isinstance(x, bool):
            raise TokenizerError(f"{path}: {key}[{i}] = {x!r:.60} is not {what}")


def _merge_pair(path: str, rank: int, m) -> tuple[str, str]:
    if isinstance(m, str):
        parts = m.split(" ")
        if len(parts) == 2:
            return parts[0], parts[1]
    elif isinstance(m, (list, tuple)) and len(m) == 2 and all(isinstance(x, str) for x in m):
        return m[0], m[1]
    raise TokenizerError(f"{path}: merge #{rank} {m!r} is not a pair of tokens")


def _gguf_sentencepiece(path, meta, tokens, types, common) -> Tokenizer:
    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens):
        raise TokenizerError(f"{path}: SentencePiece GGUF vocabulary needs tokenizer.ggml.scores, one per token")
    _check_list(path, "tokenizer.ggml.scores", scores, (int, float), "a number")
    prefix = "always" if meta.get("tokenizer.ggml.add_space_prefix", True) else "never"
    return _sentencepiece(path, tokens, scores, types, prefix, common,
                          add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)))


def _sentencepiece(path, tokens, scores, types, prefix, common, add_bos) -> Tokenizer:
    piece_ids, special, added, token_bytes = {}, {}, {}, []
    byte_ids = [None] * 256
    for i, (t, ty, sc) in enumerate(zip(tokens, types, scores)):
        if not math.isfinite(sc):
            raise TokenizerError(f"{path}: piece #{i} {t!r} has score {sc}, not a finite number")
        if ty not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE):
            raise TokenizerError(f"{path}: piece #{i} {t!r} has type {ty}, not a SentencePiece piece type (1..6)")
        if ty in (NORMAL, USER_DEFINED) and t in piece_ids:
            raise TokenizerError(f"{path}: piece #{i} {t!r} repeats piece #{piece_ids[t]}")
        if ty == BYTE:
            m = _BYTE_PIECE.fullmatch(t)
            if m is None:
                raise TokenizerError(f"{path}: byte token #{i} {t!r} is not of the form <0xNN>")
            if byte_ids[int(m.group(1), 16)] is not None:
                raise TokenizerError(f"{path}: byte token #{i} {t!r} repeats #{byte_ids[int(m.group(1), 16)]}")
            byte_ids[int(m.group(1), 16)] = i
            token_bytes.append(bytes([int(m.group(1), 16)]))
            continue
        if ty in (NORMAL, USER_DEFINED):
            piece_ids.setdefault(t, i)
            token_bytes.append(t.replace(SPACE, " ").encode("utf-8"))
            if ty == USER_DEFINED:
                added[t] = i
            continue
        if ty in (CONTROL, UNKNOWN):
            special[t] = i
        token_bytes.append(t.encode("utf-8"))
    pairs = ScorePairTable(piece_ids, list(scores))
    bpe = SentencePieceBPE(piece_ids, pairs, byte_ids if None not in byte_ids else None, common.get("unk_id"), prefix)
    return Tokenizer(bpe, list(tokens), token_bytes, special, added, add_bos=add_bos, kind="sentencepiece", **common)


# ---- tokenizer.json ------------------------------------------------------------------------
def _no_duplicate_keys(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {dup!r:.80} appears twice in one object (JSON readers disagree on which one wins)")
    return d


def _read_json(path: str):
    data = read_bytes(path)
    try:
        return json.loads(data, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise TokenizerError(f"{path}: not a tokenizer file (JSON nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, duplicate keys, huge ints
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None


def _hf_config(path: str) -> dict:
    """tokenizer_config.json next to `path` (BOS/EOS names, chat template), or {}; its types checked."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.lexists(os.path.join(folder, "tokenizer_config.json")):
        return {}
    cfg_path = inside(folder, "tokenizer_config.json")
    cfg = _read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise TokenizerError(f"{cfg_path}: not a JSON object")
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, str) and not (isinstance(v, dict) and isinstance(v.get("content"), str)):
            raise TokenizerError(f"{cfg_path}: {key} {v!r:.80} is neither a string nor {{'content': string}}")
    for key in ("add_bos_token", "add_eos_token"):
        if key in cfg and cfg[key] is not None and not isinstance(cfg[key], bool):
            raise TokenizerError(f"{cfg_path}: {key} is {cfg[key]!r:.40}, not true or false")
    t = cfg.get("chat_template")
    if t is not None and not isinstance(t, str) and not (
            isinstance(t, list) and all(isinstance(d, dict) and isinstance(d.get("template"), str) for d in t)):
        raise TokenizerError(f"{cfg_path}: chat_template is neither a string nor a list of {{name, template}}")
    jinja = os.path.join(folder, "chat_template.jinja")  # where newer transformers save the template
    if t is None and os.path.lexists(jinja):
        try:
            cfg["chat_template"] = read_bytes(inside(folder, "chat_template.jinja")).decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{jinja}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    dec = cfg.get("added_tokens_decoder")
    if dec is not None:
        if not isinstance(dec, dict):
            raise TokenizerError(f"{cfg_path}: added_tokens_decoder is not an object")
        for k, v in dec.items():
            if not k.isdigit() or len(k) > 12 or not isinstance(_token_name(v), str):
                raise TokenizerError(f"{cfg_path}: added_tokens_decoder[{k!r:.40}] is not id -> {{'content': string}}")
    return cfg


def _token_name(v):
    return v.get("content") if isinstance(v, dict) else v


def _chat_template(cfg: dict):
    t = cfg.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) else None


def _vocab_tokens(path: str, m: dict, added_list) -> tuple[list[str], dict, dict]:
    """id -> token from model.vocab and added_tokens, checked: (tokens, special, added).

    Ids are ints (not bools) in [0, n), n the number of distinct tokens; no id has two tokens. An
    added token may restate a vocab entry (same id, same text: GPT-2's <|endoftext|>); one that
    gives an id another text, or a text another id, is an error (HF tokenizers would only print a
    warning and renumber it).
    """
    vocab = m["vocab"]
    if not isinstance(added_list, list):
        raise TokenizerError(f"{path}: added_tokens is {type(added_list).__name__}, not a list")
    for k, a in enumerate(added_list):
        if not isinstance(a, dict) or not isinstance(a.get("content"), str) or "id" not in a:
            raise TokenizerError(f"{path}: added_tokens[{k}] {a!r:.80} is not {{'id': int, 'content': string}}")
        if not isinstance(a["id"], int) or isinstance(a["id"], bool):
            raise TokenizerError(f"{path}: added_tokens[{k}] {a['content']!r}: id {a['id']!r:.40} is not an int")
        if "special" in a and not isinstance(a["special"], bool):
            raise TokenizerError(f"{path}: added_tokens[{k}] {a['content']!r}: special {a['special']!r:.40} is not a bool")
    new_names = {a["content"] for a in added_list} - set(vocab)
    n = len(vocab) + len(new_names)
    tokens: list = [None] * n
    for t, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool):
            raise TokenizerError(f"{path}: model.vocab[{t!r:.80}] = {i!r:.40} is not an int id")
        if not 0 <= i < n:
            raise TokenizerError(f"{path}: model.vocab[{t!r:.80}] = {i} is outside 0..{n - 1} (ids must be dense, without gaps)")
        if tokens[i] is not None:
            raise TokenizerError(f"{path}: model.vocab gives id {i} to both {tokens[i]!r:.80} and {t!r:.80}")
        tokens[i] = t
    special, added = {}, {}
    for k, a in enumerate(added_list):
        t, i = a["content"], a["id"]
        if not 0 <= i < n:
            raise TokenizerError(f"{path}: added_tokens[{k}] {t!r:.80}: id {i} is outside 0..{n - 1} (ids must be dense, without gaps)")
        if t in vocab and vocab[t] != i:
            raise TokenizerError(f"{path}: added_tokens[{k}] {t!r:.80} has id {i}, but model.vocab gives it id {vocab[t]}")
        if tokens[i] is not None and tokens[i] != t:
            raise TokenizerError(f"{path}: added_tokens[{k}] {t!r:.80} takes id {i}, which already is {tokens[i]!r:.80}")
        if t in special or t in added:
            raise TokenizerError(f"{path}: added_tokens[{k}] {t!r:.80} is declared twice")
        tokens[i] = t
        (special if a.get("special", False) else added)[t] = i
    holes = [i for i, t in enumerate(tokens) if t is None]
    if holes:
        raise TokenizerError(f"{path}: ids {holes[:5]} have no token (vocab has gaps)")
    return tokens, special, added


def load_tokenizer_json(path: str) -> Tokenizer:
    """Tokenizer from a Hugging Face tokenizer.json (BPE models)."""
    return tokenizer_from_json(_read_json(path), path, _hf_config(path))


def tokenizer_from_json(j, path: str, cfg: dict | None = None) -> Tokenizer:
    """Tokenizer from a parsed tokenizer.json document; `path` names it in errors."""
    if not isinstance(j, dict) or not isinstance(j.get("model"), dict):
        raise TokenizerError(f"{path}: no 'model' object; not a tokenizer.json")
    m = j["model"]
    mtype = m.get("type", "BPE" if "merges" in m else None)
    if mtype != "BPE":
        raise TokenizerError(f"{path}: model type {mtype!r:.40} is not supported (only BPE)")
    vocab = m.get("vocab")
    merges = m.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise TokenizerError(f"{path}: BPE model needs a 'vocab' object and a 'merges' list")
    for key in ("byte_fallback", "fuse_unk", "ignore_merges"):
        if m.get(key) is not None and not isinstance(m[key], bool):
            raise TokenizerError(f"{path}: model.{key} is {m[key]!r:.40}, not true or false")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if m.get(key) not in (None, "", 0):  # they change how words merge; no npllama vocabulary uses them
            raise TokenizerError(f"{path}: model.{key} = {m[key]!r:.40} is not supported")
    if m.get("unk_token") is not None and not isinstance(m["unk_token"], str):
        raise TokenizerError(f"{path}: model.unk_token {m['unk_token']!r:.40} is not a string")
    for key in ("normalizer", "pre_tokenizer", "decoder"):
        if j.get(key) is not None and not (isinstance(j[key], dict) and isinstance(j[key].get("type"), str)):
            raise TokenizerError(f"{path}: {key} {j[key]!r:.80} is not an object with a 'type'")
    added_list = j.get("added_tokens")
    tokens, special, added = _vocab_tokens(path, m, [] if added_list is None else added_list)
    cfg = cfg or {}
    by_name = {t: i for i, t in enumerate(tokens)}

    def named(key, fallbacks):
        name = _token_name(cfg.get(key))
        for n in ([name] if name else []) + fallbacks:
            if n in by_name:
                return by_name[n]
        return None

    common = dict(
        bos_id=named("bos_token", ["<|begin_of_text|>", "<s>", "<|startoftext|>"]),
        eos_id=named("eos_token", ["<|end_of_text|>", "</s>", "<|endoftext|>"]),
        unk_id=by_name.get(m.get("unk_token")) if m.get("unk_token") else None,
        pad_id=named("pad_token", []),
        chat_template=_chat_template(cfg), source=path,
    )
    add_bos = bool(cfg.get("add_bos_token", False))
    pre, norm, dec = j.get("pre_tokenizer"), j.get("normalizer"), j.get("decoder")
    is_byte_level = "ByteLevel" in json.dumps(pre) or "ByteLevel" in json.dumps(dec)
    try:
        if is_byte_level:
            return _json_byte_level(path, m, tokens, vocab, merges, special, added, pre, norm, common, add_bos)
        return _json_sentencepiece(path, m, tokens, vocab, merges, special, added, pre, norm, common, add_bos)
    except (ValueError, KeyError, TypeError, AttributeError, regex.error) as e:
        # a safety net: the checks above and in the pipeline builders name the entry themselves
        if isinstance(e, TokenizerError):
            raise
        raise TokenizerError(f"{path}: malformed tokenizer.json ({type(e).__name__}: {e})") from None


def _json_byte_level(path, m, tokens, vocab, merges, special, added, pre, norm, common, add_bos) -> Tokenizer:
    if norm is not None:
        raise TokenizerError(f"{path}: normalizer {norm.get('type')!r} is not supported with a byte-level model")
    split, _ = from_hf_pretokenizer(pre)
    if split is None:
        split = lambda text: [text]  # noqa: E731
    token_bytes, encoder = [], {}
    for i, t in enumerate(tokens):
        b = None if (t in special or t in added) else unicode_to_bytes(t)
        if b is None:
            b = t.encode("utf-8")
        elif t in vocab:
            encoder.setdefault(b, i)
        token_bytes.append(b)
    pairs = _pairs_from_merges(path, merges, {t: i for t, i in vocab.items()})
    bpe = ByteLevelBPE(token_bytes, pairs, split, bool(m.get("ignore_merges", False)), encoder)
    return Tokenizer(bpe, tokens, token_bytes, special, added, add_bos=add_bos, kind="bpe", **common)


def _json_sentencepiece(path, m, tokens, vocab, merges, special, added, pre, norm, common, add_bos) -> Tokenizer:
    # Llama 2 style: spaces -> ▁ and a prefix ▁, by normalizer (Prepend + Replace) or by Metaspace
    prefix = "never"
    replaces = metaspace = False
    norms = (norm.get("normalizers") if norm and norm.get("type") == "Sequence" else [norm]) if norm else []
    if not isinstance(norms, list):
        raise TokenizerError(f"{path}: normalizer Sequence has no 'normalizers' list")
    for k, n in enumerate(norms):
        if not isinstance(n, dict) or not isinstance(n.get("type"), str):
            raise TokenizerError(f"{path}: normalizers[{k}] {n!r:.80} is not an object with a 'type'")
        pattern = n.get("pattern")
        if n["type"] == "Prepend" and n.get("prepend") == SPACE:
            prefix = "always"
        elif (n["type"] == "Replace" and isinstance(pattern, dict) and pattern.get("String") == " "
              and n.get("content") == SPACE):
            replaces = True
        else:
            raise TokenizerError(f"{path}: normalizer {n['type']!r:.40} {pattern or ''!s:.60} is not supported"
                                 " (only Prepend('▁') and Replace(' ', '▁'))")
    if pre is not None:
        for key in ("split", "add_prefix_space"):
            if key in pre and not isinstance(pre[key], bool):
                raise TokenizerError(f"{path}: pre_tokenizer Metaspace {key} is {pre[key]!r:.40}, not true or false")
        if pre.get("prepend_scheme", "always") not in ("always", "first", "never"):
            raise TokenizerError(f"{path}: pre_tokenizer prepend_scheme {pre['prepend_scheme']!r:.40} is not supported")
        if pre.get("type") != "Metaspace":
            raise TokenizerError(f"{path}: pre_tokenizer {pre.get('type')!r} is not supported with a non-byte-level model")
        if pre.get("split", False):
            raise TokenizerError(f"{path}: Metaspace with split=true is not supported")
        replaces = True
        scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
        prefix = {"always": "always", "first": "first", "never": "never"}[scheme]
        metaspace = True  # unlike Prepend, Metaspace adds no '▁' to text that already starts with one
    if not replaces:
        raise TokenizerError(f"{path}: a non-byte-level BPE needs spaces mapped to '▁' (Replace or Metaspace)")
    token_bytes, byte_ids = [], [None] * 256
    fallback = bool(m.get("byte_fallback", False))
    for i, t in enumerate(tokens):
        bm = _BYTE_PIECE.fullmatch(t) if fallback else None
        if bm:
            byte_ids[int(bm.group(1), 16)] = i
            token_bytes.append(bytes([int(bm.group(1), 16)]))
        elif t in special:
            token_bytes.append(t.encode("utf-8"))
        else:
            token_bytes.append(t.replace(SPACE, " ").encode("utf-8"))
    pairs = PairTable()
    for rank, mg in enumerate(merges):
        a, b = _merge_pair(path, rank, mg)
        if a + b in vocab:
            pairs.setdefault((a, b), (rank, a + b))
    piece_ids = {t: i for t, i in vocab.items() if t not in special}
    bpe = SentencePieceBPE(piece_ids, pairs, byte_ids if fallback and None not in byte_ids else None,
                           common["unk_id"], prefix, fuse_unk=bool(m.get("fuse_unk", False)),
                           prefix_unless_space=metaspace)
    return Tokenizer(bpe, tokens, token_bytes, special, added, add_bos=add_bos, kind="sentencepiece", **common)


# ---- tokenizer.model: tiktoken rank file ---------------------------------------------------
def llama3_special_tokens(n: int = 256) -> list[str]:
    """Llama 3's special tokens, in id order after the 128000 ranks."""
    head = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
            "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    return head + [f"<|reserved_special_token_{i}|>" for i in range(5, n - 5)]


def load_tiktoken(path: str, special_tokens: list[str] | None = None, pattern: str = LLAMA3_PATTERN) -> Tokenizer:
    """Tokenizer from a tiktoken rank file (Llama 3's tokenizer.model): 'base64 rank' per line."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(read_bytes(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            b, r = base64.b64decode(tok, validate=True), int(rank)
        except ValueError as e:
            raise TokenizerError(f"{path}: line {n} is not 'base64-token rank' ({e})") from None
        if b in ranks:
            raise TokenizerError(f"{path}: line {n}: token {b!r:.60} already has rank {ranks[b]}")
        ranks[b] = r
    n_base = len(ranks)
    if sorted(ranks.values()) != list(range(n_base)):
        raise TokenizerError(f"{path}: ranks are not the numbers 0..{n_base - 1} each once")
    token_bytes = [b""] * n_base
    for b, r in ranks.items():
        token_bytes[r] = b
    cfg = _hf_config(path)
    if special_tokens is None:
        dec = cfg.get("added_tokens_decoder")
        if isinstance(dec, dict) and dec:
            by_id = {int(k): _token_name(v) for k, v in dec.items()}
            bad = [i for i in by_id if not n_base <= i < n_base + len(by_id)]
            if bad:
                cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
                raise TokenizerError(f"{cfg_path}: added_tokens_decoder id {bad[0]} is outside "
                                     f"{n_base}..{n_base + len(by_id) - 1} (after the {n_base} ranks)")
            special_tokens = [by_id.get(i, f"<|reserved_special_token_{i - n_base}|>")
                              for i in range(n_base, max(by_id) + 1)]
        else:
            special_tokens = llama3_special_tokens()
    special = {s: n_base + k for k, s in enumerate(special_tokens)}
    token_bytes += [s.encode("utf-8") for s in special_tokens]
    # token strings spelled in the GPT-2 alphabet, as tokenizer.json and GGUF files spell them
    tokens = ["".join(BYTE_TO_UNICODE[x] for x in b) for b in token_bytes[:n_base]] + list(special_tokens)
    bpe = ByteLevelBPE(token_bytes, RankPairTable(token_bytes, ranks), regex_splitter(pattern), True, ranks)
    bos = special.get(_token_name(cfg.get("bos_token")) or "<|begin_of_text|>")
    eos = special.get(_token_name(cfg.get("eos_token")) or "<|end_of_text|>")
    return Tokenizer(bpe, tokens, token_bytes, special, {}, bos_id=bos, eos_id=eos, add_bos=True,
                     chat_template=_chat_template(cfg), source=path, kind="bpe")


# ---- tokenizer.model: SentencePiece protobuf -----------------------------------------------
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of one protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, pos = _varint(buf, pos)
        elif wt == 1:
            v, pos = buf[pos:pos + 8], pos + 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            v, pos = buf[pos:pos + n], pos + n
        elif wt == 5:
            v, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        if pos > len(buf):
            raise ValueError("message runs past the end")
        yield num, wt, v


def _int32(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


_PIECE_WIRE = {1: 2, 2: 5, 3: 0}  # piece: bytes, float32, enum


def load_sentencepiece_model(path: str) -> Tokenizer:
    """Tokenizer from a SentencePiece BPE model file (protobuf ModelProto), e.g. Llama 2's tokenizer.model."""
    buf = read_bytes(path)
    tokens, scores, types = [], [], []
    trainer = {3: 1, 35: 0, 40: 0, 41: 1, 42: 2, 43: -1}  # model_type, byte_fallback, unk/bos/eos/pad ids
    normalizer = {1: b"", 2: b"", 3: 1, 4: 1}  # name, charsmap, add_dummy_prefix, remove_extra_whitespaces
    try:
        for num, wt, v in _fields(buf):
            if num == 1 and wt == 2:
                piece = {1: b"", 2: b"\0\0\0\0", 3: NORMAL}
                for n, w, x in _fields(v):
                    if n in piece and w != _PIECE_WIRE[n]:
                        raise ValueError(f"piece #{len(tokens)}: field {n} has wire type {w}, not {_PIECE_WIRE[n]}")
                    piece[n] = x
                tokens.append(piece[1].decode("utf-8"))
                scores.append(struct.unpack("<f", piece[2])[0])
                types.append(piece[3])
            elif num == 2 and wt == 2:
                for n, w, x in _fields(v):
                    if n in trainer:
                        if w != 0:
                            raise ValueError(f"trainer_spec field {n} has wire type {w}, not 0 (an int)")
                        trainer[n] = _int32(x)
            elif num == 3 and wt == 2:
                for n, w, x in _fields(v):
                    if n in normalizer:
                        if w != (2 if n in (1, 2) else 0):
                            raise ValueError(f"normalizer_spec field {n} has wire type {w}")
                        normalizer[n] = x
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise TokenizerError(f"{path}: not a SentencePiece model or tiktoken rank file ({e})") from None
    if not tokens:
        raise TokenizerError(f"{path}: not a SentencePiece model or tiktoken rank file (no pieces found)")
    if trainer[3] != 2:
        kind = {1: "unigram", 3: "word", 4: "char"}.get(trainer[3], str(trainer[3]))
        raise TokenizerError(f"{path}: SentencePiece model type {kind} is not supported (only BPE)")
    if normalizer[2] or normalizer[1] not in (b"", b"identity"):
        raise TokenizerError(f"{path}: SentencePiece normalizer {normalizer[1].decode('utf-8', 'replace')!r} is not supported"
                             " (only identity)")
    if normalizer[4]:
        raise TokenizerError(f"{path}: remove_extra_whitespaces=true is not supported")
    n = len(tokens)
    idx = lambda i: i if 0 <= i < n else None  # noqa: E731
    common = dict(bos_id=idx(trainer[41]), eos_id=idx(trainer[42]), unk_id=idx(trainer[40]), pad_id=idx(trainer[43]),
                  chat_template=_chat_template(_hf_config(path)), source=path)
    prefix = "always" if normalizer[3] else "never"
    return _sentencepiece(path, tokens, scores, types, prefix, common, add_bos=True)
