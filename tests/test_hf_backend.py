"""HFVisionLanguageModel on tiny random Qwen2-VL and Idefics3: shared-prefix scoring is exact, the image
matters, reasoning runs two turns, tiny builds are reproducible, and both evaluators agree on it."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from safejudge.backends.base import MLLM, Models
from safejudge.backends.hf import HFVisionLanguageModel
from safejudge.backends.registry import ModelSpec, load_detector, load_relevance
from safejudge.backends.tiny import build_tiny_model, ensure_tiny_model, publish_atomically
from safejudge.compiled import compile_constitution
from safejudge.constitution import Constitution
from safejudge.decision import yes_probability
from safejudge.evaluators import JudgeOptions, judge_batched, judge_sequential
from safejudge.prompts import REASON_SUMMARY
from tests.hf_fixtures import ODD_SIZES, STATEMENTS, noise_image, odd_image

IMAGE = noise_image(1)
OTHER_IMAGE = noise_image(2, height=90, width=60)


@pytest.fixture(scope="module", params=["qwen2-vl", "idefics3"])
def mllm(request) -> HFVisionLanguageModel:
    return HFVisionLanguageModel.from_pretrained(ensure_tiny_model(request.param), max_new_tokens=6)


def full_forward_logits(model: HFVisionLanguageModel, image, statement: str) -> torch.Tensor:
    """The plain way: the whole prompt through the model, no cache, one question."""
    prompt = model.yes_no_prompt(image is not None, statement)
    if image is None:
        inputs = model.tokenizer([prompt], return_tensors="pt")
    else:
        inputs = model.processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.inference_mode():
        return model.model(**inputs).logits[0, -1].float()


def full_forward_scores(model: HFVisionLanguageModel, image, statements: list[str]) -> np.ndarray:
    return np.array(
        [yes_probability(full_forward_logits(model, image, s).numpy(), model.yes_ids, model.no_ids) for s in statements]
    )


def test_implements_the_mllm_protocol(mllm):
    assert isinstance(mllm, MLLM)


@pytest.mark.parametrize("image", [IMAGE, OTHER_IMAGE, None], ids=["wide", "tall", "prior"])
def test_shared_prefix_scoring_equals_full_forward_per_question(mllm, image):
    scores = mllm.score(image, STATEMENTS)
    assert scores.shape == (len(STATEMENTS),)
    np.testing.assert_allclose(scores, full_forward_scores(mllm, image, STATEMENTS), atol=1e-5, rtol=0)


def test_several_packs_and_single_questions_give_the_same_scores(mllm, monkeypatch):
    together = mllm.score(IMAGE, STATEMENTS)
    monkeypatch.setattr(mllm, "max_pack_tokens", 20)  # a few questions per forward
    before = mllm.stats.copy()
    np.testing.assert_allclose(mllm.score(IMAGE, STATEMENTS), together, atol=1e-5, rtol=0)
    assert (mllm.stats - before).forward_passes > 2
    alone = np.concatenate([mllm.score(IMAGE, [s]) for s in STATEMENTS])
    np.testing.assert_allclose(alone, together, atol=1e-5, rtol=0)


def test_scores_spread_and_depend_on_the_image(mllm):
    with_image = mllm.score(IMAGE, STATEMENTS)
    other = mllm.score(OTHER_IMAGE, STATEMENTS)
    prior = mllm.score(None, STATEMENTS)
    for scores in (with_image, other, prior):
        assert np.all((scores > 0) & (scores < 1))
    assert np.ptp(with_image) > 0.05, "random wide-init weights should spread answers"
    assert np.abs(with_image - other).max() > 0.01, "the image must change the answer"
    assert np.abs(with_image - prior).max() > 0.01, "the prior has no image tokens"


def test_yes_and_no_count_every_single_token_spelling(mllm):
    vocab = mllm.tokenizer.get_vocab()
    for token in ("Yes", "ĠYes"):
        assert vocab[token] in mllm.yes_ids
    for token in ("No", "ĠNo"):
        assert vocab[token] in mllm.no_ids
    probabilities = torch.softmax(full_forward_logits(mllm, IMAGE, STATEMENTS[0]).double(), dim=-1)
    p_yes, p_no = probabilities[mllm.yes_ids].sum(), probabilities[mllm.no_ids].sum()
    assert mllm.score(IMAGE, STATEMENTS[:1])[0] == pytest.approx(float(p_yes / (p_yes + p_no)), abs=1e-5)


def test_no_questions_no_work(mllm):
    assert mllm.score(IMAGE, []).shape == (0,)
    assert mllm.reason(IMAGE, []) == []


def test_reason_runs_two_greedy_turns_per_question(mllm, monkeypatch):
    prompts: list[list[str]] = []
    new_tokens: list[int] = []
    generate_text, generate_tokens = mllm._generate, mllm.model.generate

    def recording_text(image, batch):
        prompts.append(batch)
        return generate_text(image, batch)

    def recording_tokens(**inputs):
        output = generate_tokens(**inputs)
        new_tokens.append(output.shape[1] - inputs["input_ids"].shape[1])
        return output

    monkeypatch.setattr(mllm, "_generate", recording_text)
    monkeypatch.setattr(mllm.model, "generate", recording_tokens)
    answers = mllm.reason(IMAGE, STATEMENTS[:2])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert len(prompts) == 2 and all(len(batch) == 2 for batch in prompts)
    first, second = prompts
    for statement, opening, summary in zip(STATEMENTS[:2], first, second, strict=True):
        assert statement in opening and REASON_SUMMARY not in opening
        assert summary.startswith(opening[: opening.index(statement)]) and REASON_SUMMARY in summary
    # Greedy: the same question gives the same answer, alone or in a batch.
    assert mllm.reason(IMAGE, STATEMENTS[:1]) == answers[:1]
    assert new_tokens and all(0 < n <= mllm.max_new_tokens for n in new_tokens)


def test_bfloat16_stays_close_to_float32():
    directory = ensure_tiny_model("qwen2-vl")
    fp32 = HFVisionLanguageModel.from_pretrained(directory).score(IMAGE, STATEMENTS)
    bf16_model = HFVisionLanguageModel.from_pretrained(directory, dtype="bfloat16")
    assert bf16_model.model.dtype == torch.bfloat16
    bf16 = bf16_model.score(IMAGE, STATEMENTS)
    # bf16 rounding is amplified by the wide random init; garbage would be off by about 0.5.
    np.testing.assert_allclose(bf16, fp32, atol=0.25)
    np.testing.assert_allclose(bf16, full_forward_scores(bf16_model, IMAGE, STATEMENTS), atol=0.05)


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype"):
        HFVisionLanguageModel.from_pretrained(ensure_tiny_model("qwen2-vl"), dtype="float16")


def test_two_builds_from_the_same_seed_score_identically(tmp_path):
    first = HFVisionLanguageModel.from_pretrained(build_tiny_model("qwen2-vl", tmp_path / "a"))
    second = HFVisionLanguageModel.from_pretrained(build_tiny_model("qwen2-vl", tmp_path / "b"))
    np.testing.assert_array_equal(first.score(IMAGE, STATEMENTS), second.score(IMAGE, STATEMENTS))
    other_seed = HFVisionLanguageModel.from_pretrained(build_tiny_model("qwen2-vl", tmp_path / "c", seed=1))
    assert np.abs(other_seed.score(IMAGE, STATEMENTS) - first.score(IMAGE, STATEMENTS)).max() > 1e-3


def test_concurrent_builders_publish_one_complete_directory(tmp_path):
    target = tmp_path / "cache" / "model-v1"
    barrier = threading.Barrier(4)

    def build(out):
        out.mkdir()
        barrier.wait()  # every builder is mid-build before any of them publishes
        (out / "weights").write_text(threading.current_thread().name)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: publish_atomically(target, build), range(4)))
    assert results == [target] * 4
    assert (target / "weights").read_text()
    assert sorted(p.name for p in target.parent.iterdir()) == ["model-v1"], "no temporary directories left"


CONSTITUTION = Constitution.model_validate(
    {
        "name": "tiny-check",
        "version": "1",
        # Every rule is considered (t = -1) and the thresholds are wide, so that all three decision paths
        # (alpha tests, Strategy 2 with the detector, reasoning) run on the tiny models.
        "thresholds": {"relevance": -1.0, "alpha1_factor": -0.2, "alpha2_factor": 0.5, "detector_confidence": 0.05},
        "rules": [
            {
                "id": "blood",
                "title": "Blood",
                "category": "gore",
                "text": "visible blood",
                "preconditions": [
                    [STATEMENTS[0], {"text": STATEMENTS[1], "central_object": "blood"}],
                    {"text": STATEMENTS[2], "central_object": "fire"},
                ],
            },
            {
                "id": "knife",
                "title": "Knife",
                "category": "violence",
                "text": "a knife at a throat",
                "preconditions": [{"text": STATEMENTS[3], "central_object": "knife"}, STATEMENTS[0]],
            },
            {
                "id": "kiss",
                "title": "Kiss",
                "category": "sexual",
                "text": "kissing",
                "preconditions": [STATEMENTS[4]],
            },
        ],
    }
)


def test_sequential_and_batched_evaluators_agree_on_the_tiny_models(mllm):
    spec = ModelSpec(detector="tiny:owlv2")
    models = Models(mllm=mllm, relevance=load_relevance(spec), detector=load_detector(spec))
    compiled = compile_constitution(CONSTITUTION, models)
    for image in (IMAGE, OTHER_IMAGE):
        sequential = judge_sequential(image, compiled, models, JudgeOptions())
        for schedule in ("all", "waves"):
            batched = judge_batched(image, compiled, models, JudgeOptions(schedule=schedule))
            assert batched.decision() == sequential.decision()
            assert batched.rules_considered == ["blood", "knife", "kiss"]
            assert batched.mllm_calls <= sequential.mllm_calls


def test_scoring_counts_forward_passes_and_tokens_against_the_minimum():
    from PIL import Image

    from safejudge.backends.registry import load_mllm

    mllm = load_mllm(ModelSpec(relevance=None))
    image = Image.new("RGB", (64, 48), (200, 10, 10))
    questions = ["A person is visible", "A knife with a long blade is visible in a hand", "Fire"]
    before = mllm.stats.copy()
    mllm.score(image, questions)
    used = mllm.stats - before
    minimum = mllm.minimum_tokens(image, questions)
    assert used.forward_passes == 2  # the shared prefix once, then every suffix packed into one row
    assert used.tokens_processed == minimum  # packing wastes nothing on padding


@pytest.mark.parametrize("size", ODD_SIZES, ids=str)
def test_any_image_size_is_scored(mllm, size):
    scores = mllm.score(odd_image(size), STATEMENTS[:2])
    assert scores.shape == (2,) and np.all((scores > 0) & (scores < 1))


def test_prefix_reuse_gives_the_scores_of_a_fresh_prefill_and_encodes_an_image_once(mllm):
    fresh = HFVisionLanguageModel(
        mllm.model, mllm.processor, "fresh", mllm.fingerprint, mllm.max_new_tokens, prefix_cache_size=0
    )
    expected = fresh.score(IMAGE, STATEMENTS)
    mllm._prefixes.clear()
    before = mllm.stats.copy()
    first = mllm.score(IMAGE, STATEMENTS[:2])  # wave 1
    second = mllm.score(IMAGE, STATEMENTS[2:])  # wave 2: other questions, the same image
    np.testing.assert_allclose(np.concatenate([first, second]), expected, atol=1e-5, rtol=0)
    used = mllm.stats - before
    assert used.vision_encodings == 1 and used.prefix_prefills == 1 and used.prefix_hits == 1
    # A different image (a Strategy 2 view is one) is encoded; the same pixels in a new object are not.
    mllm.score(OTHER_IMAGE, STATEMENTS[:1])
    mllm.score(IMAGE.copy(), STATEMENTS[:1])
    used = mllm.stats - before
    assert used.vision_encodings == 2 and used.prefix_hits == 2
    np.testing.assert_allclose(mllm.score(OTHER_IMAGE, STATEMENTS), fresh.score(OTHER_IMAGE, STATEMENTS), atol=1e-5)


def test_a_merged_batch_scores_every_item_as_alone_in_one_decoder_pass(mllm, monkeypatch):
    # Different image sizes (prefixes of different lengths), the prior (no image), no questions, one image twice.
    items = [(IMAGE, STATEMENTS), (OTHER_IMAGE, STATEMENTS[:2]), (None, STATEMENTS[1:]), (IMAGE, []),
             (noise_image(5, height=40, width=40), STATEMENTS[:1])]
    alone = [mllm.score(image, questions) for image, questions in items]
    before = mllm.stats.copy()
    merged = mllm.score_batch(items)
    for got, expected in zip(merged, alone, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        assert got.shape == expected.shape
    used = mllm.stats - before
    assert used.vision_encodings == 0 and used.forward_passes == 1  # every prefix cached: one pass for all
    monkeypatch.setattr(mllm, "max_pack_tokens", 40)  # now the rows need several passes, still exact
    for got, expected in zip(mllm.score_batch(items), alone, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert (mllm.stats - before).forward_passes > 2


class CountingTokenizer:
    """The model's tokenizer, recording the texts of each call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, texts, *args, **kwargs):
        self.calls.append(texts)
        return self.inner(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_later_calls_on_an_image_skip_the_image_processor_and_known_prompts_the_tokenizer(mllm, monkeypatch):
    mllm.forget_images()
    mllm._token_memo.clear()
    encode, encoded = mllm._encode, []
    monkeypatch.setattr(mllm, "_encode", lambda texts, image: encoded.append(image) or encode(texts, image))
    tokenizer = CountingTokenizer(mllm.tokenizer)
    monkeypatch.setattr(mllm, "tokenizer", tokenizer)
    first = mllm.score(IMAGE, STATEMENTS[:2])
    assert len(tokenizer.calls) == 1 and len(tokenizer.calls[0]) == 2  # both prompts in one call
    mllm.score(IMAGE, STATEMENTS[2:])
    np.testing.assert_array_equal(mllm.score(IMAGE, STATEMENTS[:2]), first)
    assert len(encoded) == 1 and len(tokenizer.calls) == 2  # the third call: nothing new to tokenize
    mllm.score(OTHER_IMAGE, STATEMENTS[:2])
    assert len(encoded) == 2 and len(tokenizer.calls) == 2  # another image: the same prompts
    mllm.forget_images()
    mllm.score(IMAGE, STATEMENTS[:1])
    assert len(encoded) == 3


def test_the_engine_asks_in_waves_on_this_backend_by_default(mllm):
    assert JudgeOptions().schedule_for(mllm) == "waves"
    assert JudgeOptions(schedule="all").schedule_for(mllm) == "all"


def test_the_prefix_cache_is_bounded(mllm, monkeypatch):
    monkeypatch.setattr(mllm, "prefix_cache_size", 2)
    mllm._prefixes.clear()
    images = [noise_image(seed) for seed in (11, 12, 13)]
    before = mllm.stats.copy()
    for image in images:
        mllm.score(image, STATEMENTS[:1])
    assert len(mllm._prefixes) == 2
    mllm.score(images[0], STATEMENTS[:1])  # the oldest was evicted: encoded again
    mllm.score(images[2], STATEMENTS[:1])  # still cached
    assert (mllm.stats - before).vision_encodings == 4
    monkeypatch.setattr(mllm, "prefix_cache_size", 0)
    mllm._prefixes.clear()
    mllm.score(images[0], STATEMENTS[:1])
    mllm.score(images[0], STATEMENTS[:1])
    assert not mllm._prefixes and (mllm.stats - before).vision_encodings == 6


def test_reasoning_on_the_cached_prefix_says_what_a_fresh_generation_says(mllm):
    fresh = HFVisionLanguageModel(
        mllm.model, mllm.processor, "fresh", mllm.fingerprint, mllm.max_new_tokens, prefix_cache_size=0
    )
    expected = fresh.reason(IMAGE, STATEMENTS[:3])
    mllm._prefixes.clear()
    mllm.score(IMAGE, STATEMENTS)
    before = mllm.stats.copy()
    assert mllm.reason(IMAGE, STATEMENTS[:3]) == expected  # greedy: the same tokens
    used = mllm.stats - before
    # Both turns start from the image's cached prefix: no vision encoding, fewer prompt tokens than fresh.
    assert used.vision_encodings == 0 and used.prefix_hits == 2
    assert mllm.reason(IMAGE, STATEMENTS[1:2]) == expected[1:2]
    fresh_before = fresh.stats.copy()
    fresh.reason(IMAGE, STATEMENTS[:3])
    assert used.tokens_processed < (fresh.stats - fresh_before).tokens_processed


def test_scoring_after_reasoning_cuts_the_cached_prefix_back_to_the_image(mllm):
    fresh = HFVisionLanguageModel(
        mllm.model, mllm.processor, "fresh", mllm.fingerprint, mllm.max_new_tokens, prefix_cache_size=0
    )
    mllm._prefixes.clear()
    mllm.reason(OTHER_IMAGE, STATEMENTS[:1])  # caches the reasoning prefix only
    before = mllm.stats.copy()
    scores = mllm.score(OTHER_IMAGE, STATEMENTS)  # the image's KV reused, the yes/no opening run on top
    np.testing.assert_allclose(scores, fresh.score(OTHER_IMAGE, STATEMENTS), atol=1e-5, rtol=0)
    used = mllm.stats - before
    assert used.vision_encodings == 0 and used.prefix_hits == 1
