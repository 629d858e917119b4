"""The base of every error that is the user's to fix (a config key, a data file, an export, a run dir).

Commands print these as one line and exit with status 2 (distgan.cli); anything else is a bug and keeps
its traceback.
"""


class UserError(ValueError):
    """A problem with the user's input; the message names the file, key or value, and the fix."""
