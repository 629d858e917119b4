"""distgan.sample's truncation trick: what it does to the latents, and through the CLI on an export."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from distgan.config import GeneratorConfig
from distgan.export import export_generator
from distgan.nn import build_generator
from distgan.generation import truncate
from distgan.sample import main as sample_main


def test_resample_keeps_every_entry_inside_and_the_rest_untouched():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 16, generator=gen)
    out = truncate(z, 0.5, "resample", gen)
    inside = z.abs() <= 0.5
    assert out.abs().max() <= 0.5 and torch.equal(out[inside], z[inside]) and not torch.equal(out, z)
    assert abs(out.std().item() - 0.28) < 0.02  # N(0,1) truncated to [-0.5, 0.5] has std 0.2835


def test_scale_multiplies():
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(truncate(z, 0.7, "scale", torch.Generator()), z * 0.7)


def test_the_cli_draws_truncated_samples_and_refuses_bad_values(tmp_path, capsys):
    cfg = GeneratorConfig(arch="mlp", z_dim=8, hidden=[16])
    torch.manual_seed(0)
    export = export_generator(tmp_path / "g.safetensors", build_generator(cfg, 8, 1), cfg, 8, 1, None, 1, ema=True)
    grids = {}
    for name, extra in (("plain", []), ("resample", ["--truncation", "0.3"]),
                        ("scale", ["--truncation", "0.3", "--truncation-mode", "scale"])):
        assert sample_main(["--export", str(export), "--n", "16", "--grid", "--out", str(tmp_path / name), *extra]) == 0
        grid = np.asarray(Image.open(tmp_path / name / "grid.png"), dtype=np.float64)
        grids[name] = np.stack([grid[2 + 10 * r:10 + 10 * r, 2 + 10 * c:10 + 10 * c] for r in range(4) for c in range(4)])
    # truncated latents vary less, so the images do: per-pixel spread over the 16 samples shrinks
    spread = {k: v.std(axis=0).mean() for k, v in grids.items()}
    assert spread["resample"] < spread["plain"] and spread["scale"] < spread["plain"], spread
    capsys.readouterr()
    assert sample_main(["--export", str(export), "--n", "4", "--out", str(tmp_path / "x"), "--truncation", "2",
                        "--truncation-mode", "scale"]) == 2
    assert "must be in (0, 1]" in capsys.readouterr().err


def test_onnx_export_runs_in_onnxruntime_like_pytorch(tmp_path, capsys):
    import onnxruntime  # a test extra: CI must have it

    cfg = GeneratorConfig(arch="dcgan", z_dim=16, width=8)
    torch.manual_seed(0)
    model = build_generator(cfg, 28, 1).eval()
    export = export_generator(tmp_path / "g.safetensors", model, cfg, 28, 1, ["a", "b"], 5, ema=True)
    assert sample_main(["--export", str(export), "--onnx", str(tmp_path / "g.onnx")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["max_abs_difference"] < 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    z = torch.randn(3, 16, generator=torch.Generator().manual_seed(9))  # another batch size than the export's
    (images,) = session.run(["images"], {"z": z.numpy()})
    with torch.no_grad():
        assert np.abs(images - model(z).numpy()).max() < 1e-4
    meta = json.loads(session.get_modelmeta().custom_metadata_map["distgan"])
    assert meta["classes"] == ["a", "b"] and meta["resolution"] == 28 and meta["generator"]["z_dim"] == 16


@pytest.mark.parametrize("conditioning", ["norm", "concat"])
def test_a_conditional_generator_exports_to_onnx_with_its_classes(conditioning, tmp_path, capsys):
    import onnxruntime

    cfg = GeneratorConfig(arch="dcgan", z_dim=16, width=8, conditional=True, conditioning=conditioning)
    torch.manual_seed(0)
    model = build_generator(cfg, 28, 1, num_classes=3).eval()
    with torch.no_grad():  # trained class parameters, not the all-classes-alike start
        for name, p in model.named_parameters():
            if name.endswith(("gain.weight", "shift.weight", "embed.weight")):
                p.normal_()
    export = export_generator(tmp_path / "g.safetensors", model, cfg, 28, 1, ["a", "b", "c"], 5, ema=True)
    assert sample_main(["--export", str(export), "--onnx", str(tmp_path / "g.onnx")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["max_abs_difference"] < 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["z", "y"]
    z = torch.randn(5, 16, generator=torch.Generator().manual_seed(9))
    for y in (torch.tensor([0, 1, 2, 2, 1]), torch.tensor([2, 2, 0, 1, 0])):
        (images,) = session.run(["images"], {"z": z.numpy(), "y": y.numpy()})
        with torch.no_grad():
            assert np.abs(images - model(z, y).numpy()).max() < 1e-4
    with torch.no_grad():
        assert (model(z, torch.zeros(5, dtype=torch.long)) - model(z, torch.ones(5, dtype=torch.long))).abs().max() > 1e-3
    assert json.loads(session.get_modelmeta().custom_metadata_map["distgan"])["classes"] == ["a", "b", "c"]
