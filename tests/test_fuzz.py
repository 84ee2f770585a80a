"""Hypothesis fuzzing of the three parsers that read outside input: image bytes (decode_image), request
OPTIONS (parse_options) and constitution YAML (parse_constitution). Each must answer with its result or
its own error, never another exception, never a hang (the deadline).

CI runs a bounded number of examples per test (well under a minute in all); a longer run:
    SAFEJUDGE_FUZZ_EXAMPLES=20000 python -m pytest -q tests/test_fuzz.py
docs/reliability.md records the inputs tried, the counts and what the fuzzer found.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from safejudge.constitution import Constitution, ConstitutionError, Thresholds, parse_constitution
from safejudge.evaluators import JudgeOptions
from safejudge.images import ALLOWED_FORMATS, DecodedImage, ImageError, ImageLimits, decode_image
from safejudge.pipeline import InvalidRequest, parse_options

LONG_RUN = int(os.environ.get("SAFEJUDGE_FUZZ_EXAMPLES", "0"))
# Pillow warns (UserWarning "Corrupt EXIF data", "Truncated File Read") on much of what the fuzzer feeds it.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
# (input class, outcome) -> examples; a long run prints it (pytest -s) for docs/reliability.md.
OUTCOMES: Counter = Counter()


def outcome(kind: str, parse, result_type: type, error_type: type, prefix: str = "", by_message: bool = False):
    """parse()'s result, which must be a result_type, or None when it raised error_type with a message
    starting with prefix; any other exception fails the test. Tallies the outcome (the message's gist with
    by_message, else the type)."""
    try:
        result = parse()
    except error_type as exc:
        message = str(exc)
        assert message.startswith(prefix) and len(message) > len(prefix), message
        gist = re.sub(r"\d+", "N", re.split(r"[:;(]", message)[0]).strip() if by_message else error_type.__name__
        OUTCOMES[kind, gist] += 1
        return None
    assert isinstance(result, result_type), result
    OUTCOMES[kind, f"{result_type.__name__} {getattr(result, 'format', '')}".strip()] += 1
    return result


@pytest.fixture(scope="module", autouse=True)
def print_outcomes():
    yield
    if LONG_RUN:
        for (kind, outcome), count in sorted(OUTCOMES.items()):
            print(f"{kind}\t{outcome}\t{count}")


def fuzz(ci_examples: int):
    """Settings of one fuzz test: ci_examples in CI, SAFEJUDGE_FUZZ_EXAMPLES in a long run. The deadline
    is generous for a shared 2-core machine; a hang or a super-linear blow-up still exceeds it."""
    return settings(
        max_examples=LONG_RUN or ci_examples,
        deadline=timedelta(seconds=5),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- images ------------------------------------------------------------------------------------------

# Small limits keep each example fast; the generated images stay under them, mutations may not.
LIMITS = ImageLimits(
    max_bytes=256 * 1024, max_pixels=128 * 128, max_side=512, max_frames=24, max_decoded_pixels=24 * 128 * 128
)


def _save(frames: list[Image.Image], fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    extra = dict(save_all=True, append_images=frames[1:]) if len(frames) > 1 else {}
    frames[0].save(buffer, format=fmt, **extra, **kwargs)
    return buffer.getvalue()


def _picture(seed: int, size=(24, 16), mode="RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def _seeds() -> dict[str, bytes]:
    """One valid file per accepted format and feature: the starting points of the mutations."""
    orientation = Image.Exif()
    orientation[0x0112] = 6
    animation = [_picture(i) for i in range(5)]
    return {
        "jpeg": _save([_picture(0)], "JPEG", quality=80),
        "jpeg-exif": _save([_picture(1, (20, 12))], "JPEG", exif=orientation),
        "mpo": _save([_picture(2), _picture(3)], "MPO"),
        "png": _save([_picture(4)], "PNG"),
        "png-rgba": _save([_picture(5, mode="RGBA")], "PNG"),
        "png-palette": _save([_picture(6, mode="P")], "PNG", transparency=0),
        "apng": _save(animation, "PNG", duration=30),
        "webp": _save([_picture(7)], "WEBP", quality=70),
        "webp-animated": _save(animation, "WEBP", duration=30, lossless=True),
        "gif": _save([_picture(8, mode="P")], "GIF"),
        "gif-animated": _save(animation, "GIF", duration=30, disposal=2),
        "bmp": _save([_picture(9)], "BMP"),
        "tiff": _save([_picture(10)], "TIFF", compression="tiff_lzw"),
        "tiff-pages": _save([_picture(11), _picture(12, (8, 30), "L"), _picture(13, (40, 9), "RGBA")], "TIFF"),
    }


SEEDS = _seeds()
SEED_NAMES = sorted(SEEDS)
# The header bytes that make Pillow pick a decoder, so that random tails reach deep into each parser.
MAGIC = [
    b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBPVP8X", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
]  # fmt: skip


def check_decoding(kind: str, data: bytes, frames: int) -> None:
    """The property: a valid DecodedImage within the limits, or ImageError with a message."""
    decoded = outcome(kind, lambda: decode_image(data, LIMITS, frames), DecodedImage, ImageError, by_message=True)
    if decoded is None:
        return
    assert decoded.format in ALLOWED_FORMATS
    assert 1 <= decoded.frame_count <= LIMITS.max_frames
    assert 1 <= len(decoded.frames) == len(decoded.frame_indices) <= frames
    assert decoded.frame_indices == sorted(set(decoded.frame_indices))
    assert all(0 <= index < decoded.frame_count for index in decoded.frame_indices)
    for frame in decoded.frames:
        assert frame.mode == "RGB" and frame.width * frame.height <= LIMITS.max_pixels
        assert max(frame.size) <= LIMITS.max_side and min(frame.size) >= 1


def _flip_bits(data: bytes, positions: list[int]) -> bytes:
    out = bytearray(data)
    for position in positions:
        out[(position >> 3) % len(out)] ^= 1 << (position & 7)
    return bytes(out)


def _overwrite(data: bytes, offset: int, value: bytes) -> bytes:
    offset %= len(data)
    return data[:offset] + value + data[offset + len(value) :]


# A declared size, count or length: small, huge, or at an integer type's edge, in either byte order.
ABSURD = st.one_of(
    st.sampled_from([0, 1, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]),
    st.integers(0, 0xFFFFFFFF),
).flatmap(
    lambda n: st.sampled_from(
        [struct.pack(order + width, n & mask) for order in "<>" for width, mask in (("I", 0xFFFFFFFF), ("H", 0xFFFF))]
    )
)


@st.composite
def mutated_images(draw) -> bytes:
    data = SEEDS[draw(st.sampled_from(SEED_NAMES))]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "splice", "absurd", "insert", "delete"]))
        if kind == "flip":
            data = _flip_bits(data, draw(st.lists(st.integers(0, 8 * len(data) - 1), min_size=1, max_size=8)))
        elif kind == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif kind == "splice":  # one format's header on another's body
            head = SEEDS[draw(st.sampled_from(SEED_NAMES))]
            cut = draw(st.integers(0, min(len(head), len(data))))
            data = head[:cut] + data[cut:]
        elif kind == "absurd":  # mostly in the headers, where sizes and counts are declared
            offset = draw(st.one_of(st.integers(0, 64), st.integers(0, len(data))))
            data = _overwrite(data, offset, draw(ABSURD))
        elif kind == "insert":
            offset = draw(st.integers(0, len(data)))
            data = data[:offset] + draw(st.binary(min_size=1, max_size=64)) + data[offset:]
        else:
            start = draw(st.integers(0, len(data)))
            data = data[:start] + data[start + draw(st.integers(1, 64)) :]
        if not data:
            break
    return data


@st.composite
def many_frames(draw) -> bytes:
    """Animations and page stacks of up to twice LIMITS.max_frames frames, of tiny or uneven sizes."""
    fmt = draw(st.sampled_from(["GIF", "PNG", "WEBP", "TIFF"]))
    count = draw(st.integers(1, 2 * LIMITS.max_frames))
    sizes = st.tuples(st.integers(1, 40), st.integers(1, 40))
    size = draw(sizes)
    frames = [_picture(i, draw(sizes) if fmt == "TIFF" else size) for i in range(count)]
    options = {"TIFF": {}, "WEBP": dict(lossless=True)}.get(fmt, dict(duration=20))
    return _save(frames, fmt, **options)


@fuzz(300)
@given(data=st.binary(max_size=4096), frames=st.integers(1, 12))
def test_random_bytes_decode_or_raise_image_error(data, frames):
    check_decoding("random bytes", data, frames)


@fuzz(300)
@given(magic=st.sampled_from(MAGIC), tail=st.binary(max_size=2048), frames=st.integers(1, 12))
def test_random_bytes_behind_a_format_header_decode_or_raise_image_error(magic, tail, frames):
    check_decoding("format header + random bytes", magic + tail, frames)


@fuzz(600)
@given(data=mutated_images(), frames=st.integers(1, 12))
def test_mutated_images_decode_or_raise_image_error(data, frames):
    check_decoding("mutated images", data, frames)


@fuzz(60)
@given(data=many_frames(), frames=st.integers(1, 12))
def test_many_frames_decode_or_raise_image_error(data, frames):
    check_decoding("many frames", data, frames)


@pytest.mark.parametrize("name", SEED_NAMES)
def test_every_seed_is_a_valid_image(name):
    """The mutations start from images that decode; otherwise the fuzzer would test nothing but errors."""
    decoded = decode_image(SEEDS[name], LIMITS)
    assert decoded.frames


# -- OPTIONS -----------------------------------------------------------------------------------------

JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
OPTION_KEYS = [*JudgeOptions.model_fields, "bogus"]
THRESHOLD_KEYS = [*Thresholds.model_fields, "bogus"]
# Objects shaped like OPTIONS, so that values reach every field's validator.
NEAR_OPTIONS = st.dictionaries(
    st.sampled_from(OPTION_KEYS),
    st.one_of(JSON_VALUES, st.dictionaries(st.sampled_from(THRESHOLD_KEYS), JSON_SCALARS, max_size=4)),
    max_size=5,
)


def check_options(kind: str, raw: bytes | None) -> None:
    outcome(kind, lambda: parse_options(raw), JudgeOptions, InvalidRequest, "OPTIONS is not valid JudgeOptions JSON: ")


@fuzz(300)
@given(value=st.one_of(JSON_VALUES, NEAR_OPTIONS))
def test_options_json_values_parse_or_raise_invalid_request(value):
    check_options("OPTIONS JSON values", json.dumps(value).encode())  # json.dumps writes NaN, Infinity bare


@fuzz(200)
@given(raw=st.one_of(st.none(), st.binary(max_size=256), st.text(max_size=256).map(str.encode)))
def test_options_bytes_and_text_parse_or_raise_invalid_request(raw):
    check_options("OPTIONS bytes and text", raw)


# -- constitutions -----------------------------------------------------------------------------------

SHIPPED = sorted((Path(__file__).resolve().parents[1] / "constitutions").glob("*.yaml"))
SHIPPED_TEXT = {path.name: path.read_text(encoding="utf-8") for path in SHIPPED}
SHIPPED_DATA = {name: yaml.safe_load(text) for name, text in SHIPPED_TEXT.items()}
CONSTITUTION_KEYS = [
    *Constitution.model_fields,
    "id", "title", "category", "text", "preconditions", "central_object", "severity", "beta",
]  # fmt: skip
YAML_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30), st.sampled_from(CONSTITUTION_KEYS)
)
YAML_VALUES = st.recursive(
    YAML_SCALARS,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.one_of(st.sampled_from(CONSTITUTION_KEYS), st.text(max_size=10)), children, max_size=5),
    max_leaves=30,
)


def check_constitution(kind: str, text: str) -> None:
    outcome(kind, lambda: parse_constitution(text, source="fuzz.yaml"), Constitution, ConstitutionError, "fuzz.yaml:")


def _paths(value, path=()):
    """Every (path, value) inside nested dicts and lists."""
    yield path, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _paths(child, (*path, key))


@st.composite
def mutated_constitution_data(draw):
    """A shipped constitution with some values replaced, deleted or duplicated."""
    data = json.loads(json.dumps(SHIPPED_DATA[draw(st.sampled_from(sorted(SHIPPED_DATA)))]))
    for _ in range(draw(st.integers(1, 4))):
        paths = [path for path, _ in _paths(data) if path]
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "duplicate"]))
        if action == "replace":
            parent[path[-1]] = draw(YAML_VALUES)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, list):
            parent.append(parent[path[-1]])
        else:
            parent[draw(st.sampled_from(CONSTITUTION_KEYS))] = parent[path[-1]]
    return data


@st.composite
def mutated_constitution_text(draw) -> str:
    """A shipped constitution's text with lines dropped or repeated, characters changed, or cut short."""
    lines = SHIPPED_TEXT[draw(st.sampled_from(sorted(SHIPPED_TEXT)))].splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["drop", "repeat", "change", "cut"]))
        if action == "drop" and len(lines) > 1:
            del lines[index]
        elif action == "repeat":
            lines.insert(index, lines[index])
        elif action == "change":
            line = lines[index]
            at = draw(st.integers(0, len(line)))
            lines[index] = line[:at] + draw(st.text(max_size=4)) + line[at + 1 :]
        elif action == "cut":
            lines = lines[:index] + [lines[index][: draw(st.integers(0, len(lines[index])))]]
    return "".join(lines)


@st.composite
def alias_chains(draw) -> str:
    """Anchors whose aliases multiply ("billion laughs"), placed where a constitution's lists go."""
    width, depth = draw(st.integers(1, 12)), draw(st.integers(1, 9))
    lines = ["name: laughs", "version: 1", f"a0: &a0 [{', '.join(['A person is visible'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
    lines += ["rules:", f"  - {{id: r, title: t, category: c, text: t, preconditions: *a{depth - 1}}}"]
    return "\n".join(lines)


@fuzz(200)
@given(value=YAML_VALUES)
def test_random_yaml_documents_load_or_raise_constitution_error(value):
    check_constitution("random YAML documents", yaml.safe_dump(value))


@fuzz(100)
@given(data=mutated_constitution_data())
def test_mutated_constitution_values_load_or_raise_constitution_error(data):
    check_constitution("mutated constitution values", yaml.safe_dump(data, sort_keys=False))


@fuzz(100)
@given(text=mutated_constitution_text())
def test_mutated_constitution_text_loads_or_raises_constitution_error(text):
    check_constitution("mutated constitution text", text)


@fuzz(100)
@given(text=st.one_of(st.text(max_size=300), alias_chains(), st.integers(1, 2000).map(lambda n: "[" * n + "]" * n)))
def test_random_text_aliases_and_deep_nesting_load_or_raise_constitution_error(text):
    check_constitution("random text, alias chains, deep nesting", text)
