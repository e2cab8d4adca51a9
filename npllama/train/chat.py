"""Chat SFT examples: a conversation -> (ids, labels), the labels marking what each assistant turn adds.

ids are what the tokenizer's chat template gives (Hugging Face's apply_chat_template(messages),
no generation prompt). An assistant turn "adds" the text between the prompt that asks for it
(the conversation so far plus the generation prompt, e.g. '<|im_start|>assistant\\n') and the end
of its end-of-turn token (<|im_end|>, <|eot_id|>, Llama 2's </s>); the newline a template writes
after that token belongs to the next turn. The spans are found in the rendered text by rendering
prefixes of the conversation, then mapped to tokens by their byte spans: a token is labelled when
any of its bytes lies in a span (a token merged across the boundary must be produced by the turn).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from npllama.train.data import DataError

IGNORE = -100
ROLES = ("system", "user", "assistant")


class ChatDataError(DataError):
    """A conversation that cannot be used for SFT (bad message, no assistant turn); the message says why."""


def check_messages(messages: Any) -> list[dict[str, str]]:
    """The messages as a list of {'role', 'content'} dicts, or ChatDataError naming what is wrong."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatDataError(f"'messages' must be a non-empty list, got {type(messages).__name__}"
                            + ("" if messages else " (empty)"))
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatDataError(f"message {i} is {type(m).__name__}, not an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise ChatDataError(f"message {i} has no {key!r}")
            if not isinstance(m[key], str):
                raise ChatDataError(f"message {i}: {key!r} must be a string, got {type(m[key]).__name__}")
        if m["role"] not in ROLES:
            raise ChatDataError(f"message {i}: unknown role {m['role']!r} (one of {', '.join(ROLES)})")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _text(parts: Sequence[tuple[str, bool]]) -> str:
    return "".join(t for t, _ in parts)


def assistant_spans(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[tuple[int, int]]:
    """Character spans [start, end) of the rendered conversation that the assistant turns add."""
    full = _text(tokenizer._chat_parts(messages, False))
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _text(tokenizer._chat_parts(messages[:i], True))
        upto = tokenizer._chat_parts(messages[:i + 1], False)
        text = _text(upto)
        if not (text.startswith(prompt) and full.startswith(text)):
            # a template whose output for a prefix is not a prefix of its output (ChatML's default system
            # prompt before a conversation that opens with the assistant)
            raise ChatDataError(f"message {i}: the chat template does not render this conversation turn by turn "
                                f"(an assistant turn before any user turn?)")
        end, pos = len(text), 0
        for t, special in upto:            # the end of the turn: through its last special token
            pos += len(t)
            if special and pos > len(prompt):
                end = pos
        spans.append((len(prompt), end))
    return spans


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
    """(ids, labels): ids as apply_chat_template gives them; labels = ids on assistant-turn tokens, else -100."""
    from npllama.tokenizer.tokenizer import _clean
    messages = check_messages(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatDataError("the conversation has no assistant turn: nothing to learn from")
    try:
        parts = tokenizer._chat_parts(messages, False)
        spans = assistant_spans(tokenizer, messages)
    except ValueError as e:              # the template's own refusal (Llama 2: roles must alternate)
        raise ChatDataError(str(e)) from None
    full = _clean(_text(parts))          # _clean keeps the length in characters: the spans still apply
    byte_at = lambda c: len(full[:c].encode("utf-8"))  # noqa: E731
    spans = [(byte_at(s), byte_at(e)) for s, e in spans]
    ids: list[int] = []
    labelled: list[bool] = []
    pos, run, at_start = 0, "", True     # pos: bytes of the text before `run`

    def emit(new: list[int], starts: list[int], ends: list[int]) -> None:
        ids.extend(new)
        labelled.extend(any(s < b and a < e for s, e in spans) for a, b in zip(starts, ends))

    for text, special in list(parts) + [("", True)]:
        if not special:
            run += text
            continue
        if run:
            # tokenized run by run, exactly as Tokenizer.apply_chat_template does
            data = _clean(run).encode("utf-8")
            new = tokenizer.model.encode(_clean(run), at_start)
            pieces = [tokenizer.token_bytes[i] for i in new]
            joined = b"".join(pieces)
            extra = len(joined) - len(data)          # SentencePiece's dummy prefix space, if any
            if extra < 0 or joined[extra:] != data:
                raise ChatDataError(f"cannot align the tokens of {run[:40]!r} with its text "
                                    f"(the tokenizer's pieces do not spell it)")
            a, starts, ends = pos - extra, [], []
            for p in pieces:
                starts.append(max(a, pos))
                a += len(p)
                ends.append(max(a, pos))
            emit(new, starts, ends)
            pos += len(data)
            run = ""
        if text:
            if text not in tokenizer.special and text not in tokenizer.added:
                raise ChatDataError(f"chat template token {text!r} is not in the vocabulary")
            n = len(text.encode("utf-8"))
            emit([tokenizer.special.get(text, tokenizer.added.get(text))], [pos], [pos + n])
            pos += n
        at_start = False
    labels = [i if lab else IGNORE for i, lab in zip(ids, labelled)]
    return ids, labels


__all__ = ["ChatDataError", "IGNORE", "ROLES", "check_messages", "assistant_spans", "encode_chat"]
