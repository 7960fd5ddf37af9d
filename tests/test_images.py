"""Image loading and preprocessing: RGB conversion, pad vs crop, equality with CLIP's processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vtkit.errors import DataError, UsageError
from vtkit.images import (
    CLIP_MEAN,
    CLIP_STD,
    expand_to_square,
    load_image,
    mean_colour,
    preprocess_images,
)


def _clip_processor(size: int = 336):
    """transformers' PIL-backed CLIP processor (the original slow one's behaviour)."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers without backends: the plain class is the PIL one
        from transformers import CLIPImageProcessor as processor_class
    return processor_class(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                           image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("size", [(500, 333), (333, 500), (337, 1000), (101, 60), (336, 336)])
def test_preprocessing_equals_clip_image_processor(size):
    image = _noise_image(*size)
    processor = _clip_processor()
    crop = processor(images=[image], return_tensors="pt")["pixel_values"]
    pad = processor(images=[expand_to_square(image, (122, 116, 104))],
                    return_tensors="pt")["pixel_values"]
    assert torch.equal(preprocess_images([image], mode="crop"), crop)
    assert torch.equal(preprocess_images([image], mode="pad"), pad)


def test_batch_shape_and_dtype():
    batch = preprocess_images([_noise_image(40, 30), _noise_image(30, 40, seed=1)], size=28)
    assert batch.shape == (2, 3, 28, 28) and batch.dtype == torch.float32


def test_expand_to_square_centres_like_llava():
    assert mean_colour() == (122, 116, 104)
    wide = Image.new("RGB", (5, 2), (255, 0, 0))
    square = expand_to_square(wide, (1, 2, 3))
    pixels = np.asarray(square)
    assert square.size == (5, 5)
    # (5 - 2) // 2 = 1 row of padding above, 2 below
    assert (pixels[0] == (1, 2, 3)).all() and (pixels[1:3] == (255, 0, 0)).all()
    assert (pixels[3:] == (1, 2, 3)).all()
    tall = expand_to_square(Image.new("RGB", (2, 5), (0, 255, 0)), (1, 2, 3))
    assert (np.asarray(tall)[:, 1:3] == (0, 255, 0)).all()
    assert expand_to_square(wide.resize((4, 4)), (0, 0, 0)).size == (4, 4)


def test_pad_and_crop_differ_as_specified():
    """A wide red image: pad shows mean-colour bands above and below, crop shows only red."""
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    pad = preprocess_images([image], mode="pad")[0]
    crop = preprocess_images([image], mode="crop")[0]
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    pad_colour = (torch.tensor((122, 116, 104)) / 255 - mean) / std
    red = (torch.tensor((1.0, 0.0, 0.0)) - mean) / std
    # the 200 x 200 square is resized to 336: the image covers rows 84..251
    band = pad[:, :80, :].reshape(3, -1)
    assert torch.allclose(band, pad_colour[:, None].expand_as(band), atol=1e-6)
    assert torch.allclose(pad[:, -80:, :].reshape(3, -1), band, atol=1e-6)
    middle = pad[:, 90:245, :].reshape(3, -1)
    assert torch.allclose(middle, red[:, None].expand_as(middle), atol=1e-6)
    assert torch.allclose(crop.reshape(3, -1), red[:, None].expand(3, 336 * 336), atol=1e-6)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "LA"])
def test_every_pil_mode_loads_as_rgb(tmp_path, mode):
    source = Image.new("RGB", (7, 5), (200, 100, 50))
    image = source.convert(mode)
    path = tmp_path / f"image-{mode}.png"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (7, 5)
    expected = np.asarray(image.convert("RGB"))
    assert (np.asarray(loaded) == expected).all()
    if mode in ("L", "LA"):
        assert (expected[..., 0] == expected[..., 1]).all()
    assert preprocess_images([loaded], size=14).shape == (1, 3, 14, 14)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(path)
    assert np.asarray(load_image(path))[0, 0].tolist() == [128, 128, 128]


def test_missing_and_corrupt_images_are_named(tmp_path):
    missing = tmp_path / "no-such" / "image.png"
    with pytest.raises(DataError, match="no-such/image.png"):
        load_image(missing)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DataError, match="corrupt.png"):
        load_image(corrupt)


def test_unknown_mode_names_the_flag():
    with pytest.raises(UsageError, match="--image-mode"):
        preprocess_images([_noise_image(4, 4)], mode="stretch")
