"""The Tokenizer: one BPE model (byte-level or SentencePiece) plus special tokens, decoding and chat."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import regex

from . import chat as _chat
from .errors import TokenizerError
from .stream import StreamDecoder


class Tokenizer:
    """Text <-> token ids, matching the reference tokenizer of the vocabulary it was loaded from."""

    def __init__(self, model, tokens: list[str], token_bytes: list[bytes], special: Mapping[str, int],
                 added: Mapping[str, int] | None = None, bos_id: int | None = None, eos_id: int | None = None,
                 unk_id: int | None = None, pad_id: int | None = None, add_bos: bool = False,
                 chat_template: str | None = None, source: str = "", kind: str = "bpe"):
        self.model = model
        self.tokens = tokens  # id -> token string as the file spells it
        self.token_bytes = token_bytes  # id -> bytes it decodes to
        self.special = dict(special)  # parsed from text only when allowed
        self.added = dict(added or {})  # parsed from text always (HF non-special added / GGUF user-defined)
        self.special_ids = set(self.special.values())
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.add_bos = add_bos  # what the file says a prompt should start with
        self.kind = kind  # "bpe" (byte-level) or "sentencepiece"
        self.strip_leading_space = kind == "sentencepiece" and getattr(model, "prefix", "never") != "never"
        self.chat_template = chat_template
        self.source = source
        self._split_cache: dict = {}
        stops = ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>"]
        self.eos_ids: list[int] = ([eos_id] if eos_id is not None else []) + [
            self.special[s] for s in stops if s in self.special and self.special[s] != eos_id]

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str) -> "Tokenizer":
        """Load from a .gguf file, a tokenizer.json / tokenizer.model file, or a directory holding one."""
        from .loaders import load

        return load(path)

    # ---- vocabulary ----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self.tokens)

    def id_to_token(self, i: int) -> str:
        """The token string of id `i` as the vocabulary spells it."""
        self._check_id(i)
        return self.tokens[i]

    def token_to_id(self, token: str) -> int:
        """The id of a token string (as the vocabulary spells it)."""
        if not hasattr(self, "_token_ids"):
            self._token_ids = {}
            for i, t in enumerate(self.tokens):
                self._token_ids.setdefault(t, i)
        try:
            return self._token_ids[token]
        except KeyError:
            raise TokenizerError(f"token {token!r} is not in the vocabulary of {self.source or 'this tokenizer'}") from None

    def id_to_bytes(self, i: int, skip_special: bool = False) -> bytes:
        """The bytes id `i` decodes to (b'' for a special token when skip_special)."""
        self._check_id(i)
        if skip_special and i in self.special_ids:
            return b""
        return self.token_bytes[i]

    def _check_id(self, i) -> None:
        if not (isinstance(i, int) or hasattr(i, "__index__")) or not 0 <= int(i) < len(self.tokens):
            raise TokenizerError(f"token id {i!r} is out of range (vocab_size {len(self.tokens)})")

    # ---- encoding ------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False,
               allowed_special: str | Iterable[str] = ()) -> list[int]:
        """Token ids of `text`; special-token text is plain text unless listed in allowed_special ("all" for every one)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        text = _clean(text)
        ids: list[int] = []
        if bos:
            ids.append(self._need(self.bos_id, "BOS"))
        splitter = self._special_splitter(allowed_special)
        if splitter is None:
            ids += self.model.encode(text, True)
        else:
            table = self.special if allowed_special else {}  # only reached with parsing on, or for added tokens
            pos = 0
            for m in splitter.finditer(text):
                if m.start() > pos:
                    ids += self.model.encode(text[pos:m.start()], pos == 0)
                s = m.group()
                ids.append(self.added[s] if s in self.added else table[s])
                pos = m.end()
            if pos < len(text):
                ids += self.model.encode(text[pos:], pos == 0)
        if eos:
            ids.append(self._need(self.eos_id, "EOS"))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text` with no special-token parsing at all."""
        return self.model.encode(text, True)

    def _special_splitter(self, allowed):
        if allowed is True or allowed is False or allowed is None:
            allowed = "all" if allowed else ()
        if isinstance(allowed, str):
            if allowed not in ("all", ""):
                raise ValueError("allowed_special must be 'all' or a collection of special-token strings")
            key = allowed
        else:
            key = frozenset(allowed)
        if key in self._split_cache:
            return self._split_cache[key]
        if key == "all":
            names = set(self.special)
        else:
            names = set(key)
            unknown = names - set(self.special) - set(self.added)
            if unknown:
                raise TokenizerError(f"not special tokens of this vocabulary: {sorted(unknown)[:5]}")
        names |= set(self.added)
        # longest first, so that a token that is a prefix of another never wins
        pat = regex.compile("|".join(regex.escape(s) for s in sorted(names, key=len, reverse=True))) if names else None
        self._split_cache[key] = pat
        return pat

    def _need(self, i: int | None, what: str) -> int:
        if i is None:
            raise TokenizerError(f"{self.source or 'this tokenizer'} defines no {what} token")
        return i

    # ---- decoding ------------------------------------------------------------------------
    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`: the exact inverse of encode for byte-level vocabularies."""
        ids = [int(i) for i in ids] if not isinstance(ids, list) else ids
        n = len(self.tokens)
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < n:
                self._check_id(i)
        tb = self.token_bytes
        if skip_special:
            sp = self.special_ids
            data = b"".join([tb[i] for i in ids if i not in sp])
        else:
            data = b"".join([tb[i] for i in ids])
        text = data.decode("utf-8", "replace")
        if self.strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        """A decoder for generation: `.push(id)` returns only completed UTF-8 text."""
        return StreamDecoder(self, skip_special)

    # ---- chat ----------------------------------------------------------------------------
    @property
    def chat_format(self) -> str | None:
        """'llama3', 'llama2', 'chatml' or None (no known template)."""
        return _chat.detect_format(self.chat_template, lambda t: t in self.special or t in self.added,
                                   self.kind == "sentencepiece")

    def _chat_parts(self, messages, add_generation_prompt):
        fmt = self.chat_format
        if fmt is None:
            raise TokenizerError(f"no supported chat template for {self.source or 'this tokenizer'}"
                                 " (Llama 3, Llama 2 and ChatML are recognized)")
        name = lambda i: None if i is None else self.tokens[i]  # noqa: E731
        return _chat.render(fmt, messages, add_generation_prompt, name(self.bos_id), name(self.eos_id),
                            _chat.chatml_default_system(self.chat_template))

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat prompt as text (what the template would print)."""
        return "".join(t for t, _ in self._chat_parts(messages, add_generation_prompt))

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
                            tokenize: bool = True) -> list[int] | str:
        """Ids of the chat prompt (same as Hugging Face's apply_chat_template); tokenize=False gives the text."""
        parts = self._chat_parts(messages, add_generation_prompt)
        if not tokenize:
            return "".join(t for t, _ in parts)
        ids: list[int] = []
        run, at_start = "", True
        for text, special in parts + [("", True)]:
            if not special:
                run += text
                continue
            if run:
                ids += self.model.encode(_clean(run), at_start)
                run = ""
            if text:
                if text not in self.special and text not in self.added:
                    raise TokenizerError(f"chat template token {text!r} is not in the vocabulary")
                ids.append(self.special.get(text, self.added.get(text)))
            at_start = False
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind}, vocab_size={self.vocab_size}, source={self.source!r})"


def _clean(text: str) -> str:
    """Replace lone surrogates (not encodable as UTF-8) with U+FFFD, as tiktoken does."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text
