"""FID's Inception-v3 (pytorch-fid's variant), loaded from a local weights file: nothing is downloaded.

Maps images in [-1, 1] (grayscale repeated to RGB, resized to 299) to 2048-d pool features, for standard
FID figures comparable with published CIFAR-10 numbers.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distgan.errors import UserError

INCEPTION_DIM = 2048
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's (and torch-fidelity's) FID weights
TORCHSCRIPT_INCEPTION_FILE = "inception-2015-12-05.pt"  # NVlabs' and clean-fid's TorchScript FID Inception


def _as_rgb(x: Tensor, who: str) -> Tensor:
    """Images [N, 1 or 3, H, W] as RGB (grayscale repeated), the input both FID networks take."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{who} takes images [N, 1 or 3, H, W] in [-1, 1], got {tuple(x.shape)}")
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


class _Conv(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU; named .conv/.bn as in the weights file."""

    def __init__(self, c_in: int, c_out: int, kernel_size, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _chain(x: Tensor, *layers: nn.Module) -> Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _avg_pool(x: Tensor) -> Tensor:
    """TensorFlow's 3x3 average pool, which leaves the zero padding out of the average (the FID patch)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _InceptionA(nn.Module):
    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _Conv(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(c_in, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(c_in, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(c_in, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1x1(x), _chain(x, self.branch5x5_1, self.branch5x5_2),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(_avg_pool(x))], 1)


class _InceptionB(nn.Module):
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = _Conv(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(c_in, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch3x3(x), _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _InceptionC(nn.Module):
    def __init__(self, c_in: int, c7: int):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = _Conv(c_in, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = _Conv(c_in, c7, 1), _Conv(c7, c7, **row)
        self.branch7x7_3 = _Conv(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = _Conv(c_in, c7, 1), _Conv(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = _Conv(c7, c7, **row), _Conv(c7, c7, **col)
        self.branch7x7dbl_5 = _Conv(c7, 192, **row)
        self.branch_pool = _Conv(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        double = (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5)
        return torch.cat([self.branch1x1(x), _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          _chain(x, *double), self.branch_pool(_avg_pool(x))], 1)


class _InceptionD(nn.Module):
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(c_in, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(c_in, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        seven = (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4)
        return torch.cat([_chain(x, self.branch3x3_1, self.branch3x3_2), _chain(x, *seven),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _InceptionE(nn.Module):
    """The last blocks; the FID network's final one max-pools its pool branch (``max_pool=True``)."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.branch1x1 = _Conv(c_in, 320, 1)
        self.branch3x3_1 = _Conv(c_in, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = _Conv(384, 384, **row), _Conv(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(c_in, 448, 1), _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = _Conv(384, 384, **row), _Conv(384, 384, **col)
        self.branch_pool = _Conv(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_1(x)
        b = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in TensorFlow's FID graph (pytorch-fid's FIDInceptionA/C/E_1/E_2), up to the 2048-d pool.

    Takes images in [-1, 1], 1 or 3 channels, any size: grayscale is repeated to RGB and the image resized
    bilinearly to 299x299, as pytorch-fid does. Always in eval mode (its batch norms use the stored statistics).
    """

    def __init__(self):
        super().__init__()
        self.num_features = INCEPTION_DIM
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _InceptionA(192, 32), _InceptionA(256, 64), _InceptionA(288, 64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = _InceptionC(768, 128), _InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _InceptionC(768, 160), _InceptionC(768, 192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = _InceptionE(1280, max_pool=False), _InceptionE(2048, max_pool=True)
        self.eval()

    def train(self, mode: bool = True) -> "FIDInceptionV3":
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        x = _as_rgb(x, "FIDInceptionV3")
        if tuple(x.shape[2:]) != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = _chain(F.max_pool2d(x, 3, stride=2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = _chain(F.max_pool2d(x, 3, stride=2), self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a)
        x = _chain(x, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                   self.Mixed_7c)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class TorchScriptInception(nn.Module):
    """NVlabs' (and clean-fid's) TorchScript FID Inception, ``inception-2015-12-05.pt``, fed as they feed it:
    RGB in [0, 255] (it resizes to 299 itself), ``return_features=True`` for the 2048 pool features."""

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        self.net = scripted.eval()

    def train(self, mode: bool = True) -> "TorchScriptInception":
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        x = _as_rgb(x, "TorchScriptInception")
        return self.net((x.float().clamp(-1, 1) + 1) * 127.5, return_features=True).float()


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold code/ and constants.pkl; torch.save's zip files hold neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def load_inception_features(weights_path: str | os.PathLike) -> nn.Module:
    """FID Inception-v3 from a local file: pytorch-fid's / torch-fidelity's state dict (FIDInceptionV3), or
    NVlabs' / clean-fid's TorchScript ``inception-2015-12-05.pt`` (TorchScriptInception).

    A state dict is loaded with weights_only=True (no pickled code); its 1008-way 'fc' head is ignored (FID uses
    the pool features before it); BatchNorm 'num_batches_tracked' entries are optional. A TorchScript file runs
    TorchScript code of its own: use one from a source you trust (it is the file NVlabs publishes).
    """
    path = Path(weights_path)
    if path.is_file() and _is_torchscript(path):
        try:
            return TorchScriptInception(torch.jit.load(str(path), map_location="cpu")).requires_grad_(False)
        except RuntimeError as err:
            raise UserError(f"Inception file '{path}' is a TorchScript archive torch cannot load: {err}") from None
    expected_file = (f"the FID Inception-v3 weights ({INCEPTION_FILE} from pytorch-fid or torch-fidelity, "
                     "a plain state_dict)")
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights file '{path}' not found: expected {expected_file}. Download it on a machine with "
            "internet access and set eval.inception_weights to its local path, or use eval.features=classifier"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or pickled-code files
        raise UserError(f"Inception weights file '{path}' could not be read with weights_only=True: {err}") from err
    if not isinstance(state, dict):
        raise UserError(f"Inception weights file '{path}' holds a {type(state).__name__}, expected {expected_file}")
    model = FIDInceptionV3()
    wanted = model.state_dict()
    missing = sorted(k for k in wanted if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in wanted and not k.startswith("fc."))
    reshaped = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
                for k, v in wanted.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or reshaped:
        raise UserError(
            f"Inception weights file '{path}' does not match: expected {expected_file} with keys like "
            f"'Conv2d_1a_3x3.conv.weight'. Missing {len(missing)} keys {missing[:3]}, unexpected {len(unexpected)} "
            f"{unexpected[:3]}, wrong shape {len(reshaped)} {reshaped[:3]}"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=False)
    return model.requires_grad_(False)
