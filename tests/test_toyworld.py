"""The toy-world generator: deterministic by seed, exact ground truth, specs met, the statement grammar."""

from __future__ import annotations

import numpy as np
import pytest

from safejudge.toyworld import (
    CONCEPTS,
    HOLD_CLEARANCE,
    NEAR_GAP,
    Correlation,
    Query,
    SceneSpec,
    ToyTokenizer,
    ToyVocabularyError,
    demo_vocabulary,
    generate_scene,
    parse_statement,
    statement_text,
)


def test_same_seed_same_scene_and_different_seed_different_scene():
    first, again, other = generate_scene(7), generate_scene(7), generate_scene(8)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert first.objects == again.objects and first.background == again.background
    assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))


def test_scenes_have_zero_to_four_objects_of_known_concepts_inside_the_canvas():
    counts = []
    for seed in range(60):
        scene = generate_scene(seed)
        counts.append(len(scene.objects))
        assert scene.image.size == (96, 96)
        for obj in scene.objects:
            assert obj.concept in CONCEPTS
            left, top, right, bottom = obj.box
            assert 0 <= left < right <= 96 and 0 <= top < bottom <= 96
    assert min(counts) == 0 and max(counts) <= 4 and len(set(counts)) >= 3


def test_masks_match_boxes_and_pixels_differ_where_objects_are_drawn():
    scene = generate_scene(3, SceneSpec(objects=("skull", "car"), extra=0))
    for obj in scene.objects:
        left, top, right, bottom = obj.box
        assert scene.masks[obj.concept][top:bottom, left:right].any()
    union = np.zeros((96, 96), bool)
    for obj in scene.objects:
        union[obj.box[1]:obj.box[3], obj.box[0]:obj.box[2]] = True
    for mask in scene.masks.values():
        assert not (mask & ~union).any(), "mask pixels outside every box of their concept"
    empty = generate_scene(3, SceneSpec(extra=0))
    assert empty.objects == [] and empty.concepts == set()


@pytest.mark.parametrize("seed", range(8))
def test_holding_and_its_hard_negative_are_exact(seed):
    held = generate_scene(seed, SceneSpec(held=("knife",)))
    assert held.truth("a person is holding a knife") and held.truth("a person is visible")
    loose = generate_scene(seed, SceneSpec(not_held=("knife",)))
    assert loose.truth("a knife is visible") and loose.truth("a person is visible")
    assert not loose.truth("a person is holding a knife")
    knife = next(o for o in loose.objects if o.concept == "knife")
    person = next(o for o in loose.objects if o.concept == "person")
    gap = max(max(knife.box[0], person.box[0]) - min(knife.box[2], person.box[2]),
              max(knife.box[1], person.box[1]) - min(knife.box[3], person.box[3]))
    assert gap >= HOLD_CLEARANCE, "a loose knife must not look held"


@pytest.mark.parametrize("seed", range(8))
def test_near_and_far_are_exact(seed):
    near = generate_scene(seed, SceneSpec(near=(("flame", "house"),)))
    assert near.truth("a flame is near the house") and near.truth("fire next to a building")
    far = generate_scene(seed, SceneSpec(far=(("flame", "house"),)))
    assert far.truth("a flame is visible") and far.truth("a house is visible")
    assert not far.truth("a flame is near a house")
    assert NEAR_GAP < 16


def test_absent_concepts_never_appear():
    for seed in range(30):
        scene = generate_scene(seed, SceneSpec(absent=("skull", "person"), extra=4))
        assert not {"skull", "person"} & scene.concepts


def test_spurious_correlation_is_injected_at_the_asked_rate():
    def blood_share(probability: float) -> float:
        rng = np.random.default_rng(0)
        scenes = [generate_scene(rng, SceneSpec(objects=("knife",), extra=0), [Correlation("knife", "blood", probability)])
                  for _ in range(60)]
        return float(np.mean(["blood" in s.concepts for s in scenes]))

    assert blood_share(0.0) == 0.0
    assert 0.6 <= blood_share(0.8) <= 0.95
    assert blood_share(1.0) >= 0.9  # a full canvas may leave no room


def test_grammar_reads_the_toy_constitution_statements():
    assert parse_statement("a person is holding a gun") == Query("holding", ("pistol",))
    assert parse_statement("Blood is visible.") == Query("present", ("blood",))
    assert parse_statement("a flame is near the house") == Query("near", ("flame", "house"))
    assert parse_statement("something dangerous is visible") == Query("dangerous")
    either = parse_statement("a person holding a knife or a pistol")
    assert either == Query("any", parts=(Query("holding", ("knife",)), Query("holding", ("pistol",))))


@pytest.mark.parametrize(
    "statement, message",
    [
        ("a unicorn is visible near a castle", "unicorn, castle"),
        ("a person is holding a house", "cannot be held"),
        ("a flame and a knife or a skull", "cannot mix"),
        ("is visible", "names no toy-world object"),
    ],
)
def test_grammar_errors_say_what_is_wrong(statement, message):
    with pytest.raises(ToyVocabularyError, match=message):
        parse_statement(statement)


def test_every_generated_wording_parses_back_to_its_query():
    rng = np.random.default_rng(0)
    queries = [Query("present", (c,)) for c in CONCEPTS] + [Query("holding", ("syringe",)), Query("near", ("blood", "person")),
                                                          Query("dangerous"), Query("all", parts=(Query("present", ("car",)), Query("holding", ("ball",))))]
    for query in queries:
        for _ in range(10):
            assert parse_statement(statement_text(query, rng)) == query


def test_tokenizer_lists_unknown_words_and_maps_aliases():
    tokenizer = ToyTokenizer(demo_vocabulary())
    assert tokenizer.encode("a gun") == tokenizer.encode("a pistol")
    assert tokenizer.decode(tokenizer.encode("the flame is near a house")) == ["the", "flame", "is", "near", "a", "house"]
    with pytest.raises(ToyVocabularyError, match="dragon, lair"):
        tokenizer.encode("a dragon in its lair")
