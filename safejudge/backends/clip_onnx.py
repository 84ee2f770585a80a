"""CLIP image and text encoders exported to ONNX, served with ONNX Runtime only (no torch at serving).

An export directory holds image.onnx, text.onnx, the tokenizer (tokenizer.json, read with `tokenizers`)
and clip_onnx.json: the preprocessing numbers taken from the Hugging Face processor at export time, so
serving needs neither transformers nor torch. `export_clip` (engine_build/export_clip.py) writes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from safejudge.fingerprint import content_digest

META_FILE = "clip_onnx.json"
IMAGE_FILE = "image.onnx"
TEXT_FILE = "text.onnx"
TOKENIZER_FILE = "tokenizer.json"
EXPORT_FILES = (META_FILE, IMAGE_FILE, TEXT_FILE, TOKENIZER_FILE)  # all an export is; its fingerprint hashes them
# Only the middle of the shortest-edge resize survives the centre crop (a square's worth in every CLIP
# config); cutting a longer source down to this long/short ratio first keeps that middle and bounds the
# resize, which would otherwise make a 2x4000 banner 224x448000 pixels.
CLIP_MAX_ASPECT = 4
# ONNX Runtime and PyTorch order float sums differently; more than this is an export bug, not rounding.
EXPORT_TOLERANCE = 1e-3


class ClipOnnxMeta(BaseModel):
    """How to feed the exported encoders: CLIP's resize / centre-crop / normalise, and text limits."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="the model the encoders were exported from")
    resize_shortest_edge: int = Field(gt=0)
    crop_height: int = Field(gt=0)
    crop_width: int = Field(gt=0)
    resample: int = Field(description="PIL resampling filter, e.g. 3 = bicubic")
    rescale_factor: float
    image_mean: list[float] = Field(min_length=3, max_length=3)
    image_std: list[float] = Field(min_length=3, max_length=3)
    max_text_tokens: int = Field(gt=1)
    pad_token_id: int = Field(ge=0)
    embedding_dim: int = Field(gt=0)


def _l2_normalise(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


def _centre_crop_aspect(image: Image.Image, max_aspect: float) -> Image.Image:
    width, height = image.size
    long = math.floor(max_aspect * min(width, height))
    if width > long:
        return image.crop(((width - long) // 2, 0, (width - long) // 2 + long, height))
    if height > long:
        return image.crop((0, (height - long) // 2, width, (height - long) // 2 + long))
    return image


class OnnxClipEncoder:
    """RelevanceEncoder on two ONNX Runtime sessions; embeddings are L2-normalised rows."""

    def __init__(self, directory: str | Path, threads: int | None = None, model_id: str | None = None):
        import onnxruntime
        from tokenizers import Tokenizer

        directory = Path(directory)
        missing = [name for name in EXPORT_FILES if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{directory} is not a CLIP ONNX export (missing {', '.join(missing)}); "
                "make one with `python engine_build/export_clip.py --model <hub id or dir> --out <dir>`"
            )
        self.meta = ClipOnnxMeta.model_validate_json((directory / META_FILE).read_text())
        self.model_id = model_id or f"onnx:{self.meta.source}"
        self.fingerprint = content_digest(directory / name for name in EXPORT_FILES)
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        self.image_session = onnxruntime.InferenceSession(str(directory / IMAGE_FILE), options, providers=providers)
        self.text_session = onnxruntime.InferenceSession(str(directory / TEXT_FILE), options, providers=providers)
        self.tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        self.tokenizer.enable_truncation(self.meta.max_text_tokens)
        self.tokenizer.enable_padding(pad_id=self.meta.pad_token_id)

    def pixel_values(self, images: Sequence[Image.Image]) -> np.ndarray:
        """CLIP preprocessing as transformers' CLIP image processor does it: shortest edge, centre crop
        (beyond CLIP_MAX_ASPECT the source is centre-cropped first, which the final crop hides)."""
        meta = self.meta
        mean = np.asarray(meta.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(meta.image_std, dtype=np.float32)[:, None, None]
        batch = []
        for image in images:
            image = _centre_crop_aspect(image.convert("RGB"), CLIP_MAX_ASPECT)
            width, height = image.size
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(meta.resize_shortest_edge * long / short)
            size = (meta.resize_shortest_edge, new_long) if width <= height else (new_long, meta.resize_shortest_edge)
            image = image.resize(size, resample=meta.resample)
            top = (image.height - meta.crop_height) // 2
            left = (image.width - meta.crop_width) // 2
            image = image.crop((left, top, left + meta.crop_width, top + meta.crop_height))
            array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) * meta.rescale_factor
            batch.append((array - mean) / std)
        return np.stack(batch).astype(np.float32)

    def text_inputs(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch(list(texts))
        return {
            "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
        }

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.meta.embedding_dim), dtype=np.float32)
        return _l2_normalise(self.image_session.run(None, {"pixel_values": self.pixel_values(images)})[0])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.meta.embedding_dim), dtype=np.float32)
        return _l2_normalise(self.text_session.run(None, self.text_inputs(texts))[0])


class ExportCheck(BaseModel):
    """ONNX Runtime against PyTorch on the same inputs (projected embeddings, before normalising)."""

    image_max_abs_diff: float
    text_max_abs_diff: float


def export_clip(source: str | Path, out: str | Path, opset: int = 18) -> ExportCheck:
    """Export a transformers CLIPModel's two encoders to `out` and check them against PyTorch.

    Raises if ONNX Runtime and PyTorch differ by more than EXPORT_TOLERANCE.
    """
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = CLIPModel.from_pretrained(str(source), dtype=torch.float32).eval()
    image_processor = AutoImageProcessor.from_pretrained(str(source))
    tokenizer = AutoTokenizer.from_pretrained(str(source))

    class ImageEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = model

        def forward(self, pixel_values):
            return self.clip.visual_projection(self.clip.vision_model(pixel_values=pixel_values).pooler_output)

    class TextEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = model

        def forward(self, input_ids, attention_mask):
            pooled = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
            return self.clip.text_projection(pooled)

    crop = image_processor.crop_size
    size = image_processor.size
    meta = ClipOnnxMeta(
        source=str(source),
        resize_shortest_edge=size["shortest_edge"],
        crop_height=crop["height"],
        crop_width=crop["width"],
        resample=int(image_processor.resample),
        rescale_factor=float(image_processor.rescale_factor),
        image_mean=list(image_processor.image_mean),
        image_std=list(image_processor.image_std),
        max_text_tokens=min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        embedding_dim=model.config.projection_dim,
    )
    batch = torch.export.Dim("batch", min=1, max=4096)
    sequence = torch.export.Dim("sequence", min=2, max=meta.max_text_tokens)
    sample_images = [
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48 + 16 * seed, 64, 3), dtype=np.uint8))
        for seed in range(2)
    ]
    sample_texts = ["a photo of a person", "visible blood on the floor of a room"]
    pixel_values = image_processor(images=sample_images, return_tensors="pt")["pixel_values"]
    text = tokenizer(sample_texts, padding=True, return_tensors="pt")
    image_encoder, text_encoder = ImageEncoder().eval(), TextEncoder().eval()
    with torch.inference_mode():
        torch_image = image_encoder(pixel_values).numpy()
        torch_text = text_encoder(text["input_ids"], text["attention_mask"]).numpy()
    torch.onnx.export(
        image_encoder,
        (pixel_values,),
        str(out / IMAGE_FILE),
        input_names=["pixel_values"],
        output_names=["image_embeds"],
        dynamic_shapes={"pixel_values": {0: batch}},
        opset_version=opset,
        dynamo=True,
        external_data=False,
    )
    torch.onnx.export(
        text_encoder,
        (text["input_ids"], text["attention_mask"]),
        str(out / TEXT_FILE),
        input_names=["input_ids", "attention_mask"],
        output_names=["text_embeds"],
        dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
        opset_version=opset,
        dynamo=True,
        external_data=False,
    )
    tokenizer.backend_tokenizer.save(str(out / TOKENIZER_FILE))
    (out / META_FILE).write_text(meta.model_dump_json(indent=2))

    encoder = OnnxClipEncoder(out)
    onnx_image = encoder.image_session.run(None, {"pixel_values": pixel_values.numpy()})[0]
    onnx_text = encoder.text_session.run(
        None, {k: v.numpy() for k, v in text.items() if k in ("input_ids", "attention_mask")}
    )[0]
    check = ExportCheck(
        image_max_abs_diff=float(np.abs(onnx_image - torch_image).max()),
        text_max_abs_diff=float(np.abs(onnx_text - torch_text).max()),
    )
    if max(check.image_max_abs_diff, check.text_max_abs_diff) > EXPORT_TOLERANCE:
        raise RuntimeError(f"ONNX export of {source} disagrees with PyTorch: {check}")
    return check
