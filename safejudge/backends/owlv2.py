"""OWLv2 open-vocabulary detection for CLUE's Strategy 2: the central object's box per word."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import Owlv2ForObjectDetection, Owlv2Processor
from transformers.image_transforms import center_to_corners_format

from safejudge.backends.base import Detection
from safejudge.images import conform

# transformers guesses the channel axis of an image 1 or 3 pixels wide (rightly, with a warning per
# image); from 4 pixels on there is nothing to guess.
OWLV2_MIN_SIDE = 4
# The processor pads to a square of the longer side, in float, at full resolution, before resizing to its
# input side (a 16384-pixel side would take gigabytes): larger images are first scaled down to this many
# input sides, enough for its anti-aliased resize to work on.
OWLV2_MAX_SIDE_FACTOR = 2


class Owlv2Detector:
    """Detector protocol on transformers' Owlv2ForObjectDetection (all words in one forward)."""

    def __init__(self, model: Owlv2ForObjectDetection, processor: Owlv2Processor, model_id: str):
        self.model = model
        self.processor = processor
        self.model_id = model_id

    @classmethod
    def from_pretrained(
        cls, source: str | Path, threads: int | None = None, model_id: str | None = None
    ) -> Owlv2Detector:
        if threads is not None:
            torch.set_num_threads(threads)
        source = str(source)
        model = Owlv2ForObjectDetection.from_pretrained(source).eval()
        return cls(
            model,
            Owlv2Processor.from_pretrained(source),
            model_id=model_id or f"owlv2:{source}",
        )

    def _bounded(self, image: Image.Image) -> Image.Image:
        size = self.processor.image_processor.size
        limit = OWLV2_MAX_SIDE_FACTOR * max(size.height, size.width)
        if max(image.size) <= limit:
            return image
        scale = limit / max(image.size)
        return image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC
        )

    def detect(self, image: Image.Image, words: Sequence[str]) -> list[Detection | None]:
        """The most confident box for each word in pixel coordinates of `image`; confidence = sigmoid(logit).

        None for a word whose best box lies entirely outside the image (possible: OWLv2 sees the image
        padded to a square at the bottom and right) or rounds to no pixel of an image a few pixels wide.
        """
        if not words:
            return []
        original = image
        image = conform(self._bounded(image.convert("RGB")), min_side=OWLV2_MIN_SIDE)
        inputs = self.processor(text=[list(words)], images=[image], return_tensors="pt")
        with torch.inference_mode():
            outputs = self.model(**inputs)
        scores = torch.sigmoid(outputs.logits[0].float())  # [boxes, words]
        # Boxes are (cx, cy, w, h) relative to the padded square whose side is the image's longer side;
        # they are mapped back to the pixels of the image the caller passed.
        side = max(image.width, image.height)
        corners = center_to_corners_format(outputs.pred_boxes[0].float()) * side
        scale = torch.tensor([original.width / image.width, original.height / image.height] * 2)
        corners = corners * scale
        best = scores.argmax(dim=0)
        detections: list[Detection | None] = []
        for word_index, box_index in enumerate(best.tolist()):
            left, top, right, bottom = corners[box_index].tolist()
            box = (
                max(0, round(left)),
                max(0, round(top)),
                min(original.width, round(right)),
                min(original.height, round(bottom)),
            )
            if box[2] <= box[0] or box[3] <= box[1]:
                detections.append(None)
                continue
            detections.append(Detection(box=box, confidence=float(scores[box_index, word_index])))
        return detections
