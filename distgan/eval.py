"""``python -m distgan.eval``: judge a trained generator, train the feature network, plot a run.

    python -m distgan.eval --run DIR [--step N | --all-checkpoints] | --export FILE --data DIR [--n N]
                           [--metrics fd kid pr dc is classes_covered parzen]
                           [--features auto|classifier|inception] [--inception-weights FILE] [--seed S]
    python -m distgan.eval train-features --data DIR [--steps N] [--seed S]
    python -m distgan.eval stats --data DIR --out ref.npz [--n N] [--features ...]   (pytorch-fid's mu/sigma layout)
    python -m distgan.eval plot --run DIR

The first form prints one JSON object (figures, the real-vs-real "reference", and "meta") on stdout and,
with --run, writes it to DIR/eval.json; with --all-checkpoints it scores each checkpoint not scored yet
(DIR/eval/checkpoints.jsonl, .md, .png) and prints every checkpoint's figures and the best. Logs go to stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Optional, Sequence

import torch

from distgan.cli import add_debug_flag, run_command
from distgan.config import ConfigError, DataConfig, EvalConfig, load_config
from distgan.console import setup_logging
from distgan.errors import UserError
from distgan.limits import FLOAT_BYTES, check_count, check_seed
from distgan.metrics import registry
from distgan.metrics.feature_net import TRAIN_FEATURES_DEFAULTS, train_feature_classifier
from distgan.output import Output, OutputError


def _write_json_atomic(path: Path, record: dict) -> None:
    """Through distgan.output: an existing file is replaced only when it is an earlier evaluation's record."""
    def earlier_record(target: Path) -> None:
        try:
            ours = isinstance(json.loads(target.read_text()), dict) and target.is_file() and not target.is_symlink()
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise OutputError(f"{target} exists and is not an evaluation record distgan wrote; it was kept: move it "
                              "away")

    with Output(path, check=earlier_record, flag="eval.json") as partial:
        partial.write_text(json.dumps(record, indent=2) + "\n")


def _device(name: Optional[str]) -> torch.device:
    """--device as a torch device, refused in one line when torch cannot parse it or has no such GPU."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "not a device"
        raise UserError(f"--device {name}: {reason}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this torch sees no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0 .. "
                        f"cuda:{torch.cuda.device_count() - 1}); pick one of them")
    return device


def _check_numbers(args: argparse.Namespace, least: dict[str, int]) -> None:
    """The numeric flags, checked before any data is read or a feature classifier trained."""
    for name, minimum in least.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least {minimum}")
        if name == "seed" and value is not None:
            check_seed("--seed", value)
        elif name == "n" and value is not None:  # each image keeps at least its latent and its features
            check_count("--n", value, 2 * FLOAT_BYTES, "evaluate on fewer images (10,000 or 50,000 are the usual figures)")


# ---------------------------------------------------------------- evaluate an exported generator


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distgan.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a run dir: its newest generator (the export, or the newest intact "
                                              "checkpoint's G_ema when the run stopped early) and config.yaml")
    src.add_argument("--export", type=Path, help="an exported generator .safetensors, a checkpoint's G_ema file or a "
                                                 "checkpoint folder (needs --data)")
    p.add_argument("--step", type=int, help="with --run: score the checkpoint of this step")
    p.add_argument("--all-checkpoints", action="store_true",
                   help="with --run: score every intact checkpoint (each once: kept in DIR/eval/checkpoints.jsonl), "
                        "write DIR/eval/checkpoints.md and .png and name the best")
    p.add_argument("--data", help="real shards (default with --run: the run's data.path)")
    p.add_argument("--test-data", help="test-split shards (default: eval.test_path, else DATA_test when it exists)")
    p.add_argument("--n", type=int, help="generated images (default: the run's eval.n, else 10000)")
    p.add_argument("--metrics", nargs="+", choices=registry.names(), help="default: the run's eval.metrics, else all")
    p.add_argument("--features", choices=typing.get_args(typing.get_type_hints(EvalConfig)["features"]))
    p.add_argument("--inception-weights", help="local FID Inception-v3 weights file")
    p.add_argument("--seed", type=int, help="latent seed (default: the run's run.seed, else 0)")
    p.add_argument("--batch", type=int, help="images per generator/feature batch")
    p.add_argument("--reference-stats", help="a .npz with mu and sigma of the real features (python -m distgan.eval "
                                            "stats): fd compares with it")
    p.add_argument("--classifier-steps", type=int, help="steps of the feature classifier when it is trained on first "
                                                         "use (default: eval.classifier_steps, 2000)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add_debug_flag(p)
    return p


def _resolved_run_paths(run: Path, data_cfg: DataConfig, eval_cfg: EvalConfig) -> tuple[DataConfig, EvalConfig]:
    """The run config's relative paths made absolute against the folder training started in (RUN/workdir.txt,
    recorded by the trainer); a run without that record keeps them relative to the current folder."""
    from distgan.rundir import WORKDIR_FILE

    record = run / WORKDIR_FILE
    if not record.is_file():
        return data_cfg, eval_cfg
    workdir = Path(record.read_text().strip())

    def resolve(path: Optional[str]) -> Optional[str]:
        if not path or os.path.isabs(path) or "::" in path or "://" in path:
            return path
        return str(workdir / path)

    eval_cfg = dataclasses.replace(eval_cfg, **{key: resolve(getattr(eval_cfg, key)) for key in
                                                ("test_path", "inception_weights", "reference_stats")})
    return dataclasses.replace(data_cfg, path=resolve(data_cfg.path)), eval_cfg


def evaluate_command(args: argparse.Namespace) -> dict:
    """The run's (or the default) eval and data sections with the flags on top, evaluated by evaluate_export."""
    from distgan.loading import load_generator
    from distgan.metrics.generator_eval import evaluate_export

    _check_numbers(args, {"n": 2, "batch": 1, "classifier_steps": 1, "seed": 0})
    device = _device(args.device)
    data_cfg, eval_cfg, seed = DataConfig(), EvalConfig(), 0
    if args.run is not None:
        config_file = args.run / "config.yaml"
        if not config_file.is_file():
            raise ConfigError(f"{config_file} not found: --run takes a run dir written by python -m distgan.train")
        cfg = load_config(str(config_file))
        data_cfg, eval_cfg, seed = _resolved_run_paths(args.run, cfg.data, cfg.eval) + (cfg.run.seed,)
    else:
        if not args.data:
            raise ConfigError("--export needs --data DIR (the real shards to compare with)")
    overrides = {"n": args.n, "features": args.features, "inception_weights": args.inception_weights,
                 "test_path": args.test_data, "batch": args.batch, "metrics": args.metrics,
                 "classifier_steps": args.classifier_steps, "reference_stats": args.reference_stats}
    eval_cfg = dataclasses.replace(eval_cfg, **{k: v for k, v in overrides.items() if v is not None})
    data_cfg = dataclasses.replace(data_cfg, path=args.data or data_cfg.path, num_workers=0)
    if args.run is not None and not args.data and "::" not in data_cfg.path and not os.path.exists(data_cfg.path):
        raise ConfigError(f"{args.run / 'config.yaml'}: data.path {data_cfg.path} does not exist (here); pass the "
                          "run's data with --data DIR")
    seed = args.seed if args.seed is not None else seed
    if args.step is not None and args.run is None:
        raise UserError("--step goes with --run DIR (a run's checkpoint of that step)")
    if args.all_checkpoints:
        if args.run is None or args.step is not None:
            raise UserError("--all-checkpoints goes with --run DIR and without --step (it scores every checkpoint)")
        from distgan.checkpoint_scores import score_checkpoints

        return score_checkpoints(args.run, data_cfg, eval_cfg, seed, device)
    generator = load_generator(args.run or args.export, step=args.step, device=device)
    record = evaluate_export(generator, generator.meta, generator.source, data_cfg, eval_cfg, seed, device)
    if args.run is not None:
        _write_json_atomic(args.run / "eval.json", record)
    return record


# ---------------------------------------------------------------- train-features


def train_features_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distgan.eval train-features",
                                description="Train the feature classifier on labeled shards and keep it in distgan's cache folder "
                                            "($DISTGAN_CACHE, else ~/.cache/distgan), keyed by the data set.")
    p.add_argument("--data", required=True, help="folder of labeled shards")
    p.add_argument("--test-data", help="test-split shards for the accuracy (default: DATA_test when it exists, "
                                       "else the last train shard is held out)")
    p.add_argument("--steps", type=int, default=TRAIN_FEATURES_DEFAULTS["steps"])
    p.add_argument("--batch", type=int, default=TRAIN_FEATURES_DEFAULTS["batch"])
    p.add_argument("--lr", type=float, default=TRAIN_FEATURES_DEFAULTS["lr"])
    p.add_argument("--seed", type=int, default=0)
    add_debug_flag(p)
    return p


# ---------------------------------------------------------------- stats


def stats_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distgan.eval stats",
                                description="Write mu and sigma of the real features (pytorch-fid's .npz layout), for "
                                            "eval.reference_stats / --reference-stats.")
    p.add_argument("--data", required=True, help="folder of real shards")
    p.add_argument("--out", type=Path, required=True, help="the .npz to write")
    p.add_argument("--n", type=int, default=EvalConfig.n, help="real images (default 10000)")
    p.add_argument("--features", choices=typing.get_args(typing.get_type_hints(EvalConfig)["features"]), default="auto")
    p.add_argument("--inception-weights", help="local FID Inception-v3 weights file")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add_debug_flag(p)
    return p


# ---------------------------------------------------------------- plot


def plot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distgan.eval plot", description="Plot a run's metrics.jsonl to DIR/plots/.")
    p.add_argument("--run", type=Path, required=True)
    add_debug_flag(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    debug = "--debug" in argv  # every sub-command's parser accepts it
    return run_command("distgan.eval", lambda: run(argv), debug=debug, args=argv)


def run(argv: list[str]) -> int:
    command = argv[0] if argv and argv[0] in ("train-features", "plot", "stats") else "evaluate"
    if command == "stats":
        from distgan.metrics.generator_eval import write_reference_stats

        args = stats_parser().parse_args(argv[1:])
        _check_numbers(args, {"n": 2})
        eval_cfg = EvalConfig(n=args.n, features=args.features, inception_weights=args.inception_weights)
        result = write_reference_stats(DataConfig(path=args.data, num_workers=0), eval_cfg, args.out,
                                       _device(args.device))
    elif command == "train-features":
        args = train_features_parser().parse_args(argv[1:])
        _check_numbers(args, {"steps": 1, "batch": 1, "seed": 0})
        if not 0 < args.lr < float("inf"):
            raise UserError(f"--lr {args.lr}: must be a positive finite number")
        result = train_feature_classifier(args.data, args.test_data, args.steps, args.batch, args.lr, args.seed)
    elif command == "plot":
        from distgan.plots import plot_run

        result = {"plots": [str(p) for p in plot_run(plot_parser().parse_args(argv[1:]).run)]}
    else:
        result = evaluate_command(eval_parser().parse_args(argv))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
