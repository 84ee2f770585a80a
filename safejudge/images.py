"""Image decoding, validation, fitting images to what a model accepts, and the region operations of
Strategy 2 (Pillow)."""

from __future__ import annotations

import hashlib
import io
import math
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from safejudge.backends.base import Detection

ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
DEFAULT_FRAMES = 8  # frames judged per image unless the caller says otherwise


class ImageLimits(BaseModel):
    """What decode_image accepts; every rejection names the field it broke."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_bytes: int = Field(20 * 1024 * 1024, ge=1, description="encoded size")
    max_pixels: int = Field(
        40_000_000, ge=1, description="per frame; decompression-bomb guard: far above any photo, far below a bomb"
    )
    max_side: int = Field(16_384, ge=1, description="per frame side")
    max_frames: int = Field(1_000, ge=1, description="frames (pages) in the file")


@dataclass(frozen=True)
class DecodedImage:
    frames: list[Image.Image]  # RGB, the sampled frames, in file order (one for a still image)
    frame_indices: list[int]  # index in the file of each sampled frame
    frame_count: int  # frames (pages) in the file
    format: str  # Pillow's format name, e.g. "GIF"


class ImageError(ValueError):
    """The submitted bytes are not an image this judge accepts; the message says why."""


def sample_frame_indices(frame_count: int, frames: int) -> list[int]:
    """Up to `frames` indices: the first, the last and evenly spaced between; sorted, unique."""
    if frame_count < 1 or frames < 1:
        raise ValueError(f"frame_count and frames must be at least 1, got {frame_count} and {frames}")
    if frame_count <= frames:
        return list(range(frame_count))
    if frames == 1:
        return [0]
    # The spacing exceeds 1, so rounding never merges two indices.
    return [round(i * (frame_count - 1) / (frames - 1)) for i in range(frames)]


def pixel_digest(image: Image.Image) -> bytes:
    """SHA-256 of an image's mode, size and pixels: equal only for images that look the same."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.digest()


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), frames: int = DEFAULT_FRAMES) -> DecodedImage:
    """Validate encoded image bytes and decode up to `frames` of its frames as RGB, as a viewer shows them.

    Still images come out upright per their EXIF orientation. Animations (GIF, APNG, WebP) and multi-page
    TIFFs yield the frames picked by sample_frame_indices, each composited as a viewer shows it (Pillow's
    seek() applies GIF/APNG disposal and blending). Transparent pixels are shown on white. An MPO (the
    multi-picture JPEG many phones write) is judged by its primary image only, the one viewers show, so its
    frame_count is 1. Only the sampled frames are size-checked and decoded, plus whatever Pillow decodes
    to composite them.
    """
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    if not data:
        raise ImageError("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes; the limit is {limits.max_bytes} (max_bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ALLOWED_FORMATS:
                raise ImageError(f"image format {image.format} is not accepted; use one of {sorted(ALLOWED_FORMATS)}")
            frame_count = 1 if image.format == "MPO" else getattr(image, "n_frames", 1)
            if frame_count > limits.max_frames:
                raise ImageError(f"image has {frame_count} frames; the limit is {limits.max_frames} (max_frames)")
            indices = sample_frame_indices(frame_count, frames)
            decoded = [_frame(image, index, frame_count, limits) for index in indices]
    except ImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageError(
            f"image rejected as a decompression bomb ({exc}); the limit is {limits.max_pixels} pixels (max_pixels)"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError("cannot identify image file: not a JPEG, PNG, WebP, GIF, BMP or TIFF") from exc
    # What Pillow's plugins raise on corrupt data; tests/test_fuzz.py found the less obvious ones: TypeError
    # (a TIFF page without dimensions), IndexError and struct.error (a GIF cut inside a frame's header).
    except (OSError, EOFError, SyntaxError, ValueError, TypeError, IndexError, struct.error) as exc:
        raise ImageError(f"image is truncated or corrupt: {exc}") from exc
    return DecodedImage(frames=decoded, frame_indices=indices, frame_count=frame_count, format=image.format)


def _frame(image: Image.Image, index: int, frame_count: int, limits: ImageLimits) -> Image.Image:
    """Frame `index` of the open image, size-checked before it is decoded, as RGB."""
    if frame_count > 1:
        image.seek(index)
    width, height = image.size
    name = "image" if frame_count == 1 else f"frame {index}"
    if width * height > limits.max_pixels:
        raise ImageError(f"{name} is {width}x{height} pixels; the limit is {limits.max_pixels} pixels (max_pixels)")
    if max(width, height) > limits.max_side:
        raise ImageError(f"{name} is {width}x{height} pixels; the limit is {limits.max_side} per side (max_side)")
    image.load()
    if frame_count == 1:
        ImageOps.exif_transpose(image, in_place=True)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels are shown on white by every viewer; judge what a person would see.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    # A still RGB image is returned as decoded (no copy); an animation's frame is copied, as the next seek()
    # overwrites it.
    return image if image.mode == "RGB" and frame_count == 1 else image.convert("RGB")


def conform(image: Image.Image, min_side: int = 1, max_aspect: float | None = None) -> Image.Image:
    """The image padded (centred, with its mean colour) so that long/short side <= max_aspect, then
    upscaled (bicubic) so that its short side >= min_side. Unchanged when it already fits."""
    width, height = image.size
    if max_aspect is not None and max(width, height) > max_aspect * min(width, height):
        # Padding rather than cropping keeps all of the content in view.
        short = math.ceil(max(width, height) / max_aspect)
        padded = (max(width, short), max(height, short))
        mean = tuple(int(round(c)) for c in np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0))
        canvas = Image.new("RGB", padded, mean)
        canvas.paste(image.convert("RGB"), ((padded[0] - width) // 2, (padded[1] - height) // 2))
        image, (width, height) = canvas, padded
    if min(width, height) < min_side:
        scale = min_side / min(width, height)
        size = (max(min_side, math.ceil(width * scale)), max(min_side, math.ceil(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image


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
    """The box inside the image, at least one pixel wide and high (an empty or outside box keeps the
    nearest pixel, so a crop never reaches past the image)."""
    left, top, right, bottom = box
    left, right = _span(left, right, image.width)
    top, bottom = _span(top, bottom, image.height)
    return left, top, right, bottom


def _span(start: int, end: int, size: int) -> tuple[int, int]:
    start, end = sorted((max(0, min(size, start)), max(0, min(size, end))))
    start = min(start, size - 1)
    return start, max(end, start + 1)
