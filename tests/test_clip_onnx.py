"""CLIP encoders exported to ONNX: the export script, agreement with PyTorch, serving without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from engine_build.export_clip import main as export_main
from safejudge.backends.base import RelevanceEncoder
from PIL import Image

from safejudge.backends.clip_onnx import (
    CLIP_MAX_ASPECT,
    IMAGE_FILE,
    META_FILE,
    TEXT_FILE,
    TOKENIZER_FILE,
    OnnxClipEncoder,
)
from safejudge.backends.tiny import ensure_tiny_clip_onnx, ensure_tiny_model
from tests.hf_fixtures import ODD_SIZES, noise_image, odd_image

IMAGES = [noise_image(3), noise_image(4, height=120, width=40), noise_image(5, height=32, width=32)]
TEXTS = ["a person", "visible blood on the floor of a dark room", "fire"]


@pytest.fixture(scope="module")
def encoder() -> OnnxClipEncoder:
    return OnnxClipEncoder(ensure_tiny_clip_onnx(), threads=1)


def torch_embeddings(images, texts) -> tuple[np.ndarray, np.ndarray]:
    """The reference: transformers' CLIPModel with its own processor and tokenizer, L2-normalised."""
    source = ensure_tiny_model("clip")
    model = CLIPModel.from_pretrained(source).eval()
    pixel_values = AutoImageProcessor.from_pretrained(source)(images=images, return_tensors="pt")["pixel_values"]
    text = AutoTokenizer.from_pretrained(source)(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        image_embeds = model.get_image_features(pixel_values=pixel_values)
        text_embeds = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
    image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
    text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
    normalise = torch.nn.functional.normalize
    return normalise(image_embeds, dim=-1).numpy(), normalise(text_embeds, dim=-1).numpy()


def test_export_script_writes_encoders_checked_against_torch(tmp_path, capsys):
    out = tmp_path / "clip"
    assert export_main(["--model", str(ensure_tiny_model("clip")), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    diffs = [float(line.rsplit(" ", 1)[1]) for line in printed.splitlines() if "max abs diff" in line]
    assert len(diffs) == 2 and max(diffs) < 1e-3
    for name in (IMAGE_FILE, TEXT_FILE, TOKENIZER_FILE, META_FILE):
        assert (out / name).is_file()


def test_export_script_reports_a_missing_model(tmp_path, capsys):
    assert export_main(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 1
    assert "export failed" in capsys.readouterr().err


def test_onnx_embeddings_match_torch_clip(encoder):
    torch_images, torch_texts = torch_embeddings(IMAGES, TEXTS)
    np.testing.assert_allclose(encoder.embed_images(IMAGES), torch_images, atol=1e-4)
    np.testing.assert_allclose(encoder.embed_texts(TEXTS), torch_texts, atol=1e-4)


def test_a_long_image_matches_torch_clip_after_the_bounded_resize(encoder):
    # 12x600: past CLIP_MAX_ASPECT, yet small enough for the reference's unbounded 32x1600 resize.
    banners = [noise_image(6, height=12, width=600), noise_image(6, height=600, width=12)]
    torch_images, _ = torch_embeddings(banners, TEXTS[:1])
    np.testing.assert_allclose(encoder.embed_images(banners), torch_images, atol=1e-4)


@pytest.mark.parametrize("size", ODD_SIZES, ids=str)
def test_any_image_size_is_embedded_with_a_bounded_resize(encoder, size, monkeypatch):
    resized = []
    resize = Image.Image.resize

    def recording(self, new_size, *args, **kwargs):
        resized.append(new_size)
        return resize(self, new_size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    (embedding,) = encoder.embed_images([odd_image(size)])
    assert np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-5)
    edge = encoder.meta.resize_shortest_edge
    assert resized and max(w * h for w, h in resized) <= CLIP_MAX_ASPECT * edge * edge


def test_embeddings_are_unit_rows_and_tell_inputs_apart(encoder):
    assert isinstance(encoder, RelevanceEncoder)
    images, texts = encoder.embed_images(IMAGES), encoder.embed_texts(TEXTS)
    assert images.shape == (3, encoder.meta.embedding_dim) and texts.shape == (3, encoder.meta.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert np.abs(images[0] - images[1]).max() > 1e-3 and np.abs(texts[0] - texts[1]).max() > 1e-3
    # Padding must not change a text's embedding.
    np.testing.assert_allclose(encoder.embed_texts(TEXTS[:1])[0], texts[0], atol=1e-5)
    assert encoder.embed_images([]).shape == (0, encoder.meta.embedding_dim)
    assert encoder.embed_texts([]).shape == (0, encoder.meta.embedding_dim)


def test_a_directory_that_is_not_an_export_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="export_clip.py"):
        OnnxClipEncoder(tmp_path)


def test_serving_the_encoder_never_imports_torch():
    directory = ensure_tiny_clip_onnx()
    code = (
        "import sys\n"
        "from PIL import Image\n"
        "from safejudge.backends.registry import ModelSpec, load_relevance\n"
        f"encoder = load_relevance(ModelSpec(relevance={'onnx:' + str(directory)!r}, threads=1))\n"
        "encoder.embed_images([Image.new('RGB', (40, 30))]); encoder.embed_texts(['a person'])\n"
        "sys.exit(sorted({'torch', 'transformers'} & set(sys.modules)) or 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr or result.stdout
