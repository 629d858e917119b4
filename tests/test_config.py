from pathlib import Path

import pytest

from distgan.config import ConfigError, describe, dump_yaml, load_config, parse_override, resolve_config_path

CONFIGS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_loads(name):
    cfg = load_config(name)
    assert cfg.train.steps > 0 and cfg.train.batch_size > 0


def test_required_configs_exist():
    assert {"fashion_mnist", "mnist", "cifar10", "smoke", "seed_mlp_gan", "seed_dcgan"} <= set(CONFIGS)


def test_overrides_are_typed_yaml_values():
    cfg = load_config("smoke", ["train.steps=7", "g_optim.lr=1e-4", "log.wandb=true", "generator.hidden=[3, 4]"])
    assert cfg.train.steps == 7 and cfg.g_optim.lr == pytest.approx(1e-4) and cfg.log.wandb is True
    assert cfg.generator.hidden == [3, 4]
    assert parse_override("a.b.c=x") == {"a": {"b": {"c": "x"}}}


def test_int_widens_to_float_but_not_back():
    assert load_config(None, ["ema.half_life_kimg=3"]).ema.half_life_kimg == 3.0
    with pytest.raises(ConfigError, match=r"'train.steps' = 1.5: expected int"):
        load_config(None, ["train.steps=1.5"])


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.batchsize' \(did you mean 'train.batch_size'\?\)"):
        load_config(None, ["train.batchsize=4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'generatr'.*'generator'"):
        load_config(None, ["generatr.width=4"])


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"'loss.kind' = 'bce': choose one of minimax, non-saturating"):
        load_config(None, ["loss.kind=bce"])
    with pytest.raises(ConfigError, match=r"'log.wandb' = 'maybe': expected bool"):
        load_config(None, ["log.wandb=maybe"])


def test_configs_that_cannot_work_are_refused_with_why():
    with pytest.raises(ConfigError, match="batch norm mixes samples"):
        load_config(None, ["loss.penalty=wgan-gp", "discriminator.norm=batch"])
    load_config(None, ["loss.penalty=wgan-gp", "discriminator.norm=layer"])
    with pytest.raises(ConfigError, match="Lipschitz"):
        load_config(None, ["loss.kind=wasserstein", "discriminator.norm=none"])
    with pytest.raises(ConfigError, match="'train.d_steps' = 0"):
        load_config(None, ["train.d_steps=0"])
    with pytest.raises(ConfigError, match="eval.metrics has 'fid'.*'fd'"):
        load_config(None, ["eval.metrics=[fid]"])


def test_data_ranges_are_checked_by_the_config():
    """The read stream trusts these: config.validate is where they are checked."""
    with pytest.raises(ConfigError, match="config key 'data.shards_per_block' = 0: must be at least 1"):
        load_config(None, ["data.shards_per_block=0"])
    with pytest.raises(ConfigError, match="config key 'data.num_workers' = -1: must be 0 or more"):
        load_config(None, ["data.num_workers=-1"])
    with pytest.raises(ConfigError, match="config key 'data.cache_mb' = -1: must be 0 or more"):
        load_config(None, ["data.cache_mb=-1"])


def test_names_resolve_to_configs_folder_and_missing_names_list_choices(tmp_path):
    assert resolve_config_path("smoke").name == "smoke.yaml"
    assert resolve_config_path("smoke.yaml").name == "smoke.yaml"
    with pytest.raises(ConfigError, match="available: .*cifar10.yaml"):
        resolve_config_path("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(str(bad))


def test_dump_round_trips(tmp_path):
    cfg = load_config("cifar10", ["train.steps=3"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(str(path)) == cfg


def test_help_lists_every_key_with_default_and_meaning():
    text = describe()
    for key in ("run.dir = 'runs/default'", "run.seed = 0", "data.path", "train.steps = 5000",
                "train.batch_size = 64", "log.wandb = True"):
        assert key in text
    assert "GLOBAL batch" in text


def test_yaml_no_is_the_string_no_for_choice_keys():
    """YAML 1.1 reads a bare ``no`` as False; for a key whose choices include 'no' it means 'no'."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        load_config(None, ["train.mixed_precision=true"])


def test_registry_backed_keys_offer_their_registries_names():
    """The choices of arch, norm, loss kind and penalty are the names registered beside their code (nothing else)."""
    from distgan import losses
    from distgan.config import key_choices
    from distgan.nn import DISCRIMINATORS, GENERATORS, NORMS

    assert key_choices("loss", "kind") == tuple(losses.LOSSES) and key_choices("loss", "penalty") == tuple(losses.PENALTIES)
    assert key_choices("generator", "arch") == tuple(GENERATORS) and key_choices("discriminator", "arch") == tuple(DISCRIMINATORS)
    assert key_choices("discriminator", "norm") == tuple(NORMS)
    assert set(key_choices("generator", "norm")) == {"batch", "sync-batch", "none"}
