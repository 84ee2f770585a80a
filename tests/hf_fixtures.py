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

# Sizes every backend must take: one pixel; 3x3 (sides of 1 or 3 look like a channel axis to transformers);
# banners far past Qwen2-VL's long/short limit of 200, both ways.
ODD_SIZES = [(1, 1), (3, 3), (2, 4000), (4000, 2)]


def odd_image(size: tuple[int, int]) -> Image.Image:
    return noise_image(9, height=size[1], width=size[0])
