"""Equality assertions for files, weights and long byte strings that name the first difference, never diff it all.

A failing ``assert a == b`` on two 60 KB byte strings makes pytest render a difflib diff that can run for
minutes (with CI=1 it ran past the test's timeout). These report a digest, the first differing offset or
line, or the first differing tensor with its largest difference. tests/test_compare.py lints the suite for
plain ``assert`` on unbounded bytes and text.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping, Union

import torch
from safetensors.torch import load_file

Tensors = Mapping[str, torch.Tensor]
WINDOW = 16  # bytes shown on each side of the first difference


def _digest(data: bytes) -> str:
    return f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}"


def first_difference(a: Union[bytes, str], b: Union[bytes, str]) -> int:
    """The first index where ``a`` and ``b`` differ (the shorter length when one is a prefix of the other)."""
    n = min(len(a), len(b))
    lo = 0
    while lo < n:  # compare in blocks: a Python loop over 60 KB costs milliseconds, this far less
        hi = min(n, lo + 4096)
        if a[lo:hi] != b[lo:hi]:
            return next(i for i in range(lo, hi) if a[i] != b[i])
        lo = hi
    return n


def assert_same_bytes(a: bytes, b: bytes, what: str = "bytes") -> None:
    """``a == b``, else one line: both digests and the first differing offset with a few bytes around it."""
    if a == b:
        return
    at = first_difference(a, b)
    window = slice(max(0, at - WINDOW), at + WINDOW)
    raise AssertionError(f"{what} differ at byte {at}: {_digest(a)} vs {_digest(b)}; "
                         f"around it {a[window].hex()} vs {b[window].hex()}")


def assert_same_text(a: str, b: str, what: str = "text") -> None:
    """``a == b``, else the first differing line (number and both lines, cut to 200 characters)."""
    if a == b:
        return
    la, lb = a.splitlines(), b.splitlines()
    line = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), min(len(la), len(lb)))
    x = la[line] if line < len(la) else "<end of text>"
    y = lb[line] if line < len(lb) else "<end of text>"
    raise AssertionError(f"{what} differ at line {line + 1} of {len(la)} vs {len(lb)}: {x[:200]!r} vs {y[:200]!r}")


def tensor_differences(a: Tensors, b: Tensors) -> list[str]:
    """One line per differing tensor (name, dtype/shape or max abs difference), in ``a``'s key order."""
    out = [f"{k}: only in the first" for k in a if k not in b] + [f"{k}: only in the second" for k in b if k not in a]
    for name in (k for k in a if k in b):
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            out.append(f"{name}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
        elif not torch.equal(x, y):
            if x.is_floating_point():
                diff = (x.double() - y.double()).abs()
                worst = "nan" if diff.isnan().any() else f"{diff.max().item():.3g}"
                out.append(f"{name}: max abs difference {worst} ({int((x != y).sum())} of {x.numel()} values)")
            else:
                out.append(f"{name}: {int((x != y).sum())} of {x.numel()} values differ")
    return out


def assert_same_tensors(a: Tensors, b: Tensors, what: str = "tensors") -> None:
    """Bit-identical tensor dicts, else the first differing tensor by name with its max abs difference."""
    diffs = tensor_differences(a, b)
    if diffs:
        names = ", ".join(d.split(":")[0] for d in diffs[1:6])
        more = f" (and {len(diffs) - 1} more: {names})" if len(diffs) > 1 else ""
        raise AssertionError(f"{what} differ: {diffs[0]}{more}")


def assert_same_files(a: Union[str, Path], b: Union[str, Path], what: str = "") -> None:
    """Two identical files: a .safetensors pair is compared tensor by tensor first (names the tensor that
    differs), then byte for byte (metadata, order); any other file by bytes."""
    a, b = Path(a), Path(b)
    what = what or f"{a} and {b}"
    if a.suffix == b.suffix == ".safetensors":
        assert_same_tensors(load_file(str(a)), load_file(str(b)), what)
    assert_same_bytes(a.read_bytes(), b.read_bytes(), what)
