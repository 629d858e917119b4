"""What the bench scripts share: the generated blocks of BENCHMARKS.md and the name of the CPU they measured on.

A block is the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; a script rewrites only its own
block, and its test fails when the block differs from what the committed raw results give.
"""
from __future__ import annotations

import platform
import re
from pathlib import Path

from distgan.errors import UserError


class BlockError(UserError):
    """A Markdown file without the block's markers: one line and exit status 2."""


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def read_block(markdown: Path, name: str) -> str:
    """The block's text, one trailing newline."""
    begin, end = markers(name)
    text = markdown.read_text()
    if begin not in text or end not in text:
        raise BlockError(f"{markdown}: no {begin} ... {end} block; put the two lines where the table belongs")
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n") + "\n"


def write_block(block: str, markdown: Path, name: str) -> None:
    """Replace the block's text with ``block``; the rest of the file stays as it was."""
    read_block(markdown, name)
    begin, end = markers(name)
    head, rest = markdown.read_text().split(begin, 1)
    markdown.write_text(f"{head}{begin}\n{block}{end}{rest.split(end, 1)[1]}")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform module knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        if found:
            return found.group(1).strip()
    return platform.processor() or platform.machine()
