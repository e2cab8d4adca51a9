"""The one exception the tokenizer raises for bad files and bad ids."""
from __future__ import annotations
from npllama.errors import NpllamaError


class TokenizerError(NpllamaError, ValueError):
    """A tokenizer file is missing or malformed, or an id/token is out of range."""
