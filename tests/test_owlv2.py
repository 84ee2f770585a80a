"""Owlv2Detector on a tiny random OWLv2: one most-confident box per word, in the input image's pixels."""

from __future__ import annotations

import pytest
import torch

from safejudge.backends.base import Detector
from safejudge.backends.owlv2 import OWLV2_MAX_SIDE_FACTOR, OWLV2_MIN_SIDE, Owlv2Detector
from safejudge.backends.tiny import ensure_tiny_model
from tests.hf_fixtures import ODD_SIZES, noise_image, odd_image

WORDS = ["person", "knife", "fire"]


@pytest.fixture(scope="module")
def detector() -> Owlv2Detector:
    return Owlv2Detector.from_pretrained(ensure_tiny_model("owlv2"))


def reference(detector: Owlv2Detector, image, words):
    """Best score per word and every box, as transformers' own post-processing scales them.

    OWLv2 pads the image to a square before detection, so target size is the longer side squared."""
    inputs = detector.processor(text=[words], images=[image], return_tensors="pt")
    with torch.inference_mode():
        outputs = detector.model(**inputs)
    side = max(image.size)
    boxes = detector.processor.image_processor.post_process_object_detection(
        outputs, threshold=0.0, target_sizes=[(side, side)]
    )[0]["boxes"]
    return torch.sigmoid(outputs.logits[0]).max(dim=0).values, boxes


@pytest.mark.parametrize("size", [(100, 70), (50, 120), (64, 64)], ids=["wide", "tall", "square"])
def test_one_box_per_word_inside_the_image(detector, size):
    image = noise_image(7, height=size[1], width=size[0])
    detections = detector.detect(image, WORDS)
    assert len(detections) == len(WORDS)
    best_scores, boxes = reference(detector, image, WORDS)
    for detection, best in zip(detections, best_scores, strict=True):
        assert detection is not None
        left, top, right, bottom = detection.box
        assert 0 <= left < right <= image.width and 0 <= top < bottom <= image.height
        assert detection.confidence == pytest.approx(float(best), abs=1e-6)
        clipped = boxes.clone()
        clipped[:, 0::2] = clipped[:, 0::2].clamp(0, image.width)
        clipped[:, 1::2] = clipped[:, 1::2].clamp(0, image.height)
        distance = (clipped - torch.tensor(detection.box, dtype=clipped.dtype)).abs().max(dim=1).values
        assert float(distance.min()) <= 0.5 + 1e-4, "the box must be one of the model's boxes in input pixels"


def test_words_are_scored_independently_and_empty_is_empty(detector):
    assert isinstance(detector, Detector)
    image = noise_image(8)
    together = detector.detect(image, WORDS)
    for word, joint in zip(WORDS, together, strict=True):
        alone = detector.detect(image, [word])[0]
        assert alone.box == joint.box and alone.confidence == pytest.approx(joint.confidence, abs=1e-6)
    assert detector.detect(image, []) == []


class RecordingProcessor:
    """The detector's processor, recording the size of every image it is given."""

    def __init__(self, processor):
        self.processor, self.sizes = processor, []

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def __call__(self, images, **kwargs):
        self.sizes.extend(image.size for image in images)
        return self.processor(images=images, **kwargs)


@pytest.mark.parametrize("size", [*ODD_SIZES, (1000, 700)], ids=str)
def test_any_image_size_is_detected_in_its_own_pixels(detector, size, monkeypatch):
    recording = RecordingProcessor(detector.processor)
    monkeypatch.setattr(detector, "processor", recording)
    image = odd_image(size)
    detections = detector.detect(image, WORDS)
    assert len(detections) == len(WORDS)
    for detection in detections:
        if detection is not None:
            left, top, right, bottom = detection.box
            assert 0 <= left < right <= image.width and 0 <= top < bottom <= image.height
    (fed,) = recording.sizes
    side = detector.processor.image_processor.size.height
    assert min(fed) >= OWLV2_MIN_SIDE and max(fed) <= OWLV2_MAX_SIDE_FACTOR * side * OWLV2_MIN_SIDE


def test_a_large_image_gets_the_boxes_of_its_scaled_down_copy_scaled_back(detector):
    image = noise_image(11, height=700, width=1000)
    fed = detector._bounded(image)
    assert fed.size == (128, 90)
    scale = image.width / fed.width
    for big, small in zip(detector.detect(image, WORDS), detector.detect(fed, WORDS), strict=True):
        assert big.confidence == pytest.approx(small.confidence, abs=1e-6)
        assert max(abs(b - s * scale) for b, s in zip(big.box, small.box, strict=True)) <= scale
