"""Regenerate the results table of BENCHMARKS.md: train the listed runs, evaluate them, write the table.

    python bench/results.py [--work runs/bench] [--runs NAME ...] [--n 10000]   # train what is missing, evaluate, write
    python bench/results.py --table-only                                         # the table from bench/results/ only
    python bench/results.py --check                                              # exit 1 when BENCHMARKS.md differs
    python bench/results.py --quick                                              # tiny runs, end-to-end check only

The runs of the table are data (RUNS below). For each one the script prepares the data under WORK/data if
missing, trains the feature classifier if missing, trains the run into WORK/NAME with ``--resume auto`` (a run
whose export exists is skipped, an interrupted one resumes), evaluates it with ``python -m distgan.eval``, and
copies the raw outputs into bench/results/NAME/: eval.json, the last lines of metrics.jsonl, config.yaml, the
final sample grid, and run.json (commands, commit, images seen, machine, torch version, date, and the training
wall seconds with the load average: measured on a shared CPU, they are not a speed figure). The classifier's
accuracy goes to bench/results/classifier.json. Every command runs from a copy of distgan/ and configs/ at HEAD,
made once into WORK/src (a working tree others edit while this trains is not the code measured), with
OMP_NUM_THREADS from --threads.

The table is generated from bench/results/ alone (no torch, no data, no training) and written into
BENCHMARKS.md between the marker comments; it is never edited by hand (tests/test_bench_results.py checks).
--quick writes into runs/bench-quick (work, results and a copy of BENCHMARKS.md): nothing committed changes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this working tree's distgan and bench/, not an installed one

from bench import blocks  # noqa: E402
from distgan.cli import one_line  # noqa: E402
from distgan.errors import UserError  # noqa: E402
from distgan.metrics.cache import find_classifier  # noqa: E402
from distgan.metrics import registry  # noqa: E402
from distgan.tracking import read_metrics  # noqa: E402

RESULTS = REPO / "bench" / "results"
MARKDOWN = REPO / "BENCHMARKS.md"
BLOCK = "results"  # <!-- results:begin --> ... <!-- results:end --> in BENCHMARKS.md
COMMAND = "python bench/results.py --work runs/bench"
CHECK_COMMAND = "python bench/results.py --table-only"
COMMON_OVERRIDES = ("log.wandb=false",)  # no wandb files in a benchmark run; changes nothing it computes
METRICS_TAIL = 3  # last lines of metrics.jsonl kept


@dataclass(frozen=True)
class Run:
    name: str  # run dir under --work, and folder under bench/results/
    label: str  # the table's first column
    config: str  # configs/<config>.yaml
    overrides: tuple[str, ...] = field(default_factory=tuple)


WGAN_GP = ("loss.kind=wasserstein", "loss.penalty=wgan-gp", "discriminator.norm=layer", "train.d_steps=5",
           "train.steps=600", "g_optim.lr=1e-4", "d_optim.lr=1e-4", "g_optim.betas=[0,0.9]", "d_optim.betas=[0,0.9]")

# The table "What the GAN learned": every run sees 192,000 real images (WGAN-GP: 600 G steps x 5 D steps x 64).
# The rows on fashion_mnist_baseline were trained when it was configs/fashion_mnist.yaml (the same recipe).
RUNS = (
    Run("fashion_mnist", "fashion_mnist_baseline (the previous default)", "fashion_mnist_baseline"),
    Run("seed_dcgan", "seed_dcgan (TF tutorial recipe)", "seed_dcgan"),
    Run("seed_mlp_gan", "seed_mlp_gan (MLP GAN recipe)", "seed_mlp_gan"),
    Run("v_hinge", "hinge + spectral norm", "fashion_mnist_baseline", ("loss.kind=hinge",)),
    Run("v_r1", "R1", "fashion_mnist_baseline", ("loss.penalty=r1", "loss.penalty_weight=1.0")),
    Run("v_wgan_gp", "WGAN-GP", "fashion_mnist_baseline", WGAN_GP),
    Run("v_ema_off", "EMA off", "fashion_mnist_baseline", ("ema.enabled=false",)),
)

# Training order: the default against the seed recipes first, then the variants, so an interrupted
# regeneration has the table's main comparison.
TRAIN_ORDER = ("seed_mlp_gan", "fashion_mnist", "seed_dcgan", "v_r1", "v_ema_off", "v_hinge", "v_wgan_gp")
assert sorted(TRAIN_ORDER) == sorted(r.name for r in RUNS)

# --quick: tiny runs for checking this script end to end (appended last, so they win over the runs' own).
QUICK_OVERRIDES = ("train.steps=20", "log.every=10", "log.sample_every=10", "checkpoint.every=10")
QUICK = dict(limit="3000", test_limit="1000", shard_size="500", classifier_steps="30", n=1000)


# ---------------------------------------------------------------- running the pipeline


def rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def shown(cmd: list[str]) -> str:
    """A command as a person would type it in the repo root: python -m ... with repo-relative paths."""
    def arg(a: str) -> str:
        key, sep, value = a.rpartition("=")
        return f"{key}{sep}{rel(Path(value))}" if os.path.isabs(value) else a

    return " ".join(["python"] + [arg(a) for a in cmd[1:]])


def snapshot(work: Path) -> tuple[Path, str]:
    """distgan/ and configs/ as committed at HEAD, copied once into WORK/src: every command of a regeneration
    runs that code (its cwd), never a working tree other people may be editing while it trains."""
    src = work / "src"
    if not (src / "COMMIT").is_file():
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        tmp = work / "src.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", commit, "distgan", "configs"], cwd=REPO, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        (tmp / "COMMIT").write_text(commit + "\n")
        os.replace(tmp, src)
    return src, (src / "COMMIT").read_text().strip()


CODE: Optional[Path] = None  # the snapshot the commands run in (set by main)
THREADS = 1  # torch threads per command (OMP_NUM_THREADS; set by main from --threads)


def call(cmd: list[str], log_file: Optional[Path] = None) -> subprocess.CompletedProcess:
    print(f"[{time.strftime('%H:%M:%S')}] {shown(cmd)}", flush=True)
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1", PYTHONPATH=str(CODE))
    if THREADS:
        env["OMP_NUM_THREADS"] = str(THREADS)
    stdout = open(log_file, "a") if log_file else subprocess.DEVNULL
    try:
        proc = subprocess.run(cmd, cwd=CODE, env=env, stdout=subprocess.PIPE, stderr=stdout, text=True)
    finally:
        if log_file:
            stdout.close()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {shown(cmd)}" + (f"; see {rel(log_file)}" if log_file else ""))
    return proc


def machine() -> dict:
    """CPU model and core count, torch version, date: where the figures were measured."""
    model = blocks.cpu_model()
    try:
        from importlib.metadata import version

        torch_version = version("torch")
    except Exception:  # noqa: BLE001 - reported, not fatal
        torch_version = "unknown"
    gpu = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                         capture_output=True, text=True).stdout.strip() == "True"
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": _memory_gib(), "gpu": gpu, "torch": torch_version,
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}


def _memory_gib() -> Optional[int]:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    except (ValueError, OSError):
        return None


def prepare_data(work: Path, quick: bool) -> tuple[Path, dict]:
    """Shards of the train and test split (eval finds DATA_test beside DATA), and the feature classifier."""
    data, test = work / "data" / "fashion_mnist", work / "data" / "fashion_mnist_test"
    py = [sys.executable, "-m"]
    limit = ["--limit", QUICK["limit"], "--shard-size", QUICK["shard_size"]] if quick else []
    test_limit = ["--limit", QUICK["test_limit"], "--shard-size", QUICK["shard_size"]] if quick else []
    if not (data / "dataset.json").is_file():
        call(py + ["distgan.prepare", "fashion-mnist", "--out", str(data)] + limit)
    if not (test / "dataset.json").is_file():
        call(py + ["distgan.prepare", "fashion-mnist", "--split", "test", "--out", str(test)] + test_limit)
    record_file = work / "classifier.json"
    if find_classifier(data) is None or not record_file.is_file():
        cmd = py + ["distgan.eval", "train-features", "--data", str(data)]
        cmd += ["--steps", QUICK["classifier_steps"]] if quick else []
        out = json.loads(call(cmd, work / "classifier.log").stdout.strip().splitlines()[-1])
        out.update(command=shown(cmd), path=rel(Path(out["path"])), accuracy_on=out["accuracy_on"].replace(
            str(test), rel(test)), seconds_note="wall seconds with other jobs sharing the CPU",
                   commit=(CODE / "COMMIT").read_text().strip())
        record_file.write_text(json.dumps(out, indent=2) + "\n")
    return data, json.loads(record_file.read_text())


def train_and_evaluate(run: Run, work: Path, data: Path, n: int, quick: bool, results: Path = RESULTS) -> Path:
    run_dir = work / run.name
    overrides = [f"run.dir={run_dir}", f"data.path={data}", *COMMON_OVERRIDES, *run.overrides]
    overrides += list(QUICK_OVERRIDES) if quick else []
    train_cmd = [sys.executable, "-m", "distgan.train", "--config", run.config, *overrides, "--resume", "auto"]
    wall_file = run_dir / "bench_wall.json"
    if not (run_dir / "generator_ema.safetensors").is_file():
        segments = json.loads(wall_file.read_text()) if wall_file.is_file() else []
        start = time.time()
        segment = {"start": datetime.datetime.fromtimestamp(start).isoformat(timespec="seconds"), "seconds": None,
                   "loadavg_start": [round(x, 2) for x in os.getloadavg()], "resumed": len(segments) > 0}
        run_dir.mkdir(parents=True, exist_ok=True)
        wall_file.write_text(json.dumps(segments + [segment], indent=2) + "\n")  # seconds None: interrupted
        call(train_cmd, run_dir / "train.log")
        segment.update(seconds=round(time.time() - start, 1), loadavg_end=[round(x, 2) for x in os.getloadavg()])
        wall_file.write_text(json.dumps(segments + [segment], indent=2) + "\n")
        if not (run_dir / "generator_ema.safetensors").is_file():  # a STOP file or a signal: checkpointed
            raise SystemExit(f"{run.name}: training stopped on request before the end; run again to resume it")
    eval_cmd = [sys.executable, "-m", "distgan.eval", "--run", str(run_dir), "--n", str(n)]
    eval_file = run_dir / "eval.json"
    if not eval_file.is_file() or json.loads(eval_file.read_text())["meta"]["n"] != n:
        call(eval_cmd, run_dir / "eval.log")
    return collect(run, run_dir, shown(train_cmd), shown(eval_cmd), quick, results)


def final_grid(run_dir: Path, step: int) -> Optional[Path]:
    for name in (f"g_ema-step-{step:08d}.png", f"g-step-{step:08d}.png"):
        if (run_dir / "samples" / name).is_file():
            return run_dir / "samples" / name
    return None


def collect(run: Run, run_dir: Path, train_cmd: str, eval_cmd: str, quick: bool, results: Path = RESULTS) -> Path:
    """Copy a finished, evaluated run's raw outputs into RESULTS/NAME/ (replacing what was there)."""
    out = results / run.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    records = read_metrics(run_dir / "metrics.jsonl")  # a torn tail skipped, not a crash
    (out / "metrics_tail.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[-METRICS_TAIL:]))
    last = records[-1]
    # the resolved config, with paths relative to the repository (the results speak of no machine's folders)
    (out / "config.yaml").write_text((run_dir / "config.yaml").read_text().replace(f"{REPO}/", ""))
    evaluation = json.loads((run_dir / "eval.json").read_text())
    evaluation["meta"] = {k: rel(Path(v)) if k in ("export", "data", "test_data") and v else v
                          for k, v in evaluation["meta"].items()}
    (out / "eval.json").write_text(json.dumps(evaluation, indent=2) + "\n")
    files = {}
    grid = final_grid(run_dir, last["step"])
    if grid is not None:
        shutil.copy(grid, out / grid.name)
        files["grid"] = grid.name
    if run.name == "fashion_mnist" and (run_dir / "progress.gif").is_file():
        shutil.copy(run_dir / "progress.gif", out / "progress.gif")
        files["progress"] = "progress.gif"
    wall_file = run_dir / "bench_wall.json"
    segments = json.loads(wall_file.read_text()) if wall_file.is_file() else []
    record = {
        "name": run.name, "label": run.label, "config": run.config, "overrides": list(run.overrides),
        "common_overrides": list(COMMON_OVERRIDES), "quick": quick, "train_command": train_cmd,
        "eval_command": eval_cmd, "commit": (CODE / "COMMIT").read_text().strip() if CODE else None,
        "code_note": "distgan/ and configs/ of this commit, run from a copy (WORK/src), not the working tree",
        "threads": THREADS or "torch default",
        "steps": last["step"], "images_seen": last["images_seen"], "files": files,
        "machine": machine(),
        "wall": {"seconds": round(sum(s["seconds"] or 0 for s in segments), 1) if segments else None,
                 "segments": segments,
                 "note": "training wall seconds measured while other jobs shared the CPU (see loadavg): "
                         "not a speed figure; bench/throughput.py measures speed"},
    }
    (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


# ---------------------------------------------------------------- the table (bench/results/ only)


def load_results(results: Path = RESULTS) -> tuple[dict[str, dict], Optional[dict]]:
    found = {}
    for run in RUNS:
        folder = results / run.name
        if (folder / "run.json").is_file() and (folder / "eval.json").is_file():
            found[run.name] = {"run": json.loads((folder / "run.json").read_text()),
                               "eval": _renamed(json.loads((folder / "eval.json").read_text()))}
    classifier = results / "classifier.json"
    return found, json.loads(classifier.read_text()) if classifier.is_file() else None


def _renamed(evaluation: dict) -> dict:
    """An eval.json written before KID was reported x1e3 (``kid``, ``kid_std``: raw MMD^2) in today's names."""
    for record in (evaluation, evaluation.get("reference", {})):
        for old, new in registry.RENAMED_FIGURES.items():
            if old in record and new not in record:
                record[new] = record[old] * 1e3
    return evaluation


# the table's figure columns: (header, template) of every registered metric, in registration order
COLUMNS = [column for metric in registry.METRICS.values() for column in metric.columns]


def _cell(template: str, f: dict) -> Optional[str]:
    try:
        return template.format(**f)
    except KeyError:  # a figure the run does not have (class agreement of an unconditional G)
        return None


def _cells(f: dict, columns: list[tuple[str, str]]) -> list[str]:
    """One cell per column, n/a where the run lacks the figure."""
    return [_cell(template, f) or "n/a" for _, template in columns]


def _columns(evals: list[dict]) -> list[tuple[str, str]]:
    """The columns some run has figures for (none of the class-conditional ones in a table of unconditional runs)."""
    return [c for c in COLUMNS if any(_cell(c[1], f) is not None for f in evals)] or COLUMNS


def _distinct(values: list[str]) -> str:
    return ", ".join(dict.fromkeys(values))


def render_table(results: Path = RESULTS) -> str:
    """The Markdown block between the markers, from the raw outputs under ``results`` alone."""
    found, classifier = load_results(results)
    lines = [f"Generated by `{COMMAND}` from the raw outputs in `bench/results/` (one folder per run: eval.json, "
             f"run.json with the exact train and eval commands, config.yaml, the last {METRICS_TAIL} lines of "
             f"metrics.jsonl, the final sample grid). Do not edit this block: `{CHECK_COMMAND}` rewrites it from "
             "those files and tests/test_bench_results.py fails when it differs.", ""]
    if found:
        machines = [r["run"]["machine"] for r in found.values()]
        dates = sorted(m["date"] for m in machines)
        lines.append("Measured on " + _distinct([f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
                                                  f"{'a GPU' if m['gpu'] else 'no GPU'}" for m in machines])
                     + ", torch " + _distinct([m["torch"] for m in machines]) + ", one process per run with "
                     + _distinct([str(r["run"].get("threads", "the default")) for r in found.values()])
                     + " torch thread(s) (--threads), distgan and configs/ at commit "
                     + _distinct([str(r["run"].get("commit"))[:10] for r in found.values()]) + ", "
                     + (dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}") + ".")
        if any(r["run"]["quick"] for r in found.values()):
            lines.append("**Quick runs (--quick): a check of the pipeline, not results.**")
        lines.append("")
    if classifier:
        lines.append(f"Feature classifier: `{classifier['command']}`, {classifier['accuracy']:.4f} accuracy on "
                     f"{classifier['accuracy_images']:,} images of the {classifier['accuracy_on']} "
                     "(`bench/results/classifier.json`).")
        lines.append("")
    measured_fd = [r["eval"]["fd"] for r in found.values()]
    columns = _columns([r["eval"] for r in found.values()])
    header = "| run | config, overrides | images seen | " + " | ".join(h for h, _ in columns) + " | sample grid |"
    lines += [header, "|---" * header.count(" | ") + "|---|"]
    reference = None
    missing = []
    for run in RUNS:
        config = f"`{run.config}`" + (f" `{' '.join(run.overrides)}`" if run.overrides else "")
        if run.name not in found:
            missing.append(run.name)
            lines.append(f"| {run.label} | {config} | not yet measured |" + " |" * (len(columns) + 1))
            continue
        r, f = found[run.name]["run"], found[run.name]["eval"]
        reference = reference or f.get("reference")
        cells = _cells(f, columns)
        if f["fd"] == min(measured_fd):
            fd_column = [h for h, _ in columns].index("fd")
            cells[fd_column] = f"**{cells[fd_column]}**"
        grid = f"[grid](bench/results/{run.name}/{r['files']['grid']})" if "grid" in r["files"] else "-"
        lines.append(f"| {run.label} | {config} | {r['images_seen']:,} | " + " | ".join(cells) + f" | {grid} |")
    if reference:
        lines.append("| real vs real (train vs test) | - | - | " + " | ".join(_cells(reference, columns)) + " | - |")
    lines.append("")
    n = _distinct([f"{r['eval']['meta']['n']:,}" for r in found.values()])
    lines.append("Every run adds `" + " ".join(COMMON_OVERRIDES) + "` and its own `run.dir` and `data.path` (see "
                 "run.json)." + (f" Figures on {n} generated images (G_ema when EMA is on, G otherwise) against {n} "
                                 "real training images; the last row is the floor, real training images against "
                                 "the test split." if found else ""))
    walls = {name: r["run"]["wall"]["seconds"] for name, r in found.items() if r["run"]["wall"]["seconds"]}
    if walls:
        lines.append("")
        lines.append("Wall time is left out of the table: these runs trained while other jobs shared the CPU, so "
                     "their wall seconds (run.json, with the load average at start and end) say how busy the "
                     "machine was, not how fast distgan is; the throughput section above measures speed.")
    if missing:
        lines.append("")
        lines.append("Not yet measured: " + ", ".join(missing) + f" (`{COMMAND} --runs "
                     + " ".join(missing) + "`).")
    return "\n".join(lines) + "\n"


def read_block(markdown: Path = MARKDOWN) -> str:
    return blocks.read_block(markdown, BLOCK)


def write_block(block: str, markdown: Path = MARKDOWN) -> None:
    blocks.write_block(block, markdown, BLOCK)


# ---------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    try:
        return run(argv)
    except UserError as err:
        print(f"bench/results.py: error: {one_line(err)}", file=sys.stderr)
        return 2


def run(argv: Optional[list[str]]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--work", type=Path, help="run dirs and data (default runs/bench; --quick: runs/bench-quick)")
    parser.add_argument("--runs", nargs="+", choices=[r.name for r in RUNS],
                        help="only these runs, in this order (default: all, in TRAIN_ORDER)")
    parser.add_argument("--n", type=int, help="generated images evaluated (default 10000; --quick 1000)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per command (OMP_NUM_THREADS; 0: torch's default). Default 1: the "
                             "figures do not depend on it, and on a CPU shared with other jobs two threads per "
                             "process spend most of their time waiting for each other (measured here: about 4x "
                             "fewer images per CPU-second than one thread)")
    parser.add_argument("--table-only", action="store_true", help="write the table from bench/results/, no training")
    parser.add_argument("--check", action="store_true", help="exit 1 when the table in BENCHMARKS.md is not the "
                                                             "one bench/results/ gives")
    parser.add_argument("--quick", action="store_true",
                        help="tiny runs into runs/bench-quick (results and a BENCHMARKS.md copy there): a pipeline check")
    args = parser.parse_args(argv)
    results, markdown = RESULTS, MARKDOWN
    if args.check:
        if read_block(markdown) != render_table(results):
            print(f"{rel(markdown)}: the results table differs from bench/results/; run {CHECK_COMMAND}")
            return 1
        print(f"{rel(markdown)}: the results table matches bench/results/")
        return 0
    if not args.table_only:
        global CODE, THREADS
        THREADS = args.threads
        work = (args.work or Path("runs/bench-quick" if args.quick else "runs/bench")).resolve()
        if args.quick:
            results, markdown = work / "results", work / "BENCHMARKS.md"
            if not markdown.is_file():
                work.mkdir(parents=True, exist_ok=True)
                shutil.copy(MARKDOWN, markdown)
        work.mkdir(parents=True, exist_ok=True)
        CODE, commit = snapshot(work)
        print(f"code: distgan and configs/ of commit {commit} in {rel(CODE)}", flush=True)
        n = args.n or (QUICK["n"] if args.quick else 10000)
        data, classifier = prepare_data(work, args.quick)
        results.mkdir(parents=True, exist_ok=True)
        (results / "classifier.json").write_text(json.dumps(classifier, indent=2) + "\n")
        by_name = {r.name: r for r in RUNS}
        for run in (by_name[name] for name in (args.runs or TRAIN_ORDER)):
            start = time.time()
            train_and_evaluate(run, work, data, n, args.quick, results)
            print(f"[{time.strftime('%H:%M:%S')}] {run.name}: done in {time.time() - start:.0f} s", flush=True)
            write_block(render_table(results), markdown)  # after each run: the table is current if stopped
    write_block(render_table(results), markdown)
    print(read_block(markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
