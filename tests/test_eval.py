"""Evaluation on real Fashion-MNIST: the Evaluator, its 1 vs 2 process equality, and the eval CLIs."""
from __future__ import annotations

import json
import logging
import math
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import prepare_fashion_mnist, run_cli
from distgan.export import load_generator_export
from distgan.config import ConfigError, DataConfig, EvalConfig
from distgan.data.shards import read_dataset_info, read_images, to_float, write_shards
from distgan.eval import main as eval_main
from distgan.metrics.cache import data_cache
from distgan.metrics.evaluator import CACHE_DIR, Evaluator
from distgan.metrics.features import CLASSIFIER_FILE
from tests.distributed.launching import launch

ALL = ["fd", "kid", "pr", "classes_covered", "parzen", "dc", "is_classifier"]
FIGURES = {"fd", "kid_x1e3", "kid_std_x1e3", "precision", "recall", "modes_covered", "kl_to_real", "parzen_ll",
           "parzen_se", "parzen_sigma", "density", "coverage", "is_classifier", "is_classifier_std"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """2,000 train images (4 shards), 500 test images beside them as DIR_test, and a classifier (CLI)."""
    return prepare_fashion_mnist(tmp_path_factory.mktemp("eval_data"), train=2000, test=500)


@pytest.fixture(scope="module")
def classifier_report(shards) -> dict:
    return json.loads(run_cli("distgan.eval", "train-features", "--data", str(shards), "--steps", "150").stdout)


@pytest.fixture(scope="module")
def smoke_run(shards, classifier_report, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "smoke"
    run_cli("distgan.train", "--config", "smoke", f"data.path={shards}", f"run.dir={run}", "log.wandb=false",
            "eval.metrics=[fd,classes_covered]", "eval.every=10", "eval.n=200", "eval.best_metric=fd")
    return run


def test_training_evaluates_logs_and_keeps_the_best(smoke_run):
    records = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/fd" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert all(r["eval/fd"] > 0 and 1 <= r["eval/modes_covered"] <= 10 for r in evals)
    reference = [r for r in records if "eval_ref/fd" in r]
    assert len(reference) == 1 and reference[0]["eval_ref/fd"] < min(r["eval/fd"] for r in evals)
    best = json.loads((smoke_run / "checkpoints" / "best" / "best.json").read_text())
    best_step = min(evals, key=lambda r: r["eval/fd"])["step"]
    assert best["metric"] == "fd" and best["step"] == best_step
    assert (smoke_run / "checkpoints" / "best" / best["checkpoint"] / "G_ema.safetensors").is_file()
    assert {p.name for p in (smoke_run / "plots").glob("*.png")} >= {"losses.png", "eval.png"}


def make_evaluator(data: Path, n: int = 300, metrics=("fd", "kid", "pr", "classes_covered", "dc", "is_classifier"), seed: int = 0) -> Evaluator:
    cfg = EvalConfig(n=n, batch=100, metrics=list(metrics))
    return Evaluator(cfg, DataConfig(path=str(data), num_workers=0), read_dataset_info(str(data)), torch.device("cpu"),
                     seed)


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


class ImageBank(nn.Module):
    """A 'generator' returning real images: each latent picks one image of the bank (deterministically)."""

    z_dim = 8

    def __init__(self, images: torch.Tensor):
        super().__init__()
        self.register_buffer("images", images)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.images[(z[:, 0] * 1e4).floor().long() % len(self.images)]


class Noise(nn.Module):
    """A 'generator' of noise images: a fixed random projection of the latent."""

    z_dim = 8

    def __init__(self, shape=(1, 28, 28)):
        super().__init__()
        self.shape = shape
        self.register_buffer("w", torch.randn(self.z_dim, int(np.prod(shape)), generator=torch.Generator().manual_seed(1)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.w).view(len(z), *self.shape)


def test_train_features_cli_reaches_stated_accuracy(shards, classifier_report):
    assert classifier_report["accuracy_on"].startswith("test split") and classifier_report["accuracy_images"] == 500
    # measured 0.77 (150 steps of 64 on 2,000 images, 500 test images)
    assert classifier_report["accuracy"] >= 0.65 and classifier_report["num_classes"] == 10
    kept = data_cache(shards) / CLASSIFIER_FILE  # in distgan's cache folder, keyed by the data set
    assert classifier_report["path"] == str(kept) and kept.is_file() and kept.with_suffix(".json").is_file()
    assert not (shards / CLASSIFIER_FILE).exists()


def test_real_images_beat_noise_and_one_class_collapses(shards, classifier_report, caplog):
    test_images, _ = read_images(read_dataset_info(str(shards) + "_test"), DataConfig(), 500, seed=0)
    real = to_float(torch.from_numpy(test_images))
    evaluator = make_evaluator(shards)
    with caplog.at_level(logging.WARNING, logger="distgan.metrics.evaluator"):
        good = evaluator.evaluate(ImageBank(real), 0, 1, identity)
        assert not [r for r in caplog.records if "mode collapse" in r.message]
        noise = evaluator.evaluate(Noise(), 0, 1, identity)
        one = evaluator.evaluate(ImageBank(real[:1]), 0, 1, identity)
    assert good["fd"] < 0.1 * noise["fd"] and good["kid_x1e3"] < 0.1 * noise["kid_x1e3"]
    assert good["precision"] > 0.7 and good["recall"] > 0.7 and noise["precision"] < 0.1
    assert good["modes_covered"] == 10 and good["kl_to_real"] < 0.1
    assert good["coverage"] > 0.7 and 0.7 < good["density"] < 1.3 and noise["coverage"] < 0.1
    assert good["is_classifier"] > 3 > 1.5 > one["is_classifier"]  # 10 classes vs one image
    assert one["modes_covered"] == 1 and one["kl_to_real"] > 2.0
    warnings = [r.message for r in caplog.records if "mode collapse?" in r.message]
    assert warnings and "1 of 10 classes" in warnings[-1]
    reference = evaluator.reference()  # train vs test: the floor, close to the real-image generator
    assert reference["modes_covered"] == 10 and reference["fd"] < 0.1 * noise["fd"]


def test_latent_slices_cover_the_same_images_for_any_process_count(shards, classifier_report):
    evaluator = make_evaluator(shards, n=250)
    z1, per1, batch = evaluator.latents(16, 1)
    for world in (2, 3):
        z, per, b = evaluator.latents(16, world)
        assert b == batch and per % batch == 0 and len(z) == world * per >= 250
        assert torch.equal(z[:250], z1[:250])  # rank r's slice starts at r * per: whole batches of the same set


def test_same_seed_same_figures_and_disk_cache(smoke_run, shards, monkeypatch):
    model, meta = load_generator_export(smoke_run / "generator_ema.safetensors")
    first = make_evaluator(shards, n=200, metrics=ALL, seed=5)
    a = first.evaluate(model, 0, 1, identity)
    assert first.evaluate(model, 0, 1, identity) == a and set(a) == FIGURES
    cached = list((data_cache(shards) / CACHE_DIR).glob("real-classifier-n200-*.safetensors"))
    assert len(cached) == 1 and not (shards / CACHE_DIR).exists()
    import distgan.metrics.evaluator as evaluator_module

    def no_reading(*args, **kwargs):
        raise AssertionError("real images read again although they are cached")

    monkeypatch.setattr(evaluator_module, "read_images", no_reading)
    second = make_evaluator(shards, n=200, metrics=ALL, seed=5)
    assert second.evaluate(model, 0, 1, identity) == a  # a fresh Evaluator, from the disk cache
    assert make_evaluator(shards, n=200, metrics=["fd"], seed=6).evaluate(model, 0, 1, identity)["fd"] != a["fd"]


DISTRIBUTED_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from accelerate import Accelerator
    from distgan.export import load_generator_export
    from distgan.config import DataConfig, EvalConfig
    from distgan.data.shards import read_dataset_info
    from distgan.metrics.evaluator import Evaluator

    export, data, out = sys.argv[1:4]
    acc = Accelerator(cpu=True)
    model, meta = load_generator_export(Path(export))
    cfg = EvalConfig(n=200, batch=64, metrics=["fd", "kid", "pr", "classes_covered", "parzen", "dc", "is_classifier"])
    evaluator = Evaluator(cfg, DataConfig(path=data, num_workers=0), read_dataset_info(data), acc.device, seed=3,
                          z_dist=meta["generator"]["z_dist"])
    figures = evaluator.evaluate(model, acc.process_index, acc.num_processes, acc.gather)
    assert (figures != {}) == acc.is_main_process
    if acc.is_main_process:
        Path(out).write_text(json.dumps({"world": acc.num_processes, "figures": figures}))
    acc.wait_for_everyone()
    acc.end_training()
""")


@pytest.mark.timeout(300)
def test_two_processes_give_the_single_process_figures(smoke_run, shards, tmp_path):
    script = tmp_path / "eval_dist.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    results = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}.json"
        launch([str(script), str(smoke_run / "generator_ema.safetensors"), str(shards), str(out)], processes=world,
               timeout=240)
        results[world] = json.loads(out.read_text())
    assert results[1]["world"] == 1 and results[2]["world"] == 2
    assert set(results[1]["figures"]) == FIGURES
    assert results[2]["figures"] == results[1]["figures"]  # the same images, batches and features: equal figures


def test_eval_cli_on_a_trained_run(smoke_run):
    proc = run_cli("distgan.eval", "--run", str(smoke_run), "--n", "200", "--metrics", *ALL)
    record = json.loads(proc.stdout)
    assert FIGURES <= set(record) and FIGURES <= set(record["reference"])
    assert all(np.isfinite(record[k]) for k in FIGURES)
    assert record["meta"]["n"] == 200 and record["meta"]["features"] == "classifier" and record["meta"]["step"] == 20
    # a 20-step generator is far from the data; the test split is close to the train split
    assert record["fd"] > 5 * record["reference"]["fd"] and record["reference"]["modes_covered"] == 10
    assert json.loads((smoke_run / "eval.json").read_text()) == record


def test_plot_cli_draws_losses_and_eval_figures(smoke_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = (smoke_run / "metrics.jsonl").read_text().splitlines()
    evals = [json.dumps({"step": s, "eval/fd": 100.0 / s, "eval/modes_covered": 10}) for s in (10, 20)]
    evals.append(json.dumps({"step": 20, "eval_ref/fd": 0.5}))
    (run / "metrics.jsonl").write_text("\n".join(lines + evals) + "\n")
    written = json.loads(run_cli("distgan.eval", "plot", "--run", str(run)).stdout)["plots"]
    names = sorted(Path(p).name for p in written)
    assert names == ["discriminator.png", "eval.png", "gradients.png", "losses.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 300
            pixels = np.asarray(image.convert("L"), dtype=np.float32)
            assert pixels.std() > 5  # axes, lines and labels were drawn


def test_missing_feature_net_and_test_split_are_named(shards, classifier_report, tmp_path, caplog, monkeypatch):
    """No classifier for the data: named; one beside the shards (where an older distgan kept it) is read."""
    monkeypatch.setenv("DISTGAN_CACHE", str(tmp_path / "cache"))  # cold: the shared one has this data's classifier
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in list(shards.glob("*.tar")) + [shards / "dataset.json"]:
        shutil.copy(f, bare / f.name)
    with pytest.raises(ConfigError, match="python -m distgan.eval train-features --data"):
        make_evaluator(bare)
    kept = Path(classifier_report["path"])
    for f in (kept, kept.with_suffix(".json")):
        shutil.copy(f, bare / f.name)
    with caplog.at_level(logging.WARNING, logger="distgan.metrics.evaluator"):
        evaluator = make_evaluator(bare, n=100, metrics=["fd", "parzen"])
        figures = evaluator.evaluate(Noise(), 0, 1, identity)
    assert set(figures) == {"fd"} and evaluator.reference() == {}
    assert any("Parzen log-likelihood skipped" in r.message and "--split test" in r.message for r in caplog.records)


def test_train_features_refuses_unlabeled_shards(tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, size=(40, 28, 28, 1), dtype=np.uint8)
    write_shards(list(images), None, tmp_path / "unlabeled", shard_size=20, progress=False)
    assert eval_main(["train-features", "--data", str(tmp_path / "unlabeled"), "--steps", "5"]) == 2
    assert "without labels" in capsys.readouterr().err


class Diverged(Noise):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return super().forward(z) * float("nan")


def test_diverged_generator_gives_nan_figures_not_an_exception(shards, classifier_report, caplog):
    evaluator = make_evaluator(shards, n=100, metrics=ALL)
    with caplog.at_level(logging.ERROR, logger="distgan.metrics.evaluator"):
        figures = evaluator.evaluate(Diverged(), 0, 1, identity)
    assert set(figures) == FIGURES and all(np.isnan(v) for v in figures.values())
    assert any("not finite" in r.message for r in caplog.records)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("features", ["classifier", "inception"])
def test_training_evaluates_with_each_feature_network(shards, classifier_report, tmp_path, features):
    """eval.features=classifier and =inception (a local Inception-v3 file, here randomly initialised and shaped
    like pytorch-fid's) both evaluate inside training; auto is covered by the smoke run above."""
    overrides, data = [f"eval.features={features}"], shards
    if features == "inception":
        # shards without a test split beside them: Inception-v3 on a CPU then sees 8 images, not the
        # 1,000 test images of the real-vs-real reference
        data = tmp_path / "train_only"
        shutil.copytree(shards, data, ignore=shutil.ignore_patterns("eval_cache"))
        from distgan.metrics import FIDInceptionV3

        torch.manual_seed(0)
        state = FIDInceptionV3().state_dict()
        state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
        torch.save(state, tmp_path / "pt_inception-test.pth")
        overrides.append(f"eval.inception_weights={tmp_path / 'pt_inception-test.pth'}")
    run = tmp_path / "run"
    run_cli("distgan.train", "--config", "smoke", f"data.path={data}", f"run.dir={run}", "log.wandb=false",
            "train.steps=2", "log.every=1", "log.sample_every=2", "checkpoint.every=2", "eval.metrics=[fd]",
            "eval.n=4", "eval.batch=4", "eval.best_metric=fd", *overrides)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fd = [r["eval/fd"] for r in records if "eval/fd" in r]
    assert len(fd) == 1 and math.isfinite(fd[0]) and fd[0] > 0
    assert json.loads((run / "checkpoints" / "best" / "best.json").read_text())["metric"] == "fd"


def test_eval_trains_the_feature_classifier_on_first_use(smoke_run, shards, tmp_path, monkeypatch):
    """Right after a run, on data with labels but no classifier yet: evaluation trains it once, then evaluates;
    the classifier and the real statistics go to $DISTGAN_CACHE, nothing into the data folder."""
    monkeypatch.setenv("DISTGAN_CACHE", str(tmp_path / "cache"))
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for f in list(shards.glob("*.tar")) + [shards / "dataset.json"]:
        shutil.copy(f, fresh / f.name)
    before = sorted(p.name for p in fresh.iterdir())
    out = json.loads(run_cli("distgan.eval", "--export", str(smoke_run / "generator_ema.safetensors"), "--data",
                             str(fresh), "--n", "100", "--metrics", "fd", "classes_covered", "--classifier-steps", "150").stdout)
    trained = out["meta"]["feature_classifier_trained"]
    cache = data_cache(fresh)
    assert cache.parent.parent == tmp_path / "cache" and trained["path"] == str(cache / CLASSIFIER_FILE)
    assert trained["steps"] == 150 and trained["accuracy"] > 0.6 and (cache / CLASSIFIER_FILE).is_file()
    assert list((cache / CACHE_DIR).glob("real-classifier-n100-*.safetensors"))
    assert sorted(p.name for p in fresh.iterdir()) == before  # the user's data folder is left as it was
    assert out["meta"]["features"] == "classifier" and out["fd"] > 0 and 1 <= out["modes_covered"] <= 10


def test_eval_on_unlabeled_data_names_the_inception_file(smoke_run, tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, size=(40, 28, 28, 1), dtype=np.uint8)
    write_shards(list(images), None, tmp_path / "unlabeled", shard_size=20, progress=False)
    assert eval_main(["--export", str(smoke_run / "generator_ema.safetensors"), "--data", str(tmp_path / "unlabeled"),
                      "--n", "20", "--metrics", "fd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no labels" in err[0] and "pt_inception-2015-12-05-6726825d.pth" in err[0]


def test_reference_stats_file_round_trip(smoke_run, shards, tmp_path):
    """eval stats writes pytorch-fid's layout; evaluating against it gives the fd computed from the features."""
    ref = tmp_path / "ref.npz"
    out = json.loads(run_cli("distgan.eval", "stats", "--data", str(shards), "--out", str(ref), "--n", "300").stdout)
    with np.load(ref) as f:
        assert set(f.files) == {"mu", "sigma"} and f["mu"].shape == (out["dim"],)
        assert f["sigma"].shape == (out["dim"], out["dim"]) and out["images"] == 300
    export = str(smoke_run / "generator_ema.safetensors")
    plain = json.loads(run_cli("distgan.eval", "--export", export, "--data", str(shards), "--n", "300", "--metrics",
                               "fd").stdout)
    with_file = json.loads(run_cli("distgan.eval", "--export", export, "--data", str(shards), "--n", "300",
                                   "--metrics", "fd", "--reference-stats", str(ref)).stdout)
    assert with_file["meta"]["reference_stats"] == str(ref)
    # the two processes compute the 300 real images' float32 features separately (kernels may sum in another order
    # under another load), each value to ~6e-8 relative; fd, a sum of squares and a trace over the statistics of
    # them, agrees to about 1e-7 (seen: 6e-8 on a loaded machine): 1e-5 holds on any CPU, and a file that is not
    # used (the shifted one below) moves fd by far more
    assert with_file["fd"] == pytest.approx(plain["fd"], rel=1e-5)
    moved = tmp_path / "moved.npz"
    np.savez(moved, mu=np.load(ref)["mu"] + 1.0, sigma=np.load(ref)["sigma"])  # shifted by 1 in every dimension
    shifted = json.loads(run_cli("distgan.eval", "--export", export, "--data", str(shards), "--n", "300",
                                 "--metrics", "fd", "--reference-stats", str(moved)).stdout)
    assert shifted["fd"] != pytest.approx(plain["fd"], rel=1e-3)


def test_reference_stats_of_another_network_are_refused(smoke_run, shards, tmp_path, capsys):
    bad = tmp_path / "inception.npz"
    np.savez(bad, mu=np.zeros(2048), sigma=np.eye(2048))
    assert eval_main(["--export", str(smoke_run / "generator_ema.safetensors"), "--data", str(shards), "--n", "50",
                      "--metrics", "fd", "--reference-stats", str(bad)]) == 2
    assert "computed with another feature network" in capsys.readouterr().err
