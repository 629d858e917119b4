"""Class-conditional GANs: the projection head and the class embedding, the labels each phase gets, every loss and
penalty, resume, the class agreement metric, and sampling one class or one row per class through the real CLIs."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import run_cli
from distgan import eval as eval_cli
from distgan import sample as sample_cli
from distgan import train as train_cli
from distgan.config import Config, ConfigError, DiscriminatorConfig, GeneratorConfig, load_config
from distgan.data.shards import read_shard, write_shards
from distgan.export import export_generator
from distgan.metrics.class_agreement import class_agreement
from distgan.metrics.fd_per_class import per_class_frechet, real_class_stats
from distgan.metrics.features import CLASSIFIER_FILE, FeatureClassifier, save_classifier
from distgan.nn import build_discriminator, build_generator
from distgan.nn.conditional import NORM_LAYERS, ClassNorm
from distgan.trainer import DRAW_D_LABEL, DRAW_G_LABEL, Trainer, derive_seed
from test_cli_errors import one_line_error
from test_every_option import TINY, check_run, metrics, train

COND = ("generator.conditional=true", "discriminator.conditional=true")


def load(data: Path, run: Path, *overrides: str) -> Config:
    return load_config(None, [*TINY, *COND, f"data.path={data}", f"run.dir={run}", *overrides])


# ---------------------------------------------------------------- the networks


@pytest.mark.parametrize("arch", ["dcgan", "mlp"])
def test_projection_head_and_embedding_in_float64(arch):
    torch.manual_seed(0)
    D = build_discriminator(DiscriminatorConfig(arch=arch, width=4, hidden=[16, 8], norm="layer", conditional=True),
                            28, 1, num_classes=3).double()
    G = build_generator(GeneratorConfig(arch=arch, width=4, z_dim=8, hidden=[16], conditional=True,
                                        conditioning="concat"), 28, 1, num_classes=3).double().eval()
    with torch.no_grad():
        D.embed.weight.normal_()  # a trained projection, not the near-zero start
    x, y = torch.randn(5, 1, 28, 28, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    h = D.features(x)
    expected = D.linear(h)[:, 0] + (D.embed.weight[y] * h).sum(1)  # Miyato & Koyama: linear + <embed(y), h>
    torch.testing.assert_close(D(x, y), expected, rtol=1e-12, atol=1e-12)
    assert (D(x, y) - D(x, (y + 1) % 3)).abs().min() > 1e-6  # the class changes every logit
    z = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(G(z, y), G.net(torch.cat([z, G.embed.weight[y]], 1)), rtol=0, atol=0)
    assert (G(z, y) - G(z, (y + 1) % 3)).abs().amax(dim=(1, 2, 3)).min() > 1e-6


@pytest.mark.parametrize("arch,norm", [("dcgan", "batch"), ("mlp", "batch"), ("dcgan", "sync-batch")])
def test_class_conditional_norm_in_float64(arch, norm):
    """generator.conditioning=norm: each norm layer's output times (1 + gain[y]) plus shift[y]; it starts as the
    unconditional network (zero gains and shifts), and z stays G's only input."""
    torch.manual_seed(0)
    cfg = GeneratorConfig(arch=arch, width=4, z_dim=8, hidden=[16], norm=norm, conditional=True, conditioning="norm")
    G = build_generator(cfg, 28, 1, num_classes=3).double().eval()
    plain = build_generator(dataclasses.replace(cfg, conditional=False), 28, 1).double().eval()
    class_norms = [m for m in G.net.net if isinstance(m, ClassNorm)]
    assert class_norms and not hasattr(G, "embed") and G.net.net[0].in_features == 8
    plain.load_state_dict({k.replace(".norm.", "."): v for k, v in G.net.state_dict().items()
                           if ".gain." not in k and ".shift." not in k})
    z, y = torch.randn(5, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    torch.testing.assert_close(G(z, y), plain(z), rtol=0, atol=0)  # the start: every class alike
    with torch.no_grad():
        for m in class_norms:
            m.gain.weight.normal_()
            m.shift.weight.normal_()
    x, i = z, 0  # the same network by hand
    for layer in plain.net:
        x = layer(x)
        if isinstance(layer, NORM_LAYERS):
            shape = (5, -1) + (1,) * (x.dim() - 2)
            x = x * (1 + class_norms[i].gain.weight[y].view(shape)) + class_norms[i].shift.weight[y].view(shape)
            i += 1
    torch.testing.assert_close(G(z, y), x, rtol=1e-12, atol=1e-12)
    assert (G(z, y) - G(z, (y + 1) % 3)).abs().amax(dim=(1, 2, 3)).min() > 1e-6


def test_norm_conditioning_needs_a_norm_layer():
    cfg = GeneratorConfig(arch="dcgan", width=4, z_dim=8, norm="none", conditional=True, conditioning="norm")
    with pytest.raises(ConfigError, match="generator.conditioning=norm.*no normalisation layer.*conditioning=concat"):
        build_generator(cfg, 28, 1, num_classes=3)


def test_the_two_keys_must_agree_and_unlabeled_data_is_refused(capsys, tmp_path):
    with pytest.raises(ConfigError, match="generator.conditional=True but discriminator.conditional=False"):
        load_config(None, ["generator.conditional=true"])
    unlabeled = tmp_path / "unlabeled"
    write_shards(np.zeros((8, 1, 28, 28), np.uint8), None, unlabeled, progress=False)
    line = one_line_error(capsys, train_cli.main, ["--config", "smoke", *COND, f"data.path={unlabeled}",
                                                   f"run.dir={tmp_path / 'run'}"])
    assert "generator.conditional=true needs labeled data" in line and "conditional=false" in line


# ---------------------------------------------------------------- training


def record_calls(module: torch.nn.Module) -> list[tuple[torch.Tensor, ...]]:
    calls: list = []
    module.register_forward_pre_hook(lambda _m, args: calls.append(tuple(a.detach().clone() for a in args)))
    return calls


@pytest.mark.timeout(120)
def test_each_phase_gets_its_labels(fashion_shards, tmp_path):
    """D judges real images with their own labels, fakes with the classes G made them for, drawn per step."""
    trainer = Trainer(load(fashion_shards, tmp_path / "run", "train.steps=2"))
    d_calls, g_calls = record_calls(trainer.D_plain), record_calls(trainer.G_plain)
    real_labels = []  # (images, labels) as the data stream yields them
    batches = trainer.source.batches

    def recorded(*args):
        for images, labels in batches(*args):
            real_labels.append((images.clone(), labels.clone()))
            yield images, labels

    trainer.source.batches = recorded
    trainer.fit()
    B, K = 8, 10
    for step in range(2):
        fake_d = torch.randint(K, (B,), generator=torch.Generator().manual_seed(derive_seed(0, step, DRAW_D_LABEL, 0)))
        fake_g = torch.randint(K, (B,), generator=torch.Generator().manual_seed(derive_seed(0, step, DRAW_G_LABEL, 0)))
        (real, labels), calls = real_labels[step], d_calls[3 * step:3 * step + 3]  # D: real, fake; G phase: fake
        assert torch.equal(calls[0][0], real) and torch.equal(calls[0][1], labels)
        assert torch.equal(g_calls[3 * step][1], fake_d) and torch.equal(calls[1][1], fake_d)
        assert torch.equal(g_calls[3 * step + 1][1], fake_g) and torch.equal(calls[2][1], fake_g)
        assert len(set(labels.tolist())) > 1 and labels.min() >= 0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("overrides", [
    ("loss.kind=hinge", "loss.penalty=r1", "discriminator.norm=spectral"),
    ("loss.kind=wasserstein", "loss.penalty=wgan-gp", "discriminator.norm=layer", "generator.norm=sync-batch"),
    ("loss.kind=non-saturating", "loss.penalty=r2", "generator.arch=mlp", "discriminator.arch=mlp"),
    ("loss.kind=minimax", "discriminator.arch=maxout", "generator.arch=tf_dcgan", "discriminator.norm=none"),
    ("generator.conditioning=concat", "generator.norm=none"),
], ids=["hinge-r1", "wgan-gp", "r2-mlp", "minimax-maxout-tf_dcgan", "concat"])
def test_conditional_trains_with_losses_penalties_and_archs(overrides, fashion_shards, tmp_path):
    trainer, before = train(load(fashion_shards, tmp_path / "run", "train.steps=3", *overrides))
    check_run(trainer, before)  # every figure finite, the penalty logged on its steps, weights moved
    concat = "generator.conditioning=concat" in overrides
    class_params = {"G": ["embed.weight"] if concat else [k for k in before["G"] if k.endswith(("gain.weight", "shift.weight"))],
                    "D": ["embed.weight"]}
    assert len(class_params["G"]) >= (1 if concat else 2), "no class parameters in G"
    for name, model in (("G", trainer.G_plain), ("D", trainer.D_plain)):
        now = model.state_dict()
        for key in class_params[name]:
            assert not torch.equal(now[key], before[name][key]), f"{name}'s {key} is fixed"


@pytest.mark.timeout(180)
def test_conditional_run_resumes_bit_identical(fashion_shards, tmp_path):
    first, _ = train(load(fashion_shards, tmp_path / "split", "train.steps=2", "checkpoint.every=1000"), resume="auto")
    train(load(fashion_shards, tmp_path / "split", "train.steps=4", "checkpoint.every=1000"), resume="auto")
    train(load(fashion_shards, tmp_path / "straight", "train.steps=4", "checkpoint.every=1000"))
    for name in ("G", "D", "G_ema"):
        a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-00000004" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "split" / "checkpoints" / "step-00000004" / f"{name}.safetensors"))
        class_key = "embed.weight" if name == "D" else "net.net.2.gain.weight"  # the class parameters are saved
        assert class_key in a and a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: 2 + resume + 2 != 4 steps"


# ---------------------------------------------------------------- class agreement


def test_per_class_fd_charges_a_class_whose_samples_all_look_alike():
    """Every class's samples from its real distribution: per-class fd near 0. One class collapsed onto a single
    (correctly classified) point: class agreement would not notice, the per-class figures do."""
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(3000, 4, generator=gen, dtype=torch.float64)
    labels = torch.arange(3000) % 3
    real += labels[:, None] * 5.0  # three well-separated classes
    stats = real_class_stats(real, labels)
    fake = torch.randn(3000, 4, generator=gen, dtype=torch.float64) + labels[:, None] * 5.0
    good = per_class_frechet(fake, labels, stats)
    assert max(good.values()) < 0.05  # sampling noise of 1,000 samples in 4 dimensions
    fake[labels == 1] = 5.0 + 0.001 * torch.randn(1000, 4, generator=gen, dtype=torch.float64)
    collapsed = per_class_frechet(fake, labels, stats)
    assert collapsed[1] == pytest.approx(4.0, abs=0.2)  # trace(I) + trace(0) - 2 trace(0): 4, the lost variance
    assert collapsed[0] == good[0] and collapsed[2] == good[2]
    with pytest.raises(ValueError, match="raise eval.n"):
        per_class_frechet(fake[:4], labels[:4], stats)


def test_class_agreement_counts_matches():
    assert class_agreement(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])) == 0.75
    with pytest.raises(ValueError, match="shapes"):
        class_agreement(torch.tensor([0, 1]), torch.tensor([0]))


@pytest.mark.timeout(180)
def test_class_agreement_during_training_and_skipped_when_unconditional(fashion_shards, tmp_path, caplog, capsys):
    """With a constant classifier (zero weights, bias on class 3) the share is exactly that of class 3 among the
    classes the images were generated for: 0, 1, ..., 9, 0, ... (n=50: 5 of 50)."""
    data = tmp_path / "fm"
    shutil.copytree(fashion_shards, data)
    classifier = FeatureClassifier(1, 28, 10)
    with torch.no_grad():
        for p in classifier.parameters():
            p.zero_()
        classifier.head.bias[3] = 1.0
    save_classifier(classifier, data / CLASSIFIER_FILE)
    evals = ("eval.metrics=[class_agreement]", "eval.every=2", "eval.n=50", "eval.batch=20", "train.steps=2")
    train(load(data, tmp_path / "run", *evals))
    figures = [line for line in metrics(tmp_path / "run") if "eval/class_agreement" in line]
    assert [line["eval/class_agreement"] for line in figures] == [0.1]
    assert eval_cli.main(["--run", str(tmp_path / "run"), "--metrics", "class_agreement", "--n", "40"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["class_agreement"] == 4 / 40  # the export too
    torch.manual_seed(0)  # features that vary (the constant classifier's are all zero): per-class fd through the CLI
    save_classifier(FeatureClassifier(1, 28, 10), data / CLASSIFIER_FILE)
    assert eval_cli.main(["--run", str(tmp_path / "run"), "--metrics", "fd_per_class", "--n", "60"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < answer["fd_per_class"] <= answer["fd_worst_class"] < float("inf")
    plain = load_config(None, [*TINY, f"data.path={data}", f"run.dir={tmp_path / 'plain'}", *evals])
    train(plain)
    assert not any("eval/class_agreement" in line for line in metrics(tmp_path / "plain"))
    assert "class agreement skipped: the generator is not class-conditional" in caplog.text


# ---------------------------------------------------------------- sampling through the CLIs


def give_every_class_its_own_look(export: Path) -> None:
    """Three steps leave the class-conditional norms' gain and shift near zero: the classes then differ by less than
    a grey level, no more than two processes' rounding. Seeded unit-scale embeddings make a wrong class show."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(export), "pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(export))
    torch.manual_seed(0)
    for name, tensor in tensors.items():
        if name.endswith((".gain.weight", ".shift.weight")):
            tensors[name] = torch.randn(tensor.shape, dtype=tensor.dtype)
    save_file(tensors, str(export), metadata=metadata)


@pytest.mark.timeout(300)
def test_train_and_sample_a_class_and_a_row_per_class_through_the_cli(fashion_shards, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    run_cli("distgan.train", "--config", "smoke", *COND, "train.steps=3", f"data.path={fashion_shards}",
            f"run.dir={run}", "log.gif=false")
    meta = json.loads((run / "generator_ema.json").read_text())
    assert meta["generator"]["conditional"] is True and meta["classes"][8] == "Bag"
    give_every_class_its_own_look(run / "generator_ema.safetensors")
    run_cli("distgan.sample", "--run", str(run), "--grid", "--per-class", "--n", "3", "--out", str(out / "rows"))
    run_cli("distgan.sample", "--run", str(run), "--class", "Bag", "--n", "3", "--out", str(out / "bag"))
    run_cli("distgan.sample", "--run", str(run), "--class", "8", "--n", "3", "--out", str(out / "eight"))
    grid = np.asarray(Image.open(out / "rows" / "grid.png"))
    step = 28 + 2  # image + padding
    assert grid.shape == (10 * step + 2, 3 * step + 2)  # ten rows of three

    def cell(row: int, col: int) -> np.ndarray:
        return grid[2 + row * step:2 + row * step + 28, 2 + col * step:2 + col * step + 28]

    def levels_apart(a: np.ndarray, b: np.ndarray) -> int:
        return int(np.abs(a.astype(int) - b.astype(int)).max())

    # Two processes agree to float rounding only (CPU kernels are not bitwise reproducible across processes): one
    # grey level at most, where a value sits on a rounding boundary.
    for col in range(3):  # --class Bag (or 8) is the per-class grid's row 8: the same seed, the same latents
        bag, eight = (np.asarray(Image.open(out / name / f"{col:06d}.png")) for name in ("bag", "eight"))
        assert levels_apart(bag, cell(8, col)) <= 1 and levels_apart(bag, eight) <= 1
    for row in range(10):
        assert row == 8 or levels_apart(cell(row, 0), cell(8, 0)) > 8, f"row {row} looks like class 8"
    run_cli("distgan.sample", "--run", str(run), "--shards", "--n", "20", "--out", str(out / "shards"))
    info = json.loads((out / "shards" / "dataset.json").read_text())
    assert info["classes"] == meta["classes"]  # every class in turn, labeled: data for another conditional run
    shard = read_shard(str(out / "shards" / info["shards"][0]), resolution=28, channels=1)
    assert shard.labels.tolist() == [i % 10 for i in range(20)]
    line = one_line_error(capsys, sample_cli.main, ["--run", str(run), "--class", "Sweater", "--out", str(out)])
    assert "--class Sweater: not a class of this generator" in line and "Ankle boot" in line


def test_an_unconditional_export_refuses_class_options(capsys, tmp_path):
    cfg = GeneratorConfig(arch="mlp", z_dim=4, hidden=[8])
    path = export_generator(tmp_path / "g.safetensors", build_generator(cfg, 28, 1), cfg, 28, 1, ["a", "b"], 1, True)
    for flags, flag in ((["--class", "a"], "--class"), (["--grid", "--per-class"], "--per-class")):
        line = one_line_error(capsys, sample_cli.main, ["--export", str(path), *flags, "--out", str(tmp_path / "o")])
        assert line.startswith(f"distgan.sample: error: {flag}: this generator is not class-conditional"), line
    cond = dataclasses.replace(cfg, conditional=True)
    path = export_generator(tmp_path / "c.safetensors", build_generator(cond, 28, 1, 2), cond, 28, 1, ["a", "b"], 1,
                            True)
    line = one_line_error(capsys, sample_cli.main, ["--export", str(path), "--per-class", "--out", str(tmp_path)])
    assert "--per-class goes with --grid" in line


def test_an_export_older_than_generator_conditioning_loads_as_concat(tmp_path):
    """Exports written before the key existed have no 'conditioning': concat was the only way then."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from distgan.export import load_generator_export

    cfg = GeneratorConfig(arch="dcgan", z_dim=8, width=4, conditional=True, conditioning="concat")
    torch.manual_seed(0)
    model = build_generator(cfg, 28, 1, num_classes=3).eval()
    path = export_generator(tmp_path / "g.safetensors", model, cfg, 28, 1, ["a", "b", "c"], 5, ema=True)
    with safe_open(str(path), "pt") as fh:
        meta = json.loads(fh.metadata()["distgan"])
    del meta["generator"]["conditioning"]
    save_file(load_file(str(path)), str(path), metadata={"distgan": json.dumps(meta)})
    loaded, loaded_meta = load_generator_export(path)
    assert loaded.conditioning == loaded_meta["generator"]["conditioning"] == "concat"
    z, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        assert torch.equal(loaded(z, y), model(z, y))
