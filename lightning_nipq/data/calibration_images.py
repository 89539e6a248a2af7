"""Calibration data made elsewhere: mixup-class prompts for a text-to-image model, and a loader for its images.

Data-free quantization in the manner of Park, Lee, Choi et al. (2025) generates the
calibration images with a text-to-image diffusion model prompted with two class names at
once. No diffusion model runs here: `mixup_class_prompts` writes the prompts, you generate
the images with the model of your choice, and `load_calibration_images` turns the files
into normalised batches for `lightning_nipq.post_training_quantize` and for BatchNorm
re-estimation (``HardQuantize(bn_batches=...)`` or ``hard_quantize(bn_batches=...)``).

Plain torch; Pillow (for PNG/JPEG) and numpy (for ``.npy``) are imported only when needed.
Files are never unpickled: ``.pt`` files are read with ``torch.load(weights_only=True)`` and
``.npy`` files with ``allow_pickle=False``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor
from torch.nn import functional as F

TENSOR_SUFFIXES: tuple[str, ...] = (".npy", ".pt", ".pth")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: The prompt of the mixup-class recipe; ``{c1}`` and ``{c2}`` are two different class names.
DEFAULT_PROMPT_TEMPLATE = "a photo of a {c1} and a {c2}"

PathLike = Union[str, Path]


@dataclass(frozen=True)
class MixupPrompt:
    """One prompt of the mixup-class recipe: two class names and the share ``lam`` of the first."""

    text: str
    class1: str
    class2: str
    lam: float


def mixup_class_prompts(
    class_names: Sequence[str],
    count: int,
    template: str = DEFAULT_PROMPT_TEMPLATE,
    mixup_alpha: Optional[float] = None,
    seed: int = 0,
) -> list[MixupPrompt]:
    """``count`` prompts, each naming two different classes, every class used about equally often.

    The pairs are drawn at random without repeats until all pairs are used, then again.
    ``lam`` is 0.5, or drawn from ``Beta(mixup_alpha, mixup_alpha)`` when ``mixup_alpha`` is
    given: use it where your generator can weight the two names (e.g. interpolating their
    text embeddings); the prompt text itself names both classes.
    """
    names = [str(n) for n in class_names]
    if len(set(names)) < 2:
        raise ValueError(f"mixup-class prompts need at least two different class names, got {names}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if "{c1}" not in template or "{c2}" not in template:
        raise ValueError(f"template must contain both {{c1}} and {{c2}}, got {template!r}")
    if mixup_alpha is not None and not mixup_alpha > 0:
        raise ValueError(f"mixup_alpha must be > 0 or None, got {mixup_alpha}")
    rng = random.Random(seed)
    unique = list(dict.fromkeys(names))
    pairs = [(a, b) for i, a in enumerate(unique) for b in unique[i + 1 :]]
    prompts: list[MixupPrompt] = []
    while len(prompts) < count:
        rng.shuffle(pairs)
        for a, b in pairs[: count - len(prompts)]:
            if rng.random() < 0.5:  # either class may come first in the text
                a, b = b, a
            lam = 0.5 if mixup_alpha is None else rng.betavariate(mixup_alpha, mixup_alpha)
            prompts.append(MixupPrompt(template.format(c1=a, c2=b), a, b, lam))
    return prompts


def _files(source: Union[PathLike, Iterable[PathLike]]) -> list[Path]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TENSOR_SUFFIXES + IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(
                    f"no calibration images in {path}: expected files ending in {', '.join(TENSOR_SUFFIXES + IMAGE_SUFFIXES)}"
                )
            return found
        paths = [path]
    else:
        paths = [Path(p) for p in source]
        if not paths:
            raise ValueError("no calibration files given: pass a folder or a non-empty list of files")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"calibration file {p} does not exist")
        if p.suffix.lower() not in TENSOR_SUFFIXES + IMAGE_SUFFIXES:
            raise ValueError(f"{p}: unsupported file type; use {', '.join(TENSOR_SUFFIXES + IMAGE_SUFFIXES)}")
    return paths


def _read_tensor_file(path: Path) -> Tensor:
    if path.suffix.lower() == ".npy":
        try:
            import numpy as np
        except ImportError as e:  # pragma: no cover - numpy ships with torch's usual installs
            raise ImportError(f"reading {path} needs numpy: pip install numpy") from e
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: not a plain numeric .npy array ({e})") from e
        data = torch.from_numpy(array.copy())
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a tensor file readable with torch.load(weights_only=True) ({e})") from e
    if not isinstance(data, Tensor):
        raise ValueError(f"{path} holds a {type(data).__name__}; save a single tensor of images (torch.save(images, path))")
    if data.is_floating_point():
        return data.float()
    if data.dtype == torch.uint8:
        return data.float() / 255.0
    raise ValueError(f"{path}: images must be floating point or uint8 (0-255), got {data.dtype}")


def _read_image_file(path: Path, channels: Optional[int]) -> Tensor:
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(f"reading {path} needs Pillow: pip install pillow (or save the images as .npy/.pt)") from e
    if channels not in (None, 1, 3):
        raise ValueError(f"{path}: image files are read as 1 (grey) or 3 (RGB) channels, not channels={channels}")
    with Image.open(path) as image:
        mode = {1: "L", 3: "RGB"}.get(channels or 0) or ("L" if image.mode in ("L", "I", "I;16", "1") else "RGB")
        converted = image.convert(mode)
        data = torch.frombuffer(bytearray(converted.tobytes()), dtype=torch.uint8)
        width, height = converted.size
    return data.reshape(height, width, len(mode)).permute(2, 0, 1).float() / 255.0


def _as_images(data: Tensor, path: Path) -> Tensor:
    # (H, W) is one grey image, (C, H, W) one image, (N, C, H, W) a stack: always channels first.
    if data.dim() == 2:
        return data.unsqueeze(0).unsqueeze(0)
    if data.dim() == 3:
        return data.unsqueeze(0)
    if data.dim() == 4:
        return data
    raise ValueError(
        f"{path}: expected an image (H, W) or (C, H, W) or a stack (N, C, H, W), got shape {tuple(data.shape)}"
    )


def _per_channel(value: Union[float, Sequence[float]], channels: int, name: str) -> Tensor:
    values = torch.tensor([float(value)] if isinstance(value, (int, float)) else [float(v) for v in value])
    if values.numel() not in (1, channels):
        raise ValueError(f"{name} has {values.numel()} values for images with {channels} channels")
    return values.reshape(1, -1, 1, 1)


def load_calibration_images(
    source: Union[PathLike, Iterable[PathLike]],
    size: Optional[Union[int, tuple[int, int]]] = None,
    channels: Optional[int] = None,
    mean: Optional[Union[float, Sequence[float]]] = None,
    std: Optional[Union[float, Sequence[float]]] = None,
    batch_size: int = 32,
) -> list[Tensor]:
    """Read calibration images from a folder or files and return them as normalised float batches.

    Reads ``.npy`` (``allow_pickle=False``) and ``.pt``/``.pth`` tensors (``weights_only=True``),
    each one image (``(H, W)`` or ``(C, H, W)``) or a stack ``(N, C, H, W)``, channels first;
    and, with Pillow installed, PNG, JPEG, BMP and WebP images. A folder is read in file-name
    order; files of other types in it are skipped. uint8 data and image files are scaled to
    ``[0, 1]``; float tensors are taken as they are. Then every image is resized
    (bilinear, antialiased) to ``size`` when given, and normalised as ``(x - mean) / std``
    per channel: give the transform your training data went through.

    Args:
        source: a folder, one file, or a list of files.
        size: ``(height, width)`` or one number for square images; None requires all
            images to have the same size already.
        channels: 1 or 3 to read image files as grey or RGB and to check tensor files; None
            takes what the first file has.
        mean: per-channel (or one) mean subtracted after scaling; None subtracts nothing.
        std: per-channel (or one) standard deviation divided by; None divides by nothing.
        batch_size: images per returned batch (the last batch may be smaller).

    Returns:
        Float32 batches of shape ``(batch, channels, height, width)``.

    Example:

        ```python
        batches = load_calibration_images("generated/", size=28, channels=1, mean=0.2860, std=0.3530)
        post_training_quantize(model, batches, weight_bits=4, act_bits=4)
        ```
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if channels is not None and channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    target = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
    if target is not None and (len(target) != 2 or min(target) < 1):
        raise ValueError(f"size must be a positive number or (height, width), got {size}")
    images: list[Tensor] = []
    first: Optional[tuple[Path, tuple[int, ...]]] = None
    for path in _files(source):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            data = _as_images(_read_image_file(path, channels), path)
        else:
            data = _as_images(_read_tensor_file(path), path)
        if channels is None:
            channels = data.shape[1]
        if data.shape[1] != channels:
            raise ValueError(
                f"{path}: {data.shape[1]} channels, expected {channels} (shape {tuple(data.shape)}); "
                "tensors must be channels first, e.g. np.moveaxis(images, -1, -3) for channels-last arrays"
            )
        if data.shape[0] == 0:
            continue
        if target is not None:
            if tuple(data.shape[-2:]) != target:
                data = F.interpolate(data, size=target, mode="bilinear", align_corners=False, antialias=True)
        elif first is None:
            first = (path, tuple(data.shape[1:]))
        elif tuple(data.shape[1:]) != first[1]:
            raise ValueError(
                f"{path} has images of shape {tuple(data.shape[1:])} but {first[0]} has {first[1]}: pass size= "
                "to resize them all to one size"
            )
        images.append(data)
    if not images:
        raise ValueError(f"the calibration files in {source} hold no image")
    stacked = torch.cat(images)
    if mean is not None:
        stacked = stacked - _per_channel(mean, stacked.shape[1], "mean")
    if std is not None:
        divisor = _per_channel(std, stacked.shape[1], "std")
        if bool((divisor <= 0).any()):
            raise ValueError(f"std must be > 0, got {std}")
        stacked = stacked / divisor
    return list(stacked.split(batch_size))


def as_batches(images: Tensor, batch_size: int = 32) -> list[Tensor]:
    """Split a tensor of images ``(N, ...)`` into batches, e.g. to pass as ``HardQuantize(bn_batches=...)``."""
    if not isinstance(images, Tensor) or images.dim() < 1 or images.shape[0] == 0:
        raise ValueError("images must be a non-empty tensor with the samples along its first axis")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return list(images.split(batch_size))
