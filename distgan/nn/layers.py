"""Building blocks shared by the architectures: norms, activations, spectral norm, initialisation."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

from distgan.nn.syncbn import SyncBatchNorm
from distgan.registry import Registry

_WEIGHTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


@dataclass(frozen=True)
class Norm:
    """One ``generator.norm``/``discriminator.norm`` choice: the layer it adds after a hidden layer (None: none)."""

    layer: Callable[[int, bool], Optional[nn.Module]]  # (features, spatial) -> the layer, or None
    has_layer: bool = True  # adds a layer with its own shift (the layer before it then needs no bias)
    mixes_samples: bool = False  # normalises over the batch (per-sample gradient penalties are then not per sample)
    in_generator: bool = True  # offered for G (layer norm and spectral norm are D's only)


NORMS: Registry[Norm] = Registry("norm")
NORMS.register("batch")(Norm(lambda f, spatial: nn.BatchNorm2d(f) if spatial else nn.BatchNorm1d(f), mixes_samples=True))
NORMS.register("sync-batch")(Norm(lambda f, spatial: SyncBatchNorm(f), mixes_samples=True))
NORMS.register("none")(Norm(lambda f, spatial: None, has_layer=False))
# per-sample, so it keeps per-sample gradient penalties meaningful
NORMS.register("layer")(Norm(lambda f, spatial: nn.GroupNorm(1, f) if spatial else nn.LayerNorm(f), in_generator=False))
# no layer: the architectures spectral-normalise their weights (apply_spectral_norm)
NORMS.register("spectral")(Norm(lambda f, spatial: None, has_layer=False, in_generator=False))


def norm_layer(kind: str, features: int, spatial: bool) -> Optional[nn.Module]:
    """The normalisation after a hidden layer; None where the kind adds no layer (none, spectral).

    ``spatial`` is True after a conv ([B, C, H, W]) and False after a linear layer ([B, F]).
    """
    return NORMS[kind].layer(features, spatial)


def has_norm_layer(kind: str) -> bool:
    """Whether ``kind`` adds a layer with its own shift (then the preceding layer needs no bias)."""
    return NORMS[kind].has_layer


def activation(slope: float) -> nn.Module:
    """ReLU for slope 0 (the DCGAN paper's generator), else LeakyReLU(slope)."""
    return nn.ReLU() if slope == 0 else nn.LeakyReLU(slope)


def block(layer: nn.Module, norm: str, features: int, spatial: bool, act: nn.Module, dropout: float = 0.0) -> list[nn.Module]:
    """``layer -> [norm] -> act -> [dropout]`` as a list of modules."""
    modules = [layer]
    norm_module = norm_layer(norm, features, spatial)
    if norm_module is not None:
        modules.append(norm_module)
    modules.append(act)
    if dropout > 0:
        modules.append(nn.Dropout(dropout))
    return modules


class SpectralNorm(_SpectralNorm):
    """Spectral normalisation W / sigma(W) with one power iteration per update of W (Miyato et al. 2018, Algorithm 1).

    torch's parametrization runs its power iteration on every training-mode forward, so a GAN step that calls D
    five times refines u and v five times (about 20 small kernels per layer each time). This one iterates only in
    a forward that trains the weight (training mode, gradients enabled, the weight requiring grad): once per D
    phase, as in the paper. Every other forward (G's phase, where D is frozen; G's no-grad forward in D's phase;
    eval) takes sigma = u^T W v from the current u, v: three kernels. What changes numerically against torch's:
    a forward that does not train W uses u, v from the last training forward instead of refining them once more
    (in the G phase, u and v from before D's last update), i.e. a sigma one iteration less converged; the first
    training forward is identical. sigma is computed in fp32 with autocast off (fp16/bf16 ``mv`` would round sigma
    and u, v themselves). The buffers (``_u``, ``_v``) and state-dict keys are torch's: old checkpoints load.

    u and v change in place in a training forward, which then uses copies (as torch's), so ``D(real)``, ``D(fake)``,
    one backward works as with torch's; a forward that does not train W uses u and v themselves.
    """

    def forward(self, weight: Tensor) -> Tensor:
        if weight.ndim == 1:
            return super().forward(weight)
        device = weight.device.type  # the meta device (size estimates) has no autocast to turn off
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            weight = weight if weight.dtype == torch.float64 else weight.float()
            matrix = self._reshape_weight_to_matrix(weight)
            u, v = self._u, self._v
            if self.training and weight.requires_grad and torch.is_grad_enabled():
                self._power_method(matrix, self.n_power_iterations)
                u, v = u.clone(), v.clone()  # as torch's: a later iteration must not change what this graph saved
            sigma = torch.vdot(u, torch.mv(matrix, v))
            return weight / sigma


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Spectral-normalise the weight of every conv, transposed conv and linear layer in ``module`` (:class:`SpectralNorm`)."""
    for child in list(module.modules()):
        if isinstance(child, _WEIGHTED):
            dim = 1 if isinstance(child, nn.ConvTranspose2d) else 0  # the output channels, as torch's spectral_norm
            parametrize.register_parametrization(child, "weight", SpectralNorm(child.weight, dim=dim))
    return module


@torch.no_grad()
def dcgan_init_(module: nn.Module) -> nn.Module:
    """DCGAN initialisation: weights N(0, 0.02), norm scales N(1, 0.02), all biases 0."""
    for child in module.modules():
        if isinstance(child, _WEIGHTED):
            nn.init.normal_(child.weight, 0.0, 0.02)
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        elif isinstance(child, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
            if child.weight is not None:
                nn.init.normal_(child.weight, 1.0, 0.02)
            if child.bias is not None:
                nn.init.zeros_(child.bias)
    return module


@torch.no_grad()
def glorot_init_(module: nn.Module) -> nn.Module:
    """Keras' default initialisation (glorot_uniform weights, zero biases), for the TF tutorial's models."""
    for child in module.modules():
        if isinstance(child, _WEIGHTED):
            nn.init.xavier_uniform_(child.weight)
            if child.bias is not None:
                nn.init.zeros_(child.bias)
    return module


class Unflatten(nn.Module):
    """[B, C*H*W] -> [B, C, H, W]."""

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.channels, self.height, self.width = channels, height, width

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(x, "b (c h w) -> b c h w", c=self.channels, h=self.height, w=self.width)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, height={self.height}, width={self.width}"


class Flatten(nn.Module):
    """[B, ...] -> [B, prod(...)]."""

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(x, "b ... -> b (...)")


class Squeeze(nn.Module):
    """[B, 1] -> [B]: the discriminator's logits."""

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(x, "b 1 -> b")
