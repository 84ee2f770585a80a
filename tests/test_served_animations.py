"""Long animations, over-budget animations and MPOs through the served pipeline (the session's Triton
server, default serve limits), as a client sends them."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from safejudge.images import DEFAULT_FRAMES, ImageLimits, sample_frame_indices
from safejudge_client import InvalidRequest, JudgeClient
from tests.test_images import BLUE, RED, encode_frames, gif_of_extents, long_gif

pytest_plugins = ["tests.server_fixtures"]
pytestmark = pytest.mark.integration

CONSTITUTION = "os-bench"


@pytest.fixture(scope="module")
def client(triton_server):
    with JudgeClient(triton_server.url) as judge_client:
        yield judge_client


def test_a_3000_frame_gif_is_judged_on_its_sampled_frames(client):
    verdict = client.judge(long_gif(count=3000, size=64), CONSTITUTION)
    assert verdict.frame_count == 3000
    assert verdict.frames_judged == sample_frame_indices(3000, DEFAULT_FRAMES)
    assert len(verdict.frames_judged) == 8 and verdict.frames_judged[-1] == 2999


def test_an_animation_over_the_decoding_budget_is_refused_naming_the_limit(client):
    """A few hundred bytes: a 4000x4000 screen (16 M pixels, within max_pixels) and 1x1 frames, one more than
    the default budget allows Pillow to composite on that canvas."""
    budget = ImageLimits().max_decoded_pixels
    count = budget // (4000 * 4000) + 1
    with pytest.raises(InvalidRequest, match=rf"the limit is {budget} pixels \(max_decoded_pixels\)") as caught:
        client.judge(gif_of_extents((4000, 4000), [(0, 0, 1, 1)] * count), CONSTITUTION)
    assert caught.value.status == "INVALID_ARGUMENT"


def test_an_mpo_is_judged_on_each_of_its_images(client):
    data = encode_frames([Image.new("RGB", (64, 48), RED), Image.new("RGB", (48, 64), BLUE)], "MPO")
    assert Image.open(io.BytesIO(data)).format == "MPO"
    verdict = client.judge(data, CONSTITUTION)
    assert verdict.frame_count == 2 and verdict.frames_judged == [0, 1]
