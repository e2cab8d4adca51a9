"""The one exception the tokenizer raises for bad files and bad ids."""
from __future__ import annotations


class TokenizerError(ValueError):
    """A tokenizer file is missing or malformed, or an id/token is out of range."""
