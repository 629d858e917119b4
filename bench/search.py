"""Recipe search on Fashion-MNIST: which overrides of the default train a better GAN in the same budget.

    python bench/search.py --budget images=192000 [--points NAME ...] [--seeds 0 1 2] [--jobs 1] [--threads 1]
    python bench/search.py --budget default-time ...     # wall clock: the default's own training time
    python bench/search.py --budget default-time --probe-threads 2 ...   # ... at the demo's 2 threads
    python bench/search.py --budget seconds=240 ...      # wall clock: S seconds of training per run
    python bench/search.py --table                       # the Markdown table from bench/results/search.jsonl
    python bench/search.py --table-only --write BENCHMARKS.md   # that table into the search block
    python bench/search.py --dry-run --work DIR --budget images=32   # tiny data and runs: the path, not a figure

The points of the search are data (POINTS, in search_points.py): a name and the config overrides it puts on top of
the base config (--config, default fashion_mnist_baseline, the default before the search); search_table.py renders
the table from the JSON lines. Every point's overrides are validated before anything runs: a bad one ends the
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
search continues where it stopped, and a run another budget already trained (same base, overrides, seed and steps)
is reused, not trained again (its line says same_run_as). Each finished run appends one JSON line to the results file.
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
from bench.search_points import (  # noqa: E402,F401 - the points, for callers
    DEFAULT_POINT, POINTS, RECIPE_POINT, SHIPPED_POINT)
from bench.search_table import (TABLE_COMMAND, budget_label, budget_text, mean_std, read_block,  # noqa: E402,F401
                                render_table, write_block)
from distgan.cli import one_line  # noqa: E402
from distgan.config import Config, load_config  # noqa: E402
from distgan.errors import UserError  # noqa: E402
from distgan.metrics.cache import find_classifier  # noqa: E402

RESULTS = REPO / "bench" / "results" / "search.jsonl"
MARKDOWN = REPO / "BENCHMARKS.md"
COMMON_OVERRIDES = ("log.wandb=false", "log.gif=false", "log.progress_bar=false")
PROBE_STEPS, PROBE_FROM, PROBE_LOG_EVERY = 120, 20, 10  # probe: train 120 steps, time steps 20-120 from metrics.jsonl
# keys whose values change no step's work (see same_compute)
SAME_COMPUTE_KEYS = ("loss.kind", "loss.penalty_weight", "g_optim.lr", "d_optim.lr", "g_optim.betas", "d_optim.betas",
                     "ema.half_life_kimg", "ema.rampup")
METRICS = ("fd", "pr", "classes_covered")
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
        return budget_text(self.kind, self.value, self.probe_threads)

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
    """Real images D sees per generator step in one process (the search's runs): the global batch x d_steps."""
    return (cfg.train.batch_per_process or cfg.train.batch_size) * cfg.train.d_steps


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
    """Fashion-MNIST train and test shards under WORK/data and the train shards' feature classifier
    (in this process: done once, before any run)."""
    import torch  # loads only here, once the points are valid

    from distgan import eval as distgan_eval, prepare

    torch.set_num_threads(threads)
    data, test = work / "data" / "fashion_mnist", work / "data" / "fashion_mnist_test"
    for out, split, limit in ((data, "train", DRY["full"]), (test, "test", DRY["test"])):
        if not (out / "dataset.json").is_file():
            tiny = ["--limit", str(limit), "--shard-size", str(DRY["shard_size"])] if dry else []
            in_process(prepare.main, ["fashion-mnist", "--split", split, "--out", str(out), "--no-progress", *tiny])
    if find_classifier(data) is None:
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


def run_dir_of(name: str, seed: int, plan: dict, ctx: Search) -> Path:
    """A run's dir: new overrides, a new dir; a run capped by --max-steps has its own, so that a later uncapped run
    of the same budget does not resume its plan (plan.json) and stop at the cap."""
    digest = hashlib.sha1(" ".join((*ctx.extra, *ctx.points[name])).encode()).hexdigest()[:8]
    cap = f"-max{plan['steps']}" if plan.get("capped_by_max_steps") else ""
    return ctx.work / "runs" / Path(ctx.base).stem / ctx.budget.label / f"{name}-{digest}{cap}-seed{seed}"


def run_one(name: str, seed: int, plan: dict, ctx: Search) -> dict:
    """Train (resumed when interrupted), evaluate, and return the result line."""
    run_dir = run_dir_of(name, seed, plan, ctx)
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


def reused(record: dict, name: str, plan: dict, ctx: Search) -> dict:
    """RECORD's figures under this budget: the same training is not run twice; 'same_run_as' says where it ran."""
    budget = {"kind": ctx.budget.kind, "value": ctx.budget.value, "seconds": plan["budget_seconds"],
              "default_probe": plan.get("default_probe"), "probe_threads": ctx.budget.probe_threads}
    return {**record, "point": name, "budget": budget, "probe": plan["probe"], "same_run_as": budget_label(record),
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
        record = reused(same, name, plans[name], ctx) if same else run_one(name, seed, plans[name], ctx)
        append_line(ctx.results, record, ctx.lock)
        say(json.dumps({"point": name, "seed": seed, "steps": record["steps"], **record["figures"]}))

    ctx.map(one, todo)
    return 0


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
