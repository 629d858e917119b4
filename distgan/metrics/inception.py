"""FID's Inception-v3 (pytorch-fid's variant), loaded from a local weights file: nothing is downloaded.

Maps images in [-1, 1] (grayscale repeated to RGB, resized to 299) to 2048-d pool features, for standard
FID figures comparable with published CIFAR-10 numbers, and to the 1008 logits of the Inception Score.

Two input conventions (eval.resize), both published:
- ``tf-legacy`` (default): TensorFlow's FID graph, as torch-fidelity feeds it: the images quantised to 8 bits,
  resized with TensorFlow 1's bilinear (no half-pixel offset) and scaled (x - 128) / 128. distgan's features
  equal torch-fidelity's on the same weights (tests/test_metrics_reference.py).
- ``pytorch-fid``: pytorch-fid's way: the float images in [-1, 1] resized with F.interpolate (bilinear,
  align_corners=False), no quantisation.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distgan.errors import UserError

INCEPTION_DIM = 2048
INCEPTION_SIZE = 299
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's (and torch-fidelity's) FID weights
TORCHSCRIPT_INCEPTION_FILE = "inception-2015-12-05.pt"  # NVlabs' and clean-fid's TorchScript FID Inception
RESIZE_MODES = ("tf-legacy", "pytorch-fid")
WHERE_TO_GET = (
    f"{INCEPTION_FILE} from https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE} "
    "(SHA-256 6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2; torch-fidelity hosts the same file "
    "as weights-inception-2015-12-05-6726825d.pth), or NVlabs' TorchScript "
    f"{TORCHSCRIPT_INCEPTION_FILE} from https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
    f"{TORCHSCRIPT_INCEPTION_FILE} (SHA-256 f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4)"
)


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


def resize_tf_legacy(x: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """TensorFlow 1's bilinear resize (align_corners=False, no half-pixel offset: source = target * in / out), in
    the arithmetic of torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x, so float32 results are equal.
    F.interpolate has no such mode (its bilinear samples at half-pixel centres)."""
    def axis(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        src = torch.arange(size, dtype=x.dtype, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.long()
        return lo, (lo + 1).clamp_max(n_in - 1), src - lo.float()

    y_lo, y_hi, dy = axis(x.shape[2])
    x_lo, x_hi, dx = axis(x.shape[3])
    top, bottom = x[:, :, y_lo, :], x[:, :, y_hi, :]
    row0 = top[:, :, :, x_lo] + (top[:, :, :, x_hi] - top[:, :, :, x_lo]) * dx.view(1, 1, 1, size)
    row1 = bottom[:, :, :, x_lo] + (bottom[:, :, :, x_hi] - bottom[:, :, :, x_lo]) * dx.view(1, 1, 1, size)
    return row0 + (row1 - row0) * dy.view(1, 1, size, 1)


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

    Takes images in [-1, 1], 1 or 3 channels, any size: grayscale is repeated to RGB and the image brought to
    299x299 the way ``resize`` names (module docstring). Always in eval mode (its batch norms use the stored
    statistics). ``fc`` (the 1008-way head, set when the weights file has one) gives ``logits``.
    """

    def __init__(self, resize: str = "tf-legacy"):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"FIDInceptionV3: resize={resize!r}, expected one of {RESIZE_MODES}")
        self.resize = resize
        self.fc: Optional[nn.Linear] = None
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

    def prepare(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] as the network's 299x299 RGB input, the way ``self.resize`` says."""
        x = _as_rgb(x, "FIDInceptionV3")
        if self.resize == "tf-legacy":  # 8-bit values as TensorFlow's graph sees them (round half up, as stylegan2-ada)
            x = torch.floor((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5 + 0.5)
            return (resize_tf_legacy(x) - 128) / 128
        if tuple(x.shape[2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return x

    def logits(self, features: Tensor) -> Tensor:
        """The 1008 logits without the head's bias, from pool features: the Inception Score's input, as in
        Salimans et al.'s code (and torch-fidelity's 'logits_unbiased', stylegan2-ada's no_output_bias)."""
        if self.fc is None:
            raise ValueError("FIDInceptionV3: the weights file had no 'fc' head, so there are no logits")
        weight = self.fc.weight
        return (features.to(weight) @ weight.T).to(features.device)

    def forward(self, x: Tensor) -> Tensor:
        x = self.prepare(x)
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


def load_inception_features(weights_path: str | os.PathLike, resize: str = "tf-legacy") -> nn.Module:
    """FID Inception-v3 from a local file: pytorch-fid's / torch-fidelity's state dict (FIDInceptionV3), or
    NVlabs' / clean-fid's TorchScript ``inception-2015-12-05.pt`` (TorchScriptInception).

    A state dict is loaded with weights_only=True (no pickled code); its 1008-way 'fc' head, when present, gives
    the Inception Score's logits; BatchNorm 'num_batches_tracked' entries are optional. ``resize`` (eval.resize)
    applies to the state dict's network: the TorchScript file resizes inside itself. A TorchScript file runs
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
            f"Inception weights file '{path}' not found: download {WHERE_TO_GET}, check its SHA-256 (sha256sum) and "
            "set eval.inception_weights (--inception-weights) to its local path; or use eval.features=classifier"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or pickled-code files
        raise UserError(f"Inception weights file '{path}' could not be read with weights_only=True: {err}") from err
    if not isinstance(state, dict):
        raise UserError(f"Inception weights file '{path}' holds a {type(state).__name__}, expected {expected_file}")
    model = FIDInceptionV3(resize)
    if "fc.weight" in state and tuple(state["fc.weight"].shape[1:]) == (INCEPTION_DIM,):
        model.fc = nn.Linear(INCEPTION_DIM, state["fc.weight"].shape[0])
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
