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
# Formats whose frame k Pillow reaches only by decoding frames 0 .. k onto a canvas of the image's size:
# GifImagePlugin.seek() and PngImagePlugin.seek() (APNG) load every frame they pass to composite the next,
# WebPImagePlugin.load() calls WebPAnimDecoder.get_next() (a whole canvas) once per frame up to the one
# asked. TIFF pages (TiffImagePlugin.seek reads IFDs) and MPO images (MpoImagePlugin.seek reads the JPEG
# header at the image's offset) are reached through their headers alone.
SEQUENTIAL_FORMATS = frozenset({"GIF", "PNG", "WEBP"})


class ImageLimits(BaseModel):
    """What decode_image accepts; every rejection names the field it broke."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_bytes: int = Field(20 * 1024 * 1024, ge=1, description="encoded size")
    max_pixels: int = Field(
        40_000_000, ge=1, description="per frame; decompression-bomb guard: far above any photo, far below a bomb"
    )
    max_side: int = Field(16_384, ge=1, description="per frame side")
    # 1 G: 25 frames at the max_pixels maximum, so every default sample (8 frames) of a multi-page file of
    # 40 Mpx pages fits with room to spare; a 1080p animation judged up to its 480th frame (16 s at 30 fps);
    # a 480x360 GIF of 5,000 frames. About 1-2 s of one core for Pillow on the 2-core test machine (GIF 640,
    # APNG and WebP 1,600+ Mpx/s when frames change little, as in a small file with many large frames;
    # 70-120 Mpx/s on frames of noise, which the byte limit keeps few).
    max_decoded_pixels: int = Field(
        1_000_000_000,
        ge=1,
        description="pixels decoded to produce the sampled frames, checked before decoding: (last sampled index "
        "+ 1) x canvas for GIF, APNG and WebP (frame k is composited from frames 0 .. k), the sampled frames' "
        "areas summed for TIFF pages, MPO images and stills; the bound on the work of one image",
    )
    max_frames: int = Field(
        100_000, ge=1, description="frames (pages) in the file; a loose guard, max_decoded_pixels bounds the work"
    )


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

    Still images come out upright per their EXIF orientation. Animations (GIF, APNG, WebP), multi-page TIFFs
    and MPOs (the multi-picture JPEG many phones write; each image upright per its own EXIF) yield the
    frames picked by sample_frame_indices, each composited as a viewer shows it (Pillow's seek() applies
    GIF/APNG disposal and blending). Transparent pixels are shown on white. Every sampled frame is
    size-checked and the pixels Pillow must decode to produce them are counted against max_decoded_pixels
    before anything is decoded.
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
            frame_count = getattr(image, "n_frames", 1)
            if frame_count > limits.max_frames:
                raise ImageError(f"image has {frame_count} frames; the limit is {limits.max_frames} (max_frames)")
            indices = sample_frame_indices(frame_count, frames)
            spent = _check_before_decoding(image, indices, frame_count, limits)
            decoded = []
            for index in indices:
                if image.format in SEQUENTIAL_FORMATS:
                    spent = _step_to(image, index, spent, limits)
                decoded.append(_frame(image, index, frame_count, limits))
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


def _check_size(name: str, size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if width * height > limits.max_pixels:
        raise ImageError(f"{name} is {width}x{height} pixels; the limit is {limits.max_pixels} pixels (max_pixels)")
    if max(width, height) > limits.max_side:
        raise ImageError(f"{name} is {width}x{height} pixels; the limit is {limits.max_side} per side (max_side)")


def _check_before_decoding(image: Image.Image, indices: list[int], frame_count: int, limits: ImageLimits) -> int:
    """Refuse a sampled frame over max_pixels / max_side, or sampled frames whose decoding takes more than
    max_decoded_pixels, from the headers alone; the pixels the first frame's decoding takes."""
    name = "image" if frame_count == 1 else "frame 0"
    if image.format in SEQUENTIAL_FORMATS or frame_count == 1:
        # One canvas for every frame; reaching the last sampled frame decodes it and every frame before.
        _check_size(name, image.size, limits)
        area = image.width * image.height
        work, how = (indices[-1] + 1) * area, f"frames 0 to {indices[-1]} at {image.width}x{image.height}"
    else:
        areas = []
        for index in indices:
            image.seek(index)  # headers only (TIFF IFD, MPO image's JPEG header)
            _check_size(f"frame {index}", image.size, limits)
            areas.append(image.width * image.height)
        area, work, how = areas[0], sum(areas), f"{len(indices)} sampled frames of their own sizes"
    if work > limits.max_decoded_pixels:
        raise ImageError(
            f"image needs {work} decoded pixels ({how}); the limit is {limits.max_decoded_pixels} pixels "
            "(max_decoded_pixels)"
        )
    return area


def _step_to(image: Image.Image, index: int, spent: int, limits: ImageLimits) -> int:
    """Seek a GIF / APNG / WebP to frame `index` one frame at a time, counting the canvas each frame is
    decoded on; refuse before decoding a frame that takes the total past max_decoded_pixels. A GIF frame
    may reach past the screen its header declares (Pillow then grows the canvas), which the check before
    decoding cannot see. The new total."""
    while image.tell() < index:
        image.seek(image.tell() + 1)  # decodes the frame before, reads this one's header
        spent += image.width * image.height
        if spent > limits.max_decoded_pixels:
            raise ImageError(
                f"image needs more than {limits.max_decoded_pixels} decoded pixels (frames 0 to {image.tell()}, "
                f"canvas grown to {image.width}x{image.height}); the limit is {limits.max_decoded_pixels} pixels "
                "(max_decoded_pixels)"
            )
    return spent


def _frame(image: Image.Image, index: int, frame_count: int, limits: ImageLimits) -> Image.Image:
    """Frame `index` of the open image, size-checked before it is decoded, as RGB."""
    if frame_count > 1 and image.tell() != index:
        image.seek(index)
    _check_size("image" if frame_count == 1 else f"frame {index}", image.size, limits)
    image.load()
    if frame_count == 1:
        ImageOps.exif_transpose(image, in_place=True)
    elif image.format == "MPO":
        # Each image of an MPO is a JPEG with its own EXIF; a copy, as the file's state serves the next seek().
        image = ImageOps.exif_transpose(image)
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
