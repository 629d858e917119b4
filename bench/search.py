"""Recipe search on Fashion-MNIST: which overrides of the default train a better GAN in the same budget.

    python bench/search.py --budget images=192000 [--points NAME ...] [--seeds 0 1 2] [--jobs 1] [--threads 1]
    python bench/search.py --budget default-time ...     # wall clock: the default's own training time
    python bench/search.py --budget default-time --probe-threads 2 ...   # ... at the demo's 2 threads
    python bench/search.py --budget seconds=240 ...      # wall clock: S seconds of training per run
    python bench/search.py --table                       # the Markdown table from bench/results/search.jsonl
    python bench/search.py --table-only --write BENCHMARKS.md   # that table into the search block
    python bench/search.py --dry-run --work DIR --budget images=32   # tiny data and runs: the path, not a figure

The points of the search are data (POINTS): a name and the config overrides it puts on top of the base config
(--config, default fashion_mnist_baseline, the default before the search). Every point's overrides are validated before anything runs: a bad one ends the
search at startup with the config's own error.

Budgets. ``images=N``: each run trains N / (batch_size x d_steps) generator steps, so every point shows D the same
N real images (the project's images_seen). ``seconds=S`` and ``default-time``: each point first trains a short
probe (PROBE_STEPS steps, one probe at a time, all with the same --threads; kept for later invocations), its seconds per
step are read from metrics.jsonl (images between log lines over images_per_s, steps PROBE_FROM to PROBE_STEPS: no
start-up, no checkpoint), and the run trains floor(S / seconds per step) steps; ``default-time`` sets S to the
base config's own train.steps x the base's probed seconds per step. ``--probe-threads T`` probes at T threads
while the runs train at --threads: the budget of a command run alone with T threads (the README demo uses all the
cores), with --jobs runs side by side at one thread each to finish the search sooner (a run's steps, not its wall
time, decide its result). A run keeps the plan it started with (plan.json in its run dir), so a resumed run trains
to the same step.

The data (Fashion-MNIST train and test shards, and the feature classifier) is made once under WORK/data. Each run
is ``python -m distgan.train`` (``--resume auto``, ``train.cpu_threads=--threads``) then ``python -m
distgan.eval --run DIR`` with distgan's feature classifier (fd, precision/recall, modes covered), each a
subprocess with this tree on PYTHONPATH. Finished (point, overrides, seed, budget) results are skipped, so a killed
search continues where it stopped. Each finished run appends one JSON line to the results file.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this working tree's distgan, not an installed one

from bench import blocks  # noqa: E402
from distgan.cli import one_line  # noqa: E402
from distgan.config import Config, load_config  # noqa: E402
from distgan.errors import UserError  # noqa: E402

RESULTS = REPO / "bench" / "results" / "search.jsonl"
MARKDOWN = REPO / "BENCHMARKS.md"
BLOCK = "search"  # <!-- search:begin --> ... <!-- search:end --> in BENCHMARKS.md
TABLE_COMMAND = "python bench/search.py --table-only --write BENCHMARKS.md"

# name -> overrides on top of the base config (fashion_mnist_baseline, the default the search started from: DCGAN
# width 64, spectral-norm D, non-saturating loss, Adam 2e-4 (0.5, 0.999), batch 64, EMA half-life 10 kimg with
# ramp-up 0.05, 3,000 steps). RECIPE (the point width_32_batch_32_lr_4e-4) won the first three rounds; the fourth puts
# each first-round change on top of it, and its winner, DEFAULT_POINT, is fashion_mnist.yaml (at the demo's steps);
# the fifth (shipped_*) tries the fourth's runners-up on top of DEFAULT_POINT.
RECIPE_POINT = "width_32_batch_32_lr_4e-4"
RECIPE = ("generator.width=32", "discriminator.width=32", "train.batch_size=32", "g_optim.lr=4e-4", "d_optim.lr=4e-4")
DEFAULT_POINT = "recipe_betas_0_0.9"
BETAS_0_09 = ("g_optim.betas=[0.0,0.9]", "d_optim.betas=[0.0,0.9]")
POINTS: dict[str, tuple[str, ...]] = {
    "default": (),
    # hinge loss: Lim & Ye 2017 (Geometric GAN); Miyato et al. 2018 (spectral normalization)
    "hinge": ("loss.kind=hinge",),
    # R1 on real data: Mescheder et al. 2018 ("Which training methods for GANs do actually converge?")
    "r1_g0.1": ("loss.penalty=r1", "loss.penalty_weight=0.1"),
    "r1_g1": ("loss.penalty=r1", "loss.penalty_weight=1.0"),
    "r1_g10": ("loss.penalty=r1", "loss.penalty_weight=10.0"),
    # lazy regularisation, R1 every 4th D step with 4x weight: Karras et al. 2020 (StyleGAN2)
    "r1_g1_lazy4": ("loss.penalty=r1", "loss.penalty_weight=1.0", "loss.penalty_interval=4"),
    "hinge_r1_g1": ("loss.kind=hinge", "loss.penalty=r1", "loss.penalty_weight=1.0"),
    # spectral norm in D (the default) against none and batch norm: Miyato et al. 2018
    "d_norm_none": ("discriminator.norm=none",),
    "d_norm_batch": ("discriminator.norm=batch",),
    # two time-scale update rule, D faster than G: Heusel et al. 2017 (TTUR)
    "ttur_g1e-4_d4e-4": ("g_optim.lr=1e-4", "d_optim.lr=4e-4"),
    # Adam betas (0, 0.9) with TTUR: Miyato et al. 2018; Zhang et al. 2019 (SAGAN)
    "ttur_betas_0_0.9": ("g_optim.lr=1e-4", "d_optim.lr=4e-4", "g_optim.betas=[0.0,0.9]", "d_optim.betas=[0.0,0.9]"),
    "lr_4e-4": ("g_optim.lr=4e-4", "d_optim.lr=4e-4"),
    "batch_32": ("train.batch_size=32",),
    "batch_128": ("train.batch_size=128",),
    # EMA of G's weights: Yazici et al. 2019 ("The unusual effectiveness of averaging in GAN training")
    "ema_hl_2.5": ("ema.half_life_kimg=2.5",),
    "ema_hl_40": ("ema.half_life_kimg=40",),
    "ema_no_rampup": ("ema.rampup=0",),
    "width_32": ("generator.width=32", "discriminator.width=32"),
    # combinations with the narrower G and D (more steps in the same time), after the first round of the search
    "width_32_hinge": ("generator.width=32", "discriminator.width=32", "loss.kind=hinge"),
    "width_32_r1_g1": ("generator.width=32", "discriminator.width=32", "loss.penalty=r1", "loss.penalty_weight=1.0"),
    # second round, at the demo's wall time (probed at its 2 threads): the width-32 recipe's lr, TTUR, batch, EMA
    "width_32_lr_4e-4": ("generator.width=32", "discriminator.width=32", "g_optim.lr=4e-4", "d_optim.lr=4e-4"),
    "width_32_ttur": ("generator.width=32", "discriminator.width=32", "g_optim.lr=1e-4", "d_optim.lr=4e-4"),
    "width_32_batch_32": ("generator.width=32", "discriminator.width=32", "train.batch_size=32"),
    "width_32_ema_hl_2.5": ("generator.width=32", "discriminator.width=32", "ema.half_life_kimg=2.5"),
    # third round: lr 4e-4 won the second on its first seed; with hinge, with batch 32, and a step further
    "width_32_hinge_lr_4e-4": ("generator.width=32", "discriminator.width=32", "loss.kind=hinge", "g_optim.lr=4e-4",
                               "d_optim.lr=4e-4"),
    RECIPE_POINT: RECIPE,
    "width_32_lr_8e-4": ("generator.width=32", "discriminator.width=32", "g_optim.lr=8e-4", "d_optim.lr=8e-4"),
    # fourth round: the recipe of rounds 1 to 3 (width 32, batch 32, Adam lr 4e-4) with each first-round change on top
    **{f"recipe_{name}": (*RECIPE, *extra) for name, extra in {
        "hinge": ("loss.kind=hinge",),
        "r1_g0.1": ("loss.penalty=r1", "loss.penalty_weight=0.1"),
        "r1_g1": ("loss.penalty=r1", "loss.penalty_weight=1.0"),
        "r1_g10": ("loss.penalty=r1", "loss.penalty_weight=10.0"),
        "r1_g1_lazy4": ("loss.penalty=r1", "loss.penalty_weight=1.0", "loss.penalty_interval=4"),
        "d_norm_none": ("discriminator.norm=none",),
        "betas_0_0.9": BETAS_0_09,
        "ema_no_rampup": ("ema.rampup=0",),
        "upsample_nearest": ("generator.upsample=nearest",),
        "upsample_bilinear": ("generator.upsample=bilinear",),
        "d_steps_2": ("train.d_steps=2",),
        "pad_32": ("data.pad=2",),
    }.items()},
    # G wider than D (G's step is the cheaper half here)
    "recipe_width_g64": ("generator.width=64", *RECIPE[1:]),
    # fifth round: the fourth round's one-seed runners-up on top of its winner, the shipped default (DEFAULT_POINT)
    **{f"shipped_{name}": (*RECIPE, *BETAS_0_09, *extra) for name, extra in {
        "hinge": ("loss.kind=hinge",),
        "r1_g1": ("loss.penalty=r1", "loss.penalty_weight=1.0"),
        "r1_g10": ("loss.penalty=r1", "loss.penalty_weight=10.0"),
        "d_norm_none": ("discriminator.norm=none",),
    }.items()},
    "width_g96": ("generator.width=96",),
    "width_d32": ("discriminator.width=32",),
    # resize then convolve instead of transposed convs: Odena et al. 2016 ("Deconvolution and checkerboard artifacts")
    "upsample_nearest": ("generator.upsample=nearest",),
    "upsample_bilinear": ("generator.upsample=bilinear",),
    "d_steps_2": ("train.d_steps=2",),
    # 28x28 padded to 32x32 and the 32x32 DCGAN (4-8-16-32): LeNet-5 read MNIST padded to 32x32 (LeCun et al. 1998,
    # "Gradient-based learning applied to document recognition"), and DCGAN code on MNIST commonly resizes it to
    # 32 or 64 (pytorch/examples dcgan/main.py: --dataset mnist at --imageSize, 64 by default); scored cropped to 28
    "pad_32": ("data.pad=2",),
}

COMMON_OVERRIDES = ("log.wandb=false", "log.gif=false", "log.progress_bar=false")
PROBE_STEPS, PROBE_FROM, PROBE_LOG_EVERY = 120, 20, 10  # probe: train 120 steps, time steps 20-120 from metrics.jsonl
# keys whose values change no step's work (see same_compute)
SAME_COMPUTE_KEYS = ("loss.kind", "loss.penalty_weight", "g_optim.lr", "d_optim.lr", "g_optim.betas", "d_optim.betas",
                     "ema.half_life_kimg", "ema.rampup")
METRICS = ("fd", "pr", "coverage")
DRY = {"full": 300, "test": 100, "shard_size": 100, "classifier_steps": 5, "n": 100, "max_steps": 4,
       "probe_steps": 4, "probe_from": 2, "probe_log_every": 1}
DRY_OVERRIDES = ("generator.width=8", "discriminator.width=8", "train.batch_size=8", "log.every=1",
                 "log.sample_every=2", "log.n_samples=4", "data.num_workers=0", "checkpoint.every=2")


class SearchError(UserError):
    """A bad command line or point list: one line and exit status 2, like every distgan command."""


# ---------------------------------------------------------------- budgets and points


@dataclass(frozen=True)
class Budget:
    kind: str  # images | seconds | default-time
    value: Optional[float]  # images or seconds; None for default-time (measured)
    probe_threads: Optional[int] = None  # wall clock probed at other threads than the runs train with; else None

    @property
    def label(self) -> str:
        label = self.kind if self.value is None else f"{self.kind}={int(self.value) if self.value.is_integer() else self.value}"
        return label if self.probe_threads is None else f"{label}@{self.probe_threads}threads"

    @property
    def wall_clock(self) -> bool:
        return self.kind != "images"


def parse_budget(text: str, probe_threads: Optional[int] = None) -> Budget:
    """``images=N``, ``seconds=S`` or ``default-time``; PROBE_THREADS only for a wall-clock budget whose probes
    use other threads than its runs (None otherwise)."""
    if text == "default-time":
        return Budget("default-time", None, probe_threads)
    match = re.fullmatch(r"(images|seconds)=([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)", text)
    if not match or float(match.group(2)) <= 0:
        raise SearchError(f"--budget {text!r}: expected images=N, seconds=S (positive numbers) or default-time")
    if match.group(1) == "images" and probe_threads is not None:
        raise SearchError(f"--probe-threads {probe_threads} with --budget {text}: an image budget has no probes; "
                          "drop --probe-threads or use seconds=S or default-time")
    return Budget(match.group(1), float(match.group(2)), probe_threads)


def select_points(names: Optional[list[str]]) -> dict[str, tuple[str, ...]]:
    unknown = [n for n in names or [] if n not in POINTS]
    if unknown:
        raise SearchError(f"unknown point(s) {', '.join(unknown)}; known: {', '.join(POINTS)}")
    return {n: POINTS[n] for n in (names or POINTS)}


def point_configs(base: str, points: dict[str, tuple[str, ...]], extra: tuple[str, ...]) -> dict[str, Config]:
    """Every point's config, validated now: a bad override is the config's error before any run starts."""
    configs = {}
    for name, overrides in points.items():
        try:
            configs[name] = load_config(base, [*extra, *overrides])
        except UserError as err:
            raise SearchError(f"point {name}: {one_line(err)}") from None
    return configs


def images_per_step(cfg: Config) -> int:
    return cfg.train.batch_size * cfg.train.d_steps


# ---------------------------------------------------------------- running commands


def call(cmd: list[str], log_file: Path, threads: int = 1) -> str:
    """A distgan command as a subprocess with this tree on PYTHONPATH and THREADS torch threads (OMP_NUM_THREADS:
    evaluation and data preparation; training sets its own from train.cpu_threads); its stdout, or the search ends."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", WANDB_MODE="offline",
               OMP_NUM_THREADS=str(threads))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as log:
        proc = subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log,
                              text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): python -m {' '.join(cmd)}; see {log_file}")
    return proc.stdout


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def in_process(main: Callable[[list[str]], int], argv: list[str]) -> None:
    """A distgan command's main in this process (its JSON answer on stdout dropped); a failure ends the search."""
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"failed ({code}): {main.__module__} {' '.join(argv)}")


def prepare_data(work: Path, dry: bool, threads: int) -> Path:
    """Fashion-MNIST train and test shards under WORK/data and the feature classifier beside the train shards
    (in this process: done once, before any run)."""
    import torch  # loads only here, once the points are valid

    from distgan import eval as distgan_eval, prepare

    torch.set_num_threads(threads)
    data, test = work / "data" / "fashion_mnist", work / "data" / "fashion_mnist_test"
    for out, split, limit in ((data, "train", DRY["full"]), (test, "test", DRY["test"])):
        if not (out / "dataset.json").is_file():
            tiny = ["--limit", str(limit), "--shard-size", str(DRY["shard_size"])] if dry else []
            in_process(prepare.main, ["fashion-mnist", "--split", split, "--out", str(out), "--no-progress", *tiny])
    if not (data / "feature_classifier.safetensors").is_file():
        steps = ["--steps", str(DRY["classifier_steps"])] if dry else []
        in_process(distgan_eval.main, ["train-features", "--data", str(data), *steps])
    return data


def train_command(base: str, run_dir: Path, data: Path, seed: int, steps: int, threads: int,
                  overrides: Iterable[str]) -> list[str]:
    return ["distgan.train", "--config", base, f"run.dir={run_dir}", f"data.path={data}", f"run.seed={seed}",
            f"train.steps={steps}", f"train.cpu_threads={threads}", *COMMON_OVERRIDES, *overrides, "--resume", "auto"]


# ---------------------------------------------------------------- probes (wall-clock budgets)


def seconds_per_step(metrics_file: Path, first: int, last: int) -> float:
    """Training seconds per step over steps (first, last]: the median over log intervals of each interval's images
    over its images_per_s (a median: a moment of contention on a shared machine moves one interval, not the figure)."""
    from distgan.tracking import read_metrics  # loads torch: only once a probe has run

    rates = []
    previous = None
    for record in read_metrics(metrics_file):  # distgan's reader: a torn tail is skipped, not a crash
        if "images_per_s" not in record:
            continue
        if previous is not None and first < record["step"] <= last and record["images_per_s"] > 0:
            seconds = (record["images_seen"] - previous["images_seen"]) / record["images_per_s"]
            rates.append(seconds / (record["step"] - previous["step"]))
        previous = record
    if not rates:
        raise SystemExit(f"{metrics_file}: no timed log lines between steps {first} and {last}")
    return statistics.median(rates)


def compute_class(overrides: tuple[str, ...]) -> tuple[str, ...]:
    """The overrides that change a step's work: points with equal classes share one probe (so one probe's noise
    does not set them apart); the loss kind, learning rates, betas, EMA and penalty weight change only numbers."""
    return tuple(sorted(o for o in overrides if not o.split("=", 1)[0].startswith(SAME_COMPUTE_KEYS)))


def same_compute(overrides: tuple[str, ...]) -> bool:
    """True when the point does the default's work per step: it trains exactly the default's steps."""
    return compute_class(overrides) == ()


def probe(name: str, overrides: tuple[str, ...], ctx: "Search") -> dict:
    """Train a fresh short run of the point and measure its seconds per step."""
    run_dir = ctx.work / "probes" / Path(ctx.base).stem / name
    shutil.rmtree(run_dir, ignore_errors=True)
    plan = ctx.probe_plan
    extra = (*ctx.extra, f"log.every={plan['log_every']}", f"log.sample_every={plan['steps'] * 10}",
             f"checkpoint.every={plan['steps'] * 10}", *overrides)
    load = os.getloadavg()
    threads = ctx.probe_threads
    call(train_command(ctx.base, run_dir, ctx.data, 0, plan["steps"], threads, extra), run_dir.parent / f"{name}.log",
         threads)
    sps = seconds_per_step(run_dir / "metrics.jsonl", plan["from"], plan["steps"])
    return {"seconds_per_step": sps, "steps": plan["steps"], "timed_from": plan["from"], "threads": threads,
            "parallel_probes": 1, "loadavg_before": rounded(load), "loadavg_after": rounded(os.getloadavg()),
            "date": now()}


def measure_probes(names: list[str], ctx: "Search") -> dict[str, dict]:
    """Probes of these points, in this invocation, one at a time with the same threads: alike conditions for all
    (--jobs parallel probes would leave the last one alone on the machine)."""
    say(f"probing {len(names)} point(s) for {ctx.probe_plan['steps']} steps each")
    figures = {}
    for name in names:
        figures[name] = probe(name, POINTS[name], ctx)
        say(f"probe {name}: {figures[name]['seconds_per_step'] * 1000:.1f} ms/step")
    return figures


# ---------------------------------------------------------------- one run


@dataclass
class Search:
    base: str
    work: Path
    data: Path
    results: Path
    points: dict[str, tuple[str, ...]]
    configs: dict[str, Config]
    budget: Budget
    seeds: list[int]
    jobs: int
    threads: int
    n_eval: int
    extra: tuple[str, ...]
    max_steps: Optional[int]
    probe_plan: dict
    lock: threading.Lock
    new_probes: bool = False

    @property
    def probe_threads(self) -> int:
        return self.budget.probe_threads or self.threads

    def map(self, fn: Callable, items: list) -> list:
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            return list(pool.map(fn, items))


def rounded(values: Iterable[float]) -> list[float]:
    return [round(v, 2) for v in values]


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def class_probes(names: set[str], ctx: "Search") -> dict[str, dict]:
    """Each point's probe: one per compute class, kept in WORK/probes/BASE-threadsT.json so that every later
    invocation (other seeds, new points) plans the same steps for the same work; --new-probes measures again."""
    saved_file = ctx.work / "probes" / f"{Path(ctx.base).stem}-threads{ctx.probe_threads}.json"
    saved = {} if ctx.new_probes or not saved_file.is_file() else json.loads(saved_file.read_text())
    classes: dict[str, str] = {}  # compute class (as JSON) -> the point probed for it
    for name in sorted(names, key=lambda n: (n != "default", n)):
        key = json.dumps(compute_class(POINTS[name]))
        classes.setdefault(key, saved.get(key, {}).get("point", name))
    missing = {key: name for key, name in classes.items() if key not in saved}
    if missing:
        measured = measure_probes(sorted(missing.values()), ctx)
        saved.update({key: {**measured[name], "point": name} for key, name in missing.items()})
        saved_file.parent.mkdir(parents=True, exist_ok=True)
        saved_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    probes = {}
    for name in names:
        probe_ = saved[json.dumps(compute_class(POINTS[name]))]
        probes[name] = {k: v for k, v in probe_.items() if k != "point"}
        if probe_["point"] != name:
            probes[name]["same_compute_as"] = probe_["point"]
    return probes


def plan_steps(name: str, ctx: Search, probes: dict[str, dict], default_seconds: Optional[float]) -> dict:
    """How many steps the point trains under the budget, and why."""
    per_step = images_per_step(ctx.configs[name])
    if ctx.budget.kind == "images":
        steps = max(1, math.floor(ctx.budget.value / per_step))
        plan = {"steps": steps, "probe": None, "budget_seconds": None}
    else:
        seconds = ctx.budget.value if ctx.budget.kind == "seconds" else default_seconds
        steps = max(1, math.floor(seconds / probes[name]["seconds_per_step"] + 1e-9))  # x / x is 1, not 0.99..
        plan = {"steps": steps, "probe": probes[name], "budget_seconds": seconds,
                "default_probe": probes["default"] if ctx.budget.kind == "default-time" else None}
    if ctx.max_steps is not None and plan["steps"] > ctx.max_steps:
        plan.update(steps=ctx.max_steps, capped_by_max_steps=True)
    return plan


def run_one(name: str, seed: int, plan: dict, ctx: Search) -> dict:
    """Train (resumed when interrupted), evaluate, and return the result line."""
    digest = hashlib.sha1(" ".join((*ctx.extra, *ctx.points[name])).encode()).hexdigest()[:8]  # new overrides: new dir
    run_dir = ctx.work / "runs" / Path(ctx.base).stem / ctx.budget.label / f"{name}-{digest}-seed{seed}"
    plan_file = run_dir / "plan.json"
    if plan_file.is_file():  # a resumed run trains to the step it was planned for
        plan = json.loads(plan_file.read_text())
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        plan_file.write_text(json.dumps(plan, indent=2) + "\n")
    overrides = (*ctx.extra, *ctx.points[name])
    load_before = os.getloadavg()
    if not (run_dir / "generator_ema.safetensors").is_file():
        timed(lambda: call(train_command(ctx.base, run_dir, ctx.data, seed, plan["steps"], ctx.threads, overrides),
                           run_dir / "train.log", ctx.threads), run_dir / "wall.json")
    load_after = os.getloadavg()
    segments = json.loads((run_dir / "wall.json").read_text()) if (run_dir / "wall.json").is_file() else []
    out = call(["distgan.eval", "--run", str(run_dir), "--n", str(ctx.n_eval), "--metrics", *METRICS],
               run_dir / "eval.log", ctx.threads)
    figures = json.loads(out.strip().splitlines()[-1])
    from distgan.tracking import read_metrics  # a torn tail skipped, not a crash

    last = read_metrics(run_dir / "metrics.jsonl")[-1]
    return {
        "point": name, "overrides": list(ctx.points[name]), "base": ctx.base, "seed": seed,
        "budget": {"kind": ctx.budget.kind, "value": ctx.budget.value, "seconds": plan["budget_seconds"],
                   "default_probe": plan.get("default_probe"), "probe_threads": ctx.budget.probe_threads},
        "steps": last["step"], "images": last["images_seen"], "capped_by_max_steps": plan.get("capped_by_max_steps", False),
        "train_wall_seconds": round(math.fsum(segments), 2), "train_segments": len(segments), "probe": plan["probe"],
        "loadavg_before": rounded(load_before), "loadavg_after": rounded(load_after),
        "threads": ctx.threads, "jobs": ctx.jobs, "n_eval": ctx.n_eval, "dry_run": bool(ctx.extra),
        "figures": {k: figures.get(k) for k in ("fd", "precision", "recall", "modes_covered", "kl_to_real")},
        "commit": commit(), "machine": machine(), "date": now(),
    }


def timed(body: Callable[[], object], wall_file: Path) -> None:
    """Run body and add its wall seconds to WALL_FILE's list (one entry per finished training segment)."""
    start = time.time()
    body()
    segments = json.loads(wall_file.read_text()) if wall_file.is_file() else []
    wall_file.write_text(json.dumps([*segments, round(time.time() - start, 2)]) + "\n")


def append_line(path: Path, record: dict, lock: threading.Lock) -> None:
    """One write of one line, flushed and fsynced: a killed search leaves whole lines only."""
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with lock:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "distgan", "configs"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return (proc.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def machine() -> dict:
    """CPU model, cores, torch version: where the figures were measured."""
    model = blocks.cpu_model()
    try:
        from importlib.metadata import version

        torch_version = version("torch")
    except Exception:  # noqa: BLE001 - reported, not fatal
        torch_version = "unknown"
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch_version, "python": platform.python_version()}


# ---------------------------------------------------------------- the search


def read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_key(record: dict) -> tuple:
    budget = record["budget"]
    return (record["base"], record["point"], tuple(record["overrides"]), record["seed"], budget["kind"], budget["value"],
            budget.get("probe_threads"))


def pending_runs(ctx: Search) -> list[tuple[str, int]]:
    done = {run_key(r) for r in read_lines(ctx.results)}
    budget = {"kind": ctx.budget.kind, "value": ctx.budget.value, "probe_threads": ctx.budget.probe_threads}
    return [(name, seed) for name in ctx.points for seed in ctx.seeds
            if run_key({"base": ctx.base, "point": name, "overrides": ctx.points[name], "seed": seed,
                        "budget": budget}) not in done]


def same_training(records: list[dict], name: str, seed: int, plan: dict, ctx: Search) -> Optional[dict]:
    """A run of another budget that trained exactly this: same base, overrides, seed and steps, evaluated alike
    (e.g. images=242464 at batch 32 is the 7,577 steps some wall-clock budget already gave the point)."""
    for r in records:
        if (r["base"], r["overrides"], r["seed"], r["steps"], r["n_eval"], r["dry_run"]) == (
                ctx.base, list(ctx.points[name]), seed, plan["steps"], ctx.n_eval, bool(ctx.extra)):
            return r
    return None


def reused(record: dict, plan: dict, ctx: Search) -> dict:
    """RECORD's figures under this budget: the same training is not run twice; 'same_run_as' says where it ran."""
    budget = {"kind": ctx.budget.kind, "value": ctx.budget.value, "seconds": plan["budget_seconds"],
              "default_probe": plan.get("default_probe"), "probe_threads": ctx.budget.probe_threads}
    return {**record, "budget": budget, "probe": plan["probe"], "same_run_as": budget_label(record),
            "capped_by_max_steps": plan.get("capped_by_max_steps", False)}


def search(ctx: Search) -> int:
    todo = pending_runs(ctx)
    say(f"{len(todo)} run(s) to do, {len(ctx.points) * len(ctx.seeds) - len(todo)} already in {ctx.results}")
    if not todo:
        return 0
    probes: dict[str, dict] = {}
    default_seconds = None
    if ctx.budget.wall_clock:
        names = {name for name, _ in todo}
        if ctx.budget.kind == "default-time" or any(same_compute(ctx.points[n]) for n in names):
            names.add("default")
        probes = class_probes(names, ctx)
        if ctx.budget.kind == "default-time":
            base_steps = load_config(ctx.base, list(ctx.extra)).train.steps
            default_seconds = base_steps * probes["default"]["seconds_per_step"]
            say(f"default-time: {base_steps} steps x {probes['default']['seconds_per_step']:.4f} s = "
                f"{default_seconds:.1f} s per run")
    plans = {name: plan_steps(name, ctx, probes, default_seconds) for name in {n for n, _ in todo}}
    earlier = read_lines(ctx.results)

    def one(item: tuple[str, int]) -> None:
        name, seed = item
        same = same_training(earlier, name, seed, plans[name], ctx)
        record = reused(same, plans[name], ctx) if same else run_one(name, seed, plans[name], ctx)
        append_line(ctx.results, record, ctx.lock)
        say(json.dumps({"point": name, "seed": seed, "steps": record["steps"], **record["figures"]}))

    ctx.map(one, todo)
    return 0


# ---------------------------------------------------------------- the table (the JSONL only)


def mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation in float64 (None for one value)."""
    xs = [float(v) for v in values]
    mean = math.fsum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def budget_label(record: dict) -> str:
    budget = record["budget"]
    return Budget(budget["kind"], budget["value"], budget.get("probe_threads")).label


def group(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(point, budget) -> its runs, the last line of each seed."""
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for r in records:
        groups.setdefault((r["point"], budget_label(r)), {})[r["seed"]] = r
    return {key: [by_seed[s] for s in sorted(by_seed)] for key, by_seed in groups.items()}


def distinct(values: Iterable) -> str:
    seen = list(dict.fromkeys(values))
    return ", ".join(f"{v:,}" if isinstance(v, int) else str(v) for v in seen)


def reference(point: str) -> str:
    """The point a row is measured against: the recipe for the fourth round's points, the shipped default for the
    fifth's, else the base's default."""
    if point.startswith("shipped_"):
        return DEFAULT_POINT
    return RECIPE_POINT if point.startswith("recipe_") else "default"


def verdict(runs: list[dict], ref: Optional[list[dict]]) -> str:
    """'yes': the mean fd of 2+ seeds is below the reference's mean minus its seed spread; '1 seed': one seed is
    (not yet a result: a point that wins on one seed may be noise); '' otherwise or without a spread to beat."""
    if not ref or len(ref) < 2:
        return ""
    ref_mean, ref_std = mean_std([r["figures"]["fd"] for r in ref])
    if mean_std([r["figures"]["fd"] for r in runs])[0] >= ref_mean - ref_std:
        return ""
    return "yes" if len(runs) >= 2 else "1 seed"


def row(point: str, budget: str, runs: list[dict], ref: Optional[list[dict]]) -> str:
    mean, std = mean_std([r["figures"]["fd"] for r in runs])
    recall, _ = mean_std([r["figures"]["recall"] for r in runs])
    wall, _ = mean_std([r["train_wall_seconds"] for r in runs])
    beats = verdict(runs, ref) if point != reference(point) else ""
    overrides = f"`{' '.join(runs[0]['overrides'])}`" if runs[0]["overrides"] else "-"
    spread = f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"
    per_seed = ", ".join(f"{r['figures']['fd']:.2f}" for r in runs)
    if runs[0]["budget"]["kind"] == "default-time":  # the measured S of each run
        budget += f" ({distinct(round(r['budget']['seconds']) for r in runs)} s)"
    if any("same_run_as" in r for r in runs):
        budget += f" (the runs of {distinct(r.get('same_run_as', 'this budget') for r in runs)})"
    name = f"**{point}**" if beats == "yes" else point
    versus = f"{beats} ({reference(point)})" if beats else ""
    return (f"| {name} | {overrides} | {budget} | {distinct(r['steps'] for r in runs)} | "
            f"{distinct(r['images'] for r in runs)} | {len(runs)} | {spread} | "
            f"{per_seed} | {recall:.3f} | "
            f"{min(r['figures']['modes_covered'] for r in runs):.0f} | {wall:.0f} | {versus} |")


def render_table(records: list[dict]) -> str:
    """The Markdown table: one row per (point, budget), by budget, then by mean fd."""
    if not records:
        return ("Not run yet: bench/results/search.jsonl has no results. `python bench/search.py --budget "
                "images=192000 --seeds 0 1 2` (or `--budget default-time`) runs the search, then "
                f"`{TABLE_COMMAND}` writes the table here.\n")
    groups = group(records)
    lines = [f"Generated by `{TABLE_COMMAND}` from bench/results/search.jsonl (one line per run). fd: Frechet "
             "distance in distgan's classifier features (lower is better), mean ± sample std over seeds. Each point "
             f"is measured against its reference at the same budget: {RECIPE_POINT} (the recipe of rounds 1 to 3) for "
             f"the recipe_* points, {DEFAULT_POINT} (the shipped default) for the shipped_* points, the base's default "
             "for the others. A point in bold beats it on the mean of 2 or "
             "more seeds by more than the reference's seed spread; '1 seed' marks a point that does so on its one "
             "seed (not yet a result).", "",
             "| point | overrides | budget | steps | images | seeds | fd mean ± std | fd per seed | recall mean "
             "| modes covered min | train wall s mean | beats its reference |", "|---" * 12 + "|"]
    for budget in sorted({b for _, b in groups}):
        rows = {p: runs for (p, b), runs in groups.items() if b == budget}
        order = sorted(rows, key=lambda p: mean_std([r["figures"]["fd"] for r in rows[p]])[0])
        lines += [row(p, budget, rows[p], rows.get(reference(p))) for p in order]
    machines = sorted({f"{r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']}"
                       for r in records})
    dates = sorted(r["date"][:10] for r in records)
    lines += ["", f"Measured on {'; '.join(machines)}, {dates[0]} to {dates[-1]}, commit(s) "
              f"{distinct(r['commit'][:10] for r in records)}, {distinct(r['threads'] for r in records)} thread(s) "
              f"per run, {distinct(r['jobs'] for r in records)} run(s) at a time, fd on "
              f"{distinct(r['n_eval'] for r in records)} generated images."]
    if any(r.get("dry_run") for r in records):
        lines.append("**Dry-run lines: a check of the path, not results.**")
    return "\n".join(lines) + "\n"


def read_block(markdown: Path) -> str:
    return blocks.read_block(markdown, BLOCK)


def write_block(block: str, markdown: Path) -> None:
    blocks.write_block(block, markdown, BLOCK)


# ---------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/search.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--budget", help="images=N, seconds=S or default-time")
    p.add_argument("--config", default="fashion_mnist_baseline", help="the base config the points override")
    p.add_argument("--points", nargs="+", help=f"only these points (default: all): {', '.join(POINTS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (jobs x threads <= the cores available)")
    p.add_argument("--threads", type=int, default=1, help="train.cpu_threads of every run (and probe)")
    p.add_argument("--probe-threads", type=int,
                   help="wall-clock budgets: probe at this many threads (default --threads), e.g. a demo's cores")
    p.add_argument("--n", type=int, default=5000, help="generated images per evaluation")
    p.add_argument("--work", type=Path, default=Path("runs/search"), help="data, probes and run dirs")
    p.add_argument("--results", type=Path, help="the JSONL (default bench/results/search.jsonl; --dry-run: WORK/)")
    p.add_argument("--max-steps", type=int, help="cap on any run's steps (recorded in its line)")
    p.add_argument("--new-probes", action="store_true", help="measure the probes again (default: reuse WORK/probes)")
    p.add_argument("--table", action="store_true", help="after the search, print the table")
    p.add_argument("--table-only", action="store_true", help="print the table from the JSONL; no runs")
    p.add_argument("--write", type=Path, help="with --table/--table-only: replace the search block of this file")
    p.add_argument("--dry-run", action="store_true", help="tiny data, width 8, a few steps: the path end to end")
    return p


def context(args: argparse.Namespace, results: Path) -> Search:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if args.jobs < 1 or args.threads < 1 or args.jobs * args.threads > cores:
        raise SearchError(f"--jobs {args.jobs} x --threads {args.threads}: need both >= 1 and a product of at most "
                          f"the {cores} core(s) available")
    if args.probe_threads is not None and not 1 <= args.probe_threads <= cores:
        raise SearchError(f"--probe-threads {args.probe_threads}: need 1 to the {cores} core(s) available")
    if not args.budget:
        raise SearchError("--budget is required (images=N, seconds=S or default-time) unless --table-only")
    probe_threads = None if args.probe_threads in (None, args.threads) else args.probe_threads
    budget = parse_budget(args.budget, probe_threads)
    if args.n < 2 or (args.max_steps is not None and args.max_steps < 1):
        raise SearchError("--n must be at least 2 and --max-steps at least 1")
    points = select_points(args.points)
    extra = DRY_OVERRIDES if args.dry_run else ()
    configs = point_configs(args.config, {"default": POINTS["default"], **points}, extra)
    work = args.work.resolve()
    plan = ({"steps": DRY["probe_steps"], "from": DRY["probe_from"], "log_every": DRY["probe_log_every"]}
            if args.dry_run else {"steps": PROBE_STEPS, "from": PROBE_FROM, "log_every": PROBE_LOG_EVERY})
    n_eval = DRY["n"] if args.dry_run else args.n
    max_steps = DRY["max_steps"] if args.dry_run and args.max_steps is None else args.max_steps
    return Search(args.config, work, work / "data" / "fashion_mnist", results, points, configs, budget, args.seeds,
                  args.jobs, args.threads, n_eval, extra, max_steps, plan, threading.Lock(), args.new_probes)


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        results = (args.results or (args.work / "search.jsonl" if args.dry_run else RESULTS)).resolve()
        if not args.table_only:
            ctx = context(args, results)
            ctx.work.mkdir(parents=True, exist_ok=True)
            prepare_data(ctx.work, args.dry_run, ctx.threads)
            search(ctx)
        if args.table or args.table_only:
            table = render_table(read_lines(results))
            if args.write:
                write_block(table, args.write)
            print(table, end="")
    except UserError as err:
        print(f"bench/search.py: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
