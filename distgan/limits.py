"""Bounds on what a user's input may ask for, checked before anything is allocated: the one place for sizes.

Sizes come from config keys, command arguments and files' metadata (dataset.json, an export's). Each estimate
here is a lower bound of the bytes the work holds at once (weights and their gradients, the latents drawn for a
batch, the images of a grid), so a refusal never turns away work that would fit. It is compared with this
machine's memory (the smallest of physical memory, the cgroup's limit and the process's RLIMIT_AS) and the
refusal names the key or file, the value, the estimate and the limit. Numbers that size no allocation of their
own (seeds, the number of layers, resolutions) have plain bounds.
"""
from __future__ import annotations

import os
import resource
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from distgan.errors import UserError, shown

if TYPE_CHECKING:
    from distgan.config import Config

FLOAT_BYTES = 4
MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed and numpy's SeedSequence both take
MAX_RESOLUTION = 4096  # images and networks: past this a number is a typo (distgan's conv nets build at most 128)
MAX_STEPS = 10**8 - 1  # checkpoint folders are step-NNNNNNNN: a ninth digit would never be found again
MAX_HIDDEN_LAYERS = 64  # a hidden list longer than this is a typo (each layer costs kilobytes of Python objects)
LAYER_OVERHEAD_BYTES = 4096  # the Python objects of one hidden layer, before its weights (a lower bound)
CGROUP_LIMIT = Path("/sys/fs/cgroup/memory.max")


class LimitError(UserError):
    """A size that cannot fit this machine (or is past a plain bound); the message names it and the limit."""


# ---------------------------------------------------------------- the machine


def memory_limit() -> int:
    """Bytes this process can ever hold: physical memory, capped by the cgroup's limit and RLIMIT_AS."""
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    try:
        text = CGROUP_LIMIT.read_text().strip()
        if text.isdigit():
            limits.append(int(text))
    except OSError:
        pass
    return min(limits)


def human(count: int) -> str:
    """Bytes as people read them: 1.5 GB."""
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if count < 1000 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def check_memory(what: str, value: Any, need: int, fix: str) -> None:
    """Refuse ``what`` = ``value`` (None: ``what`` says it all) when its lower-bound estimate ``need`` (bytes)
    exceeds the machine's memory."""
    limit = memory_limit()
    if need > limit:
        raise LimitError(f"{what}{'' if value is None else ' = ' + shown(value)} needs at least {human(need)} of memory, more than the "
                         f"{human(limit)} this machine gives the process; {fix}")


# ---------------------------------------------------------------- plain bounds


def check_seed(what: str, value: Any) -> None:
    """A seed torch and numpy both accept: an integer in [0, 2**63 - 1]."""
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SEED):
        raise LimitError(f"{what} = {shown(value)}: a seed must be an integer from 0 to 2**63 - 1 ({MAX_SEED})")


def check_resolution(what: str, value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_RESOLUTION):
        raise LimitError(f"{what} = {shown(value)}: a resolution must be an integer from 1 to {MAX_RESOLUTION}")


def check_hidden(what: str, hidden: Any) -> None:
    """A list of hidden-layer sizes short enough to build (its entries are checked with the other sizes)."""
    if isinstance(hidden, (list, tuple)) and len(hidden) > MAX_HIDDEN_LAYERS:
        raise LimitError(f"{what} lists {len(hidden)} hidden layers: at most {MAX_HIDDEN_LAYERS}")


def check_text(what: str, text: Any) -> None:
    """A path or name without control characters (a newline, a tab, an escape): they would be stored altered or
    shown misleadingly, and no file a user means has them."""
    if isinstance(text, (str, os.PathLike)):
        text = os.fspath(text)
        bad = next((ch for ch in str(text) if unicodedata.category(ch) == "Cc"), None)
        if bad is not None:
            raise LimitError(f"{what} = {shown(text)} holds the control character {bad!r}; use a path without it")


# ---------------------------------------------------------------- estimates from a config alone


def _conv_params(width: int, max_width: int) -> int:
    """The fewest weights a DCGAN-style net with this width has: one 4x4 conv between its two smallest blocks."""
    return 16 * width * min(2 * width, max_width)


def _mlp_params(sizes: Sequence[int], pieces: int = 1) -> int:
    return sum(pieces * a * b for a, b in zip(sizes[:-1], sizes[1:]))


def config_estimates(cfg: "Config") -> list[tuple[str, Any, int, str]]:
    """(key, value, bytes at least, fix) for each config key that sizes an allocation whatever the data is.

    Weights count twice (the weights and their gradients); latents are drawn for the global batch on every rank
    (distgan.trainer), for the sample grid and for every image of an evaluation."""
    g, d, z = cfg.generator, cfg.discriminator, cfg.generator.z_dim
    out = []
    if g.arch == "mlp":
        params = _mlp_params([z, *g.hidden]) + LAYER_OVERHEAD_BYTES * len(g.hidden)
        out.append(("generator.hidden", g.hidden, 2 * FLOAT_BYTES * params, "use fewer or smaller layers"))
    else:
        out.append(("generator.width", g.width, 2 * FLOAT_BYTES * _conv_params(g.width, g.max_width),
                    "use a smaller generator.width or generator.max_width"))
    if d.arch in ("mlp", "maxout"):
        pieces = d.maxout_pieces if d.arch == "maxout" else 1
        params = _mlp_params(d.hidden, pieces) + LAYER_OVERHEAD_BYTES * len(d.hidden)
        out.append(("discriminator.hidden", d.hidden, 2 * FLOAT_BYTES * params, "use fewer or smaller layers"))
    else:
        out.append(("discriminator.width", d.width, 2 * FLOAT_BYTES * _conv_params(d.width, d.max_width),
                    "use a smaller discriminator.width or discriminator.max_width"))
    batch_key = "train.batch_per_process" if cfg.train.batch_per_process else "train.batch_size"
    batch = cfg.train.batch_per_process or cfg.train.batch_size
    out.append((batch_key, batch, FLOAT_BYTES * batch * z, f"use a smaller {batch_key}"))
    out.append(("log.n_samples", cfg.log.n_samples, FLOAT_BYTES * cfg.log.n_samples * z,
                "a sample grid of a few hundred images is plenty"))
    if cfg.eval.metrics:
        out.append(("eval.n", cfg.eval.n, FLOAT_BYTES * cfg.eval.n * z,
                    "evaluate on fewer images (10,000 or 50,000 are the usual figures)"))
        out.append(("eval.batch", cfg.eval.batch, FLOAT_BYTES * cfg.eval.batch * z, "use a smaller eval.batch"))
    return out


def check_config(cfg: "Config") -> None:
    """Every sized key of a config against the machine, and the plain bounds (seeds, layer counts)."""
    check_seed("config key 'run.seed'", cfg.run.seed)
    if cfg.train.steps > MAX_STEPS:
        raise LimitError(f"config key 'train.steps' = {shown(cfg.train.steps)}: at most {MAX_STEPS} (checkpoints are "
                         "named with 8 digits)")
    check_hidden("config key 'generator.hidden'", cfg.generator.hidden)
    check_hidden("config key 'discriminator.hidden'", cfg.discriminator.hidden)
    for key, value, need, fix in config_estimates(cfg):
        check_memory(f"config key '{key}'", value, need, fix)


# ---------------------------------------------------------------- estimates once the images' size is known


def network_sizes(build: Callable[..., Any], section: Any, resolution: int, channels: int,
                  num_classes: Optional[int]) -> tuple[int, int]:
    """(parameters, activation floats per sample) of a network, built on the meta device (nothing allocated)."""
    import torch

    with torch.device("meta"):
        net = build(section, resolution, channels, num_classes)
    params = sum(p.numel() for p in net.parameters()) + sum(b.numel() for b in net.buffers())
    return params, _activations_per_sample(net, resolution, channels, num_classes, getattr(net, "z_dim", None))


def _activations_per_sample(net: Any, resolution: int, channels: int, num_classes: Optional[int],
                            z_dim: Optional[int]) -> int:
    """Floats of every layer's output for one sample (a meta-device forward); the image alone if it cannot run."""
    import torch

    total = [0]

    def count(_module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            total[0] += output.numel()

    x = torch.empty(1, z_dim, device="meta") if z_dim else torch.empty(1, channels, resolution, resolution,
                                                                          device="meta")
    handles = [m.register_forward_hook(count) for m in net.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            net(x, torch.zeros(1, dtype=torch.long, device="meta")) if num_classes else net(x)
    except Exception:  # an op without a meta kernel: fall back to the image, which every network holds
        total[0] = channels * resolution * resolution
    finally:
        for handle in handles:
            handle.remove()
    return max(total[0], channels * resolution * resolution)


def check_training(cfg: "Config", resolution: int, channels: int, local_batch: int,
                   num_classes: Optional[int]) -> None:
    """The run's G and D at the data's size, before they are built: weights and gradients of both, and one
    batch's activations through each, against the machine's memory."""
    from distgan.nn import build_discriminator, build_generator  # lazily: nn builds on config

    g_params, g_act = network_sizes(build_generator, cfg.generator, resolution, channels, num_classes)
    d_params, d_act = network_sizes(build_discriminator, cfg.discriminator, resolution, channels, num_classes)
    need = FLOAT_BYTES * (2 * (g_params + d_params) + local_batch * (g_act + d_act))
    what = (f"the run's networks for {channels}x{resolution}x{resolution} images (generator.arch={cfg.generator.arch}, "
            f"discriminator.arch={cfg.discriminator.arch}: {g_params + d_params} parameters) with a batch of "
            f"{local_batch} per process")
    check_memory(what, None, need,
                 "use smaller networks (width, hidden), a smaller batch, or images of a smaller resolution")
    check_images("config key 'log.n_samples'", cfg.log.n_samples, cfg.log.n_samples, resolution, channels,
                 "a sample grid of a few hundred images is plenty")


def check_images(what: str, value: Any, count: int, resolution: int, channels: int, fix: str,
                 bytes_per_value: int = FLOAT_BYTES) -> None:
    """``count`` images held at once (a grid, a batch, a resized image)."""
    check_memory(what, value, bytes_per_value * count * channels * resolution * resolution, fix)


def check_count(what: str, value: Any, per_item_bytes: int, fix: str) -> None:
    """``value`` items of ``per_item_bytes`` each held at once (latents of every image asked for)."""
    check_memory(what, value, value * per_item_bytes, fix)

