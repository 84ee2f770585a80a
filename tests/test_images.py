"""Image decoding and validation with real Pillow encoders, and the Strategy 2 region operations."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from safejudge.backends.base import Detection
from safejudge.images import ImageError, box_area_fraction, crop_region, decode_image, remove_region


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient(width=64, height=48) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(x, (height, 1))] * 3, axis=-1), "RGB")


def noise(size=64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_accepted_formats_decode_to_rgb(fmt):
    image = decode_image(encode(gradient(), fmt))
    assert image.mode == "RGB" and image.size == (64, 48)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    image = decode_image(encode(gradient(64, 48), "JPEG", exif=exif))
    assert image.size == (48, 64)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    assert decode_image(encode(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "image is empty"),
        (b"definitely not an image", "cannot identify image file"),
        (encode(noise(), "PNG")[:2000], "truncated or corrupt"),
        (encode(Image.new("RGB", (4, 4)), "PNG"), "each side must be at least 8"),
        (encode(Image.new("1", (20_000, 100)), "PNG"), "the limit is"),
        (encode(gradient(), "ICO"), "format ICO is not accepted"),
    ],
)
def test_bad_images_are_rejected_with_a_reason(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_decompression_bomb_is_rejected_before_decoding():
    bomb = encode(Image.new("1", (9000, 9000)), "PNG")  # 81 Mpx in a few kB
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="pixels|bomb"):
        decode_image(bomb)


def test_remove_region_fills_only_the_box_with_the_mean_colour():
    image = gradient(100, 100)
    removed = np.asarray(remove_region(image, (10, 20, 30, 60)))
    original = np.asarray(image)
    assert (removed[20:60, 10:30] == original.reshape(-1, 3).mean(axis=0).round()).all()
    outside = np.ones(original.shape[:2], bool)
    outside[20:60, 10:30] = False
    assert (removed[outside] == original[outside]).all()


def test_crop_and_area_fraction_clamp_to_the_image():
    image = gradient(100, 100)
    assert crop_region(image, (90, 90, 150, 150)).size == (10, 10)
    assert box_area_fraction(image, Detection((0, 0, 10, 10), 0.9)) == pytest.approx(0.01)
