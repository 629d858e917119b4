"""The one exception of the data package, so every data module can raise it without importing another."""

from distgan.errors import UserError


class DataError(UserError):
    """A data problem; the message names the file (shard) and key, and what to do."""
