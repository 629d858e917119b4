"""``python -m distgan.eval``: judge a trained generator, train the feature network, plot a run.

    python -m distgan.eval --run DIR | --export FILE --data DIR [--n N] [--metrics fd kid pr coverage parzen]
                           [--features auto|classifier|inception] [--inception-weights FILE] [--seed S]
    python -m distgan.eval train-features --data DIR [--steps N] [--seed S]
    python -m distgan.eval plot --run DIR

The first form prints one JSON object (figures, the real-vs-real "reference", and "meta") on stdout and,
with --run, writes it to DIR/eval.json. Logs go to stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from .config import EVAL_METRICS, ConfigError, DataConfig, EvalConfig, load_config
from .data.errors import DataError

log = logging.getLogger("distgan.eval")

TRAIN_FEATURES_DEFAULTS = dict(steps=2000, batch=64, lr=3e-3)
CLASSIFIER_EVAL_IMAGES = 10_000  # test (or held-out) images the accuracy is measured on


def _write_json_atomic(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def _device(name: Optional[str]) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


# ---------------------------------------------------------------- evaluate an exported generator


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distgan.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a run dir: its generator_ema.safetensors and config.yaml")
    src.add_argument("--export", type=Path, help="an exported generator .safetensors (needs --data)")
    p.add_argument("--data", help="real shards (default with --run: the run's data.path)")
    p.add_argument("--test-data", help="test-split shards (default: eval.test_path, else DATA_test when it exists)")
    p.add_argument("--n", type=int, help="generated images (default: the run's eval.n, else 10000)")
    p.add_argument("--metrics", nargs="+", choices=EVAL_METRICS, help="default: the run's eval.metrics, else all")
    p.add_argument("--features", choices=("auto", "classifier", "inception"))
    p.add_argument("--inception-weights", help="local FID Inception-v3 weights file")
    p.add_argument("--seed", type=int, help="latent seed (default: the run's run.seed, else 0)")
    p.add_argument("--batch", type=int, help="images per generator/feature batch")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    return p


def evaluate_export(args: argparse.Namespace) -> dict:
<<<<<<< HEAD
    from distgan.export import load_generator_export
    from distgan.data.shards import read_dataset_info
=======
    from .checkpoint import load_generator_export
    from .data.shards import read_dataset_info
>>>>>>> issue9-data
    from .evaluation import DEFAULT_METRICS, Evaluator

    data_cfg, eval_cfg, seed = DataConfig(), EvalConfig(), 0
    if args.run is not None:
        config_file = args.run / "config.yaml"
        if not config_file.is_file():
            raise ConfigError(f"{config_file} not found: --run takes a run dir written by python -m distgan.train")
        cfg = load_config(str(config_file))
        data_cfg, eval_cfg, seed = cfg.data, cfg.eval, cfg.run.seed
        export = args.run / "generator_ema.safetensors"
    else:
        if not args.data:
            raise ConfigError("--export needs --data DIR (the real shards to compare with)")
        export = args.export
    overrides = {"n": args.n, "features": args.features, "inception_weights": args.inception_weights,
                 "test_path": args.test_data, "batch": args.batch, "metrics": args.metrics}
    eval_cfg = dataclasses.replace(eval_cfg, **{k: v for k, v in overrides.items() if v is not None})
    if not eval_cfg.metrics:
        eval_cfg.metrics = list(DEFAULT_METRICS)
    data_cfg = dataclasses.replace(data_cfg, path=args.data or data_cfg.path, num_workers=0)
    seed = args.seed if args.seed is not None else seed
    device = _device(args.device)
    model, meta = load_generator_export(Path(export), device)
    info = read_dataset_info(data_cfg.path, allow_pipe=data_cfg.allow_pipe)
    if (meta["channels"], meta["resolution"]) != (info.channels, info.resolution):
        raise ConfigError(f"{export} makes {meta['channels']}x{meta['resolution']} images but {data_cfg.path} holds "
                          f"{info.channels}x{info.resolution}: pass --data with the run's data")
    evaluator = Evaluator(eval_cfg, data_cfg, info, device, seed, z_dist=meta["generator"]["z_dist"])
    start = time.perf_counter()
    figures = evaluator.evaluate(model, rank=0, world_size=1, gather=lambda t: t)
    record: dict = dict(figures)
    reference = evaluator.reference()
    if reference:
        record["reference"] = reference
    record["meta"] = {"export": str(export), "step": meta.get("step"), "n": eval_cfg.n, "seed": seed,
                      "metrics": eval_cfg.metrics, "features": evaluator.net.kind, "data": data_cfg.path,
                      "test_data": evaluator.test_path, "seconds": round(time.perf_counter() - start, 2)}
    if args.run is not None:
        _write_json_atomic(args.run / "eval.json", record)
    return record


# ---------------------------------------------------------------- train-features


def train_features_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distgan.eval train-features",
                                description="Train the feature classifier on labeled shards and save it beside them.")
    p.add_argument("--data", required=True, help="folder of labeled shards (the classifier is saved into it)")
    p.add_argument("--test-data", help="test-split shards for the accuracy (default: DATA_test when it exists, "
                                       "else the last train shard is held out)")
    p.add_argument("--steps", type=int, default=TRAIN_FEATURES_DEFAULTS["steps"])
    p.add_argument("--batch", type=int, default=TRAIN_FEATURES_DEFAULTS["batch"])
    p.add_argument("--lr", type=float, default=TRAIN_FEATURES_DEFAULTS["lr"])
    p.add_argument("--seed", type=int, default=0)
    return p


def _labeled(stream: Iterator, where: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for images, labels in stream:
        if (labels < 0).any():
            raise DataError(f"{where}: some samples have no label (.cls); train-features needs labels on every sample")
        yield images, labels


def train_features(args: argparse.Namespace) -> dict:
    from .data.shards import read_dataset_info
    from .data.stream import make_batch_iterator
    from .evaluation import read_images, to_float
    from .metrics import evaluate_classifier, save_classifier, train_classifier
    from .metrics.features import CLASSIFIER_FILE

    if not os.path.isdir(args.data):
        raise DataError(f"--data {args.data}: not a folder; train-features saves the classifier beside the shards")
    if args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: must be at least 1")
    data_cfg = DataConfig(path=args.data, num_workers=1)
    info = read_dataset_info(args.data)
    test_path = args.test_data or (args.data.rstrip("/") + "_test" if os.path.isdir(args.data.rstrip("/") + "_test") else None)
    if test_path:
        held_info, train_path, measured_on = read_dataset_info(test_path), args.data, f"test split {test_path}"
    elif len(info.shards) >= 2:
        held_info = dataclasses.replace(info, shards=info.shards[-1:], count=None)
        train_path, measured_on = "::".join(info.shards[:-1]), f"held-out train shard {info.shards[-1]}"
    else:
        raise DataError(f"{args.data} has one shard and no test split: prepare a test split (python -m distgan.prepare "
                        f"SOURCE --split test --out {args.data.rstrip('/')}_test) or more shards (--shard-size)")
    held_images, held_labels = read_images(held_info, data_cfg, CLASSIFIER_EVAL_IMAGES, seed=args.seed)
    if (held_labels < 0).any():
        raise DataError(f"{held_info.shards[0]}: samples without labels (.cls). train-features needs a labeled dataset; "
                        "without labels evaluate with --features inception --inception-weights FILE")
    num_classes = len(info.classes) if info.classes else int(held_labels.max()) + 1
    start = time.perf_counter()
    stream = make_batch_iterator(dataclasses.replace(data_cfg, path=train_path), args.batch, 0, 1, args.seed)
    try:
        model = train_classifier(_labeled(stream, args.data), info.channels, info.resolution, num_classes,
                                 args.steps, lr=args.lr, seed=args.seed)
    finally:
        stream.close()
    images = to_float(torch.from_numpy(held_images))
    accuracy = evaluate_classifier(model, images, torch.from_numpy(held_labels))
    path = Path(args.data) / CLASSIFIER_FILE
    save_classifier(model, path, accuracy=accuracy)
    log.info("feature classifier: accuracy %.4f on %d images of the %s; saved %s", accuracy, len(images),
             measured_on, path)
    return {"path": str(path), "accuracy": accuracy, "accuracy_on": measured_on, "accuracy_images": len(images),
            "num_classes": num_classes, "steps": args.steps, "seconds": round(time.perf_counter() - start, 1)}


# ---------------------------------------------------------------- plot


def plot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distgan.eval plot", description="Plot a run's metrics.jsonl to DIR/plots/.")
    p.add_argument("--run", type=Path, required=True)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    command = argv[0] if argv and argv[0] in ("train-features", "plot") else "evaluate"
    try:
        if command == "train-features":
            result = train_features(train_features_parser().parse_args(argv[1:]))
        elif command == "plot":
            from .plots import plot_run

            result = {"plots": [str(p) for p in plot_run(plot_parser().parse_args(argv[1:]).run)]}
        else:
            result = evaluate_export(eval_parser().parse_args(argv))
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        print(f"distgan.eval: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
