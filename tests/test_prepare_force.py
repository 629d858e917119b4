"""``prepare --out``/``--force`` (and ``write_shards``) never damage what distgan did not write, and --out is a path."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distgan import prepare
from distgan.data.errors import DataError
from distgan.data.shards import write_shards
from compare import assert_same_bytes


def make_npz(path: Path, n: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=np.full((n, 4, 4), 7, np.uint8))
    return path


def run_prepare(capsys, src: Path, out: str | Path, *extra: str) -> tuple[int, str]:
    code = prepare.main(["npz", "--src", str(src), "--out", str(out), "--no-progress", *extra])
    return code, capsys.readouterr().err


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_force_replaces_a_distgan_shard_folder(tmp_path, capsys):
    src = make_npz(tmp_path / "a.npz")
    assert run_prepare(capsys, src, tmp_path / "ds")[0] == 0
    assert run_prepare(capsys, make_npz(tmp_path / "b.npz", n=9), tmp_path / "ds", "--force")[0] == 0
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["count"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz", "ds"]  # nothing left aside


@pytest.mark.parametrize("case", ["the source folder", "a folder holding the source", "a plain file",
                                  "an unrelated folder", "shards plus a foreign file"])
def test_force_refuses_what_distgan_did_not_write(tmp_path, capsys, case):
    src = make_npz(tmp_path / "data" / "images.npz")
    if case == "the source folder":
        src, out = tmp_path / "images", tmp_path / "images"
        src.mkdir()
        from PIL import Image
        for i in range(3):
            Image.fromarray(np.full((4, 4), i, np.uint8)).save(src / f"{i}.png")
        (src / "dataset.json").write_text("{}")  # even one that looks like ours: it is the source
        source = "folder"
    elif case == "a folder holding the source":
        out, source = tmp_path / "data", "npz"
        (out / "dataset.json").write_text("{}")
    elif case == "a plain file":
        out, source = tmp_path / "notes.txt", "npz"
        out.write_text("keep me")
    elif case == "an unrelated folder":
        out, source = tmp_path / "thesis", "npz"
        out.mkdir()
        (out / "chapter1.tex").write_text("keep me")
    else:
        out, source = tmp_path / "ds", "npz"
        write_shards(np.zeros((3, 4, 4), np.uint8), None, out, progress=False)
        (out / "my-notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    code = prepare.main([source, "--src", str(src), "--out", str(out), "--force", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--force will not replace {out}" in err and ("choose" in err or "move it away" in err)
    assert snapshot(tmp_path) == before  # nothing deleted, nothing written


@pytest.mark.parametrize("url", ["pipe:touch {marker}", "PIPE:touch {marker}", "  pipe:touch {marker}",
                                 "Pipe:touch {marker}/x"])
def test_out_url_is_refused_before_the_writer(tmp_path, capsys, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    src = make_npz(tmp_path / "a.npz")
    marker = tmp_path / "ran"
    code, err = run_prepare(capsys, src, url.format(marker=marker))
    assert code == 2 and "--out" in err and "local folder" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]
    with pytest.raises(DataError, match="not a URL"):
        write_shards(np.zeros((2, 4, 4), np.uint8), None, url.format(marker=marker), progress=False)
    assert not marker.exists()


def test_write_shards_protects_the_export(tmp_path):
    """``sample --shards --force`` passes its export file: an --out holding it is refused."""
    run = tmp_path / "run"
    write_shards(np.zeros((2, 4, 4), np.uint8), None, run, progress=False)
    export = run / "generator_ema.safetensors"
    with pytest.raises(DataError, match="holds .*generator_ema.safetensors, which this command reads"):
        export.write_bytes(b"weights")
        write_shards(np.zeros((2, 4, 4), np.uint8), None, run, force=True, protect=[export], progress=False)
    assert_same_bytes(export.read_bytes(), b"weights", "the export")


def test_sample_shards_force_replaces_only_its_own_shards(tmp_path, capsys):
    from distgan import sample
    from distgan.config import GeneratorConfig
    from distgan.export import export_generator
    from distgan.nn import build_generator

    cfg = GeneratorConfig(arch="mlp", z_dim=4, hidden=[8], norm="none")
    run = tmp_path / "run"
    run.mkdir()
    export = export_generator(run / "generator_ema.safetensors", build_generator(cfg, 8, 1), cfg, 8, 1, None, 1, True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    before = snapshot(tmp_path)
    for out in (run, tmp_path / "notes", export):
        assert sample.main(["--export", str(export), "--n", "3", "--out", str(out), "--shards", "--force"]) == 2
        err = capsys.readouterr().err
        assert f"--force will not replace {out}" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before
    for n in (3, 5):  # written, then replaced: it is distgan's
        assert sample.main(["--export", str(export), "--n", str(n), "--out", str(tmp_path / "gen"), "--shards", "--force"]) == 0
    assert json.loads((tmp_path / "gen" / "dataset.json").read_text())["count"] == 5


def test_an_out_folder_with_a_percent_sign_is_written(tmp_path):
    """The shard writer %-formats its pattern: a '%' in the folder name was a TypeError traceback."""
    out = tmp_path / "100%d sure"
    images = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 1), dtype=np.uint8)
    info = write_shards(list(images), None, out, shard_size=4, progress=False)
    assert info.count == 6 and sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
