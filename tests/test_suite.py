"""The suite's own guarantees: it tests this working tree (its distgan, here and in the processes tests start),
collects the same tests as `pytest` or as `python -m pytest`, and under CI never passes by skipping."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import distgan
from conftest import REPO, cannot_run, in_ci
from tests.distributed.launching import cpu_env

PRINT_DISTGAN = "import distgan, sys; sys.stdout.write(distgan.__file__)"


def test_distgan_is_imported_from_the_working_tree():
    assert Path(distgan.__file__).resolve().is_relative_to(REPO), distgan.__file__


def test_launched_processes_import_the_working_tree(tmp_path, monkeypatch):
    """A stale copy of distgan on the caller's PYTHONPATH (a checkout, another install) must not win in the
    processes the tests launch: cpu_env puts the repo first."""
    stale = tmp_path / "stale" / "distgan"
    stale.mkdir(parents=True)
    (stale / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(stale.parent))
    script = tmp_path / "where" / "print_distgan.py"  # run as a script: its own folder, not the repo, is on sys.path
    script.parent.mkdir()
    script.write_text(PRINT_DISTGAN)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=cpu_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout).resolve().is_relative_to(REPO), proc.stdout


def collected(output: str) -> int:
    """The count on pytest's last line ("303 tests collected in 7.1s"); fails on collection errors."""
    last = output.strip().splitlines()[-1]
    match = re.fullmatch(r"(\d+) tests? collected in .*", last)
    assert match, output[-3000:]
    return int(match.group(1))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bare_pytest_collects_what_python_m_pytest_collects(tmp_path):
    """`python -m pytest` puts the current folder on sys.path and the `pytest` command does not; pyproject's
    pythonpath must make them equal (the command runs as a script, like this stand-in for it)."""
    entry = tmp_path / "pytest"
    entry.write_text("import sys\nfrom pytest import console_main\nsys.exit(console_main())\n")
    env = cpu_env()
    env.pop("PYTHONPATH")  # the point is what pytest itself puts on sys.path
    args = ["--collect-only", "-q", "-p", "no:cacheprovider"]
    runs = [subprocess.Popen(cmd + args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for cmd in ([sys.executable, str(entry)], [sys.executable, "-m", "pytest"])]
    try:
        bare, module = (run.communicate(timeout=200)[0] for run in runs)
    finally:
        for run in runs:
            run.kill()
            run.wait()
    assert collected(bare) == collected(module) > 0


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("yes", True), ("", False), ("0", False),
                                            ("false", False), (None, False)])
def test_ci_is_read_as_a_flag(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_a_test_that_cannot_run_skips_here_and_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "0")
    with pytest.raises(pytest.skip.Exception, match="no widget"):
        cannot_run("no widget", "install the widget")
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="no widget; under CI this is a failure: install the widget"):
        cannot_run("no widget", "install the widget")
