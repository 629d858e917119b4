"""The base of every error that is the user's to fix (a config key, a data file, an export, a run dir).

Commands print these as one line and exit with status 2 (distgan.cli); anything else is a bug and keeps
its traceback.
"""


class UserError(ValueError):
    """A problem with the user's input; the message names the file, key or value, and the fix."""


SHOWN_CHARS = 60  # an error message shows at most this much of a value


def shown(value: object) -> str:
    """A value as an error message shows it: its repr, cut to a short prefix (a YAML alias bomb's value is
    hundreds of megabytes), and a huge integer by its size (Python refuses to print one past 4,300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value).bit_length() > 192:
        return f"{'a negative' if value < 0 else 'an'} integer of {abs(value).bit_length()} bits"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."
