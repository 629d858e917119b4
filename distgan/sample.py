"""``python -m distgan.sample --run DIR [--step N] | --export FILE --n N --out DIR [--grid | --interpolate | --shards | --onnx F]``

Images from a trained generator (a run's newest G_ema: its export, or its newest intact checkpoint when the run
stopped early; ``--step N``: that checkpoint's; ``--export``: an export file or a checkpoint folder): PNG files,
one grid, a latent interpolation between two seeds, or webdataset shards (to augment another data set). A class-conditional generator makes
images of one class (``--class K``), of every class in turn, or a grid with one row per class (``--per-class``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from distgan.cli import add_debug_flag, run_command
from distgan.console import progress, setup_logging
from distgan.errors import UserError
from distgan.export import export_onnx
from distgan.generation import class_index, generate, latents, slerp
from distgan.limits import FLOAT_BYTES, check_count, check_images, check_seed
from distgan.loading import load_generator
from distgan.tracking import image_grid, save_grid


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m distgan.sample", description=__doc__.split("\n\n")[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a run dir: its newest generator (the export, or the newest intact "
                                              "checkpoint's G_ema when the run stopped before its end)")
    src.add_argument("--export", type=Path, help="an exported generator .safetensors file, a checkpoint's "
                                                 "G_ema.safetensors, or a checkpoint folder")
    p.add_argument("--step", type=int, help="with --run: the checkpoint of this step")
    p.add_argument("--n", type=int, default=64, help="number of images (interpolation: steps between the seeds)")
    p.add_argument("--out", type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="latent seed (interpolation goes from --seed to --seed2)")
    p.add_argument("--seed2", type=int, default=1)
    p.add_argument("--batch", type=int, default=256)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--grid", action="store_true", help="write one grid.png instead of single images")
    mode.add_argument("--interpolate", action="store_true", help="spherical interpolation between two seeds, as a grid")
    mode.add_argument("--shards", action="store_true", help="write webdataset shards + dataset.json")
    mode.add_argument("--onnx", type=Path, metavar="FILE", help="write the generator as ONNX (any batch), checked "
                                                               "with onnxruntime against PyTorch")
    p.add_argument("--truncation", type=float, help="the truncation trick for normal latents: with --truncation-mode "
                                                     "resample (BigGAN) every |z_i| above this is drawn again; with "
                                                     "scale, z is multiplied by it (0 < PSI <= 1)")
    p.add_argument("--truncation-mode", choices=("resample", "scale"), default="resample")
    p.add_argument("--force", action="store_true", help="with --shards: replace an existing output")
    p.add_argument("--class", dest="class_", metavar="K", help="a class-conditional generator: images of class K "
                                                               "(its name, or its index; default: every class in "
                                                               "turn, class 0 for --interpolate)")
    p.add_argument("--per-class", action="store_true", help="with --grid, for a class-conditional generator: one "
                                                            "row per class, --n images in each (the same latents in "
                                                            "every row)")
    add_debug_flag(p)
    return p.parse_args(argv)


def conditioning(args: argparse.Namespace, meta: dict) -> Optional[int]:
    """The class ``--class`` asks for (None: every class in turn); refuses the class options for an unconditional
    export, and ``--per-class`` outside a grid."""
    conditional = bool(meta["generator"].get("conditional"))
    if not conditional and (args.class_ is not None or args.per_class):
        flag = "--class" if args.class_ is not None else "--per-class"
        raise UserError(f"{flag}: this generator is not class-conditional (generator.conditional=false when it was "
                        "trained); sample it without the option")
    if args.per_class and (not args.grid or args.class_ is not None):
        raise UserError("--per-class goes with --grid (one row per class) and without --class")
    return class_index(args.class_, meta["classes"], "--class") if args.class_ is not None else None


def check_sample_size(args: argparse.Namespace, meta: dict) -> None:
    """--n and --batch against the machine's memory before a latent is drawn: the latents of all --n images are
    drawn at once, a grid holds all its images, and each batch its own."""
    g, resolution, channels = meta["generator"], meta["resolution"], meta["channels"]
    rows = len(meta["classes"]) if args.per_class and meta.get("classes") else 1
    fix = "ask for fewer images (--n), or run the command several times with other --seed values"
    check_count("--n", args.n, rows * g["z_dim"] * FLOAT_BYTES, fix)
    if args.grid or args.interpolate or args.per_class:
        check_images("--n", args.n, rows * args.n, resolution, channels, fix)
    check_images("--batch", args.batch, min(args.batch, args.n), resolution, channels, "use a smaller --batch")


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    return run_command("distgan.sample", lambda: sample(args), debug=args.debug, args=args)


def sample(args: argparse.Namespace) -> int:
    for name in ("n", "batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be at least 1")
    check_seed("--seed", args.seed)
    check_seed("--seed2", args.seed2)
    if args.step is not None and args.run is None:
        raise UserError("--step goes with --run DIR (a run's checkpoint of that step)")
    model = load_generator(args.run or args.export, step=args.step)
    meta, export = model.meta, model.source
    check_sample_size(args, meta)
    if args.onnx is not None:
        print(json.dumps(export_onnx(model.net, meta, args.onnx, seed=args.seed)))
        return 0
    if args.out is None:
        raise UserError("--out DIR is needed (where the images go)")
    g = meta["generator"]
    wanted = conditioning(args, meta)
    num_classes = len(meta["classes"]) if g.get("conditional") else 0
    if args.interpolate:
        za = latents(1, g["z_dim"], g["z_dist"], args.seed)[0]
        zb = latents(1, g["z_dim"], g["z_dist"], args.seed2)[0]
        labels = torch.full((args.n,), wanted or 0) if num_classes else None
        with torch.no_grad():
            path = slerp(za, zb, torch.linspace(0, 1, args.n))
            images = (model(path) if labels is None else model(path, labels)).float()
        print(save_grid(images, args.out / "interpolation.png", nrow=args.n))
        return 0
    if args.per_class:  # the same n latents in every row (the same seed): the class changes, the style does not
        rows = [generate(model, args.n, g["z_dim"], g["z_dist"], args.seed, args.batch, args.truncation,
                         args.truncation_mode, torch.full((args.n,), k)) for k in range(num_classes)]
        print(save_grid(torch.cat(rows), args.out / "grid.png", nrow=args.n))
        return 0
    labels = None
    if num_classes:  # one class, or every class in turn
        labels = torch.full((args.n,), wanted) if wanted is not None else torch.arange(args.n) % num_classes
    images = generate(model, args.n, g["z_dim"], g["z_dist"], args.seed, args.batch, args.truncation,
                      args.truncation_mode, labels)
    if args.grid:
        print(save_grid(images, args.out / "grid.png"))
    elif args.shards:
        from distgan.data.shards import write_shards

        uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        # --force replaces only shards distgan wrote, never the folder holding the export
        write_shards(uint8, labels.tolist() if labels is not None else None, args.out, force=args.force,
                     protect=[export], source=f"distgan.sample:{export}",
                     classes=meta["classes"] if labels is not None else None)  # a conditional G's shards are labeled
        print(args.out)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(progress(images, desc="writing", unit="img")):
            grid = image_grid(img[None], nrow=1, pad=0)
            Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(args.out / f"{i:06d}.png")
        print(f"{args.n} images in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
