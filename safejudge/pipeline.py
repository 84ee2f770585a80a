"""The served pipeline's stage logic, free of Triton: each model_repository/<stage>/1/model.py only moves
tensors into and out of these classes and maps InvalidRequest to INVALID_ARGUMENT.

    safety_judge (ensemble): IMAGE, CONSTITUTION, OPTIONS? -> VERDICT
      preprocess  IMAGE bytes -> PIXELS (decode + validate)
      relevance   PIXELS -> EMBEDDING (CLIP image embedding; empty without a relevance encoder)
      judge       PIXELS, CONSTITUTION, OPTIONS?, EMBEDDING -> VERDICT (judge_batched; the MLLM over BLS)
      mllm        PIXELS?, QUESTIONS, MODE -> SCORES, ANSWERS (dynamic batching)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import ValidationError

from safejudge.backends.base import MLLM, Models, UnsupportedQuestion
from safejudge.backends.registry import ModelSpec, load_detector, load_mllm, load_relevance
from safejudge.evaluators import JudgeOptions, judge_batched
from safejudge.images import ImageError, decode_image
from safejudge.store import ConstitutionStore, UnknownConstitution

MODES = ("score", "reason", "id")


# Triton 2.51 hands a BLS caller every error as INTERNAL; stages mark faults of the request with this tag
# so that the caller can still answer INVALID_ARGUMENT.
INVALID_REQUEST_TAG = "invalid request: "


class InvalidRequest(ValueError):
    """The request itself is wrong (the client's fault); served as INVALID_ARGUMENT with this message."""


def stage_parameters(model_config_json: str) -> dict[str, str]:
    """The string parameters of a stage, from the model config JSON Triton hands to initialize()."""
    config = json.loads(model_config_json)
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def stage_spec(parameters: dict[str, str], threads: int | None = None) -> ModelSpec:
    spec = ModelSpec.model_validate_json(parameters["model_spec"])
    return spec.model_copy(update={"threads": threads}) if threads else spec


def image_pixels(data: bytes) -> np.ndarray:
    """Encoded image bytes -> validated RGB pixels [H, W, 3] uint8 (the first frame of an animation)."""
    try:
        return np.asarray(decode_image(data, frames=1).frames[0], dtype=np.uint8)
    except ImageError as exc:
        raise InvalidRequest(str(exc)) from exc


def pixels_image(pixels: np.ndarray) -> Image.Image:
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InvalidRequest(f"PIXELS must be uint8 [height, width, 3], got {pixels.dtype} {list(pixels.shape)}")
    return Image.fromarray(pixels, "RGB")


def _readable(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
    )


def parse_options(raw: bytes | None) -> JudgeOptions:
    """OPTIONS JSON (absent: defaults) -> JudgeOptions (threshold overrides included)."""
    if raw is None:
        return JudgeOptions()
    try:
        options = JudgeOptions.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidRequest(f"OPTIONS is not valid JudgeOptions JSON: {_readable(exc)}") from exc
    return options


class MLLMStage:
    """The `mllm` model: answers yes/no questions (score), reasons (reason) about one image or none, or
    names the loaded model (id: ANSWERS = [model_id], which the judge stage reports and keys caches by)."""

    def __init__(self, spec: ModelSpec):
        self.mllm = load_mllm(spec)

    def run(self, pixels: np.ndarray | None, questions: Sequence[str], mode: str) -> tuple[np.ndarray, list[str]]:
        if mode not in MODES:
            raise InvalidRequest(f"MODE must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "id":
            return np.zeros(0, dtype=np.float32), [self.mllm.model_id]
        if not questions:
            return np.zeros(0, dtype=np.float32), []
        image = None if pixels is None else pixels_image(pixels)
        if mode == "reason" and image is None:
            raise InvalidRequest("MODE reason needs PIXELS")
        try:
            if mode == "score":
                return np.asarray(self.mllm.score(image, list(questions)), dtype=np.float32), []
            return np.zeros(0, dtype=np.float32), list(self.mllm.reason(image, list(questions)))
        except UnsupportedQuestion as exc:
            raise InvalidRequest(f"the model {self.mllm.model_id} cannot answer this: {exc}") from exc


class RelevanceStage:
    """The `relevance` model: the CLIP image embedding the judge compares with its rule embeddings."""

    def __init__(self, spec: ModelSpec):
        self.encoder = load_relevance(spec)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """[dim] float32, or [0] when no relevance encoder is configured (every rule is then considered)."""
        if self.encoder is None:
            return np.zeros(0, dtype=np.float32)
        return np.asarray(self.encoder.embed_images([pixels_image(pixels)]), dtype=np.float32)[0]


class JudgeStage:
    """The `judge` model: judge_batched over the compiled constitution, with the MLLM reached remotely.

    mllm is the `mllm` stage seen through the MLLM interface (over BLS in the server); the relevance
    encoder (rule texts, compiled once) and the detector (Strategy 2) run here.
    """

    def __init__(self, spec: ModelSpec, constitutions: Path, cache_dir: Path, mllm: MLLM):
        self.models = Models(mllm=mllm, relevance=load_relevance(spec), detector=load_detector(spec))
        self.store = ConstitutionStore(constitutions, self.models, cache_dir)

    def judge(self, pixels: np.ndarray, constitution: bytes, options: bytes | None, embedding: np.ndarray) -> str:
        """Verdict JSON for one image."""
        parsed = parse_options(options)
        try:
            compiled = self.store.get(constitution.decode())
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"CONSTITUTION is not UTF-8 text: {exc}") from exc
        except UnknownConstitution as exc:
            raise InvalidRequest(str(exc)) from exc
        verdict = judge_batched(
            pixels_image(pixels),
            compiled,
            self.models,
            parsed,
            image_embedding=embedding if embedding.size else None,
        )
        return verdict.model_dump_json()
