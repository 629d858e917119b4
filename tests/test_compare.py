"""tests/compare.py names the first difference in one short line; a lint keeps bare ``assert`` off unbounded bytes."""
from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from compare import assert_same_bytes, assert_same_files, assert_same_tensors, assert_same_text, first_difference

TESTS = Path(__file__).resolve().parent
UNBOUNDED_CALLS = {"read_bytes", "read_text", "tobytes"}  # what a file or an array holds: any length


def test_bytes_report_offset_and_digests_fast():
    a = bytes(range(256)) * 240  # 60 KB, as an exported generator
    b = bytearray(a)
    b[40_000] ^= 1
    started = time.perf_counter()
    with pytest.raises(AssertionError) as err:
        assert_same_bytes(a, bytes(b), "export")
    message = str(err.value)
    assert time.perf_counter() - started < 1.0
    assert "export differ at byte 40000" in message and "sha256" in message and len(message) < 400
    assert first_difference(a, a + b"x") == len(a)
    assert_same_bytes(a, a)


def test_text_reports_the_first_differing_line():
    with pytest.raises(AssertionError, match=r"log differ at line 2 of 3 vs 3: 'b' vs 'B'"):
        assert_same_text("a\nb\nc", "a\nB\nc", "log")
    with pytest.raises(AssertionError, match=r"line 3 of 2 vs 3: '<end of text>' vs 'c'"):
        assert_same_text("a\nb", "a\nb\nc")


def test_tensors_name_the_first_differing_tensor_and_its_difference(tmp_path):
    a = {"conv.weight": torch.zeros(64, 64, 3, 3), "bias": torch.zeros(3), "steps": torch.tensor([4])}
    b = {k: v.clone() for k, v in a.items()}
    b["conv.weight"][5, 5, 1, 1] = 0.25
    one = r"^D differ: conv\.weight: max abs difference 0\.25 \(1 of 36864 values\)$"
    with pytest.raises(AssertionError, match=one):
        assert_same_tensors(a, b, "D")
    b["steps"] += 1
    del b["bias"]
    with pytest.raises(AssertionError, match=r"D differ: bias: only in the first \(and 2 more: conv\.weight, steps\)"):
        assert_same_tensors(a, b, "D")
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file({**a, "bias": torch.ones(3)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(AssertionError, match=r"G differ: bias: max abs difference 1 "):
        assert_same_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors", "G")
    save_file(a, str(tmp_path / "c.safetensors"))
    assert_same_files(tmp_path / "a.safetensors", tmp_path / "c.safetensors")


# ---------------------------------------------------------------- the lint


def _unbounded(node: ast.AST, names: set[str]) -> bool:
    """An expression of any length: a .read_bytes()/.read_text()/.tobytes() call, a bytes literal, or a name
    assigned from one of these in the same function."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr in UNBOUNDED_CALLS
    if isinstance(node, ast.Constant):
        return isinstance(node.value, bytes)
    return isinstance(node, ast.Name) and node.id in names


def _short_slice(node: ast.AST) -> bool:
    """``x[:4]`` or ``x[2:6]``: a slice with a constant end, as short as its bounds say."""
    return (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice)
            and isinstance(node.slice.upper, ast.Constant) and node.slice.step is None
            and (node.slice.lower is None or isinstance(node.slice.lower, ast.Constant)))


def bare_unbounded_asserts(source: str) -> list[int]:
    """Lines of ``assert X == Y`` (or !=) where X or Y is unbounded bytes or text (see :func:`_unbounded`) and
    neither is a slice with constant bounds."""
    tree = ast.parse(source)
    found = []
    scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))] + [tree]
    for scope in scopes:
        names = set()
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign) and _unbounded(node.value, set()):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(scope):
            if not isinstance(node, ast.Assert):
                continue
            tests = node.test.values if isinstance(node.test, ast.BoolOp) else [node.test]
            for test in tests:
                if isinstance(test, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in test.ops):
                    sides = (test.left, *test.comparators)
                    if any(_unbounded(side, names) for side in sides) and not any(map(_short_slice, sides)):
                        found.append(node.lineno)
    return sorted(set(found))


def test_the_lint_finds_what_it_is_meant_to_find():
    source = '''
def f(p, q, arr):
    a = p.read_bytes()
    assert a == q.read_bytes()
    assert p.read_text() == "x" and True
    assert arr.tobytes() != b""
    assert b"abc" == q
    assert len(p.read_bytes()) == 3
    assert p.name == "x"
    assert a[:4] == b":W&B"
'''
    assert bare_unbounded_asserts(source) == [4, 5, 6, 7]


def test_no_bare_assert_on_unbounded_bytes_or_text():
    """A failing ``assert a == b`` on long bytes or text makes pytest diff them in full (minutes under CI=1):
    use tests/compare.py (assert_same_bytes/_text/_files/_tensors), which names the first difference."""
    offenders = [f"{path.relative_to(TESTS.parent)}:{line}" for path in sorted(TESTS.rglob("*.py"))
                 for line in bare_unbounded_asserts(path.read_text())]
    assert not offenders, f"bare assert on bytes/text of any length at {offenders}: use tests/compare.py's helpers"
