"""The committed toy demo models (ONNX Runtime): they load, answer toy-world questions well above chance on
fresh generated scenes, give a language prior without an image, reason in parseable JSON, find boxes, and
refuse words they do not know. Also the `demo:toy` registry scheme and `safejudge demo`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from safejudge.backends.base import MLLM, Detector, RelevanceEncoder
from safejudge.backends.onnx_demo import TOY_WARNING, load_demo_models
from safejudge.cli import app
from safejudge.decision import parse_reasoning
from safejudge.toyworld import CONCEPTS, HOLDABLE, SceneSpec, ToyVocabularyError, generate_scene
from tests.hf_fixtures import ODD_SIZES, odd_image

FRESH_SEED = 424242  # not a training seed: training draws from seed 0's stream


@pytest.fixture(scope="module")
def models():
    return load_demo_models()


@pytest.fixture(scope="module")
def fresh_scenes():
    rng = np.random.default_rng(FRESH_SEED)
    return [generate_scene(rng) for _ in range(100)]


def test_models_implement_the_interfaces(models):
    assert isinstance(models.mllm, MLLM)
    assert isinstance(models.relevance, RelevanceEncoder)
    assert isinstance(models.detector, Detector)


def test_presence_questions_are_answered_well_above_chance(models, fresh_scenes):
    rng = np.random.default_rng(1)
    correct = 0
    for scene in fresh_scenes:
        present = sorted(scene.concepts)
        concept = str(rng.choice(present)) if present and rng.random() < 0.5 else str(rng.choice(CONCEPTS))
        score = models.mllm.score(scene.image, [f"a {concept} is visible"])[0]
        correct += (score > 0.5) == (concept in scene.concepts)
    assert correct >= 90, f"{correct}/100"


def test_holding_hard_negatives_are_told_apart(models):
    rng = np.random.default_rng(FRESH_SEED + 1)
    correct = 0
    for index in range(40):
        concept = HOLDABLE[index % len(HOLDABLE)]
        held = index % 2 == 0
        scene = generate_scene(rng, SceneSpec(held=(concept,)) if held else SceneSpec(not_held=(concept,)))
        correct += (models.mllm.score(scene.image, [f"a person is holding a {concept}"])[0] > 0.5) == held
    assert correct >= 32, f"{correct}/40"


def test_one_call_scores_many_questions_like_separate_calls(models, fresh_scenes):
    image = fresh_scenes[0].image
    questions = ["a knife is visible", "a person is holding a flower", "a flame is near a house"]
    together = models.mllm.score(image, questions)
    apart = [models.mllm.score(image, [q])[0] for q in questions]
    assert together.shape == (3,)
    np.testing.assert_allclose(together, apart, atol=1e-5)


def test_prior_without_image_depends_on_the_question_only(models, fresh_scenes):
    questions = ["a skull is visible", "a person is holding a syringe", "something dangerous is visible"]
    prior = models.mllm.score(None, questions)
    assert np.all((prior > 0.0) & (prior < 1.0))
    np.testing.assert_allclose(prior, models.mllm.score(None, questions[::-1])[::-1], atol=1e-6)
    with_skull = generate_scene(5, SceneSpec(objects=("skull",), extra=0))
    assert models.mllm.score(with_skull.image, ["a skull is visible"])[0] > prior[0]
    without = generate_scene(5, SceneSpec(objects=("tree",), absent=("skull",), extra=0))
    assert models.mllm.score(without.image, ["a skull is visible"])[0] < prior[0]


def test_reasoning_returns_parseable_json_that_is_mostly_right(models, fresh_scenes):
    rng = np.random.default_rng(2)
    right = 0
    for scene in fresh_scenes[:20]:
        concept = str(rng.choice(CONCEPTS))
        question = f"a {concept} is visible"
        (raw,) = models.mllm.reason(scene.image, [question])
        answer = parse_reasoning(raw)
        assert answer.parsed, raw
        assert set(json.loads(raw)) == {"rating", "rationale"}
        assert concept in answer.rationale
        right += answer.holds == (concept in scene.concepts)
    assert right >= 17, f"{right}/20"


def test_unknown_words_are_a_clear_error(models, fresh_scenes):
    with pytest.raises(ToyVocabularyError, match="unicorn"):
        models.mllm.score(fresh_scenes[0].image, ["a knife is visible", "a unicorn is visible"])
    with pytest.raises(ToyVocabularyError, match="unicorn"):
        models.relevance.embed_texts(["a unicorn"])
    with pytest.raises(ToyVocabularyError, match="not a toy-world object"):
        models.detector.detect(fresh_scenes[0].image, ["unicorn"])


def test_clip_ranks_matching_scenes_above_others(models, fresh_scenes):
    images = models.relevance.embed_images([s.image for s in fresh_scenes])
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-4)
    aucs = []
    for concept in ("person", "flame", "house", "knife", "skull"):
        text = models.relevance.embed_texts([f"a {concept}"])[0]
        similarity = images @ text
        has = np.array([concept in s.concepts for s in fresh_scenes])
        if has.any() and (~has).any():
            aucs.append(float((similarity[has][:, None] > similarity[~has][None, :]).mean()))
    assert np.mean(aucs) >= 0.85, aucs


def test_detector_boxes_cover_the_true_object(models):
    hits = 0
    for seed in range(20):
        scene = generate_scene(seed, SceneSpec(held=("knife",)))
        (detection,) = models.detector.detect(scene.image, ["knife"])
        truth = scene.boxes("knife")[0]
        if detection is not None:
            left, top = max(detection.box[0], truth[0]), max(detection.box[1], truth[1])
            right, bottom = min(detection.box[2], truth[2]), min(detection.box[3], truth[3])
            inter = max(0, right - left) * max(0, bottom - top)
            union = ((detection.box[2] - detection.box[0]) * (detection.box[3] - detection.box[1])
                     + (truth[2] - truth[0]) * (truth[3] - truth[1]) - inter)
            hits += inter / union > 0.3 and detection.confidence > 0.5
    assert hits >= 16, f"{hits}/20"
    empty = generate_scene(0, SceneSpec(extra=0))
    (nothing,) = models.detector.detect(empty.image, ["pistol"])
    assert nothing is None or nothing.confidence < 0.5


def test_registry_demo_scheme_loads_the_toy_models():
    from safejudge.backends.registry import ModelSpec, load_models

    loaded = load_models(ModelSpec(mllm="demo:toy", relevance="demo:toy", detector="demo:toy"))
    assert loaded.mllm.model_id == "toy-vlm-demo" and loaded.detector is not None


def test_demo_command_judges_scenes_and_says_the_models_are_toys():
    result = CliRunner().invoke(app, ["demo", "--scenes", "4", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "UNSAFE" in result.output or "SAFE" in result.output
    assert "verdicts name exactly the truly violated rules" in result.output
    assert "never be used to judge real photos" in " ".join(result.output.split())
    assert "real photos" in TOY_WARNING


@pytest.mark.parametrize("size", ODD_SIZES, ids=str)
def test_any_image_size_is_scored_embedded_and_searched(models, size):
    # Every demo model reads images through toyworld.model_input, which resizes any size to the scene size.
    image = odd_image(size)
    scores = models.mllm.score(image, ["a knife is visible", "a person is visible"])
    assert scores.shape == (2,) and np.all((scores > 0) & (scores < 1))
    assert np.linalg.norm(models.relevance.embed_images([image])[0]) == pytest.approx(1.0, abs=1e-4)
    (detection,) = models.detector.detect(image, ["knife"])
    if detection is not None:
        left, top, right, bottom = detection.box
        assert 0 <= left < right <= image.width and 0 <= top < bottom <= image.height
