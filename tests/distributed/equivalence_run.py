"""Train cases of the DDP equivalence matrix for a few steps and write each rank's weights (or gradients).

    python tests/distributed/equivalence_run.py OUT [CASE ...] [--steps N] [--tag T] [--resume auto] [--grads]
    accelerate launch --config_file launch/cpu-2proc.yaml tests/distributed/equivalence_run.py OUT

Writes OUT/CASE/{T}world{W}-rank{R}.safetensors with G.*, D.*, G_ema.* tensors; the run dir is OUT/CASE/T
(default: one per process count), so a second call with the same --tag and --resume auto continues it, on
any process count. --grads writes instead the gradients that the first D and G optimizer steps received
(after DDP's all-reduce), as OUT/CASE/grads-world{W}-rank{R}.safetensors.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from distgan.config import load_config  # noqa: E402
from distgan.trainer import Trainer  # noqa: E402
from tests.distributed.support import MemorySource  # noqa: E402

NORMS = {
    "bn-g": ["generator.norm=batch", "discriminator.norm=none", "train.small_bn_batch=warn"],  # kept per rank
    "syncbn-g": ["generator.norm=sync-batch", "discriminator.norm=none"],
    "syncbn-d": ["generator.norm=none", "discriminator.norm=sync-batch"],
}
PENALTIES = {
    "none": ["loss.penalty=none"],
    "r1": ["loss.penalty=r1", "loss.penalty_weight=1.0"],
    "wgan-gp": ["loss.penalty=wgan-gp", "loss.penalty_weight=1.0"],
    "lazy-r1": ["loss.penalty=r1", "loss.penalty_weight=1.0", "loss.penalty_interval=4"],
}
# WGAN-GP through a batch-norm D is refused by the config (the penalty is per sample): not a case.
CASES = {f"{p}.{n}": PENALTIES[p] + NORMS[n] for p in PENALTIES for n in NORMS if not (p == "wgan-gp" and n == "syncbn-d")}
CONDITIONAL = ["generator.conditional=true", "discriminator.conditional=true"]  # labels drawn for the global batch
# the class-conditional case: per-class gains and shifts on sync-BN layers in G (generator.conditioning=norm)
CASES["r1.syncbn-gd-cond"] = PENALTIES["r1"] + ["generator.norm=sync-batch", "discriminator.norm=sync-batch"] + CONDITIONAL
# plain BN in G on 6 samples per rank, as configured: build.norms_for_ranks makes it sync-batch (the default rule)
CASES["none.bn-g-switched"] = PENALTIES["none"] + ["generator.norm=batch", "discriminator.norm=none"]
STEPS = 20


def record_first_gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Fill a dict with the gradients each optimizer holds when it first steps (a torch step pre-hook)."""
    grads: dict[str, torch.Tensor] = {}
    for prefix, module, optimizer in (("D", trainer.D_plain, trainer.opt_d), ("G", trainer.G_plain, trainer.opt_g)):
        names = {id(p): name for name, p in module.named_parameters()}

        def hook(opt, _args, _kwargs, prefix=prefix, names=names):
            if any(key.startswith(prefix + ".") for key in grads):
                return
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grads[f"{prefix}.{names[id(p)]}"] = p.grad.detach().clone()

        optimizer.optimizer.register_step_pre_hook(hook)
    return grads


def run_case(name: str, out: Path, steps: int, tag: str | None, resume: str | None, grads: bool) -> Trainer:
    world = os.environ.get("WORLD_SIZE", "1")
    run_dir = out / name / (tag or f"world{world}")
    overrides = CASES[name] + [
        f"run.dir={run_dir}", f"train.steps={steps}", "train.batch_size=12", "log.wandb=false",
        "log.sample_every=1000", "log.every=1000", "checkpoint.every=1000", "log.gif=false",
        "ema.half_life_kimg=0.05", "ema.rampup=0", "train.cpu_threads=1",
    ]
    source = MemorySource(num_classes=3 if CONDITIONAL[0] in overrides else 0)
    trainer = Trainer(load_config("smoke", overrides), source=source, resume=resume)
    recorded = record_first_gradients(trainer) if grads else None
    trainer.fit()
    acc = trainer.accelerator
    if recorded is not None:
        tensors, stem = recorded, "grads-"
    else:
        tensors, stem = {}, tag or ""
        for prefix, module in (("G", trainer.G_plain), ("D", trainer.D_plain), ("G_ema", trainer.ema.model)):
            for key, value in module.state_dict().items():
                tensors[f"{prefix}.{key}"] = value.detach().contiguous().clone()
    save_file(tensors, str(out / name / f"{stem}world{acc.num_processes}-rank{acc.process_index}.safetensors"))
    acc.wait_for_everyone()
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("cases", nargs="*")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--tag", help="run dir name under OUT/CASE (shared across process counts, for resume)")
    parser.add_argument("--resume")
    parser.add_argument("--grads", action="store_true", help="record the first step's gradients instead")
    args = parser.parse_args()
    if os.environ.get("EQ_DTYPE") == "float64":  # rounding-free comparison: differences are then logic, not noise
        torch.set_default_dtype(torch.float64)
    trainer = None
    for name in args.cases or list(CASES):
        trainer = run_case(name, args.out, 1 if args.grads else args.steps, args.tag, args.resume, args.grads)
    trainer.close()


if __name__ == "__main__":
    main()
