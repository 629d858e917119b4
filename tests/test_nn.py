"""Model builders: shapes and ranges, parameter counts, initialisation, double backward, errors."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from distgan.config import DiscriminatorConfig, GeneratorConfig
from distgan.losses import r1_penalty
from distgan.nn import DISCRIMINATORS, GENERATORS, SyncBatchNorm, build_discriminator, build_generator, sample_latent

RESOLUTIONS = (28, 32, 64, 128)
CHANNELS = (1, 3)
G_NORMS = ("batch", "sync-batch", "none")
D_NORMS = ("none", "batch", "sync-batch", "layer", "spectral")


def small_g(arch: str, norm: str = "batch", **kw) -> GeneratorConfig:
    return GeneratorConfig(arch=arch, z_dim=8, width=4, max_width=16, norm=norm, hidden=[16, 32], **kw)


def small_d(arch: str, norm: str = "none", **kw) -> DiscriminatorConfig:
    return DiscriminatorConfig(arch=arch, width=4, max_width=16, norm=norm, hidden=[16, 8], maxout_pieces=3, **kw)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch", list(GENERATORS))
@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_generator_shapes_and_range(arch: str, resolution: int) -> None:
    torch.manual_seed(0)
    for channels, norm in itertools.product(CHANNELS, G_NORMS):
        g = build_generator(small_g(arch, norm, leaky_slope=0.1 if norm == "none" else 0.0), resolution, channels)
        assert g.z_dim == 8
        images = g(3.0 * torch.randn(3, 8))
        assert images.shape == (3, channels, resolution, resolution), (arch, norm, channels)
        assert images.min() >= -1.0 and images.max() <= 1.0
        assert images.std() > 0  # not a constant image
        has_bn = any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, SyncBatchNorm)) for m in g.modules())
        assert has_bn == (norm != "none")


@pytest.mark.parametrize("arch", list(DISCRIMINATORS))
@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_discriminator_shapes(arch: str, resolution: int) -> None:
    torch.manual_seed(0)
    for channels, norm in itertools.product(CHANNELS, D_NORMS):
        d = build_discriminator(small_d(arch, norm, dropout=0.2), resolution, channels)
        logits = d(torch.randn(3, channels, resolution, resolution))
        assert logits.shape == (3,) and logits.dtype == torch.float32, (arch, norm, channels)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", list(DISCRIMINATORS))
def test_discriminator_norm_layers(arch: str) -> None:
    def count(d: nn.Module, kind: type) -> int:
        return sum(isinstance(m, kind) for m in d.modules())

    weighted = count(build_discriminator(small_d(arch, "none"), 32, 3), (nn.Conv2d, nn.Linear))
    spectral = build_discriminator(small_d(arch, "spectral"), 32, 3)
    assert sum(hasattr(m, "parametrizations") for m in spectral.modules()) == weighted  # every conv/linear
    assert count(spectral, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)) == 0
    hidden_after_first = weighted - 2  # no norm on the first layer nor on the logit layer
    assert count(build_discriminator(small_d(arch, "sync-batch"), 32, 3), SyncBatchNorm) == hidden_after_first
    assert count(build_discriminator(small_d(arch, "layer"), 32, 3), (nn.GroupNorm, nn.LayerNorm)) == hidden_after_first
    with_dropout = build_discriminator(small_d(arch, dropout=0.3), 32, 3)
    assert count(with_dropout, nn.Dropout) == hidden_after_first + 1


@pytest.mark.parametrize("resolution", RESOLUTIONS)
@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_dcgan_upsample_then_conv(upsample: str, resolution: int) -> None:
    """generator.upsample nearest/bilinear: no transposed conv, a resize and a 3x3 conv per block, same output."""
    torch.manual_seed(0)
    g = build_generator(small_g("dcgan", upsample=upsample), resolution, 3)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in g.modules())
    resizes = [m for m in g.modules() if isinstance(m, nn.Upsample)]
    assert resizes and all(m.mode == upsample and m.scale_factor == 2 for m in resizes)
    transposed = build_generator(small_g("dcgan"), resolution, 3)
    assert len(resizes) == sum(isinstance(m, nn.ConvTranspose2d) for m in transposed.modules())
    images = g(torch.randn(3, 8))
    assert images.shape == (3, 3, resolution, resolution) and images.abs().max() <= 1
    images.sum().backward()
    assert all(p.grad is not None for p in g.parameters())


def test_dcgan_transposed_default_keeps_its_state_dict() -> None:
    """The default (transposed) is the DCGAN generator as before: same keys, so older checkpoints still load."""
    default = build_generator(small_g("dcgan"), 28, 1)
    assert small_g("dcgan").upsample == "transposed"
    assert sorted(default.state_dict()) == [
        "net.0.weight", "net.2.bias", "net.2.num_batches_tracked", "net.2.running_mean", "net.2.running_var",
        "net.2.weight", "net.4.weight", "net.5.bias", "net.5.num_batches_tracked", "net.5.running_mean",
        "net.5.running_var", "net.5.weight", "net.7.bias", "net.7.weight"]
    default.load_state_dict(build_generator(small_g("dcgan", upsample="transposed"), 28, 1).state_dict())


def test_upsample_is_refused_for_generators_without_upsampling_blocks() -> None:
    from distgan.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="generator.upsample.*only the dcgan generator"):
        load_config(None, ["generator.arch=mlp", "generator.upsample=nearest"])
    with pytest.raises(ConfigError, match="generator.upsample"):
        load_config(None, ["generator.upsample=bicubic"])
    assert load_config(None, ["generator.arch=mlp"]).generator.upsample == "transposed"


def test_dcgan_parameter_counts_match_pytorch_example() -> None:
    """64 px, width 64, BN: the PyTorch DCGAN example's counts (3,576,704 and 2,765,568) plus the biases
    distgan keeps where no norm follows (G output conv: 3; D first conv: 64, D logit: 1)."""
    assert n_params(build_generator(GeneratorConfig(), 64, 3)) == 3_576_704 + 3
    assert n_params(build_discriminator(DiscriminatorConfig(), 64, 3)) == 2_765_568 + 64 + 1


def test_dcgan_channels_capped_by_max_width() -> None:
    g = build_generator(GeneratorConfig(width=64, max_width=256), 128, 3)
    convs = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [c.in_channels for c in convs] == [256, 256, 256, 128, 64]
    assert [c.out_channels for c in convs] == [256, 256, 128, 64, 3]
    d = build_discriminator(DiscriminatorConfig(width=64, max_width=256), 128, 3)
    assert [c.out_channels for c in d.modules() if isinstance(c, nn.Conv2d)] == [64, 128, 256, 256, 256]


def test_tf_dcgan_layers_match_the_tutorial() -> None:
    g = build_generator(GeneratorConfig(arch="tf_dcgan"), 28, 1)
    linear = next(m for m in g.modules() if isinstance(m, nn.Linear))
    assert (linear.in_features, linear.out_features, linear.bias) == (100, 7 * 7 * 256, None)
    convs = [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert convs == [(256, 128, (5, 5), (1, 1)), (128, 64, (5, 5), (2, 2)), (64, 1, (5, 5), (2, 2))]
    assert next(m for m in g.modules() if isinstance(m, nn.LeakyReLU)).negative_slope == 0.3
    d = build_discriminator(DiscriminatorConfig(arch="tf_dcgan", norm="none", dropout=0.3), 28, 1)
    assert [(m.in_channels, m.out_channels) for m in d.modules() if isinstance(m, nn.Conv2d)] == [(1, 64), (64, 128)]
    assert next(m for m in d.modules() if isinstance(m, nn.Linear)).in_features == 128 * 7 * 7
    assert n_params(d) == (1 * 25 * 64 + 64) + (64 * 25 * 128 + 128) + (128 * 49 + 1)
    with pytest.raises(ValueError, match="divisible by 4"):
        build_generator(GeneratorConfig(arch="tf_dcgan"), 30, 1)


def test_seed_mlp_layer_sizes() -> None:
    g = build_generator(GeneratorConfig(arch="mlp", z_dim=100, hidden=[128, 256, 512]), 28, 1)
    d = build_discriminator(DiscriminatorConfig(arch="mlp", hidden=[512, 256]), 28, 1)
    g_sizes = [(m.in_features, m.out_features) for m in g.modules() if isinstance(m, nn.Linear)]
    d_sizes = [(m.in_features, m.out_features) for m in d.modules() if isinstance(m, nn.Linear)]
    assert g_sizes == [(100, 128), (128, 256), (256, 512), (512, 784)]
    assert d_sizes == [(784, 512), (512, 256), (256, 1)]


def test_maxout_units_take_the_max_of_their_pieces() -> None:
    d = build_discriminator(DiscriminatorConfig(arch="maxout", hidden=[240, 240], maxout_pieces=5, norm="none"), 28, 1)
    linears = [(m.in_features, m.out_features) for m in d.modules() if isinstance(m, nn.Linear)]
    assert linears == [(784, 1200), (240, 1200), (240, 1)]
    maxout = d.net[1]
    x = torch.randn(4, 784)
    pre = maxout.linear(x).reshape(4, 240, 5)
    assert torch.equal(maxout(x), pre.max(dim=2).values)


def test_dcgan_init_statistics() -> None:
    torch.manual_seed(0)
    g = build_generator(GeneratorConfig(), 64, 3)
    d = build_discriminator(DiscriminatorConfig(), 64, 3)
    for model in (g, d):
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and m.weight.numel() > 10_000:
                assert abs(m.weight.mean().item()) < 2e-3 and m.weight.std().item() == pytest.approx(0.02, rel=0.05)
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and m.bias is not None:
                assert torch.all(m.bias == 0)
            if isinstance(m, nn.BatchNorm2d) and m.num_features >= 256:
                assert m.weight.mean().item() == pytest.approx(1.0, abs=5e-3)
                assert m.weight.std().item() == pytest.approx(0.02, rel=0.2)
                assert torch.all(m.bias == 0)


def _r1_and_grads(d: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    penalty = r1_penalty(d(x), x)
    params = [p for p in d.parameters() if p.requires_grad]
    grads = torch.autograd.grad(penalty, params, allow_unused=True)
    return penalty, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("arch", list(DISCRIMINATORS))
@pytest.mark.parametrize("norm", D_NORMS)
def test_r1_double_backward_matches_finite_differences(arch: str, norm: str) -> None:
    """The R1 gradient w.r.t. D's parameters (a double backward) equals a central finite difference.

    LeakyReLU(1) is the identity: R1 of a piecewise-linear D jumps where a unit changes side, which
    would spoil the finite difference; the norms and maxout keep D non-linear.
    """
    torch.manual_seed(0)
    d = build_discriminator(small_d(arch, norm, leaky_slope=1.0), 28, 1).double()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    if norm == "spectral":
        _, train_grads = _r1_and_grads(d, x)  # training mode: a power iteration in every forward
        assert all(torch.isfinite(g).all() for g in train_grads)
        d.eval()  # fixed power-iteration vectors: the function is deterministic
    _, grads = _r1_and_grads(d, x)
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    params = [p for p in d.parameters() if p.requires_grad]
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((g * v).sum() for g, v in zip(grads, direction))
    eps = 1e-6
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.add_(sign * eps * v)
        values.append(_r1_and_grads(d, x)[0].item())
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.sub_(sign * eps * v)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert analytic.item() == pytest.approx(numeric, rel=1e-4, abs=1e-8)


def test_unsupported_resolution_lists_supported_ones() -> None:
    with pytest.raises(ValueError, match="28, 32, 64, 128"):
        build_generator(GeneratorConfig(), 48, 3)
    with pytest.raises(ValueError, match="28, 32, 64, 128"):
        build_discriminator(DiscriminatorConfig(), 256, 3)


def test_unknown_arch_and_norm_are_refused() -> None:
    """Choices are checked once, by the config; the builders' tables hold exactly the config's choices."""
    from distgan.config import ConfigError, key_choices, load_config

    with pytest.raises(ConfigError, match="generator.arch"):
        load_config(None, ["generator.arch=resnet"])
    with pytest.raises(ConfigError, match="generator.norm"):
        load_config(None, ["generator.norm=layer"])
    with pytest.raises(ConfigError, match="discriminator.norm"):
        load_config(None, ["discriminator.norm=instance"])
    assert set(GENERATORS) == set(key_choices("generator", "arch"))
    assert set(DISCRIMINATORS) == set(key_choices("discriminator", "arch"))


def test_generator_activation_follows_leaky_slope() -> None:
    relu = build_generator(small_g("dcgan", leaky_slope=0.0), 32, 3)
    leaky = build_generator(small_g("mlp", leaky_slope=0.2), 32, 3)
    assert any(isinstance(m, nn.ReLU) for m in relu.modules()) and not any(isinstance(m, nn.LeakyReLU) for m in relu.modules())
    assert [m.negative_slope for m in leaky.modules() if isinstance(m, nn.LeakyReLU)] == [0.2, 0.2]


def test_sample_latent() -> None:
    z = sample_latent(20_000, 4, "normal", generator=torch.Generator().manual_seed(0))
    assert z.shape == (20_000, 4)
    assert abs(z.mean().item()) < 0.02 and z.std().item() == pytest.approx(1.0, abs=0.02)
    u = sample_latent(20_000, 4, "uniform", generator=torch.Generator().manual_seed(0))
    assert u.min() >= -1.0 and u.max() <= 1.0 and u.std().item() == pytest.approx(1 / 3**0.5, abs=0.01)
    same = sample_latent(20_000, 4, "normal", generator=torch.Generator().manual_seed(0), device="cpu")
    assert torch.equal(z, same)
    from distgan.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="'normal', 'uniform'"):
        load_config(None, ["generator.z_dist=gaussian"])  # choices are checked by the config
