"""How every command ends on an error: what a user can cause is one line and an exit status, a bug a traceback.

``run_command`` is the one error handler of every command (train, sample, eval, prepare):

    2    a user error (distgan.errors.UserError: a config key, a data file, an export, a run dir), an OSError
         (a full disk, a permission, a name too long: the path and the fix), a damaged user file (safetensors'
         SafetensorError, JSON that does not parse), input nested past Python's limit, and wandb's errors
    130  Ctrl-C (KeyboardInterrupt): one line, no traceback

``--debug`` shows the traceback of each of these too.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from safetensors import SafetensorError

from distgan.errors import UserError
from distgan.limits import check_text

# RecursionError: input nested past Python's limit (a 5,000-deep YAML list); SafetensorError and JSONDecodeError:
# a damaged weights or metadata file the user pointed at
USER_ERRORS = (UserError, OSError, RecursionError, SafetensorError, json.JSONDecodeError)
INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C

# what to do about an OSError, by errno
_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere (earlier checkpoints are intact)",
    errno.EDQUOT: "the disk quota is used up: free space or write elsewhere",
    errno.EACCES: "permission denied: fix the permissions or choose a path you can write",
    errno.EPERM: "operation not permitted: fix the permissions or choose another path",
    errno.ENAMETOOLONG: "the name is too long for the file system: use a shorter path",
    errno.EROFS: "the file system is read-only: choose a writable path",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder where a file belongs: check the path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or use fewer data workers",
}


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def check_arguments(args: argparse.Namespace | Sequence[str]) -> None:
    """Every text or path argument (parsed, or the raw command line) without control characters: a newline in
    --out would name another file."""
    named = vars(args).items() if isinstance(args, argparse.Namespace) else [("argument", list(args))]
    for name, value in named:
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, (str, Path)):
                check_text(f"--{name.rstrip('_').replace('_', '-')}" if name != "argument" else name, item)


def _os_error(err: OSError) -> str:
    fix = _OS_FIXES.get(err.errno)
    if fix is None:
        return " ".join(str(err).split())
    paths = [p for p in (err.filename, err.filename2) if p is not None]
    where = " -> ".join(str(os.fsdecode(p))[:200] for p in paths)
    return f"{where}: {fix}" if where else f"{err.strerror or type(err).__name__}: {fix}"


def _wandb_error(err: BaseException) -> Optional[str]:
    """The message for one of wandb's errors (a missing or bad API key, no network), or None; wandb is never imported
    here (it costs a second): an error of it exists only when it was."""
    errors = sys.modules.get("wandb.errors")
    if errors is None or not isinstance(err, errors.Error):
        return None
    return (f"wandb: {' '.join(str(err).split())[:300]} (log in with `wandb login` or set WANDB_API_KEY, or run with "
            "WANDB_MODE=offline and `wandb sync` later, or log.wandb=false)")


def one_line(err: BaseException) -> str:
    """The error's message on one line; an error re-raised from a DataLoader worker keeps only its last line."""
    if isinstance(err, RecursionError):
        return "the input is nested too deeply to read (a list or mapping thousands of levels deep)"
    if isinstance(err, SafetensorError):
        return f"a weights file cannot be read ({' '.join(str(err).split())[:200]}): it is damaged or not safetensors"
    if isinstance(err, json.JSONDecodeError):
        return f"a JSON file is damaged ({err.msg} at line {err.lineno}); re-create it"
    if isinstance(err, OSError) and not isinstance(err, UserError):
        return _os_error(err)
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    last = lines[-1]
    if "Original Traceback" in str(err) and ": " in last:  # "DataError: shard-3.tar: ..." -> the message
        last = last.split(": ", 1)[1]
    return last if "Original Traceback" in str(err) else " ".join(lines)


def run_command(prog: str, body: Callable[[], int], debug: bool = False,
                args: Optional[argparse.Namespace | Sequence[str]] = None) -> int:
    """Run a command's body (after checking ``args``); print what the user can cause as ``PROG: error: MESSAGE``
    and return its status (2; 130 for Ctrl-C)."""
    try:
        if args is not None:
            check_arguments(args)
        return body()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED
    except Exception as err:
        message = one_line(err) if isinstance(err, USER_ERRORS) else _wandb_error(err)
        if message is None or debug:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
