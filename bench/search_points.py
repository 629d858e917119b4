"""The recipe search's points: each a name and the config overrides it puts on the base config (bench/search.py
trains them, bench/search_table.py compares each with its reference)."""
from __future__ import annotations

# name -> overrides on top of the base config (fashion_mnist_baseline, the default the search started from: DCGAN
# width 64, spectral-norm D, non-saturating loss, Adam 2e-4 (0.5, 0.999), batch 64, EMA half-life 10 kimg with
# ramp-up 0.05, 3,000 steps). RECIPE (the point width_32_batch_32_lr_4e-4) won the first three rounds; the fourth puts
# each first-round change on top of it, and its winner, DEFAULT_POINT, is fashion_mnist.yaml (at the demo's steps);
# the fifth (shipped_*) tries the fourth's runners-up on top of DEFAULT_POINT.
RECIPE_POINT = "width_32_batch_32_lr_4e-4"
RECIPE = ("generator.width=32", "discriminator.width=32", "train.batch_size=32", "g_optim.lr=4e-4", "d_optim.lr=4e-4")
DEFAULT_POINT = "recipe_betas_0_0.9"  # issue 12's default: the reference of the shipped_* points
# what fashion_mnist.yaml trains since issue 23: DEFAULT_POINT at batch 128 with the lrs x 4 (the same math as its
# batch_size=128, lr=1.6e-3 in one process), the winner at the demo's wall time
SHIPPED_POINT = "shipped_batch_128_lr_linear"
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
    # issue 23's batch-size table: the shipped default at global batch 128 and 512, the lrs kept (none) or scaled by
    # sqrt(B / 32) or B / 32 (train.lr_batch_scaling, the rule a multi-GPU recipe uses; batch_per_process x 1 process)
    **{f"shipped_batch_{b}_lr_{rule}": (*RECIPE, *BETAS_0_09, f"train.batch_per_process={b}",
                                        f"train.lr_batch_scaling={rule}")
       for b in (128, 512) for rule in ("none", "sqrt", "linear")},
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


def reference(point: str) -> str:
    """The point a row is measured against: the recipe for the fourth round's points, the shipped default for the
    fifth's, else the base's default."""
    if point.startswith("shipped_"):
        return DEFAULT_POINT
    return RECIPE_POINT if point.startswith("recipe_") else "default"
