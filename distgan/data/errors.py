"""The one exception of the data package, so every data module can raise it without importing another."""

from distgan.errors import UserError


class DataError(UserError):
    """A data problem; the message names the file (shard) and key, and what to do."""


class CorruptShardError(DataError):
    """A shard whose bytes are damaged before the tar (a broken gzip); data.skip_bad_samples skips it."""
