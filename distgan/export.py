"""The exported generator: ``generator_ema.safetensors`` plus ``generator_ema.json``, all that sampling needs.

The weights file carries its metadata (the generator's config section, ``conditional`` included, resolution,
channels, classes: a conditional generator's class indices, and ``pad``: the run's data.pad), so
``distgan.sample`` and ``distgan.eval`` rebuild the network without the run's config or checkpoints.
``resolution`` is the generator's own; a padded run's images are cropped by ``pad`` on each side back to the
data's resolution (resolution - 2 pad) wherever they are used: :func:`load_generator_export` returns the
generator cropped. An export written before ``pad`` existed has none: 0.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from distgan.checkpoint import module_tensors
from distgan.config import (
    ConfigError, GeneratorConfig, generator_keys_meant_when_absent, section_from_dict, validate_generator,
)
from distgan.data.errors import DataError
from distgan.data.untrusted import require_regular_file
from distgan.errors import UserError, shown
from distgan.limits import FLOAT_BYTES, MAX_RESOLUTION, LimitError, check_count, check_hidden
from distgan.nn import build_generator, cropped
from distgan.output import Output, OutputError, replace_file_with_force

EXPORT_VERSION = 1
EXPORT_FILE = "generator_ema.safetensors"  # what a finished run exports into its run dir


def generator_metadata(generator_cfg: GeneratorConfig, resolution: int, channels: int, classes: Optional[list[str]],
                       step: int, ema: bool, pad: int = 0) -> dict:
    """What rebuilds a generator without its run: written into every export and every checkpoint's G/G_ema file."""
    return {"format_version": EXPORT_VERSION, "generator": asdict(generator_cfg), "resolution": resolution,
            "channels": channels, "classes": classes, "step": step, "ema": ema, "pad": pad}


def export_generator(path: Path, model: torch.nn.Module, generator_cfg: GeneratorConfig, resolution: int,
                     channels: int, classes: Optional[list[str]], step: int, ema: bool, pad: int = 0) -> Path:
    """Write the weights (metadata inside) atomically, then the readable ``.json`` beside them; ``resolution``: the
    generator's, ``pad``: pixels cropped from each side of its images (the run's data.pad)."""
    meta = generator_metadata(generator_cfg, resolution, channels, classes, step, ema, pad)
    with Output(path, check=_own_export, flag="export") as partial:
        save_file(module_tensors(model), str(partial), metadata={"distgan": json.dumps(meta)})
    with Output(path.with_suffix(".json"), check=_own_export_json, flag="export") as partial:
        partial.write_text(json.dumps(meta, indent=2))
    return path


def _own_export(path: Path) -> None:
    """Only an earlier export (a safetensors file with distgan metadata, of any version) is replaced by a new one."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            ours = "distgan" in (fh.metadata() or {})
    except (SafetensorError, OSError):
        ours = False
    if path.is_symlink() or not ours:
        raise OutputError(f"{path} exists and is not a distgan export; it was kept: move it away")


def _own_export_json(path: Path) -> None:
    try:
        record = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError):
        record = None
    if not (isinstance(record, dict) and "format_version" in record and "generator" in record):
        raise OutputError(f"{path} exists and is not the metadata of a distgan export; it was kept: move it away")


class ExportError(UserError):
    """An exported generator that is missing, foreign, corrupt or does not fit its own metadata."""


def read_export_metadata(path: Path) -> dict:
    """The export's metadata, checked before anything is allocated from it."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no exported generator there (a finished run writes generator_ema.safetensors; "
                          "pass --run DIR or --export FILE)")
    try:
        require_regular_file(path, "export")  # a FIFO would block safetensors' open
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("distgan")
    except (SafetensorError, OSError, DataError) as err:
        raise ExportError(f"{path}: not a readable safetensors file ({err}); re-export it or point at another") from None
    if raw is None:
        written_by = ("a checkpoint written before distgan recorded the generator in checkpoints: sample the run's "
                      "final export or a newer checkpoint" if path.parent.joinpath("state.json").is_file() else
                      "export it with distgan, or point at a run dir or a checkpoint folder")
        raise ExportError(f"{path}: not a distgan export (no 'distgan' metadata): {written_by}")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        raise ExportError(f"{path}: its 'distgan' metadata is not JSON; the file is not a distgan export") from None
    if not isinstance(meta, dict) or meta.get("format_version") != EXPORT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ExportError(f"{path}: export format {shown(version)} is not {EXPORT_VERSION}; export it with this version")
    resolution, channels = meta.get("resolution"), meta.get("channels")
    if not (isinstance(resolution, int) and 1 <= resolution <= MAX_RESOLUTION and channels in (1, 3)):
        raise ExportError(f"{path}: metadata says resolution {shown(resolution)} and channels {shown(channels)} "
                          f"(expected 1..{MAX_RESOLUTION} and 1 or 3): the export is damaged")
    pad = meta.setdefault("pad", 0)  # an export written before data.pad existed: not padded
    if not (isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad and 2 * pad < resolution):
        raise ExportError(f"{path}: metadata says pad {shown(pad)} for resolution {resolution} (expected 0 <= pad < "
                          "resolution / 2): the export is damaged")
    _check_sizes(path, meta)
    return meta


def _check_sizes(path: Path, meta: dict) -> None:
    """The metadata's generator section and class list, bounded before anything is built from them."""
    generator, classes = meta.get("generator"), meta.get("classes")
    if not isinstance(generator, dict):
        raise ExportError(f"{path}: its metadata has no generator section: the export is damaged; re-export it")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ExportError(f"{path}: metadata says classes {shown(classes)} (expected a list of names or null): the "
                          "export is damaged; re-export it")
    z_dim = generator.get("z_dim")
    try:
        check_hidden(f"{path}: metadata's generator.hidden", generator.get("hidden"))
        if classes and isinstance(z_dim, int):  # a conditional generator embeds each class in z_dim numbers
            check_count(f"{path}: metadata's class list of {len(classes)} names", len(classes), z_dim * FLOAT_BYTES,
                        "a real export has a few hundred classes at most")
    except LimitError as err:
        raise ExportError(f"{err}: the export is damaged; re-export it") from None


# torch dtype -> the safetensors header's name for it (what save_file writes)
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def _check_weights_fit(path: Path, expected: dict[str, torch.Tensor]) -> None:
    """Refuse a file whose tensors (read from its header only) are not the network its metadata describes, or
    that is smaller than that network's bytes, so a damaged export never sizes an allocation."""
    damaged = f"{path}: its weights cannot be loaded: they do not match its metadata"
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = {key: (tuple(fh.get_slice(key).get_shape()), fh.get_slice(key).get_dtype()) for key in fh.keys()}
    except (SafetensorError, OSError) as err:
        raise ExportError(f"{path}: not a readable safetensors file ({err}); re-export it or point at another") from None
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise ExportError(f"{damaged} (missing {missing[:3]}, unexpected {unexpected[:3]}): the export is damaged; "
                          "re-export it")
    for key, tensor in expected.items():
        want = (tuple(tensor.shape), _SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype)))
        if header[key] != want:
            raise ExportError(f"{damaged} ({key}: {header[key][1]} {list(header[key][0])} in the file, the "
                              f"metadata's network needs {want[1]} {list(want[0])}): the export is damaged; re-export it")
    total = sum(t.numel() * t.element_size() for t in expected.values())
    if total > path.stat().st_size:
        raise ExportError(f"{damaged} (its network needs {total} bytes, the file has {path.stat().st_size}): the "
                          "export is damaged; re-export it")


def load_generator_export(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild an exported generator (eval mode) and return it with its metadata; a padded run's generator comes
    cropped (its images at the data's resolution, resolution - 2 * meta["pad"]). ``path``: an export, or a
    checkpoint's G_ema/G file (they carry the same metadata)."""
    path = Path(path)
    meta = read_export_metadata(path)
    g = meta.get("generator")
    if isinstance(g, dict):  # an older export: what it meant by a key it predates
        g = meta["generator"] = {**generator_keys_meant_when_absent(g), **g}
    try:
        generator_cfg = section_from_dict(GeneratorConfig, g, "generator")
        validate_generator(generator_cfg)
    except ConfigError as err:
        raise ExportError(f"{path}: the generator section of its metadata is not valid: {err}") from None
    classes = meta.get("classes")
    if generator_cfg.conditional and not (isinstance(classes, list) and len(classes) >= 2):
        raise ExportError(f"{path}: a conditional generator whose metadata has no class list ({classes!r}): "
                          "the export is damaged; re-export it")
    num_classes = len(classes) if generator_cfg.conditional else None
    with torch.device("meta"):  # shapes only: the metadata must fit the file before anything is allocated
        shapes = build_generator(generator_cfg, meta["resolution"], meta["channels"], num_classes).state_dict()
    _check_weights_fit(path, shapes)
    model = build_generator(generator_cfg, meta["resolution"], meta["channels"], num_classes)
    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"{path}: its weights cannot be loaded ({first}); the file is truncated or does not "
                          "match its metadata: re-export it") from None
    return cropped(model, meta["pad"]).to(device).eval(), meta


def export_onnx(model: torch.nn.Module, meta: dict, path: Path, check_batch: int = 8, seed: int = 0,
                force: bool = False) -> dict:
    """The generator as ONNX (input ``z`` [batch, z_dim], and ``y`` [batch] int64 class indices for a conditional
    one; output ``images`` [batch, C, R, R] in [-1, 1], any batch, R the data's: a padded run's ``model`` comes
    cropped), its metadata (the class names included) in the model's metadata_props, then run by onnxruntime
    against PyTorch on the same latents and classes. An existing ``path`` is replaced only with ``force``."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ExportError(f"--onnx needs the onnx, onnxscript and onnxruntime packages ({err.name} is missing): "
                          "pip install 'distgan[onnx]'") from None
    from distgan.nn import sample_latent

    g = meta["generator"]
    z = sample_latent(check_batch, g["z_dim"], g["z_dist"], torch.Generator().manual_seed(seed))
    inputs = {"z": z}
    if g.get("conditional"):  # every class in turn, so the check sees each class's parameters
        inputs["y"] = torch.arange(check_batch, dtype=torch.int64) % len(meta["classes"])
    batch = torch.export.Dim("batch", min=1)
    with Output(path, check=replace_file_with_force("--onnx", force), flag="--onnx") as tmp:
        model = model.cpu().eval()
        torch.onnx.export(model, tuple(inputs.values()), str(tmp), input_names=list(inputs), output_names=["images"],
                          dynamo=True, dynamic_shapes={name: {0: batch} for name in inputs}, verbose=False)
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, {"distgan": json.dumps(meta)})
        onnx.save(proto, str(tmp))
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        (images,) = session.run(["images"], {name: value.numpy() for name, value in inputs.items()})
        with torch.no_grad():
            expected = model(*inputs.values()).numpy()
        difference = float(abs(images - expected).max())
        if images.shape != expected.shape or not difference < 1e-4:  # float32 kernels differ by rounding only
            raise ExportError(f"{path}: onnxruntime's images differ from PyTorch's by {difference} (shape "
                              f"{images.shape} vs {expected.shape}); the model was not written")
    return {"onnx": str(path), "checked_batch": check_batch, "max_abs_difference": difference}
