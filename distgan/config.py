"""Typed configuration: one dataclass per component, YAML files plus dotted overrides, strict validation.

Every component is built from its own section (``cfg.generator``, ``cfg.loss`` ...), never from the whole
config. Unknown keys name the closest valid key; wrong types name the expected type.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from distgan import limits
from distgan.errors import UserError, shown
from distgan.safe_yaml import YAMLInputError, load_yaml


def _config_dir() -> Path:
    """Where ``--config NAME`` looks: the configs an installed wheel carries as package data (distgan/configs,
    mapped from the repository's top-level configs/ in pyproject.toml), else a checkout's configs/."""
    packaged = importlib.resources.files("distgan") / "configs"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "configs"


CONFIG_DIR = _config_dir()
MAX_LAYER_SIZE = 1 << 16  # channels, hidden units or latent size beyond this are a typo (and gigabytes of weights)
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few kilobytes


class ConfigError(UserError):
    """A configuration problem; the message names the key, the value and the fix."""


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run directory: config.yaml, metrics.jsonl, samples/, checkpoints/, export
    seed: int = 0  # global seed; each rank and data worker derives its own from it
    name: Optional[str] = None  # run name for trackers (default: the run dir's name)


@dataclass
class DataConfig:
    path: str = "data/fashion_mnist"  # folder of webdataset shards (with dataset.json) or a shard URL pattern
    hflip: bool = False  # random horizontal flip
    num_workers: int = 1  # DataLoader workers per process (0 = read in the training process)
    shards_per_block: int = 4  # shards read and shuffled together in one block of the stream
    cache_mb: int = 256  # decoded shards kept in memory per data worker (MB)
    skip_bad_samples: bool = False  # skip (and count) unreadable or misshapen samples instead of failing
    allow_pipe: bool = False  # allow 'pipe:' shard URLs (they run shell commands)
    pad: int = 0  # background pixels (pixel value 0) added on each side of the real images, e.g. 2 makes 28x28 Fashion-MNIST 32x32 for the 32x32 DCGAN; G and D are built at the padded size, and evaluation, sample grids and the export crop G's images back to the data's size (0 = off)
    prepare: Optional[str] = None  # a distgan.prepare source (fashion-mnist, mnist, cifar10) that makes data.path on first use (downloaded, checksums verified, when not installed locally)
    prepare_timeout_s: float = 7200.0  # on first use, how long the other processes wait for the main one to make data.path (a download may take far longer than train.collective_timeout_s)


@dataclass
class GeneratorConfig:
    arch: str = "dcgan"  # dcgan: strided transposed convs; mlp; tf_dcgan: the TF tutorial's G; or your own: package.module:Class
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments for your own arch (package.module:Class)
    z_dim: int = 100  # latent size
    z_dist: Literal["normal", "uniform"] = "normal"  # latent distribution (uniform is on [-1, 1])
    width: int = 64  # channels of the last conv block; doubles per block towards the input (dcgan)
    max_width: int = 512  # cap on conv channels (dcgan)
    norm: str = "batch"  # normalisation in hidden layers
    hidden: list[int] = field(default_factory=lambda: [128, 256, 512])  # hidden sizes (mlp)
    leaky_slope: float = 0.0  # 0 = ReLU (DCGAN paper); > 0 = LeakyReLU with that slope
    upsample: Literal["transposed", "nearest", "bilinear"] = "transposed"  # dcgan: how each block doubles the resolution: a stride-2 transposed conv, or nearest/bilinear resizing then a 3x3 conv (Odena et al. 2016: no checkerboard)
    conditional: bool = False  # class-conditional (needs labeled shards; set discriminator.conditional too)
    conditioning: Literal["norm", "concat"] = "norm"  # how a conditional G sees the class: per-class gain and shift in its norm layers, or an embedding concatenated to z


def generator_keys_meant_when_absent(section: dict) -> dict[str, Any]:
    """What a generator section written before a key existed meant by leaving it out, where that is not the
    key's default (exports and checkpoint configs of older runs)."""
    return {"conditioning": "concat"} if section.get("conditional") else {}  # concat was the only conditioning


@dataclass
class DiscriminatorConfig:
    arch: str = "dcgan"  # maxout: the 2014 paper's maxout MLP; or your own: package.module:Class
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments for your own arch (package.module:Class)
    width: int = 64  # channels of the first conv block; doubles per block (dcgan)
    max_width: int = 512  # cap on conv channels (dcgan)
    norm: str = "batch"  # normalisation in hidden layers (layer and spectral: D only)
    hidden: list[int] = field(default_factory=lambda: [512, 256])  # hidden sizes (mlp, maxout)
    maxout_pieces: int = 5  # linear pieces per maxout unit
    leaky_slope: float = 0.2  # LeakyReLU slope
    dropout: float = 0.0  # dropout probability after each hidden block
    conditional: bool = False  # class-conditional: a projection head (Miyato & Koyama 2018); must equal generator.conditional


@dataclass
class LossConfig:
    kind: str = "non-saturating"  # the adversarial loss (distgan.losses.LOSSES)
    penalty: str = "none"  # gradient penalty on D (distgan.losses.PENALTIES)
    penalty_weight: float = 10.0  # gamma (R1/R2 use gamma/2 * |grad|^2; WGAN-GP lambda * (|grad|-1)^2)
    penalty_interval: int = 1  # lazy regularisation: apply every k D steps, weight scaled by k


@dataclass
class OptimizerConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])  # Adam/AdamW betas
    weight_decay: float = 0.0
    momentum: float = 0.0  # SGD only
    eps: float = 1e-8


@dataclass
class TrainConfig:
    steps: int = 5000  # generator steps
    batch_size: int = 64  # GLOBAL batch; each of N processes takes batch_size / N. With batch_per_process: the reference batch the lrs were tuned for
    batch_per_process: int = 0  # 0: off (batch_size is the global batch); N > 0: the global batch is N x the number of processes
    lr_batch_scaling: Literal["none", "sqrt", "linear"] = "none"  # both lrs x (global batch / batch_size) ** (0, 0.5, 1); needs batch_per_process
    small_bn_batch: Literal["sync-batch", "error", "warn"] = "sync-batch"  # plain batch norm on < 32 samples per rank (several processes): switched to sync-batch, refused, or kept with a warning
    d_steps: int = 1  # discriminator steps per generator step (each on a fresh real batch)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: what the launcher asks, else no; fp16/bf16 need a GPU
    on_nonfinite: Literal["stop", "skip"] = "stop"  # what a NaN/Inf loss does
    max_grad_norm: float = 0.0  # clip gradient norms when > 0
    collective_timeout_s: float = 600.0  # a rank that stops answering ends the job after this long
    stop_check_every: int = 10  # steps between checks of the stop request (signal or STOP file): one small all-reduce each
    channels_last: bool = False  # G and D and the real batches in NHWC memory format (faster convolutions on tensor-core GPUs)
    compile: bool = False  # torch.compile G and D (not with gradient penalties: compiled graphs have no double backward)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"  # torch.compile's mode; reduce-overhead and max-autotune replay each compiled forward and backward as a CUDA graph (CUDA only)
    cpu_threads: int = 0  # CPU threads per process; 0 = the cores available divided by the processes on this node (launchers' OMP_NUM_THREADS is ignored: they set 1 by default)


@dataclass
class EMAConfig:
    enabled: bool = True
    half_life_kimg: float = 10.0  # thousands of (global) images over which G_ema's weight halves
    rampup: float = 0.05  # half-life is at most rampup * images seen (0 disables ramp-up)
    decay: Optional[float] = None  # a fixed per-step decay instead of the half-life (e.g. 0.999)
    start_step: int = 0  # before this step G_ema copies G


@dataclass
class LogConfig:
    every: int = 50  # steps between metrics.jsonl lines
    sample_every: int = 500  # steps between sample grids
    n_samples: int = 64  # images in a sample grid (fixed noise)
    wandb: bool = True  # log to wandb through Accelerate (WANDB_MODE is respected; offline works)
    wandb_project: str = "distgan"  # the wandb project (and the TensorBoard run's folder name)
    wandb_entity: Optional[str] = None  # the wandb team or user the run goes to (default: wandb's default entity)
    wandb_group: Optional[str] = None  # a wandb group for runs shown together (e.g. seeds of one recipe)
    wandb_tags: list[str] = field(default_factory=list)  # wandb tags, e.g. [baseline, r1]
    wandb_notes: Optional[str] = None  # a wandb note: what this run tries
    tensorboard: bool = False  # also log to TensorBoard (RUN_DIR/tensorboard/) through Accelerate's trackers
    gif: bool = True  # write progress.gif from the sample grids at the end
    progress_bar: bool = True  # a progress bar on a terminal (DISTGAN_PROGRESS=1 forces it); without one, a line per log.every steps


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep: int = 3  # keep the last K checkpoints


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations during training (0 = only at the end, if metrics is set)
    n: int = 10000  # generated images per evaluation
    metrics: list[str] = field(default_factory=list)  # e.g. [fd, kid, pr, dc, is, classes_covered, parzen] (distgan.metrics.registry)
    features: Literal["auto", "classifier", "inception"] = "auto"  # auto: the data set's classifier (distgan's cache folder, or beside the shards), else inception
    inception_weights: Optional[str] = None  # local FID Inception file: pytorch-fid's pt_inception-2015-12-05-6726825d.pth or NVlabs' TorchScript inception-2015-12-05.pt
    best_metric: Optional[str] = None  # keep the best checkpoint by this figure (e.g. fd: lower is better)
    test_path: Optional[str] = None  # test-split shards for real-vs-real references and Parzen (default: DATA_test)
    batch: int = 250  # images per generator/feature batch during evaluation
    reference_stats: Optional[str] = None  # a pytorch-fid style .npz (mu, sigma) of real features: fd uses it instead of computing them (python -m distgan.eval stats writes one)
    classifier_steps: int = 2000  # steps of the feature classifier trained on first use (labeled data, no classifier yet)
    resize: Literal["tf-legacy", "pytorch-fid"] = "tf-legacy"  # how Inception sees images: tf-legacy = TensorFlow's FID graph as torch-fidelity (8-bit, TF1 bilinear, equal features); pytorch-fid = F.interpolate on the float images
    prdc_k: int = 5  # nearest neighbours of density and coverage (dc; Naeem et al.'s default 5)


@dataclass
class AugmentConfig:
    policy: list[Literal["translation", "cutout", "color"]] = field(default_factory=list)  # DiffAugment ops on every image D sees (real and fake, both phases); empty: off
    p: float = 1.0  # probability each op is applied to an image (1: DiffAugment as published); the start value when adaptive
    adaptive: bool = False  # ADA: move p towards augment.target of r_t = E[sign(D(real))]
    target: float = 0.6  # ADA's r_t target (the paper's 0.6)
    interval: int = 4  # D phases between r_t measurements (and p updates)
    speed_kimg: float = 500.0  # thousands of real images over which p can move from 0 to 1 (the paper's 500)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    g_optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    d_optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


# ---------------------------------------------------------------- building from dicts


def choices(section: type, key: str) -> tuple[str, ...]:
    """The values a ``Literal`` key accepts (e.g. ``choices(OptimizerConfig, "name")``)."""
    return typing.get_args(typing.get_type_hints(section)[key])


def _registries() -> dict[str, Any]:
    """``section.key`` -> the registry its values are checked against (imported here: they live with their code,
    which imports this module)."""
    from distgan import losses
    from distgan.nn import DISCRIMINATORS, GENERATORS, NORMS

    return {"generator.arch": GENERATORS, "discriminator.arch": DISCRIMINATORS, "generator.norm": NORMS,
            "discriminator.norm": NORMS, "loss.kind": losses.LOSSES, "loss.penalty": losses.PENALTIES}


def key_choices(section: str, key: str) -> Optional[tuple[str, ...]]:
    """The values ``section.key`` accepts when it is a choice (each item's, for a list: a registry's names or a
    ``Literal``'s values), else None: for validation, --help and the coverage tests. A key whose registry allows
    it also takes an import path ``package.module:Class``."""
    registry = _registries().get(f"{section}.{key}")
    if registry is not None:
        names = registry.names()
        return tuple(n for n in names if registry[n].in_generator) if f"{section}.{key}" == "generator.norm" else names
    if section == "eval" and key in ("metrics", "best_metric"):
        from distgan.metrics import registry as metrics  # imports neither torch nor the metric modules

        return tuple(metrics.names() if key == "metrics" else metrics.ranked_figures())
    section_type = typing.get_type_hints(Config).get(section)
    tp = typing.get_type_hints(section_type).get(key) if section_type is not None else None
    return _literal_values(tp) if tp is not None else None


def check_choice(dotted: str, value: str) -> None:
    """``value`` is a registered choice of ``dotted`` (``section.key``), or for an architecture an importable import
    path; else a ConfigError naming the key, the value and the choices."""
    from distgan.registry import RegistryError

    registry = _registries()[dotted]
    allowed = key_choices(*dotted.split("."))
    try:
        if value in registry and value not in allowed:
            raise RegistryError(f"config key '{dotted}' = {value!r}: choose one of {', '.join(allowed)} ({value} is "
                                "for the discriminator only)")
        registry.resolve(value)
    except RegistryError as err:
        raise ConfigError(str(err).replace(f"config key '{registry.key}'", f"config key '{dotted}'")) from None


def validate_choices(cfg: "Config") -> None:
    """Every registry-backed key names a registered choice, or (architectures) an importable import path."""
    for dotted in _registries():
        section, key = dotted.split(".")
        check_choice(dotted, getattr(getattr(cfg, section), key))


def _closest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(options)})"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping of names to values"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints widen to floats, nothing else is converted."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if isinstance(value, bool) and ("no" if not value else "yes") in typing.get_args(tp):
            value = "no" if not value else "yes"  # YAML 1.1 reads a bare no/yes as a boolean
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            if arg is not type(None):
                try:
                    return _coerce(value, arg, key)
                except ConfigError:
                    pass
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item_tp,) = typing.get_args(tp)
            return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
    elif tp is Any:
        return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}' = {shown(value)}: expected {_type_name(tp)}")


def section_from_dict(cls: type, data: Any, prefix: str) -> Any:
    """A config dataclass from a plain dict (a YAML section, an export's metadata), every key checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix}' must be a mapping, got {shown(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            options = [f"{prefix}.{n}" if prefix else n for n in names]
            raise ConfigError(f"unknown config key '{full}'{_closest(full, options)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = section_from_dict(tp, value, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict:
    """``section.key=value`` -> nested dict; the value is parsed as YAML (so 1e-4, true, [1, 2] work)."""
    if "=" not in text:
        raise ConfigError(f"override {shown(text)} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    limits.check_text("override", dotted)
    try:
        value = load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {shown(text)}: the value is not valid YAML ({' '.join(str(err).split())}); "
                          "quote strings that contain ':', '[' or '{'") from None
    except YAMLInputError as err:
        raise ConfigError(f"override {shown(dotted + '=...')}: {err}") from None
    except RecursionError:
        raise ConfigError(f"override '{dotted}=...': the value is nested too deeply") from None
    out: dict = {}
    node = out
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def config_names() -> list[str]:
    """The names ``--config`` accepts besides a path: the YAML files in CONFIG_DIR, without .yaml."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []


def resolve_config_path(name_or_path: str) -> Path:
    """A path as given, else a config shipped with distgan by name (with or without .yaml)."""
    candidates = [Path(name_or_path), CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"]
    for path in candidates:
        if path.exists() and not path.is_dir():  # not is_file(): a FIFO or a device is refused by name when read
            return path
    available = ", ".join(f"{name}.yaml" for name in config_names())
    raise ConfigError(f"config '{name_or_path}' not found as a file or among distgan's configs in {CONFIG_DIR} "
                      f"(available: {available})")


def from_dict(data: dict) -> Config:
    cfg = section_from_dict(Config, data or {}, "")
    validate(cfg)
    limits.check_config(cfg)  # sizes against the machine's memory, before anything is allocated from them
    return cfg


def load_config(name_or_path: Optional[str], overrides: list[str] = ()) -> Config:
    """Load a YAML config (or the defaults when None) and apply dotted overrides, then validate."""
    data: dict = {}
    if name_or_path:
        path = resolve_config_path(name_or_path)
        from distgan.data.untrusted import read_regular_file  # a leaf module: regular files only, bounded reads

        try:
            data = load_yaml(read_regular_file(path, "config", MAX_CONFIG_BYTES).decode()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
        except YAMLInputError as err:
            raise ConfigError(f"{path}: {err}") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to be a distgan config") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read it as a YAML text file ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for text in overrides:
        data = _merge(data, parse_override(text))
    return from_dict(data)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Refuse configurations that cannot work, saying why and what to change."""
    t, loss, d = cfg.train, cfg.loss, cfg.discriminator
    positive = {
        "train.steps": t.steps, "train.batch_size": t.batch_size, "train.d_steps": t.d_steps,
        "loss.penalty_interval": loss.penalty_interval, "log.every": cfg.log.every,
        "log.sample_every": cfg.log.sample_every, "log.n_samples": cfg.log.n_samples,
        "checkpoint.every": cfg.checkpoint.every, "checkpoint.keep": cfg.checkpoint.keep,
        "generator.z_dim": cfg.generator.z_dim, "generator.width": cfg.generator.width,
        "discriminator.width": d.width, "train.stop_check_every": t.stop_check_every,
        "data.shards_per_block": cfg.data.shards_per_block,
    }
    positive.update({f"{net}.hidden[{i}]": h for net, hidden in (("generator", cfg.generator.hidden),
                                                                  ("discriminator", d.hidden))
                     for i, h in enumerate(hidden)})
    positive.update({"generator.max_width": cfg.generator.max_width, "discriminator.max_width": d.max_width,
                     "discriminator.maxout_pieces": d.maxout_pieces})
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key '{key}' = {shown(value)}: must be at least 1")
    _check_finite(cfg, "")
    validate_choices(cfg)
    for who, section in (("generator", cfg.generator), ("discriminator", d)):
        if section.kwargs and ":" not in section.arch:
            raise ConfigError(f"config key '{who}.kwargs' = {section.kwargs!r}: only your own network ({who}.arch="
                              f"package.module:Class) takes extra arguments; {who}.arch={section.arch} does not")
    validate_generator(cfg.generator)
    at_least_zero = {
        "run.seed": cfg.run.seed, "train.max_grad_norm": t.max_grad_norm, "loss.penalty_weight": loss.penalty_weight,
        "ema.half_life_kimg": cfg.ema.half_life_kimg, "ema.rampup": cfg.ema.rampup, "ema.start_step": cfg.ema.start_step,
        "generator.leaky_slope": cfg.generator.leaky_slope, "discriminator.leaky_slope": d.leaky_slope,
        "eval.every": cfg.eval.every,
    }
    for key, value in at_least_zero.items():
        if value < 0:
            raise ConfigError(f"config key '{key}' = {shown(value)}: must be 0 or more")
    if not 0.0 <= d.dropout < 1.0:
        raise ConfigError(f"config key 'discriminator.dropout' = {shown(d.dropout)}: must be in [0, 1)")
    if t.batch_per_process < 0:
        raise ConfigError(f"config key 'train.batch_per_process' = {shown(t.batch_per_process)}: must be 0 (off) or more")
    if t.lr_batch_scaling != "none" and not t.batch_per_process:
        raise ConfigError(
            f"train.lr_batch_scaling={t.lr_batch_scaling} without train.batch_per_process: the global batch is "
            "train.batch_size, so there is nothing to scale. Set train.batch_per_process=N or train.lr_batch_scaling=none"
        )
    if t.cpu_threads < 0:
        raise ConfigError(f"config key 'train.cpu_threads' = {shown(t.cpu_threads)}: must be 0 (automatic) or more")
    for key, value in (("data.num_workers", cfg.data.num_workers), ("data.cache_mb", cfg.data.cache_mb),
                       ("data.pad", cfg.data.pad)):
        if value < 0:
            raise ConfigError(f"config key '{key}' = {shown(value)}: must be 0 or more")
    for key, value in (("train.collective_timeout_s", t.collective_timeout_s),
                       ("data.prepare_timeout_s", cfg.data.prepare_timeout_s)):
        if value <= 0:
            raise ConfigError(f"config key '{key}' = {shown(value)}: must be positive (seconds)")
    if cfg.ema.decay is not None and not 0.0 <= cfg.ema.decay < 1.0:
        raise ConfigError(f"config key 'ema.decay' = {shown(cfg.ema.decay)}: must be in [0, 1)")
    if loss.penalty == "wgan-gp" and _norm_mixes_samples(d.norm):
        raise ConfigError(
            f"loss.penalty=wgan-gp with discriminator.norm={d.norm}: the penalty is defined per sample, "
            "but batch norm mixes samples, so the gradient of one output w.r.t. one input is not the critic's "
            "gradient. Use discriminator.norm=layer or none (as the WGAN-GP paper does)."
        )
    if cfg.generator.conditional != d.conditional:
        raise ConfigError(
            f"generator.conditional={cfg.generator.conditional} but discriminator.conditional={d.conditional}: a "
            "class-conditional GAN conditions both networks; set both to true (or both to false)"
        )
    if t.compile_mode != "default" and not t.compile:
        raise ConfigError(f"train.compile_mode={t.compile_mode} without train.compile=true: the mode is torch.compile's; "
                          "set train.compile=true, or leave train.compile_mode at default")
    if t.compile and loss.penalty != "none":
        raise ConfigError(
            f"train.compile=true with loss.penalty={loss.penalty}: a compiled D has no double backward, which the "
            "penalty needs. Set train.compile=false or loss.penalty=none"
        )
    if loss.kind == "wasserstein" and loss.penalty == "none" and d.norm != "spectral":
        raise ConfigError(
            "loss.kind=wasserstein without a Lipschitz constraint diverges: set loss.penalty=wgan-gp "
            "or discriminator.norm=spectral"
        )
    for key, opt in (("g_optim", cfg.g_optim), ("d_optim", cfg.d_optim)):
        if opt.momentum < 0 or opt.weight_decay < 0:
            raise ConfigError(f"config key '{key}.momentum'/'{key}.weight_decay' must be 0 or more")
        if opt.lr <= 0 or opt.eps <= 0:
            raise ConfigError(f"config key '{key}.lr' = {shown(opt.lr)} / '{key}.eps' = {shown(opt.eps)}: must be positive")
        if len(opt.betas) != 2 or not all(0.0 <= b < 1.0 for b in opt.betas):
            raise ConfigError(f"config key '{key}.betas' = {shown(opt.betas)}: must be two numbers in [0, 1)")
    validate_eval(cfg.eval)
    validate_augment(cfg.augment)


def _norm_mixes_samples(norm: str) -> bool:
    from distgan.nn import NORMS

    return NORMS[norm].mixes_samples


def validate_augment(cfg: AugmentConfig) -> None:
    """The augment section: known, distinct ops; p and target in [0, 1]; a positive interval and speed."""
    if len(set(cfg.policy)) != len(cfg.policy):
        raise ConfigError(f"config key 'augment.policy' = {shown(cfg.policy)}: name each op once")
    if not 0.0 <= cfg.p <= 1.0:
        raise ConfigError(f"config key 'augment.p' = {shown(cfg.p)}: must be in [0, 1]")
    if not 0.0 <= cfg.target < 1.0:
        raise ConfigError(f"config key 'augment.target' = {shown(cfg.target)}: must be in [0, 1) (the paper uses 0.6)")
    if cfg.interval < 1:
        raise ConfigError(f"config key 'augment.interval' = {shown(cfg.interval)}: must be at least 1")
    if cfg.speed_kimg <= 0:
        raise ConfigError(f"config key 'augment.speed_kimg' = {shown(cfg.speed_kimg)}: must be positive")
    if cfg.adaptive and not cfg.policy:
        raise ConfigError("config key 'augment.adaptive' = True with an empty augment.policy: nothing to adapt; "
                          "set augment.policy=[translation,cutout,color] or augment.adaptive=false")


def validate_generator(cfg: GeneratorConfig) -> None:
    """The generator section on its own (an export's metadata sizes a network from it)."""
    check_choice("generator.arch", cfg.arch)
    check_choice("generator.norm", cfg.norm)
    sizes = {"generator.z_dim": cfg.z_dim, "generator.width": cfg.width, "generator.max_width": cfg.max_width,
             **{f"generator.hidden[{i}]": h for i, h in enumerate(cfg.hidden)}}
    for key, value in sizes.items():
        if not 1 <= value <= MAX_LAYER_SIZE:
            raise ConfigError(f"config key '{key}' = {shown(value)}: must be between 1 and {MAX_LAYER_SIZE}")
    if not (math.isfinite(cfg.leaky_slope) and cfg.leaky_slope >= 0):
        raise ConfigError(f"config key 'generator.leaky_slope' = {shown(cfg.leaky_slope)}: must be 0 or more")
    if cfg.upsample != "transposed" and cfg.arch != "dcgan":
        raise ConfigError(f"config key 'generator.upsample' = {shown(cfg.upsample)} with generator.arch={cfg.arch}: only "
                          "the dcgan generator has upsampling blocks; set generator.upsample=transposed")


def _check_finite(node: Any, prefix: str) -> None:
    """Every float in the config is a number: NaN and infinity (YAML .nan, .inf) are refused by key; no text (a
    path, a name) holds a control character (a newline in run.dir would be stored as something else)."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, key + ".")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"config key '{key}' = {shown(value)}: must be a finite number")
            limits.check_text(f"config key '{key}'", item)


def validate_eval(cfg: EvalConfig) -> None:
    """The eval section, also when built by hand: types, sizes, and metric and figure names (the registry)."""
    # metric names live with the metrics (the registry imports neither torch nor the metric modules)
    from distgan.metrics import registry

    hints = typing.get_type_hints(EvalConfig)
    for f in dataclasses.fields(cfg):
        _coerce(getattr(cfg, f.name), hints[f.name], f"eval.{f.name}")
    best = cfg.best_metric
    for name, renamed in [(best, registry.RENAMED_FIGURES)] + [(m, registry.RENAMED) for m in cfg.metrics]:
        if name in renamed:
            raise ConfigError(f"eval: '{name}' is now called '{renamed[name]}'; use that name")
    if best is not None and best not in registry.ranked_figures():
        raise ConfigError(f"eval.best_metric = {shown(best)}{_closest(best, registry.ranked_figures())}")
    for metric in cfg.metrics:
        if metric not in registry.METRICS:
            raise ConfigError(f"eval.metrics has {shown(metric)}{_closest(metric, registry.names())}")
    if cfg.prdc_k < 1:
        raise ConfigError(f"eval.prdc_k={shown(cfg.prdc_k)}: must be at least 1")
    if cfg.classifier_steps < 1:
        raise ConfigError(f"eval.classifier_steps={shown(cfg.classifier_steps)}: must be at least 1")
    if cfg.n < 2 or cfg.batch < 1:
        raise ConfigError(f"eval.n={shown(cfg.n)} and eval.batch={shown(cfg.batch)}: need n >= 2 and batch >= 1")


# ---------------------------------------------------------------- --help


def _literal_values(tp: Any) -> tuple[str, ...] | None:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return typing.get_args(tp)
    if origin in (list, typing.Union, types.UnionType):
        found = [_literal_values(arg) for arg in typing.get_args(tp)]
        return next((values for values in found if values), None)
    return None


def describe(cfg: Optional[Config] = None) -> str:
    """Every key with its value in ``cfg`` (the defaults when None), its choices and its meaning (this file's
    comments); a value that is not the default names the default."""
    cfg = cfg if cfg is not None else Config()
    defaults = Config()
    source = Path(__file__).read_text().splitlines()
    comments: dict[tuple[str, str], str] = {}
    current = None
    for line in source:
        stripped = line.strip()
        if stripped.startswith("class ") and stripped.endswith("Config:"):
            current = stripped[len("class "):-1]
        elif current and ":" in stripped and not stripped.startswith(("#", '"', "def", "@")):
            name = stripped.split(":", 1)[0].strip()
            note = stripped.split("#", 1)[1].strip() if "  # " in stripped else ""
            comments[(current, name)] = note
    lines = []
    for section in dataclasses.fields(Config):
        values, default_values = getattr(cfg, section.name), getattr(defaults, section.name)
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(values):
            value, default = getattr(values, f.name), getattr(default_values, f.name)
            line = f"  {section.name}.{f.name} = {value!r}" + (f" (default {default!r})" if value != default else "")
            options = key_choices(section.name, f.name)
            if options:
                line += f"  [{' | '.join(options)}]"
            note = comments.get((type(values).__name__, f.name), "")
            lines.append(line + (f"  # {note}" if note else ""))
    return "\n".join(lines)
