"""Fuzzing the commands' input path: overrides drawn from the schema's keys with extreme and ill-typed values, and
mutated dataset.json, export metadata and state.json, through the real parsing and validation.

Every example must end in status 0 or 2 through distgan.cli.run_command (a traceback, i.e. any other exception,
fails the test), quickly, with a one-line message that shows at most a short prefix of a value. Most examples
run in-process (the same functions the commands call); a few run as real processes under a memory cap.
Derandomized: the same examples on every run, so a failure reproduces.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from distgan import cli
from distgan.checkpoint import TrainState, load_checkpoint, save_checkpoint, verify_checkpoint
from distgan.config import Config, load_config
from distgan.data.shards import read_dataset_info, write_shards
from distgan.export import load_generator_export

REPO = Path(__file__).resolve().parents[1]
FUZZ = settings(derandomize=True, deadline=timedelta(seconds=20), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MAX_LINE = 600  # a refusal names a key or file and a short prefix of the value

KEYS = [f"{section.name}.{f.name}" for section in dataclasses.fields(Config)
        for f in dataclasses.fields(section.default_factory())]

HUGE_INTS = st.sampled_from([2**31, 2**63, 2**64, 2**70, 10**12, 10**18, 10**23, -(2**63), -1, 0, 10**300])
CONTROL_TEXT = st.text(alphabet=st.sampled_from(["a", "/", "\n", "\t", "\x00", "\x1b", "\r", "é", " "]), max_size=12)
SNIPPETS = [
    "&a [1, *a]", "[&a 1, *a]", "{a: 1, a: 2}", ".nan", ".inf", "-.inf", "~", "[]", "{}", "yes", "0x7fffffff",
    "1e400", "'\\x00'", "[" * 200 + "]" * 200, "!!binary aGVsbG8=", "!!python/object:os.system {}", "9" * 5000,
    "&x 3", "*x", "[1, [2, [3, [4]]]]", "2001-01-01", "{<<: {a: 1}}",
]
YAML_SNIPPETS = st.sampled_from(SNIPPETS)


def with_each_snippet(test):
    """Every snippet as an explicit example too (drawn examples favour the first ones)."""
    for snippet in SNIPPETS:
        test = example(overrides=[f"train.steps={snippet}", f"generator.hidden={snippet}"])(test)
    return test


def deep(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


VALUES = st.one_of(
    HUGE_INTS, st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), CONTROL_TEXT,
    st.integers(0, 80).map(deep), st.lists(HUGE_INTS, max_size=5),
    st.dictionaries(st.sampled_from(["a", "steps", "width"]), HUGE_INTS, max_size=2),
)


def as_override(key: str, value: object) -> str:
    if isinstance(value, str) and value.startswith("!yaml "):
        return f"{key}={value[len('!yaml '):]}"
    if isinstance(value, float) and not np.isfinite(value):
        return f"{key}={'.nan' if np.isnan(value) else ('.inf' if value > 0 else '-.inf')}"
    return f"{key}={json.dumps(value)}"  # JSON is YAML flow syntax


OVERRIDES = st.lists(st.tuples(st.sampled_from(KEYS + ["train.no_such_key", "nosection.x", "train"]),
                               st.one_of(VALUES, YAML_SNIPPETS.map(lambda s: "!yaml " + s))),
                     min_size=1, max_size=4).map(lambda pairs: [as_override(k, v) for k, v in pairs])


def ends_as_a_command_must(capsys, body, *, seconds: float = 20.0) -> int:
    """Run ``body`` through the commands' one error handler: status 0 or 2, one short line, in time."""
    started = time.monotonic()
    status = cli.run_command("distgan.fuzz", body)  # anything but a user error propagates: a traceback
    assert time.monotonic() - started < seconds
    err = capsys.readouterr().err.strip().splitlines()
    assert status in (0, 2)
    if status == 2:
        assert len(err) == 1 and err[0].startswith("distgan.fuzz: error: ") and len(err[0]) < MAX_LINE, err
    return status


@settings(FUZZ, max_examples=200)
@with_each_snippet
@given(overrides=OVERRIDES)
def test_overrides_end_in_a_config_or_one_line(capsys, overrides):
    ends_as_a_command_must(capsys, lambda: (load_config("smoke", overrides), 0)[1])


@settings(FUZZ, max_examples=80)
@given(text=st.one_of(YAML_SNIPPETS, st.text(max_size=200)), key=st.sampled_from(["train", "log", "x"]))
def test_config_files_end_in_a_config_or_one_line(capsys, tmp_path_factory, text, key):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(f"{key}: {text}\n", errors="surrogatepass") if "\ud800" not in text else path.write_text("{}")
    ends_as_a_command_must(capsys, lambda: (load_config(str(path)), 0)[1])


# ---------------------------------------------------------------- mutated files


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "tiny"
    images = np.random.default_rng(0).integers(0, 256, (12, 8, 8), dtype=np.uint8)
    write_shards(images, [i % 3 for i in range(12)], out, classes=["a", "b", "c"], shard_size=6, progress=False)
    return out


FILE_VALUES = st.one_of(VALUES, st.none(), st.lists(st.text(max_size=5), max_size=4), st.just([1] * 100_000))
# values every file key is also tried with (drawn examples favour the simplest)
FILE_EXAMPLES = [None, -1, 2**70, 10**18, 1.5, float("nan"), "x\n", ["a", "b"], ["a"] * 100_000, [1] * 100_000,
                 {"a": 1}, deep(60), True]


def with_each_value(keys: list[str]):
    def decorate(test):
        for key in keys:
            for value in FILE_EXAMPLES:
                test = example(key=key, value=value)(test)
        return test
    return decorate


@settings(FUZZ, max_examples=60)
@with_each_value(["count", "resolution", "channels", "classes", "shards"])
@given(key=st.sampled_from(["format_version", "count", "resolution", "channels", "classes", "shards", "source",
                            "split", "extra"]), value=FILE_VALUES)
def test_mutated_dataset_json_is_read_or_refused(capsys, tmp_path_factory, shards, key, value):
    folder = tmp_path_factory.mktemp("d") / "tiny"
    shutil.copytree(shards, folder)
    record = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**record, key: value}))
    ends_as_a_command_must(capsys, lambda: (read_dataset_info(str(folder)), 0)[1])


GOOD_META = {"format_version": 1, "generator": {"arch": "mlp", "z_dim": 4, "hidden": [8]}, "resolution": 8,
             "channels": 1, "classes": None, "step": 1, "ema": True}


@settings(FUZZ, max_examples=120)
@with_each_value(["resolution", "classes", "pad", "generator.hidden", "generator.z_dim", "generator.conditional"])
@given(key=st.sampled_from(["format_version", "resolution", "channels", "classes", "pad", "generator",
                            "generator.hidden", "generator.z_dim", "generator.arch", "generator.conditional",
                            "generator.width", "generator.max_width"]), value=FILE_VALUES)
def test_mutated_export_metadata_is_loaded_or_refused(capsys, tmp_path_factory, key, value):
    meta = json.loads(json.dumps(GOOD_META))
    section, _, name = key.partition(".")
    (meta[section] if name else meta)[name or section] = value
    path = tmp_path_factory.mktemp("e") / "g.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"distgan": json.dumps(meta)})
    ends_as_a_command_must(capsys, lambda: (load_generator_export(path), 0)[1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("c") / "checkpoints", TrainState(step=3, images_seen=48,
                           batches_consumed=3), {"G": torch.nn.Linear(2, 2)}, {}, keep=1)


@settings(FUZZ, max_examples=120)
@with_each_value(["step", "images_seen", "world_size", "manifest"])
@given(key=st.sampled_from(["format_version", "step", "images_seen", "batches_consumed", "world_size",
                            "skipped_steps", "manifest", "extra"]), value=FILE_VALUES)
def test_mutated_state_json_is_intact_or_damaged(capsys, tmp_path_factory, checkpoint, key, value):
    path = tmp_path_factory.mktemp("s") / checkpoint.name
    shutil.copytree(checkpoint, path)
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**state, key: value}))
    problem = verify_checkpoint(path)
    assert problem is None or (isinstance(problem, str) and len(problem) < MAX_LINE)
    if problem is None:  # what passes as intact loads
        ends_as_a_command_must(capsys, lambda: (load_checkpoint(path, {"G": torch.nn.Linear(2, 2)}), 0)[1])


# ---------------------------------------------------------------- real processes under a memory cap


PARSE_ONLY = ("import sys; from distgan.cli import run_command; from distgan.config import load_config; "
              "sys.exit(run_command('distgan.train', lambda: (load_config('smoke', sys.argv[1:]), 0)[1]))")


@settings(FUZZ, max_examples=6)
@given(overrides=OVERRIDES)
def test_overrides_in_a_real_process_stay_under_a_memory_cap(overrides):
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", PARSE_ONLY, *overrides], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60, preexec_fn=cap)
    assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, proc.stderr[-3000:]
