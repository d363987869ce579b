"""The compressed artifact's error type, shared by every piece of the codec (registry, layouts, file, entry point).

Its own module so the lowest pieces can raise it without importing the ones that compose them; the public name is
``trainables.compression.codec.CodecError`` (the same class).
"""

from __future__ import annotations


class CodecError(ValueError):
    """A compressed file that cannot be written or read; the message names the file and what is wrong."""
