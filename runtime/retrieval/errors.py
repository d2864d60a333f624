"""Errors of document indexing and search that a user can cause."""

from ripelm.models.errors import RipelmError


class RetrievalError(RipelmError):
    """Base of the retrieval errors."""


class SkipFile(RetrievalError):
    """This file cannot be indexed (binary, encrypted, too large, unreadable...); the message says why."""


class CollectionNotFoundError(RetrievalError):
    """No collection of that name."""


class EmbedderMismatchError(RetrievalError):
    """The collection was built with another embedding model; mixing vectors would make search garbage."""


class StoreError(RetrievalError):
    """The store file is not a ripelm index, or is from a newer ripelm."""
