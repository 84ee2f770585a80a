"""Shared pieces of the Hugging Face / ONNX backend tests: tiny models, test images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

torch.set_num_threads(1)


def noise_image(seed: int, height: int = 70, width: int = 100) -> Image.Image:
    """A random RGB image; different seeds differ everywhere, so a model that reads the image must notice."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


STATEMENTS = [
    "a person is visible",
    "there is visible blood on the floor",
    "flames",
    "a knife blade is held against the throat of a person lying on a bed",
    "two people are kissing with teeth exposed",
]
