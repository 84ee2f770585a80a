"""Image decoding and validation with real Pillow encoders (stills, animations, multi-page, MPO), frame
sampling, limits, fitting images to a model (conform), and the Strategy 2 region operations."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile, WebPImagePlugin
from pydantic import ValidationError

from safejudge.backends.base import Detection
from safejudge.images import (
    DEFAULT_FRAMES,
    DecodedImage,
    ImageError,
    ImageLimits,
    box_area_fraction,
    conform,
    crop_region,
    decode_image,
    remove_region,
    sample_frame_indices,
)

BLUE, RED = (0, 0, 255), (255, 0, 0)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def encode_frames(frames: list[Image.Image], fmt: str, **kwargs) -> bytes:
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], **kwargs)


def gradient(width=64, height=48) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(x, (height, 1))] * 3, axis=-1), "RGB")


def noise(size=64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def animation(count=6, red_from=3, size=(40, 30)) -> list[Image.Image]:
    """Blue frames, each marked at its top-left pixel with its index; from `red_from` on a red square.

    The encoders store later frames as the small rectangles that changed, so a decoder that does not
    composite shows the square (or the marker) without the blue around it."""
    frames = []
    for index in range(count):
        frame = Image.new("RGB", size, BLUE)
        frame.putpixel((0, 0), (0, 12 * index, 255))
        if index >= red_from:
            ImageDraw.Draw(frame).rectangle((10, 10, 20, 20), fill=RED)
        frames.append(frame)
    return frames


ANIMATED = {
    "GIF": dict(duration=40),
    "PNG": dict(duration=40),  # APNG
    "WEBP": dict(duration=40, lossless=True),
}


def long_gif(count: int = 3000, size: int = 64) -> bytes:
    """A GIF of `count` frames of size x size: blue, with one red pixel at (i % size, i // size) in frame i
    (Pillow stores each frame as the rectangle that changed)."""
    frames = []
    for index in range(count):
        frame = Image.new("P", (size, size), 0)
        frame.putpalette([*BLUE, *RED])
        frame.putpixel((index % size, index // size), 1)
        frames.append(frame)
    return encode_frames(frames, "GIF", duration=20)


def marker(index: int, size: int = 64) -> tuple[int, int]:
    return index % size, index // size


def _gif_pixels(width: int, height: int) -> bytes:
    """The image data (LZW code size, sub-blocks, terminator) of a width x height GIF frame of colour 0."""
    data = encode(Image.new("P", (width, height), 0), "GIF")
    position = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # header, screen, colour table
    while data[position : position + 1] == b"!":  # extension: label, then sub-blocks up to an empty one
        position += 2
        while data[position]:
            position += data[position] + 1
        position += 1
    assert data[position : position + 1] == b",", "an image descriptor"
    flags = data[position + 9]
    position += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    return data[position:-1]  # up to the trailer


def gif_of_extents(screen: tuple[int, int], extents: list[tuple[int, int, int, int]]) -> bytes:
    """A GIF written by hand: a logical screen of `screen` pixels and one blue frame per (left, top, width,
    height) extent. Frames may be much smaller than the screen (a few bytes each), or reach past it."""
    parts = [b"GIF89a", struct.pack("<HHBBB", *screen, 0x80, 0, 0), bytes([*BLUE, *RED])]
    for left, top, width, height in extents:
        parts += [b",", struct.pack("<HHHHB", left, top, width, height, 0), _gif_pixels(width, height)]
    return b"".join([*parts, b";"])


def single(data: bytes, **kwargs) -> Image.Image:
    decoded = decode_image(data, **kwargs)
    assert decoded.frame_count == 1 and decoded.frame_indices == [0] and len(decoded.frames) == 1
    return decoded.frames[0]


# -- stills ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_accepted_formats_decode_to_rgb(fmt):
    decoded = decode_image(encode(gradient(), fmt))
    assert isinstance(decoded, DecodedImage) and decoded.format == fmt
    image = single(encode(gradient(), fmt))
    assert image.mode == "RGB" and image.size == (64, 48)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    assert single(encode(gradient(64, 48), "JPEG", exif=exif)).size == (48, 64)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    assert single(encode(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_mpo_is_judged_on_each_of_its_images():
    first, second = Image.new("RGB", (32, 24), RED), Image.new("RGB", (20, 40), BLUE)
    data = encode_frames([first, second], "MPO")
    assert Image.open(io.BytesIO(data)).format == "MPO"
    decoded = decode_image(data)
    assert decoded.format == "MPO" and decoded.frame_count == 2 and decoded.frame_indices == [0, 1]
    assert [frame.size for frame in decoded.frames] == [(32, 24), (20, 40)]
    assert [frame.mode for frame in decoded.frames] == ["RGB", "RGB"]
    (r0, g0, b0), (r1, g1, b1) = (frame.getpixel((5, 5)) for frame in decoded.frames)
    assert r0 > 240 and g0 < 15 and b0 < 15, "the first image is the red one"  # JPEG rounding
    assert r1 < 15 and g1 < 15 and b1 > 240, "the second image is the blue one"
    assert decode_image(data, frames=1).frame_indices == [0], "sampled like any multi-frame file"


def test_mpo_images_are_upright_per_their_own_exif():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encode_frames([gradient(64, 48), gradient(64, 48)], "MPO", exif=exif)
    # Pillow's MPO writer gives every image the first one's EXIF: turn the second image's into 8 (rotate 90°
    # counter-clockwise), the same length, so the file's offsets still hold.
    orientation_6 = b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06"  # tag 0x0112, SHORT, count 1, value 6 (MM)
    assert data.count(orientation_6) == 2
    second = data.rindex(orientation_6) + len(orientation_6) - 1
    data = data[:second] + b"\x08" + data[second + 1 :]
    decoded = decode_image(data)
    assert [frame.size for frame in decoded.frames] == [(48, 64), (48, 64)]
    first, second = (np.asarray(frame, dtype=int)[:, 24, 0] for frame in decoded.frames)
    assert first[0] < 20 and first[-1] > 235, "rotated clockwise: the dark left edge is on top"
    assert second[0] > 235 and second[-1] < 20, "rotated counter-clockwise: the dark left edge is at the bottom"


@pytest.mark.parametrize("size", [(1, 1), (3, 3), (4000, 2), (2, 4000)])
def test_every_valid_size_decodes(size):
    image = single(encode(Image.new("RGB", size, RED), "PNG"))
    assert image.size == size and image.getpixel((0, 0)) == RED


# -- animations and pages ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(ANIMATED))
def test_animation_frames_are_composited_as_a_viewer_shows_them(fmt):
    decoded = decode_image(encode_frames(animation(), fmt, **ANIMATED[fmt]))
    assert decoded.format == fmt and decoded.frame_count == 6 and decoded.frame_indices == list(range(6))
    for index, frame in enumerate(decoded.frames):
        assert frame.mode == "RGB" and frame.size == (40, 30)
        assert frame.getpixel((0, 0)) == (0, 12 * index, 255), "each frame is the one at its index"
        assert frame.getpixel((30, 25)) == BLUE, "unchanged pixels come from the frames before"
        assert frame.getpixel((15, 15)) == (RED if index >= 3 else BLUE)


@pytest.mark.parametrize("fmt", sorted(ANIMATED))
def test_a_sampled_animation_keeps_first_last_and_the_frames_between(fmt):
    decoded = decode_image(encode_frames(animation(count=11, red_from=10), fmt, **ANIMATED[fmt]), frames=3)
    assert decoded.frame_count == 11 and decoded.frame_indices == [0, 5, 10]
    assert [frame.getpixel((0, 0)) for frame in decoded.frames] == [(0, 12 * i, 255) for i in (0, 5, 10)]
    assert decoded.frames[-1].getpixel((15, 15)) == RED, "the red square appears only in the last frame"


def test_animated_transparency_is_shown_on_white():
    frames = [Image.new("RGBA", (20, 20), (*BLUE, 255)), Image.new("RGBA", (20, 20), (0, 0, 0, 0))]
    # blend 0 (APNG_BLEND_OP_SOURCE): the second frame replaces the first, transparent pixels included.
    decoded = decode_image(encode_frames(frames, "PNG", blend=0, disposal=0))
    assert [frame.getpixel((5, 5)) for frame in decoded.frames] == [BLUE, (255, 255, 255)]


def test_multi_page_tiff_pages_of_different_sizes_and_modes():
    pages = [Image.new("RGB", (10, 8), RED), Image.new("L", (30, 20), 200), Image.new("RGBA", (5, 50), (*BLUE, 0))]
    decoded = decode_image(encode_frames(pages, "TIFF"))
    assert decoded.format == "TIFF" and decoded.frame_count == 3 and decoded.frame_indices == [0, 1, 2]
    assert [frame.size for frame in decoded.frames] == [(10, 8), (30, 20), (5, 50)]
    assert [frame.getpixel((1, 1)) for frame in decoded.frames] == [RED, (200, 200, 200), (255, 255, 255)]


def test_default_and_invalid_frame_counts():
    decoded = decode_image(encode_frames(animation(count=20, red_from=20), "GIF"))
    assert len(decoded.frames) == DEFAULT_FRAMES and decoded.frame_indices[0] == 0 and decoded.frame_indices[-1] == 19
    with pytest.raises(ValueError, match="frames must be at least 1, got 0"):
        decode_image(encode(gradient(), "PNG"), frames=0)


def test_a_long_animation_of_small_frames_is_judged_by_its_sampled_frames():
    data = long_gif()
    assert len(data) < 200_000
    decoded = decode_image(data)
    assert decoded.format == "GIF" and decoded.frame_count == 3000
    assert decoded.frame_indices == sample_frame_indices(3000, DEFAULT_FRAMES) and len(decoded.frames) == 8
    for index, frame in zip(decoded.frame_indices, decoded.frames):
        assert frame.size == (64, 64) and frame.getpixel(marker(index)) == RED, f"frame {index} is frame {index}"
        if index:
            assert frame.getpixel(marker(index - 1)) == BLUE


def refuse_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, any pixel decoding fails the test (Pillow decodes in ImageFile.load, WebP in its own)."""

    def decoded(*args, **kwargs):
        raise AssertionError("pixels were decoded before the image was refused")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)
    monkeypatch.setattr(WebPImagePlugin.WebPImageFile, "load", decoded)


@pytest.mark.parametrize("fmt", sorted(ANIMATED))
def test_an_animation_whose_decoding_exceeds_the_budget_is_refused_before_decoding(fmt, monkeypatch):
    data = encode_frames(animation(count=11), fmt, **ANIMATED[fmt])
    # Reaching frame 10 decodes frames 0 to 10 on a 40x30 canvas: 11 x 1200 pixels, however few are judged.
    assert decode_image(data, ImageLimits(max_decoded_pixels=13_200), frames=2).frame_indices == [0, 10]
    assert decode_image(data, ImageLimits(max_decoded_pixels=1_200), frames=1).frame_indices == [0]
    refuse_decoding(monkeypatch)
    with pytest.raises(
        ImageError,
        match=r"^image needs 13200 decoded pixels \(frames 0 to 10 at 40x30\); "
        r"the limit is 13199 pixels \(max_decoded_pixels\)$",
    ):
        decode_image(data, ImageLimits(max_decoded_pixels=13_199), frames=2)


@pytest.mark.parametrize("fmt", ["TIFF", "MPO"])
def test_pages_and_mpo_images_count_only_the_sampled_frames(fmt, monkeypatch):
    """TIFF pages and MPO images are reached through their headers: only the sampled ones are decoded."""
    data = encode_frames([Image.new("RGB", size, RED) for size in [(10, 8), (30, 20), (5, 50)]], fmt)
    assert decode_image(data, ImageLimits(max_decoded_pixels=80 + 600 + 250)).frame_count == 3
    assert decode_image(data, ImageLimits(max_decoded_pixels=80 + 250), frames=2).frame_indices == [0, 2]
    refuse_decoding(monkeypatch)
    with pytest.raises(
        ImageError,
        match=r"^image needs 930 decoded pixels \(3 sampled frames of their own sizes\); "
        r"the limit is 929 pixels \(max_decoded_pixels\)$",
    ):
        decode_image(data, ImageLimits(max_decoded_pixels=929))


def test_a_gif_whose_frames_grow_its_canvas_is_stopped_within_the_budget():
    """The header declares a 1x1 screen; Pillow grows the canvas to 100x100 for the frames that reach past
    it, so each later frame costs 10,000 pixels, which the check before decoding cannot see."""
    data = gif_of_extents((1, 1), [(0, 0, 1, 1)] + [(0, 0, 100, 100)] * 9)
    decoded = decode_image(data, ImageLimits(max_decoded_pixels=1 + 9 * 10_000))
    assert decoded.frame_count == 10 and decoded.frames[-1].size == (100, 100)
    with pytest.raises(
        ImageError,
        match=r"^image needs more than 50000 decoded pixels \(frames 0 to 5, canvas grown to 100x100\); "
        r"the limit is 50000 pixels \(max_decoded_pixels\)$",
    ):
        decode_image(data, ImageLimits(max_decoded_pixels=50_000))


def test_the_default_budget_refuses_a_few_hundred_bytes_of_large_empty_frames(monkeypatch):
    """What the served test sends: a 4000x4000 screen (16 M pixels, within max_pixels) and 1x1 frames."""
    default = ImageLimits()
    count = default.max_decoded_pixels // (4000 * 4000) + 1
    data = gif_of_extents((4000, 4000), [(0, 0, 1, 1)] * count)
    assert len(data) < 2000 and count <= default.max_frames
    refuse_decoding(monkeypatch)
    with pytest.raises(ImageError, match=rf"\(frames 0 to {count - 1} at 4000x4000\);.*\(max_decoded_pixels\)$"):
        decode_image(data)


@pytest.mark.parametrize(
    "frame_count, frames, expected",
    [
        (1, 8, [0]),
        (5, 8, [0, 1, 2, 3, 4]),
        (8, 8, list(range(8))),
        (9, 1, [0]),
        (9, 2, [0, 8]),
        (11, 3, [0, 5, 10]),
        (10, 4, [0, 3, 6, 9]),
    ],
)
def test_sample_frame_indices(frame_count, frames, expected):
    assert sample_frame_indices(frame_count, frames) == expected


@pytest.mark.parametrize("frame_count", [2, 7, 9, 100, 999, 1000])
@pytest.mark.parametrize("frames", [1, 2, 3, 8, 50])
def test_sampled_indices_are_sorted_unique_and_span_the_file(frame_count, frames):
    indices = sample_frame_indices(frame_count, frames)
    assert len(indices) == min(frames, frame_count)
    assert indices == sorted(set(indices)) and indices[0] == 0 and 0 <= indices[-1] < frame_count
    if frames > 1:
        assert indices[-1] == frame_count - 1
        gaps = np.diff(indices)
        assert gaps.max() - gaps.min() <= 1, "evenly spaced"


def test_sampling_refuses_counts_below_one():
    with pytest.raises(ValueError, match="at least 1"):
        sample_frame_indices(0, 8)
    with pytest.raises(ValueError, match="at least 1"):
        sample_frame_indices(5, 0)


# -- rejections --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, limits, message",
    [
        (b"", ImageLimits(), r"^image is empty \(0 bytes\)$"),
        (b"definitely not an image", ImageLimits(), "^cannot identify image file"),
        (encode(noise(), "PNG")[:2000], ImageLimits(), "^image is truncated or corrupt"),
        (encode(gradient(), "ICO"), ImageLimits(), "format ICO is not accepted"),
        (
            encode(gradient(), "PNG"),
            ImageLimits(max_bytes=100),
            r"^image is \d+ bytes; the limit is 100 \(max_bytes\)$",
        ),
        (
            encode(Image.new("1", (20_000, 100)), "PNG"),
            ImageLimits(),
            r"^image is 20000x100 pixels; the limit is 16384 per side \(max_side\)$",
        ),
        (
            encode(gradient(), "PNG"),
            ImageLimits(max_pixels=3000),
            r"^image is 64x48 pixels; the limit is 3000 pixels \(max_pixels\)$",
        ),
        (
            encode_frames([Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)), Image.new("RGB", (60, 50))], "TIFF"),
            ImageLimits(max_pixels=2000),
            r"^frame 2 is 60x50 pixels; the limit is 2000 pixels \(max_pixels\)$",
        ),
        (
            encode_frames(animation(count=5), "GIF"),
            ImageLimits(max_frames=4),
            r"^image has 5 frames; the limit is 4 \(max_frames\)$",
        ),
    ],
    ids=["empty", "garbage", "truncated", "ico", "bytes", "side", "pixels", "page-pixels", "frames"],
)
def test_bad_images_are_rejected_naming_the_problem_and_the_limit(data, limits, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data, limits)


def test_decompression_bomb_is_rejected_before_decoding():
    bomb = encode(Image.new("1", (9000, 9000)), "PNG")  # 81 Mpx in a few kB
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match=r"9000x9000 pixels; the limit is 40000000 pixels \(max_pixels\)"):
        decode_image(bomb)


def test_a_bomb_beyond_pillows_own_guard_still_names_the_limit():
    bomb = encode(Image.new("1", (16_000, 12_000)), "PNG")  # 192 Mpx: Pillow refuses it while opening
    with pytest.raises(ImageError, match=r"decompression bomb.*the limit is 40000000 pixels \(max_pixels\)"):
        decode_image(bomb, ImageLimits(max_side=20_000))


def test_limits_are_validated_frozen_and_closed():
    assert ImageLimits().max_bytes == 20 * 1024 * 1024
    assert ImageLimits().max_decoded_pixels >= 8 * ImageLimits().max_pixels, "8 frames of the largest size"
    with pytest.raises(ValidationError, match="max_frames"):
        ImageLimits(max_frames=0)
    with pytest.raises(ValidationError, match="max_decoded_pixels"):
        ImageLimits(max_decoded_pixels=0)
    with pytest.raises(ValidationError, match="max_pixel"):
        ImageLimits(max_pixel=5)
    with pytest.raises(ValidationError, match="frozen"):
        ImageLimits().max_side = 5


# -- conform -----------------------------------------------------------------------------------------


def test_conform_leaves_fitting_images_alone():
    image = gradient(64, 48)
    assert conform(image) is image
    assert conform(image, min_side=48, max_aspect=64 / 48) is image


def test_conform_pads_an_extreme_aspect_centred_with_the_mean_colour():
    banner = Image.new("RGB", (4000, 2), (100, 0, 0))
    banner.paste((200, 0, 0), (0, 0, 2000, 2))  # mean colour (150, 0, 0)
    padded = conform(banner, max_aspect=200)
    assert padded.size == (4000, 20)
    pixels = np.asarray(padded)
    assert (pixels[9:11] == np.asarray(banner)).all(), "the banner sits in the middle, unchanged"
    assert (pixels[:9] == (150, 0, 0)).all() and (pixels[11:] == (150, 0, 0)).all()
    assert conform(banner.transpose(Image.Transpose.TRANSPOSE), max_aspect=200).size == (20, 4000)


def test_conform_upscales_the_short_side():
    assert conform(Image.new("RGB", (1, 1), RED), min_side=28).size == (28, 28)
    upscaled = conform(Image.new("RGB", (3, 9), RED), min_side=6)
    assert upscaled.size == (6, 18) and upscaled.getpixel((3, 9)) == RED
    both = conform(Image.new("RGB", (1, 300), RED), min_side=4, max_aspect=100)
    assert both.size == (4, 400)


# -- Strategy 2 regions ------------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    "size, box, expected",
    [
        ((1, 1), (0, 0, 1, 1), (0, 0, 1, 1)),
        ((1, 1), (0, 0, 0, 0), (0, 0, 1, 1)),
        ((3, 3), (3, 3, 9, 9), (2, 2, 3, 3)),  # outside: the nearest pixel, never past the image
        ((3, 3), (-5, 1, -1, 1), (0, 1, 1, 2)),
        ((4000, 2), (10, 0, 10, 2), (10, 0, 11, 2)),
    ],
)
def test_regions_of_tiny_images_and_boxes_stay_inside(size, box, expected):
    values = np.arange(size[0] * size[1] * 3) % 251  # distinct neighbours, so a shifted crop shows
    image = Image.fromarray(values.reshape(size[1], size[0], 3).astype(np.uint8))
    left, top, right, bottom = expected
    assert np.array_equal(np.asarray(crop_region(image, box)), np.asarray(image)[top:bottom, left:right])
    removed = np.asarray(remove_region(image, box))
    changed = np.any(removed != np.asarray(image), axis=-1)
    assert not changed[:top].any() and not changed[bottom:].any()
    assert not changed[:, :left].any() and not changed[:, right:].any()
