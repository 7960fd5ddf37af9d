"""Image loading and CLIP preprocessing, exactly as LLaVA-1.5 feeds its vision tower.

Two modes (docs/protocol.md section 4):

- ``pad`` (LLaVA-1.5's code, ``image_aspect_ratio: "pad"``): paste the image centred on a square
  of the CLIP mean colour (122, 116, 104), then CLIP preprocessing.
- ``crop`` (llava-hf's processor, and very likely the published 66.8): CLIP preprocessing only,
  which resizes the shortest edge and centre-crops, so the borders of a non-square image are lost.

CLIP preprocessing reproduces the original ``CLIPImageProcessor`` (the slow, PIL one) number for
number: shortest edge to ``size`` with PIL bicubic (long edge ``int(size * long / short)``),
centre crop ``size`` x ``size`` (top/left offsets rounded down), ``uint8 -> float64 * (1/255) ->
float32``, then ``(x - mean) / std`` in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vtkit.defaults import IMAGE_MODES
from vtkit.errors import DataError, UsageError

#: OpenAI CLIP's normalisation constants (what LLaVA-1.5's CLIP ViT-L/14-336 processor uses).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL modes holding more than 8 bits per pixel; PIL's own convert("RGB") clips them to 255.
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file and return it as an RGB PIL image, fully decoded.

    Any PIL mode is accepted (RGB, RGBA, P, L, LA, CMYK, 16-bit grey, ...). Alpha is dropped the
    way PIL's ``convert("RGB")`` drops it, which is what LLaVA's loaders do (``.convert('RGB')``)
    and what the CLIP processor of LLaVA's pinned transformers did; newer transformers composite
    transparency onto white instead. A multi-frame file gives its first frame.

    Raises :class:`DataError` naming ``path`` if the file is missing or cannot be decoded.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DataError(f"cannot decode image {path}: {error}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` in RGB mode (a copy; the input is left as it is)."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode in _WIDE_GREY_MODES:
        grey = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ("P", "PA"):
        # Going through RGBA keeps PIL quiet about palette transparency; the colours are the same.
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def mean_colour(mean: Sequence[float] = CLIP_MEAN) -> tuple[int, int, int]:
    """The padding colour LLaVA derives from the processor mean: ``int(x * 255)`` per channel."""
    return tuple(int(x * 255) for x in mean)


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's ``expand2square``: centre ``image`` on a square of colour ``background``.

    The square's side is the longer edge; the offset is ``(long - short) // 2`` on the short
    axis. A square image is returned unchanged.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    if width > height:
        result.paste(image, (0, (width - height) // 2))
    else:
        result.paste(image, ((height - width) // 2, 0))
    return result


def resize_shortest_edge(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter edge is ``size`` (bicubic), as CLIPImageProcessor does."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, resample=Image.Resampling.BICUBIC)


def clip_pixels(image: Image.Image, size: int, mean: Sequence[float],
                std: Sequence[float]) -> np.ndarray:
    """CLIP preprocessing of one RGB image: a float32 array [3, size, size]."""
    pixels = np.asarray(resize_shortest_edge(image, size), dtype=np.uint8)
    height, width = pixels.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    pixels = pixels[top:top + size, left:left + size]
    # Same dtype steps as transformers' rescale/normalize, so values match bit for bit.
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    normalised = (scaled - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


def check_image_mode(mode: str) -> str:
    """Return ``mode`` if it is a known ``--image-mode``, else raise :class:`UsageError`."""
    if mode not in IMAGE_MODES:
        raise UsageError(f"--image-mode must be one of {', '.join(IMAGE_MODES)}, not {mode!r}")
    return mode


def preprocess_images(images: Sequence[Image.Image], mode: str = "pad", size: int = 336,
                      mean: Sequence[float] = CLIP_MEAN,
                      std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """Turn PIL images into the vision tower's input, a float32 tensor [B, 3, size, size].

    ``mode`` is ``"pad"`` (expand to a square of the mean colour first) or ``"crop"``; anything
    else is a :class:`UsageError` naming ``--image-mode``. Images not in RGB are converted first.
    """
    check_image_mode(mode)
    arrays = []
    for image in images:
        image = image if image.mode == "RGB" else to_rgb(image)
        if mode == "pad":
            image = expand_to_square(image, mean_colour(mean))
        arrays.append(clip_pixels(image, size, mean, std))
    if not arrays:
        return torch.empty((0, 3, size, size), dtype=torch.float32)
    return torch.from_numpy(np.stack(arrays))
