"""``python -m distgan.sample --run DIR | --export FILE --n N --out DIR [--grid | --interpolate | --shards | --onnx F]``

Images from a trained generator (the run's exported G_ema): PNG files, one grid, a latent interpolation
between two seeds, or webdataset shards (to augment another data set). A class-conditional generator makes
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
from distgan.errors import UserError
from distgan.export import export_onnx, load_generator_export
from distgan.nn import sample_latent
from distgan.tracking import image_grid, save_grid


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m distgan.sample", description=__doc__.split("\n\n")[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a run dir (uses its generator_ema.safetensors)")
    src.add_argument("--export", type=Path, help="an exported generator .safetensors file")
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


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (Gaussian latents keep their norm along the path)."""
    a_n, b_n = a / a.norm(), b / b.norm()
    omega = torch.acos((a_n * b_n).sum().clamp(-1, 1))
    if omega.abs() < 1e-6:
        return (1 - t)[:, None] * a + t[:, None] * b
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so)[:, None] * a + (torch.sin(t * omega) / so)[:, None] * b


def truncate(z: torch.Tensor, value: float, mode: str, gen: torch.Generator) -> torch.Tensor:
    """The truncation trick on normal latents: fidelity for variety. ``resample``: redraw every entry whose
    magnitude exceeds ``value`` (Brock et al. 2019); ``scale``: shrink z towards the mean by ``value``."""
    if mode == "scale":
        if not 0 < value <= 1:
            raise UserError(f"--truncation {value} with --truncation-mode scale: must be in (0, 1]")
        return z * value
    if value <= 0:
        raise UserError(f"--truncation {value}: must be positive (entries above it are drawn again)")
    z = z.clone()
    outside = z.abs() > value
    while outside.any():  # each redraw lands inside with probability P(|N(0,1)| <= value) > 0
        z[outside] = torch.randn(int(outside.sum()), generator=gen)
        outside = z.abs() > value
    return z


@torch.no_grad()
def generate(model, n: int, z_dim: int, z_dist: str, seed: int, batch: int, truncation: Optional[float] = None,
             mode: str = "resample", labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``n`` images (of the classes ``labels`` [n] for a conditional generator)."""
    gen = torch.Generator().manual_seed(seed)
    z = sample_latent(n, z_dim, z_dist, gen)
    if truncation is not None:
        z = truncate(z, truncation, mode, gen)
    return torch.cat([(model(z[i:i + batch]) if labels is None else model(z[i:i + batch], labels[i:i + batch])).float()
                      for i in range(0, n, batch)])


def class_index(value: str, classes: list[str]) -> int:
    """``--class`` as a class name or an index into ``classes``."""
    if value in classes:
        return classes.index(value)
    if value.isdigit() and int(value) < len(classes):
        return int(value)
    raise UserError(f"--class {value}: not a class of this generator; use a name or an index 0..{len(classes) - 1} "
                    f"({', '.join(classes)})")


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
    return class_index(args.class_, meta["classes"]) if args.class_ is not None else None


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command("distgan.sample", lambda: sample(args), debug=args.debug)


def sample(args: argparse.Namespace) -> int:
    for name in ("n", "batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be at least 1")
    export = args.export or args.run / "generator_ema.safetensors"
    model, meta = load_generator_export(export)
    if args.onnx is not None:
        print(json.dumps(export_onnx(model, meta, args.onnx, seed=args.seed)))
        return 0
    if args.out is None:
        raise UserError("--out DIR is needed (where the images go)")
    g = meta["generator"]
    if args.truncation is not None and g["z_dist"] != "normal":
        raise UserError(f"--truncation: the generator draws {g['z_dist']} latents; truncation is for normal ones")
    wanted = conditioning(args, meta)
    num_classes = len(meta["classes"]) if g.get("conditional") else 0
    if args.interpolate:
        za = sample_latent(1, g["z_dim"], g["z_dist"], torch.Generator().manual_seed(args.seed))[0]
        zb = sample_latent(1, g["z_dim"], g["z_dist"], torch.Generator().manual_seed(args.seed2))[0]
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
        for i, img in enumerate(images):
            grid = image_grid(img[None], nrow=1, pad=0)
            Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(args.out / f"{i:06d}.png")
        print(f"{args.n} images in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
