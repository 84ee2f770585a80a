"""The model interfaces every evaluator uses; backends implement them, evaluators never see a backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image


class UnsupportedQuestion(ValueError):
    """A backend cannot ask this question at all (e.g. words outside a toy model's vocabulary): the
    request is at fault, not the server."""


@dataclass
class MLLMStats:
    """Work counters a backend may keep (attribute `stats`), read by benchmarks as differences."""

    forward_passes: int = 0
    tokens_processed: int = 0  # every prompt position run through the decoder (scoring, reasoning), padding included
    tokens_generated: int = 0  # reasoning output tokens
    prefix_prefills: int = 0  # prompt prefixes prefilled from scratch (not found in a prefix cache)
    vision_encodings: int = 0  # of those, the ones with an image: the image through the vision tower
    prefix_hits: int = 0  # calls that started from a cached prefix (as is, or cut back and extended)

    def copy(self) -> MLLMStats:
        return MLLMStats(**{f.name: getattr(self, f.name) for f in fields(self)})

    def __sub__(self, other: MLLMStats) -> MLLMStats:
        return MLLMStats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})


@runtime_checkable
class MLLM(Protocol):
    """A multimodal LLM that answers yes/no questions about one image (or none) and can reason."""

    model_id: str
    fingerprint: str  # what the model is (safejudge.fingerprint): keys caches of its outputs, unlike model_id

    def score(self, image: Image.Image | None, questions: Sequence[str]) -> np.ndarray:
        """M = P(Yes)/(P(Yes)+P(No)) for each question, shape [len(questions)], in one call.

        image None asks the questions with no image tokens at all (the language prior M(None, c)).
        Implementations encode the image once and share it across the questions.

        A backend may also offer `score_batch(items) -> list[np.ndarray]`: `score` for several images (or
        none) with their questions at once, one array per item, in order (optional, not part of this
        protocol: evaluators only call `score`; the served stage's merged rounds call it through `score_batch`
        below to merge a dynamic batch).
        """
        ...

    def reason(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        """The raw final answer (expected `{"rating": "Yes"|"No", "rationale": ...}`) per question.

        Two turns per question, as in the paper: think step by step about what is visible, then
        summarise as JSON. Questions are independent; implementations may batch them.
        """
        ...


def score_batch(mllm: MLLM, items: Sequence[tuple[Image.Image | None, Sequence[str]]]) -> list[np.ndarray]:
    """mllm.score for each (image, questions) item: in one merged call when the backend has `score_batch`,
    otherwise one `score` call per item."""
    merged = getattr(mllm, "score_batch", None)
    if merged is None:
        return [mllm.score(image, questions) for image, questions in items]
    scores = list(merged(items))
    shapes = [np.shape(s) for s in scores]
    if shapes != [(len(questions),) for _, questions in items]:
        raise RuntimeError(f"score_batch returned scores of shapes {shapes} for {[len(q) for _, q in items]} questions")
    return scores


@runtime_checkable
class RelevanceEncoder(Protocol):
    """A CLIP-style dual encoder; embeddings are L2-normalised rows."""

    model_id: str
    fingerprint: str

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class Detection:
    """A box in pixel coordinates (left, top, right, bottom) and the detector's confidence."""

    box: tuple[int, int, int, int]
    confidence: float


@runtime_checkable
class Detector(Protocol):
    """Open-vocabulary detector for the central object of a precondition (Strategy 2). It keys no cache
    (compiled constitutions do not depend on it), so it needs no fingerprint."""

    model_id: str

    def detect(self, image: Image.Image, words: Sequence[str]) -> list[Detection | None]:
        """The most confident box for each word, or None when nothing was found."""
        ...


@dataclass(frozen=True)
class Models:
    """What one judge needs: an MLLM, and optionally a relevance encoder and a detector."""

    mllm: MLLM
    relevance: RelevanceEncoder | None = None
    detector: Detector | None = None
