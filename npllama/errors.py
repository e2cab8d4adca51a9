"""The one base class of every error a user can cause (a bad path, file, tensor, key or flag).

The CLI turns exactly these (and an OSError that names a path) into one line and exit code 2;
anything else is a bug and is reported as an internal error.
"""
from __future__ import annotations


class NpllamaError(Exception):
    """A mistake in what npllama was given; the message names the file, tensor, key or flag."""


class InputError(NpllamaError, ValueError):
    """Arrays or arguments handed to the model that it cannot take (ids, targets, a mask, a KV cache too small)."""


class InputTypeError(InputError, TypeError):
    """An array of the wrong kind (float token ids, say)."""
