"""Streaming detokenization: text comes out only when its UTF-8 bytes are complete.

A character such as an emoji often spans several byte tokens; printing each token's bytes on
its own would show replacement characters. The incremental UTF-8 decoder holds back an
incomplete tail until the rest arrives.
"""
from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


class StreamDecoder:
    """Feed ids one at a time with `push`; each call returns the newly completed text."""

    def __init__(self, tokenizer: "Tokenizer", skip_special: bool = False):
        self._tok = tokenizer
        self._skip = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._strip = tokenizer.strip_leading_space  # the dummy-prefix space of the first piece
        self._started = False

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly '')."""
        data = self._tok.id_to_bytes(token_id, skip_special=self._skip)
        return self._emit(self._utf8.decode(data))

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished character becomes U+FFFD)."""
        return self._emit(self._utf8.decode(b"", final=True))

    def _emit(self, text: str) -> str:
        if text and not self._started:
            self._started = True
            if self._strip and text[0] == " ":
                text = text[1:]
        return text
