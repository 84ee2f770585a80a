"""Image decoding, validation and the region operations of Strategy 2 (Pillow)."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from safejudge.backends.base import Detection

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
MAX_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000  # decompression-bomb guard: far above any photo, far below a bomb
MAX_SIDE = 16_384
MIN_SIDE = 8


from dataclasses import dataclass
from pydantic import BaseModel, ConfigDict

DEFAULT_FRAMES = 8


class ImageLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_bytes: int = MAX_BYTES
    max_pixels: int = MAX_PIXELS
    max_side: int = MAX_SIDE
    max_frames: int = 1000


@dataclass(frozen=True)
class DecodedImage:
    frames: list
    frame_indices: list
    frame_count: int
    format: str


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), frames: int = DEFAULT_FRAMES) -> DecodedImage:
    image = _decode_first(data)
    return DecodedImage([image], [0], 1, "?")


class ImageError(ValueError):
    """The submitted bytes are not an image this judge accepts; the message says why."""


def _decode_first(data: bytes) -> Image.Image:
    """Validate and decode encoded image bytes into an RGB image, upright per its EXIF orientation."""
    if not data:
        raise ImageError("image is empty (0 bytes)")
    if len(data) > MAX_BYTES:
        raise ImageError(f"image is {len(data)} bytes; the limit is {MAX_BYTES}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ALLOWED_FORMATS:
                raise ImageError(f"image format {image.format} is not accepted; use one of {sorted(ALLOWED_FORMATS)}")
            width, height = image.size
            if width * height > MAX_PIXELS or max(width, height) > MAX_SIDE:
                raise ImageError(f"image is {width}x{height} pixels; the limit is {MAX_PIXELS} pixels, {MAX_SIDE} per side")
            if min(width, height) < MIN_SIDE:
                raise ImageError(f"image is {width}x{height} pixels; each side must be at least {MIN_SIDE}")
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageError(f"image rejected as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError("cannot identify image file: not a JPEG, PNG, WebP, GIF, BMP or TIFF") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"image is truncated or corrupt: {exc}") from exc
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels are shown on white by every viewer; judge what a person would see.
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def box_area_fraction(image: Image.Image, detection: Detection) -> float:
    left, top, right, bottom = detection.box
    return max(0, right - left) * max(0, bottom - top) / float(image.width * image.height)


def remove_region(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The image with the box filled by the image's mean colour.

    Grey/mean fill rather than blur or inpainting: blur keeps the object's silhouette and colour, and
    inpainting needs another model; a flat fill removes the object's evidence and nothing else.
    """
    pixels = np.asarray(image, dtype=np.float32)
    left, top, right, bottom = _clamp(image, box)
    mean = pixels.reshape(-1, 3).mean(axis=0)
    out = pixels.copy()
    out[top:bottom, left:right] = mean
    return Image.fromarray(out.round().astype(np.uint8), "RGB")


def crop_region(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    return image.crop(_clamp(image, box))


def _clamp(image: Image.Image, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    left, top, right, bottom = box
    left, right = sorted((max(0, min(image.width, left)), max(0, min(image.width, right))))
    top, bottom = sorted((max(0, min(image.height, top)), max(0, min(image.height, bottom))))
    return left, top, max(right, left + 1), max(bottom, top + 1)
