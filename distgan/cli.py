"""How every command ends on an error: a user's mistake is one line and exit status 2, a bug a traceback.

``--debug`` shows the traceback of a user error too.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from distgan.errors import UserError

# OSError: a path that cannot be read or written (permissions, a full disk, a folder where a file belongs);
# RecursionError: input nested past Python's limit (a 5,000-deep YAML list).
USER_ERRORS = (UserError, OSError, RecursionError)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def one_line(err: BaseException) -> str:
    """The error's message on one line; an error re-raised from a DataLoader worker keeps only its last line."""
    if isinstance(err, RecursionError):
        return "the input is nested too deeply to read (a list or mapping thousands of levels deep)"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    last = lines[-1]
    if "Original Traceback" in str(err) and ": " in last:  # "DataError: shard-3.tar: ..." -> the message
        last = last.split(": ", 1)[1]
    return last if "Original Traceback" in str(err) else " ".join(lines)


def run_command(prog: str, body: Callable[[], int], debug: bool = False) -> int:
    """Run a command's body; print a user error as ``PROG: error: MESSAGE`` and return 2."""
    try:
        return body()
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
