"""The one base class of every error a user can cause (a bad path, file, tensor, key or flag).

The CLI turns exactly these (and an OSError that names a path) into one line and exit code 2;
anything else is a bug and is reported as an internal error.
"""
from __future__ import annotations


class NpllamaError(Exception):
    """A mistake in what npllama was given; the message names the file, tensor, key or flag."""
