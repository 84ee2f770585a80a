"""A scripted fake of the model interface (safejudge.backends.base), for unit tests of the decision logic.

The answers are tables the test writes; the original image is told apart from derived views (region
removed, crop) by identity, so Strategy 2 can be scripted too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from safejudge.backends.base import Detection


@dataclass
class ScriptedMLLM:
    image: Image.Image
    with_image: dict[str, float]
    prior: dict[str, float]
    view: dict[str, float] = field(default_factory=dict)  # score on any derived view of the image
    reasoning: dict[str, str] = field(default_factory=dict)
    model_id: str = "scripted"
    fingerprint: str = "sha256:scripted"
    score_calls: list[tuple[str, int]] = field(default_factory=list)
    reason_calls: list[list[str]] = field(default_factory=list)

    def score(self, image: Image.Image | None, questions: Sequence[str]) -> np.ndarray:
        if image is None:
            table, kind = self.prior, "prior"
        elif image is self.image:
            table, kind = self.with_image, "image"
        else:
            table, kind = self.view, "view"
        self.score_calls.append((kind, len(questions)))
        return np.array([table[q] for q in questions])

    def reason(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        self.reason_calls.append(list(questions))
        return [self.reasoning[q] for q in questions]


@dataclass
class ScriptedDetector:
    boxes: dict[str, Detection | None]
    model_id: str = "scripted-detector"
    calls: int = 0

    def detect(self, image: Image.Image, words: Sequence[str]) -> list[Detection | None]:
        self.calls += 1
        return [self.boxes.get(word) for word in words]


@dataclass
class ScriptedRelevance:
    """Rule texts and the image get fixed unit vectors; cosine = dot product of the table's vectors."""

    texts: dict[str, np.ndarray]
    image_vector: np.ndarray
    model_id: str = "scripted-relevance"
    fingerprint: str = "sha256:scripted-relevance"

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([self.image_vector for _ in images])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.texts[t] for t in texts])
