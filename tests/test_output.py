"""distgan.output.Output, the one writer of every output: temporary sibling, lock, re-check at the rename, no
replacement of what the user made, partial output removed on an error and at the next start."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from compare import assert_same_bytes
from distgan.output import MARKER, Output, OutputError, remove_stale_partials, replace_file_with_force


def hidden(folder):
    """What distgan may have left beside its outputs: partial folders and lock files."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_file_is_renamed_into_place_and_nothing_is_left_beside_it(tmp_path):
    with Output(tmp_path / "out.bin") as partial:
        assert partial.parent.name.startswith(".out.bin.partial-") and not (tmp_path / "out.bin").exists()
        partial.write_bytes(b"data")
    assert_same_bytes((tmp_path / "out.bin").read_bytes(), b"data", "the output")
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("folder", [False, True])
def test_a_target_that_appears_during_the_write_is_kept_and_the_write_fails(tmp_path, folder):
    target = tmp_path / "out"
    with pytest.raises(OutputError, match="appeared while distgan was writing it; it was kept"):
        with Output(target, folder=folder) as partial:
            (partial / "ours.txt").write_text("ours") if folder else partial.write_text("ours")
            target.mkdir()  # the user's folder, with their file, made while distgan writes
            (target / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in target.iterdir()) == ["theirs.txt"] and hidden(tmp_path) == []


def test_an_empty_folder_taken_over_is_kept_if_it_gets_a_file_meanwhile(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with Output(target, folder=True, empty_folder_ok=True) as partial:  # empty: taken over
        (partial / "a.png").write_bytes(b"x")
    assert [p.name for p in target.iterdir()] == ["a.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OutputError, match="received files while distgan was writing; they were kept"):
        with Output(empty, folder=True, empty_folder_ok=True) as partial:
            (partial / "a.png").write_bytes(b"x")
            (empty / "mine.txt").write_text("mine")
    assert [p.name for p in empty.iterdir()] == ["mine.txt"] and hidden(tmp_path) == []


def test_an_existing_target_is_replaced_only_when_the_check_accepts_it(tmp_path):
    target = tmp_path / "grid.png"
    target.write_bytes(b"the user's")
    with pytest.raises(OutputError, match="already exists; pass --force"):
        with Output(target, check=replace_file_with_force("--out", False)):
            pytest.fail("never reached: refused before writing")
    assert_same_bytes(target.read_bytes(), b"the user's", "the user's file")
    with Output(target, check=replace_file_with_force("--out", True)) as partial:
        partial.write_bytes(b"new")
    assert_same_bytes(target.read_bytes(), b"new", "the output")
    assert hidden(tmp_path) == []


def test_a_target_replaced_by_the_user_during_the_write_is_kept(tmp_path):
    target = tmp_path / "grid.png"
    target.write_bytes(b"old")
    with pytest.raises(OutputError, match="changed while distgan was writing it; it was kept"):
        with Output(target, check=replace_file_with_force("--out", True)) as partial:
            partial.write_bytes(b"new")
            target.unlink()
            target.write_bytes(b"the user's new file")  # another inode than the one --force accepted
    assert_same_bytes(target.read_bytes(), b"the user's new file", "the user's file")


def test_an_error_removes_the_partial_output_and_releases_the_lock(tmp_path):
    with pytest.raises(RuntimeError):
        with Output(tmp_path / "out", folder=True) as partial:
            (partial / "half.tar").write_bytes(b"x" * 100)
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    with Output(tmp_path / "out", folder=True):  # the lock is free again
        pass


def test_a_second_writer_of_the_same_target_fails_on_the_lock(tmp_path):
    with Output(tmp_path / "out", folder=True):
        with pytest.raises(OutputError, match=rf"being written by another distgan process \(pid {os.getpid()}\)"):
            Output(tmp_path / "out", folder=True).start()
    assert (tmp_path / "out").is_dir() and hidden(tmp_path) == []


def test_stale_partials_of_dead_writers_are_removed_at_the_next_start(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    import socket

    def partial(name: str, marker: dict | None) -> None:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "out").write_text("half")
        if marker is not None:
            (folder / MARKER).write_text(json.dumps(marker))

    host = socket.gethostname()
    partial(".out.partial-dead", {"pid": pid, "host": host, "started": None})
    partial(".out.partial-reused", {"pid": os.getpid(), "host": host, "started": "1"})  # pid alive, another start
    partial(".out.partial-alive", {"pid": os.getpid(), "host": host, "started": None})
    partial(".out.partial-elsewhere", {"pid": pid, "host": host + "-other", "started": None})
    partial(".out.partial-unmarked", None)  # not provably distgan's
    with Output(tmp_path / "out") as path:
        path.write_text("done")
    assert hidden(tmp_path) == [".out.partial-alive", ".out.partial-elsewhere", ".out.partial-unmarked"]
    assert remove_stale_partials(tmp_path) == []


@pytest.mark.parametrize("existing", ["file", "empty folder", "folder"])
def test_the_rename_itself_never_replaces_anything(tmp_path, existing):
    from distgan.output import rename_noreplace

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir() if existing != "file" else src.write_text("new")
    if existing == "file":
        dst.write_text("theirs")
    else:
        dst.mkdir()
        if existing == "folder":
            (dst / "theirs").write_text("theirs")
    with pytest.raises(OSError):
        rename_noreplace(src, dst)
    assert src.exists() and (dst.read_text() == "theirs" if existing == "file" else dst.is_dir())
