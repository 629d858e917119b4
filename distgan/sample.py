"""``python -m distgan.sample --run DIR [--step N] | --export FILE --n N --out DIR [--grid | --interpolate | --shards | --onnx F]``

Images from a trained generator (a run's newest G_ema: its export, or its newest intact checkpoint when the run
stopped early; ``--step N``: that checkpoint's; ``--export``: an export file or a checkpoint folder): PNG files,
one grid, a latent interpolation between two seeds, or webdataset shards (to augment another data set). A class-conditional generator makes
images of one class (``--class K``), of every class in turn, or a grid with one row per class (``--per-class``).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from PIL import Image

from distgan.cli import add_debug_flag, run_command
from distgan.console import progress, setup_logging
from distgan.errors import UserError
from distgan.export import export_onnx
from distgan.generation import batches, class_index, generate, latent_blocks, latents, slerp
from distgan.limits import FLOAT_BYTES, check_count, check_images, check_seed
from distgan.loading import load_generator
from distgan.output import Check, Output, replace_file_with_force
from distgan.stop import stop_cleanly
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
    p.add_argument("--force", action="store_true", help="replace an existing output distgan wrote: grid.png, "
                                                        "interpolation.png, the --onnx file, a folder of sampled "
                                                        "images or of shards (never a folder holding other files)")
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
    """--n and --batch against the machine's memory before a latent is drawn: the latents of all --n images (held at
    once by a grid; single images and shards hold one block of them, see :func:`stream`), a grid's images, and each
    batch's own."""
    g, resolution, channels = meta["generator"], meta["resolution"], meta["channels"]
    rows = len(meta["classes"]) if args.per_class and meta.get("classes") else 1
    fix = "ask for fewer images (--n), or run the command several times with other --seed values"
    check_count("--n", args.n, rows * g["z_dim"] * FLOAT_BYTES, fix)
    if args.grid or args.interpolate or args.per_class:
        check_images("--n", args.n, rows * args.n, resolution, channels, fix)
    check_images("--batch", args.batch, min(args.batch, args.n), resolution, channels, "use a smaller --batch")


GRID_MAX_VALUES = 1 << 26  # a grid PNG past this many values (256 MB as floats) is no picture anyone can look at
PNG_NAME = re.compile(r"\d{6,}\.png")


def stream(model, n: int, z_dim: int, z_dist: str, seed: int, batch: int, truncation: Optional[float] = None,
           mode: str = "resample", label_of: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
           ) -> Iterator[torch.Tensor]:
    """The images of :func:`distgan.generation.generate`, ``batch`` at a time, generated as they are consumed (one
    block of latents held); ``label_of`` maps image indices to the classes of a conditional generator."""
    start = 0
    for z in latent_blocks(n, z_dim, z_dist, seed, truncation, mode):
        labels = label_of(torch.arange(start, start + len(z))) if label_of is not None else None
        for images in batches(model, z, labels, batch):
            yield images.cpu()
        start += len(z)


def check_grid_size(n_images: int, meta: dict, what: str) -> None:
    """A grid is one PNG held whole: refuse one past GRID_MAX_VALUES before generating anything."""
    resolution = meta["resolution"] - 2 * meta.get("pad", 0)
    values = n_images * meta["channels"] * resolution ** 2
    if values > GRID_MAX_VALUES:
        most = GRID_MAX_VALUES // (meta["channels"] * resolution ** 2)
        raise UserError(f"--n with {what}: a grid of {n_images} images of {meta['channels']}x{resolution}x{resolution} "
                        f"holds {values} values, more than {GRID_MAX_VALUES} (a grid is held in memory whole); use a "
                        f"smaller --n (at most {most} images in the grid), or single images (no {what}) or --shards, "
                        "which stream")


def png_folder_check(force: bool) -> Check:
    """An existing --out folder of single images is replaced only with --force, and only when it holds nothing but
    the NNNNNN.png files this command writes."""
    def check(out: Path) -> None:
        if out.is_symlink() or not out.is_dir():
            raise UserError(f"--out {out}: it exists and is not a folder; remove it yourself or choose another --out")
        entries = sorted(p.name for p in out.iterdir())
        if not force:
            raise UserError(f"--out {out} already holds {entries[0]}, which this command did not write; pass --force "
                            "to replace the folder, or choose another --out")
        foreign = [name for name in entries if not PNG_NAME.fullmatch(name)]
        if foreign:
            raise UserError(f"--force will not replace {out}: it holds {foreign[0]}, which is not a sampled image "
                            "(NNNNNN.png); move it away or choose another --out")
    return check


def write_grid(images: torch.Tensor, path: Path, force: bool, nrow: Optional[int] = None) -> Path:
    """One grid PNG (``--out DIR/grid.png``) through distgan.output: an existing file is replaced only with --force."""
    with Output(path, check=replace_file_with_force("--out", force)) as partial:
        save_grid(images, partial, nrow=nrow)
    return path


def write_images(images: Iterator[torch.Tensor], out: Path, n: int, force: bool) -> int:
    """NNNNNN.png files, batch by batch, into --out as a whole (renamed into place when all are written)."""
    count = 0
    with Output(out, folder=True, empty_folder_ok=True, check=png_folder_check(force)) as folder:
        with progress(total=n, desc="writing", unit="img") as bar:
            for batch in images:
                for img in batch:
                    grid = image_grid(img[None], nrow=1, pad=0)
                    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(folder / f"{count:06d}.png")
                    count += 1
                    bar.update(1)
    return count


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    # Ctrl-C and SIGTERM end it cleanly: what was half written is removed, exit 130 / 143
    return run_command("distgan.sample", lambda: stop_cleanly("distgan.sample", lambda: sample(args)),
                       debug=args.debug, args=args)


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
        print(json.dumps(export_onnx(model.net, meta, args.onnx, seed=args.seed, force=args.force)))
        return 0
    if args.out is None:
        raise UserError("--out DIR is needed (where the images go)")
    g = meta["generator"]
    wanted = conditioning(args, meta)
    num_classes = len(meta["classes"]) if g.get("conditional") else 0
    if args.interpolate:
        check_grid_size(args.n, meta, "--interpolate")
        za = latents(1, g["z_dim"], g["z_dist"], args.seed)[0]
        zb = latents(1, g["z_dim"], g["z_dist"], args.seed2)[0]
        labels = torch.full((args.n,), wanted or 0) if num_classes else None
        with torch.no_grad():
            path = slerp(za, zb, torch.linspace(0, 1, args.n))
            images = (model(path) if labels is None else model(path, labels)).float()
        print(write_grid(images, args.out / "interpolation.png", args.force, nrow=args.n))
        return 0
    if args.per_class:  # the same n latents in every row (the same seed): the class changes, the style does not
        check_grid_size(args.n * num_classes, meta, "--grid --per-class")
        rows = [generate(model, args.n, g["z_dim"], g["z_dist"], args.seed, args.batch, args.truncation,
                         args.truncation_mode, torch.full((args.n,), k)) for k in range(num_classes)]
        print(write_grid(torch.cat(rows), args.out / "grid.png", args.force, nrow=args.n))
        return 0
    label_of = None
    if num_classes:  # one class, or every class in turn
        label_of = (lambda index: torch.full_like(index, wanted)) if wanted is not None else (lambda index: index % num_classes)
    if args.grid:
        check_grid_size(args.n, meta, "--grid")
        images = generate(model, args.n, g["z_dim"], g["z_dist"], args.seed, args.batch, args.truncation,
                          args.truncation_mode, label_of(torch.arange(args.n)) if label_of is not None else None)
        print(write_grid(images, args.out / "grid.png", args.force))
        return 0
    images = stream(model, args.n, g["z_dim"], g["z_dist"], args.seed, args.batch, args.truncation,
                    args.truncation_mode, label_of)
    if args.shards:
        from distgan.data.shards import write_shards

        labels = (int(label_of(torch.tensor(i))) for i in range(args.n)) if label_of is not None else None
        pixels = (((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8) for batch in images for image in batch)
        # --force replaces only shards distgan wrote, never the folder holding the export
        write_shards(pixels, labels, args.out, force=args.force, protect=[export], source=f"distgan.sample:{export}",
                     total=args.n, classes=meta["classes"] if label_of is not None else None)  # conditional: labeled
        print(args.out)
    else:
        print(f"{write_images(images, args.out, args.n, args.force)} images in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
