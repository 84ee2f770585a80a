"""The TensorRT-LLM backend: its logic on CPU (a stand-in for `tensorrt_llm.LLM`), the engine itself on a GPU.

CPU tests use the tiny Qwen2-VL checkpoint's real processor and chat template; only the engine, which needs
a GPU and the tensorrt_llm package, is replaced. GPU tests (marker `gpu`) need both and a Qwen2-VL or
Qwen2.5-VL checkpoint directory in SAFEJUDGE_TRTLLM_MODEL; they skip cleanly otherwise.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from safejudge.backends.tiny import ensure_tiny_model
from safejudge.backends.trtllm import (
    MAX_ASPECT,
    PIXELS_PER_VISUAL_TOKEN,
    LOGPROB_SAMPLING,
    LOGPROB_TOLERANCE,
    SCORE_SAMPLING,
    SUPPORTED_MODEL_TYPES,
    Capabilities,
    TRTLLMSettings,
    TRTLLMVisionLanguageModel,
    choose_route,
    expanded_prefix_length,
    extend_positions,
    first_token_logits,
    first_token_logprobs,
    fit_pixel_budget,
    image_hash_key,
    inspect_checkpoint,
    probe_capabilities,
    reason_sampling,
    yes_probability_from_top,
)
from safejudge.decision import parse_reasoning, yes_no_token_ids, yes_probability
from safejudge.prompts import REASON_SUMMARY, SYSTEM, YES_NO

torch.set_num_threads(1)

QWEN_IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
STATEMENTS = ["a person is visible", "visible blood on the skin", "a knife is held in a hand"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return ensure_tiny_model("qwen2-vl")


@pytest.fixture(scope="module")
def processor(tiny_dir):
    from safejudge.backends.hf import PROCESSORS

    return PROCESSORS["qwen2_vl"].from_pretrained(tiny_dir)


@pytest.fixture
def image() -> Image.Image:
    pixels = np.random.default_rng(1).integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


class FakeLLM:
    """Stands in for `tensorrt_llm.LLM` (it needs a GPU): records every `generate` call and answers each
    request with logits derived from its prompt and image, greedy token = argmax, like the real engine.

    A request with DisaggregatedParams (the encode_once route) is answered like upstream's LLM: the image comes
    from the embedding handle, not from multi_modal_data, and the fake checks what the engine would need: the
    handle belongs to the request's own image, the hash is that image's key, and the mrope positions are the
    ones the full prompt has (length and values)."""

    def __init__(self, vocab_size: int, emit_wrong_token: bool = False, logits: bool = True, processor=None,
                 handles=None, boost: tuple[list[int], float] | None = None):
        self.vocab_size = vocab_size
        self.emit_wrong_token = emit_wrong_token
        self.logits = logits
        self.processor = processor
        self.handles = handles
        self.boost = boost  # (token ids, added logit): puts Yes/No into the top-k
        self.calls: list[tuple[list[dict], object]] = []
        self.disaggregated: list[list] = []

    def logits_for(self, request: dict, digest_of_image: bytes | None = None) -> np.ndarray:
        digest = hashlib.sha256(request["prompt"].encode())
        if digest_of_image is not None:
            digest.update(digest_of_image)
        else:
            for image in request.get("multi_modal_data", {}).get("image", []):
                digest.update(image_digest(image))
        seed = int.from_bytes(digest.digest()[:8], "little")
        row = np.random.default_rng(seed).normal(0.0, 3.0, size=self.vocab_size).astype(np.float32)
        if self.boost is not None:
            row[self.boost[0]] += self.boost[1]
        return row

    def _image_from_handles(self, request: dict, params) -> bytes:
        assert params.request_type == "context_and_generation"
        (embedding,) = params.multimodal_embedding_handles
        images = request.get("multi_modal_data", {}).get("image", [])
        if images:  # the request's own image and its handle must agree: blocks of two images never mix
            assert embedding["digest"] == image_digest(images[0])
            assert params.multimodal_hashes == [image_hash_key(images[0])]
        ids = self.processor.tokenizer(request["prompt"], add_special_tokens=False).input_ids
        positions, _ = self.handles.load(params.mrope_position_ids_handle)  # refuses a freed tensor
        expected = fake_mrope(ids, image_pad_id(self.processor), embedding["tensor_size"][0])
        np.testing.assert_array_equal(positions, expected)
        return embedding["digest"]

    def generate(self, requests, params, use_tqdm=True, disaggregated_params=None):
        assert isinstance(requests, list) and not use_tqdm
        self.calls.append((requests, params))
        per_request = disaggregated_params or [None] * len(requests)
        assert len(per_request) == len(requests)
        self.disaggregated.append(list(per_request))
        outputs = []
        for request, dp in zip(requests, per_request, strict=True):
            digest = None if dp is None else self._image_from_handles(request, dp)
            row = self.logits_for(request, digest)
            token = int(row.argmin() if self.emit_wrong_token else row.argmax())
            wants_logits = params.get("return_generation_logits", False)
            completion = SimpleNamespace(
                token_ids=[token],
                # [generated tokens, vocab] in bf16, as the PyTorch backend hands it over.
                generation_logits=torch.from_numpy(row[None]).to(torch.bfloat16) if self.logits and wants_logits
                else None,
                logprobs=top_logprobs(row, params["logprobs"], token) if params.get("logprobs") else None,
                text=f"  answer {len(self.calls)}.{len(outputs)}  ",  # call.request, with stray spaces
            )
            outputs.append(SimpleNamespace(outputs=[completion]))
        return outputs


def image_digest(image: Image.Image) -> bytes:
    return hashlib.sha256(image.tobytes()).digest()


def image_pad_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")


def fake_mrope(ids: list[int], image_token_id: int, image_tokens: int) -> np.ndarray:
    """Qwen2-VL's 3-section rope positions ([3, 1, L]) for a prompt with one image of `image_tokens` tokens
    (laid out as one row): text counts up in all sections, the image block spans a grid, text after it counts
    on from the largest position plus one."""
    columns, position = [], 0
    for token in ids:
        if token == image_token_id:
            for index in range(image_tokens):
                columns.append((position, position + index // 2, position + index % 2))
            position = max(max(c) for c in columns) + 1
        else:
            columns.append((position, position, position))
            position += 1
    return np.array(columns, dtype=np.int64).T[:, None, :]


def top_logprobs(row: np.ndarray, k: int, token: int) -> list[dict]:
    logprobs = row.astype(np.float64) - np.log(np.exp(row.astype(np.float64) - row.max()).sum()) - row.max()
    top = np.argsort(-logprobs)[:k]
    return [{int(t): SimpleNamespace(logprob=float(logprobs[t]), rank=r + 1) for r, t in enumerate(top)}
            | {token: SimpleNamespace(logprob=float(logprobs[token]), rank=1)}]


class FakeHandles:
    """TensorHandles on CPU: a handle is a dict naming an array kept here; the tensors the backend makes are
    alive while the keep-alive object it got is (the encoder's own live as long as the engine says)."""

    def __init__(self):
        self.arrays: dict[int, np.ndarray] = {}
        self.keeps: dict[int, weakref.ref] = {}

    def dump(self, array, like=None, owned_by_engine: bool = False) -> tuple[dict, object]:
        key = len(self.arrays) + 1
        self.arrays[key] = np.asarray(array).copy()
        keep = KeepAlive()
        if not owned_by_engine:
            self.keeps[key] = weakref.ref(keep)
        return {"key": key, "tensor_size": list(np.shape(array))}, keep

    def load(self, handle) -> tuple[np.ndarray, str]:
        key = handle["key"]
        assert key not in self.keeps or self.keeps[key]() is not None, "the tensor behind this handle was freed"
        return self.arrays[key], "like"

    def alive(self) -> list[int]:
        return [key for key, ref in self.keeps.items() if ref() is not None]


class KeepAlive:
    """What the fake hands out to keep alive (weakly referenceable, unlike None)."""


@dataclass(kw_only=True)
class FakeDisaggregatedParams:
    """The fields of tensorrt_llm.llmapi.DisaggregatedParams (1.2.x) this backend uses, and one it must pass
    on untouched."""

    request_type: str | None = None
    multimodal_embedding_handles: list | None = None
    multimodal_hashes: list | None = None
    mrope_position_ids_handle: dict | None = None
    mrope_position_deltas_handle: dict | None = None
    opaque_state: bytes | None = None


class FakeEncoder:
    """Stands in for `tensorrt_llm.MultimodalEncoder`: one output per input, with the handles upstream's
    encoder returns (embedding, its own random hash, mrope positions of the prompt it was given)."""

    def __init__(self, processor, handles: FakeHandles):
        self.processor = processor
        self.handles = handles
        self.calls: list[list[dict]] = []

    def generate(self, inputs):
        self.calls.append(list(inputs))
        outputs = []
        for request in inputs:
            (image,) = request["multi_modal_data"]["image"]
            tokens = max(1, (image.width // 28) * (image.height // 28))
            ids = self.processor.tokenizer(request["prompt"], add_special_tokens=False).input_ids
            params = FakeDisaggregatedParams(
                multimodal_embedding_handles=[{"digest": image_digest(image), "tensor_size": [tokens, 16]}],
                multimodal_hashes=[[7] * 8],  # the encoder's own key; the backend must replace it
                mrope_position_ids_handle=self.handles.dump(
                    fake_mrope(ids, image_pad_id(self.processor), tokens), owned_by_engine=True
                )[0],
                mrope_position_deltas_handle={"delta": "same for every question"},
                opaque_state=b"kept",
            )
            outputs.append(SimpleNamespace(disaggregated_params=params))
        return outputs


def make_backend(processor, llm: FakeLLM, **kwargs) -> TRTLLMVisionLanguageModel:
    return TRTLLMVisionLanguageModel(
        llm,
        processor,
        model_id="tiny-qwen2-vl",
        fingerprint="sha256:tiny-qwen2-vl",
        score_params=dict(SCORE_SAMPLING),
        reason_params=reason_sampling(64),
        **kwargs,
    )


def vocab_rows(processor) -> int:
    # Real checkpoints pad the logits row past the tokenizer's vocabulary; the fake does too.
    return len(processor.tokenizer) + 7


# -- prompts ------------------------------------------------------------------------------------------


def test_prompt_with_and_without_image_differ_only_by_the_image(processor):
    backend = make_backend(processor, FakeLLM(vocab_rows(processor)))
    with_image = backend.yes_no_prompt(True, STATEMENTS[0])
    without_image = backend.yes_no_prompt(False, STATEMENTS[0])
    assert with_image.count(QWEN_IMAGE_PLACEHOLDER) == 1
    assert QWEN_IMAGE_PLACEHOLDER not in without_image
    assert with_image.replace(QWEN_IMAGE_PLACEHOLDER, "") == without_image
    assert SYSTEM in with_image and STATEMENTS[0] in with_image
    assert with_image.endswith("<|im_start|>assistant\n")


def test_questions_about_one_image_share_system_image_and_opening_words(processor):
    backend = make_backend(processor, FakeLLM(vocab_rows(processor)))
    prompts = [backend.yes_no_prompt(True, s) for s in STATEMENTS]
    shared = os.path.commonprefix(prompts)
    opening = YES_NO.split("{statement}")[0]
    assert shared.index(SYSTEM) < shared.index(QWEN_IMAGE_PLACEHOLDER) < shared.index(opening)
    # The image and everything before it tokenize identically, so KV blocks can be shared.
    token_lists = [processor.tokenizer(p).input_ids for p in prompts]
    shared_tokens = len(os.path.commonprefix(token_lists))
    assert shared_tokens >= len(processor.tokenizer(shared[: shared.index(opening)]).input_ids)


# -- scoring ------------------------------------------------------------------------------------------


def test_score_is_yes_probability_of_each_questions_own_logits(processor, image):
    llm = FakeLLM(vocab_rows(processor))
    backend = make_backend(processor, llm)
    scores = backend.score(image, STATEMENTS)

    yes, no = yes_no_token_ids(processor.tokenizer.get_vocab())
    sent = [request for requests, _ in llm.calls for request in requests]
    assert [s for s in STATEMENTS if any(s in r["prompt"] for r in sent)] == STATEMENTS
    rows = np.stack([llm.logits_for(r) for r in sent])
    rows = torch.from_numpy(rows).to(torch.bfloat16).float().numpy()  # what the engine hands over
    np.testing.assert_allclose(scores, yes_probability(rows, yes, no), rtol=1e-6)
    assert scores.shape == (3,) and np.all((scores > 0) & (scores < 1))
    # Each score belongs to its own question: the order follows the questions.
    reordered = backend.score(image, STATEMENTS[::-1])
    np.testing.assert_allclose(reordered, scores[::-1], rtol=1e-6)


def test_score_sends_the_image_with_every_question_and_warms_the_prefix_first(processor, image):
    llm = FakeLLM(vocab_rows(processor))
    make_backend(processor, llm, warm_prefix=True).score(image, STATEMENTS)
    assert [len(requests) for requests, _ in llm.calls] == [1, 2]
    for requests, params in llm.calls:
        assert params == SCORE_SAMPLING
        for request in requests:
            assert request["multi_modal_data"]["image"][0].tobytes() == image.tobytes()
            assert QWEN_IMAGE_PLACEHOLDER in request["prompt"]


def test_prior_is_one_batch_without_image_data(processor):
    llm = FakeLLM(vocab_rows(processor))
    scores = make_backend(processor, llm).score(None, STATEMENTS)
    assert scores.shape == (3,)
    (requests, _), = llm.calls
    assert len(requests) == 3
    assert all("multi_modal_data" not in r and QWEN_IMAGE_PLACEHOLDER not in r["prompt"] for r in requests)


def test_without_warm_prefix_all_questions_go_in_one_batch(processor, image):
    llm = FakeLLM(vocab_rows(processor))
    backend = make_backend(processor, llm)  # the default: no KV reuse, so nothing to warm
    backend.score(image, STATEMENTS)
    assert [len(requests) for requests, _ in llm.calls] == [3]
    assert backend.counters.vision_runs == 3  # per_question: the engine encodes the image with every question


def test_the_whole_triton_batch_reaches_the_engine_in_one_call(processor, image):
    other = Image.new("RGB", (64, 64), (200, 30, 30))
    items = [(image, STATEMENTS), (None, STATEMENTS[:2]), (other, STATEMENTS[2:]), (other, [])]
    llm = FakeLLM(vocab_rows(processor))
    backend = make_backend(processor, llm)
    batched = backend.score_batch(items)
    assert [len(requests) for requests, _ in llm.calls] == [6]
    assert backend.counters.history == [6] and backend.counters.engine_calls == 1
    assert [len(s) for s in batched] == [3, 2, 1, 0]


def test_score_batch_runs_many_images_in_two_engine_calls_with_each_items_own_scores(processor, image):
    other = Image.new("RGB", (64, 64), (200, 30, 30))
    items = [(image, STATEMENTS), (None, STATEMENTS[:2]), (other, STATEMENTS[2:]), (other, [])]
    llm = FakeLLM(vocab_rows(processor))
    backend = make_backend(processor, llm, warm_prefix=True)
    batched = backend.score_batch(items)
    # Heads: only the image with several questions warms a prefix; everything else goes in the second call.
    assert [len(requests) for requests, _ in llm.calls] == [1, 5]
    assert [len(s) for s in batched] == [3, 2, 1, 0]
    for (item_image, questions), scores in zip(items, batched, strict=True):
        np.testing.assert_allclose(scores, backend.score(item_image, questions), rtol=1e-6)
    assert not np.allclose(batched[0][:2], batched[1])  # with and without the image differ


def test_no_questions_means_no_engine_call(processor, image):
    llm = FakeLLM(vocab_rows(processor))
    backend = make_backend(processor, llm)
    assert backend.score(image, []).shape == (0,)
    assert backend.reason(image, []) == []
    assert llm.calls == []


def test_large_images_are_scaled_to_the_pixel_budget_before_sending(processor):
    llm = FakeLLM(vocab_rows(processor))
    big = Image.new("RGB", (400, 200), (10, 200, 30))
    make_backend(processor, llm, max_image_pixels=20_000).score(big, STATEMENTS[:1])
    sent = llm.calls[0][0][0]["multi_modal_data"]["image"][0]
    assert sent.width * sent.height <= 20_000
    assert abs(sent.width / sent.height - 2.0) < 0.05


def test_a_logits_row_that_does_not_peak_at_the_emitted_token_is_refused(processor, image):
    backend = make_backend(processor, FakeLLM(vocab_rows(processor), emit_wrong_token=True))
    with pytest.raises(RuntimeError, match="misaligned"):
        backend.score(image, STATEMENTS)


def test_missing_generation_logits_name_the_setting_to_fix(processor, image):
    backend = make_backend(processor, FakeLLM(vocab_rows(processor), logits=False))
    with pytest.raises(RuntimeError, match="gather_generation_logits"):
        backend.score(image, STATEMENTS)


@pytest.mark.parametrize("shape", [(11,), (1, 11), (3, 11), (1, 3, 11)])
def test_first_token_logits_takes_the_first_row_of_the_first_beam(shape):
    values = np.zeros(shape, dtype=np.float32)
    first = values.reshape(-1, 11)[0]
    first[4] = 5.0  # the first token's row peaks at token 4; any later row peaks elsewhere
    values.reshape(-1, 11)[1:, 9] = 50.0
    output = SimpleNamespace(outputs=[SimpleNamespace(generation_logits=values, token_ids=[4])])
    row = first_token_logits(output)
    assert row.shape == (11,) and row[4] == 5.0 and row[9] == 0.0


def test_an_emitted_token_outside_the_row_is_refused():
    output = SimpleNamespace(outputs=[SimpleNamespace(generation_logits=np.zeros((1, 5)), token_ids=[7])])
    with pytest.raises(RuntimeError, match="misaligned"):
        first_token_logits(output)


# -- encode_once: the vision encoder once per image, handles per question --------------------------


def make_encode_once(processor, **kwargs):
    handles = FakeHandles()
    llm = FakeLLM(vocab_rows(processor), processor=processor, handles=handles, boost=kwargs.pop("boost", None))
    encoder = FakeEncoder(processor, handles)
    backend = make_backend(processor, llm, encoder=encoder, handles=handles, **kwargs)
    return backend, llm, encoder, handles


def test_encode_once_scores_equal_the_one_request_at_a_time_route(processor, image):
    backend, llm, encoder, _ = make_encode_once(processor)
    reference = make_backend(processor, FakeLLM(vocab_rows(processor)))
    encoded = backend.score(image, STATEMENTS)
    one_by_one = np.concatenate([reference.score(image, [q]) for q in STATEMENTS])
    # The fake answers from the prompt and the image either way: equal means every question got its own
    # image's embedding and the positions of its own prompt (the fake checks both).
    np.testing.assert_allclose(encoded, one_by_one, rtol=1e-6)
    assert backend.route == "encode_once" and reference.route == "per_question"


def test_encode_once_runs_the_vision_encoder_once_per_distinct_image_in_one_call(processor, image):
    other = Image.new("RGB", (64, 64), (200, 30, 30))
    backend, llm, encoder, handles = make_encode_once(processor)
    items = [(image, STATEMENTS), (other, STATEMENTS), (None, STATEMENTS[:1]), (image.copy(), STATEMENTS[:2]),
             (other, [])]
    batched = backend.score_batch(items)
    (sent,) = encoder.calls  # one encoder call, one input per distinct image
    assert [r["multi_modal_data"]["image"][0].tobytes() for r in sent] == [image.tobytes(), other.tobytes()]
    assert backend.counters.vision_runs == 2 and backend.counters.encoder_calls == 1
    assert backend.counters.history == [9]  # every question of the batch in one LLM.generate
    (params,) = llm.disaggregated
    assert [p is None for p in params] == [False] * 6 + [True] + [False] * 2  # the prior carries no handles
    assert params[0].multimodal_hashes == [image_hash_key(image)] == params[7].multimodal_hashes
    assert params[3].multimodal_hashes == [image_hash_key(other)] != params[0].multimodal_hashes
    assert all(p.opaque_state == b"kept" and p.mrope_position_deltas_handle for p in params if p is not None)
    gc.collect()
    assert len(handles.keeps) == 8 and not handles.alive()  # per-question positions, freed once the call is done
    np.testing.assert_allclose(batched[3], batched[0][:2], rtol=1e-6)


def test_encode_once_never_mixes_two_images(processor, image):
    """A, B, A: with handles keyed by content, the second A is scored exactly as the first."""
    other = Image.new("RGB", (80, 60), (20, 20, 220))
    backend, llm, *_ = make_encode_once(processor, warm_prefix=True)
    first = backend.score(image, STATEMENTS)
    between = backend.score(other, STATEMENTS)
    again = backend.score(image, STATEMENTS)
    np.testing.assert_array_equal(again, first)
    assert not np.allclose(between, first)
    hashes = {tuple(p.multimodal_hashes[0]) for call in llm.disaggregated for p in call}
    assert hashes == {tuple(image_hash_key(image)), tuple(image_hash_key(other))}
    assert [len(requests) for requests, _ in llm.calls] == [1, 2] * 3  # warm_prefix still applies


def test_encode_once_reasoning_encodes_the_image_once_for_both_turns(processor, image):
    backend, llm, encoder, _ = make_encode_once(processor)
    answers = backend.reason(image, STATEMENTS[:2])
    assert len(encoder.calls) == 1 and backend.counters.vision_runs == 1
    assert [len(requests) for requests, _ in llm.calls] == [2, 2] and len(answers) == 2


def test_the_route_needs_encoder_and_handles_together(processor):
    with pytest.raises(ValueError, match="encode_once needs"):
        make_backend(processor, FakeLLM(vocab_rows(processor)), encoder=object())


def test_image_hash_key_is_eight_int32_by_content_mode_and_size():
    red = Image.new("RGB", (4, 2), (255, 0, 0))
    key = image_hash_key(red)
    assert len(key) == 8 and all(isinstance(v, int) and -(2**31) <= v < 2**31 for v in key)
    assert image_hash_key(red.copy()) == key
    assert image_hash_key(Image.new("RGB", (4, 2), (255, 0, 1))) != key
    assert image_hash_key(Image.new("RGB", (2, 4), (255, 0, 0))) != key  # same bytes, another shape


def test_question_positions_derive_from_the_encoded_prompt(processor):
    backend = make_backend(processor, FakeLLM(vocab_rows(processor)))
    pad = image_pad_id(processor)
    encoded_ids = backend._token_ids(backend.yes_no_prompt(True, "a knife"))
    for statement in ["a person is visible and holds a very long object in the left hand", "x"]:
        ids = backend._token_ids(backend.yes_no_prompt(True, statement))
        prefix = expanded_prefix_length(encoded_ids, ids, pad, image_tokens=6)
        derived = extend_positions(fake_mrope(encoded_ids, pad, 6), prefix, len(ids) + 5)
        np.testing.assert_array_equal(derived, fake_mrope(ids, pad, 6))
    with pytest.raises(ValueError, match="does not share the image"):
        expanded_prefix_length(encoded_ids, backend._token_ids(backend.yes_no_prompt(False, "x")), pad, 6)


def test_positions_refuse_a_prefix_that_ends_inside_the_image():
    positions = fake_mrope([1, 9, 2, 3], image_token_id=9, image_tokens=4)
    with pytest.raises(ValueError, match="not a text token"):
        extend_positions(positions, prefix=4, length=8)  # the 4th position is an image token
    with pytest.raises(ValueError, match="within both prompts"):
        extend_positions(positions, prefix=0, length=8)


# -- Yes/No from top-k logprobs ----------------------------------------------------------------------


def test_top_logprobs_with_every_spelling_give_the_logits_answer(processor):
    yes, no = yes_no_token_ids(processor.tokenizer.get_vocab())
    row = np.random.default_rng(3).normal(0, 3, size=vocab_rows(processor)).astype(np.float32)
    row[yes + no] += 12.0
    (top,) = top_logprobs(row, 20, int(row.argmax()))
    score = yes_probability_from_top({t: v.logprob for t, v in top.items()}, yes, no)
    assert score == pytest.approx(float(yes_probability(row, yes, no)), abs=1e-9)


def test_top_logprobs_missing_a_side_or_too_much_mass_ask_for_logits():
    assert yes_probability_from_top({1: -0.1, 2: -3.0}, [1], [5]) is None  # no No spelling listed
    # Yes and No listed, but two absent No spellings could each be as likely as the listed No: refused.
    assert yes_probability_from_top({1: -0.1, 5: -4.0}, [1], [5, 6, 7]) is None
    # Absent spellings at most e^-12 each against listed mass near 1: accepted, within the tolerance.
    score = yes_probability_from_top({1: -0.1, 5: -2.5, 9: -12.0}, [1, 2], [5, 6])
    exact = math.exp(-0.1) / (math.exp(-0.1) + math.exp(-2.5))
    assert score == pytest.approx(exact) and 2 * math.exp(-12.0) < LOGPROB_TOLERANCE


def test_logprobs_that_do_not_peak_at_the_emitted_token_are_refused():
    output = SimpleNamespace(outputs=[SimpleNamespace(token_ids=[4], logprobs=[{4: -2.0, 5: -0.5}])])
    with pytest.raises(RuntimeError, match="misaligned"):
        first_token_logprobs(output)
    assert first_token_logprobs(SimpleNamespace(outputs=[SimpleNamespace(token_ids=[4], logprobs=None)])) is None


def test_logprob_reading_sends_top_k_and_reruns_only_rows_that_miss_a_spelling(processor, image):
    yes, no = yes_no_token_ids(processor.tokenizer.get_vocab())
    boosted = FakeLLM(vocab_rows(processor), boost=(yes + no, 12.0))
    backend = make_backend(processor, boosted, logprob_params=dict(LOGPROB_SAMPLING))
    scores = backend.score(image, STATEMENTS)
    assert [params for _, params in boosted.calls] == [LOGPROB_SAMPLING]  # all read from the top 20
    assert backend.counters.logits_fallbacks == 0
    exact = make_backend(processor, FakeLLM(vocab_rows(processor), boost=(yes + no, 12.0))).score(image, STATEMENTS)
    np.testing.assert_allclose(scores, exact, atol=LOGPROB_TOLERANCE)

    plain = FakeLLM(vocab_rows(processor))  # random rows: Yes and No are almost never both in the top 20
    backend = make_backend(processor, plain, logprob_params=dict(LOGPROB_SAMPLING))
    scores = backend.score(image, STATEMENTS)
    assert [params for _, params in plain.calls] == [LOGPROB_SAMPLING, SCORE_SAMPLING]
    assert backend.counters.logits_fallbacks == len(plain.calls[1][0]) > 0
    reference = make_backend(processor, FakeLLM(vocab_rows(processor))).score(image, STATEMENTS)
    np.testing.assert_allclose(scores, reference, rtol=1e-6)


def test_logprob_fallback_on_encode_once_reuses_the_images_handles(processor, image):
    backend, llm, encoder, _ = make_encode_once(processor, logprob_params=dict(LOGPROB_SAMPLING))
    backend.score(image, STATEMENTS)
    assert len(encoder.calls) == 1 and len(llm.calls) == 2
    assert all(p is not None for p in llm.disaggregated[1])


# -- the capability probe and the route -------------------------------------------------------------


def fake_modules(encoder=True, mrope=True, logprobs=True, logits=True, shared=True, version="1.2.1",
                 encoder_in_torch=False):
    fields = ["request_type", "first_gen_tokens", "multimodal_embedding_handles", "multimodal_hashes"]
    fields += ["mrope_position_ids_handle", "mrope_position_deltas_handle"] if mrope else []
    sampling = ["max_tokens", "top_k"] + (["logprobs"] if logprobs else []) + (
        ["return_generation_logits"] if logits else [])
    root = SimpleNamespace(__version__=version, SamplingParams=dataclass_with(sampling))
    if encoder:
        root.MultimodalEncoder = object
    modules = {
        "tensorrt_llm": root,
        "tensorrt_llm.llmapi": SimpleNamespace(DisaggregatedParams=dataclass_with(fields)),
        "tensorrt_llm._torch.shared_tensor": SimpleNamespace(**({"SharedTensorContainer": object} if shared else {})),
    }
    if encoder_in_torch:  # where releases before 1.2 kept it
        modules["tensorrt_llm._torch.multimodal.mm_encoder"] = SimpleNamespace(MultimodalEncoder=object)

    def import_module(name):
        if name not in modules:
            raise ImportError(f"No module named {name!r}")
        return modules[name]

    return import_module


def dataclass_with(names):
    return dataclasses.make_dataclass("Fake", [(n, object, None) for n in names])


def test_probe_finds_each_capability_of_a_full_install():
    caps = probe_capabilities(fake_modules())
    assert caps.version == "1.2.1" and caps.encode_once and caps.logprobs and caps.generation_logits
    assert caps.mrope_handles and caps.embedding_handles and not caps.problems
    decision = choose_route(TRTLLMSettings(model="Qwen/Qwen2.5-VL-7B-Instruct"), "qwen2_5_vl", caps)
    assert (decision.route, decision.yes_no_from) == ("encode_once", "logprobs")
    assert any("KV block reuse off" in note for note in decision.notes)


def test_probe_finds_the_encoder_in_its_older_home():
    assert probe_capabilities(fake_modules(encoder=False, encoder_in_torch=True)).encode_once
    assert not probe_capabilities(fake_modules(encoder=False)).multimodal_encoder


def test_probe_without_tensorrt_llm():
    caps = probe_capabilities(lambda name: (_ for _ in ()).throw(ImportError("No module named 'tensorrt_llm'")))
    assert caps == Capabilities(problems=caps.problems) and "cannot be imported" in caps.problems[0]
    assert not caps.encode_once and not caps.logprobs


@pytest.mark.parametrize(
    ("modules", "model_type", "why"),
    [
        (fake_modules(), "qwen2_vl", "model_type 'qwen2_vl' has no encoder/prefill split"),
        (fake_modules(mrope=False), "qwen2_5_vl", "mrope_position_ids_handle"),
        (fake_modules(encoder=False), "qwen2_5_vl", "tensorrt_llm.MultimodalEncoder"),
        (fake_modules(shared=False), "qwen2_5_vl", "SharedTensorContainer"),
    ],
)
def test_auto_falls_back_to_per_question_with_the_reason_and_explicit_encode_once_is_refused(modules, model_type, why):
    caps = probe_capabilities(modules)
    decision = choose_route(TRTLLMSettings(model="Qwen/Qwen2-VL-7B-Instruct"), model_type, caps)
    assert decision.route == "per_question" and why in decision.notes[0]
    with pytest.raises(ValueError, match="route=encode_once is not possible"):
        choose_route(TRTLLMSettings(model="Qwen/Qwen2-VL-7B-Instruct", route="encode_once"), model_type, caps)


def test_route_choices_for_logprobs_logits_and_an_explicit_per_question():
    settings = TRTLLMSettings(model="Qwen/Qwen2.5-VL-7B-Instruct")
    no_logprobs = choose_route(settings, "qwen2_5_vl", probe_capabilities(fake_modules(logprobs=False)))
    assert no_logprobs.yes_no_from == "logits" and any("no SamplingParams.logprobs" in n for n in no_logprobs.notes)
    asked = choose_route(settings.model_copy(update={"route": "per_question"}), "qwen2_5_vl",
                         probe_capabilities(fake_modules()))
    assert asked.route == "per_question" and "as asked" in asked.notes[0]
    with pytest.raises(ValueError, match="return_generation_logits"):
        choose_route(settings, "qwen2_5_vl", probe_capabilities(fake_modules(logits=False)))


def test_load_takes_the_route_the_probe_allows_and_logs_it(tiny_dir, tmp_path, processor, monkeypatch, caplog):
    """`load` end to end on fake tensorrt_llm modules: a Qwen2.5-VL checkpoint gets the encoder, a Qwen2-VL one
    does not; the log says which path was taken and why."""
    import logging

    import transformers

    started = []
    import_module = fake_modules()
    trt, llmapi = import_module("tensorrt_llm"), import_module("tensorrt_llm.llmapi")
    trt.MultimodalEncoder = lambda **kw: started.append(("encoder", kw)) or SimpleNamespace(shutdown=lambda: None)
    trt.LLM = lambda **kw: started.append(("llm", kw)) or SimpleNamespace(shutdown=lambda: None)
    llmapi.KvCacheConfig = lambda **kw: kw
    shared = SimpleNamespace(SharedTensorContainer=object)
    monkeypatch.setitem(sys.modules, "tensorrt_llm", trt)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", llmapi)
    monkeypatch.setitem(sys.modules, "tensorrt_llm._torch", SimpleNamespace(shared_tensor=shared))
    monkeypatch.setitem(sys.modules, "tensorrt_llm._torch.shared_tensor", shared)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: processor)
    caplog.set_level(logging.INFO, logger="safejudge.backends.trtllm")

    qwen25 = _broken_copy(tiny_dir, tmp_path)
    config = json.loads((qwen25 / "config.json").read_text())
    (qwen25 / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_5_vl"}))
    backend = TRTLLMVisionLanguageModel.load(TRTLLMSettings(model=str(qwen25)))
    assert backend.route == "encode_once" and [kind for kind, _ in started] == ["encoder", "llm"]
    assert backend.logprob_params.logprobs == LOGPROB_SAMPLING["logprobs"]
    assert started[1][1]["kv_cache_config"]["enable_block_reuse"] is False
    assert "route encode_once" in caplog.text

    started.clear()
    backend = TRTLLMVisionLanguageModel.load(TRTLLMSettings(model=str(tiny_dir)))
    assert backend.route == "per_question" and [kind for kind, _ in started] == ["llm"]
    assert "route per_question (because model_type 'qwen2_vl'" in caplog.text


# -- reasoning ----------------------------------------------------------------------------------------


def test_reason_runs_two_turns_and_feeds_each_thought_back(processor, image):
    llm = FakeLLM(vocab_rows(processor))
    answers = make_backend(processor, llm, warm_prefix=True).reason(image, STATEMENTS)

    # Turn 1 (warm + rest), then turn 2 (warm + rest).
    assert [len(requests) for requests, _ in llm.calls] == [1, 2, 1, 2]
    first_turn = [r for requests, _ in llm.calls[:2] for r in requests]
    second_turn = [r for requests, _ in llm.calls[2:] for r in requests]
    thoughts = [f"answer {call}.{index}" for call, index in [(1, 0), (2, 0), (2, 1)]]
    for statement, request, thought in zip(STATEMENTS, second_turn, thoughts, strict=True):
        assert statement in request["prompt"] and thought in request["prompt"]
        assert request["prompt"].rstrip().endswith("<|im_start|>assistant")
        assert REASON_SUMMARY in request["prompt"]
        assert request["multi_modal_data"]["image"][0].tobytes() == image.tobytes()
    assert all(REASON_SUMMARY not in r["prompt"] for r in first_turn)
    assert answers == ["answer 3.0", "answer 4.0", "answer 4.1"]
    assert all(params == {"max_tokens": 64, "top_k": 1} for _, params in llm.calls)


# -- settings -----------------------------------------------------------------------------------------


def test_settings_build_llm_and_kv_cache_arguments(tiny_dir):
    settings = TRTLLMSettings(model=str(tiny_dir), max_new_tokens=128, free_gpu_memory_fraction=0.5)
    arguments = settings.llm_arguments()
    assert arguments["model"] == str(tiny_dir)
    assert arguments["backend"] == "pytorch"
    assert arguments["gather_generation_logits"] is True
    assert arguments["max_num_tokens"] >= settings.max_prompt_tokens
    assert settings.kv_cache_arguments() == {"enable_block_reuse": False, "free_gpu_memory_fraction": 0.5}
    assert settings.route == "auto" and settings.yes_no_from == "logprobs" and not settings.effective_warm_prefix
    assert TRTLLMSettings(model=str(tiny_dir), enable_block_reuse=True).effective_warm_prefix
    assert TRTLLMSettings(model="Qwen/Qwen2-VL-7B-Instruct").model == "Qwen/Qwen2-VL-7B-Instruct"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": "/no/such/checkpoint"}, "neither an existing checkpoint directory nor a hub id"),
        ({"max_num_tokens": 1000}, "max_num_tokens=1000 cannot hold one prompt"),
        ({"max_seq_len": 1500}, "max_seq_len=1500 is shorter than a reasoning exchange"),
        ({"free_gpu_memory_fraction": 1.5}, "free_gpu_memory_fraction"),
        ({"max_image_pixels": 100}, "max_image_pixels"),
        ({"dtype": "float8"}, "dtype"),
        ({"max_tokens": 3}, "max_tokens"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(overrides, message):
    with pytest.raises(ValidationError, match=message):
        TRTLLMSettings(**{"model": "Qwen/Qwen2-VL-7B-Instruct", **overrides})


def test_a_relative_checkpoint_directory_becomes_absolute(tiny_dir, monkeypatch):
    monkeypatch.chdir(tiny_dir.parent)
    assert TRTLLMSettings(model=tiny_dir.name).model == str(tiny_dir.resolve())


def test_settings_from_a_model_spec_target():
    settings = TRTLLMSettings.from_target("Qwen/Qwen2-VL-2B-Instruct?max_new_tokens=128&warm_prefix=false")
    assert (settings.model, settings.max_new_tokens, settings.warm_prefix) == ("Qwen/Qwen2-VL-2B-Instruct", 128, False)
    assert TRTLLMSettings.from_target("Qwen/Qwen2-VL-2B-Instruct") == TRTLLMSettings(model="Qwen/Qwen2-VL-2B-Instruct")
    with pytest.raises(ValidationError, match="bogus"):
        TRTLLMSettings.from_target("Qwen/Qwen2-VL-2B-Instruct?bogus=1")
    with pytest.raises(ValueError, match="key=value pairs"):
        TRTLLMSettings.from_target("Qwen/Qwen2-VL-2B-Instruct?max_new_tokens")


def test_fit_pixel_budget_keeps_small_images_and_aspect():
    small = Image.new("RGB", (100, 50))
    assert fit_pixel_budget(small, 5000) is small
    fitted = fit_pixel_budget(Image.new("RGB", (3000, 1000)), 1280 * PIXELS_PER_VISUAL_TOKEN)
    assert fitted.width * fitted.height <= 1280 * PIXELS_PER_VISUAL_TOKEN
    assert abs(fitted.width / fitted.height - 3.0) < 0.01


@pytest.mark.parametrize("size", [(1, 1), (3, 3), (2, 4000), (4000, 2), (1, 16384), (16384, 1), (16384, 2441)], ids=str)
@pytest.mark.parametrize("budget", [PIXELS_PER_VISUAL_TOKEN, 1280 * PIXELS_PER_VISUAL_TOKEN])
def test_fit_pixel_budget_makes_any_size_fit_the_qwen_processor(size, budget):
    image = Image.new("RGB", size)
    fitted = fit_pixel_budget(image, budget)
    assert fitted.width * fitted.height <= budget
    assert max(fitted.size) / min(fitted.size) <= 200, "smart_resize refuses more"
    if max(size) / min(size) <= MAX_ASPECT and size[0] * size[1] <= budget:
        assert fitted is image


# -- checkpoints --------------------------------------------------------------------------------------


def test_tiny_qwen2_vl_checkpoint_passes_inspection(tiny_dir, processor):
    report = inspect_checkpoint(tiny_dir)
    assert report.ok, report.problems
    assert report.model_type in SUPPORTED_MODEL_TYPES
    assert report.weight_files == ["model.safetensors"]
    assert (report.yes_token_ids, report.no_token_ids) == yes_no_token_ids(processor.tokenizer.get_vocab())


def _broken_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "checkpoint"
    shutil.copytree(tiny_dir, copy)
    return copy


def test_inspection_names_every_problem(tiny_dir, tmp_path):
    copy = _broken_copy(tiny_dir, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": "idefics3"}))
    (copy / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    (copy / "tokenizer.json").unlink()
    (copy / "chat_template.jinja").unlink()
    problems = " | ".join(inspect_checkpoint(copy).problems)
    assert "model_type 'idefics3' is not supported" in problems
    assert "model-00002-of-00002.safetensors" in problems
    assert "tokenizer.json is missing" in problems
    assert "no chat template" in problems
    assert len(inspect_checkpoint(copy).problems) == 4


def test_inspection_of_a_missing_directory():
    report = inspect_checkpoint("/no/such/checkpoint")
    assert not report.ok and "is not a directory" in report.problems[0]


def test_load_refuses_a_broken_checkpoint_before_touching_the_gpu(tiny_dir, tmp_path):
    copy = _broken_copy(tiny_dir, tmp_path)
    (copy / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        TRTLLMVisionLanguageModel.load(TRTLLMSettings(model=str(copy)))


def test_build_script_checks_a_checkpoint(tiny_dir, tmp_path):
    script = REPO / "engine_build" / "build_trtllm.py"
    ok = subprocess.run([sys.executable, script, "check", tiny_dir], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["model_type"] == "qwen2_vl"
    copy = _broken_copy(tiny_dir, tmp_path)
    (copy / "tokenizer.json").unlink()
    bad = subprocess.run([sys.executable, script, "check", copy], capture_output=True, text=True)
    assert bad.returncode == 2 and "tokenizer.json is missing" in bad.stderr


def test_importing_the_backend_does_not_import_tensorrt_llm():
    code = (
        "import sys, safejudge.backends.trtllm\n"
        "from safejudge.backends.registry import ModelSpec\n"
        "ModelSpec(mllm='trtllm:Qwen/Qwen2-VL-7B-Instruct?max_new_tokens=64')\n"
        "sys.exit('tensorrt_llm' in sys.modules or 'torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_registry_trtllm_scheme_checks_the_checkpoint_before_loading(tiny_dir, tmp_path):
    from safejudge.backends.registry import ModelSpec, load_mllm

    copy = _broken_copy(tiny_dir, tmp_path)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json is missing"):
        load_mllm(ModelSpec(mllm=f"trtllm:{copy}?max_new_tokens=64", relevance=None))
    with pytest.raises(ValueError, match="max_num_tokens=100"):
        load_mllm(ModelSpec(mllm=f"trtllm:{tiny_dir}?max_num_tokens=100", relevance=None))


# -- on a GPU -----------------------------------------------------------------------------------------
#
# Need an NVIDIA GPU, tensorrt_llm (the NGC container of docs/gpu.md) and a checkpoint in
# SAFEJUDGE_TRTLLM_MODEL (Qwen2.5-VL-7B-Instruct is the default; Qwen2-VL runs the per_question route).
# Tolerance: GPU_ATOL between routes and batch shapes; bf16 kernels differ slightly with the batch shape,
# a wrong image or misplaced positions move scores by far more.

GPU_ATOL = 0.02
GPU_QUESTIONS = STATEMENTS + ["the image is mostly red", "the image is mostly blue", "a dog is visible"]


def _gpu_model() -> str:
    if importlib.util.find_spec("tensorrt_llm") is None:
        pytest.skip("tensorrt_llm is not installed (use the NGC TensorRT-LLM container, see docs/gpu.md)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    model = os.environ.get("SAFEJUDGE_TRTLLM_MODEL")
    if not model:
        pytest.skip("set SAFEJUDGE_TRTLLM_MODEL to a Qwen2.5-VL or Qwen2-VL checkpoint directory")
    return model


@pytest.fixture(scope="module")
def gpu_backend():
    """The default settings (route auto, reuse off, logprobs reading), a share of the GPU left for the
    reuse engine below."""
    settings = TRTLLMSettings(model=_gpu_model(), max_new_tokens=96, max_batch_size=16, free_gpu_memory_fraction=0.3)
    backend = TRTLLMVisionLanguageModel.load(settings)
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def gpu_reference(gpu_backend):
    """The same engine without the encoder and with full logits: the one-request-at-a-time reference."""
    b = gpu_backend
    return TRTLLMVisionLanguageModel(
        b.llm, b.processor, b.model_id, b.fingerprint, b.score_params, b.reason_params, b.max_image_pixels
    )


@pytest.fixture(scope="module")
def gpu_reuse_backend(gpu_backend):
    settings = TRTLLMSettings(
        model=_gpu_model(), max_new_tokens=96, max_batch_size=16, free_gpu_memory_fraction=0.3,
        enable_block_reuse=True,
    )
    backend = TRTLLMVisionLanguageModel.load(settings)
    yield backend
    backend.shutdown()


def _solid(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (448, 448), colour)


def _is_qwen25(model: str) -> bool:
    config = Path(model) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "qwen2_5_vl"


@pytest.mark.gpu
def test_gpu_probe_finds_what_the_route_needs(gpu_backend):
    caps = probe_capabilities()
    assert caps.generation_logits and caps.logprobs, caps
    if _is_qwen25(gpu_backend.model_id):
        assert caps.encode_once, caps.missing_for_encode_once()
        assert gpu_backend.route == "encode_once"


@pytest.mark.gpu
def test_gpu_scores_are_probabilities_that_follow_the_image(gpu_backend):
    questions = ["the image is mostly red", "the image is mostly blue"]
    red, blue = gpu_backend.score(_solid((220, 20, 20)), questions), gpu_backend.score(_solid((20, 20, 220)), questions)
    assert np.all((red > 0) & (red < 1)) and np.all((blue > 0) & (blue < 1))
    assert red[0] > blue[0] and blue[1] > red[1]


@pytest.mark.gpu
def test_gpu_encode_once_equals_one_request_at_a_time(gpu_backend, gpu_reference):
    red = _solid((220, 20, 20))
    together = gpu_backend.score(red, GPU_QUESTIONS)
    one_by_one = np.concatenate([gpu_reference.score(red, [q]) for q in GPU_QUESTIONS])
    np.testing.assert_allclose(together, one_by_one, atol=GPU_ATOL, err_msg=f"route {gpu_backend.route}")


@pytest.mark.gpu
def test_gpu_vision_encoder_runs_once_per_image_and_the_batch_is_one_engine_call(gpu_backend, gpu_reference):
    if gpu_backend.route != "encode_once":
        pytest.skip(f"route {gpu_backend.route}: the engine encodes the image with every question")
    red, blue = _solid((220, 20, 20)), _solid((20, 20, 220))
    items = [(red, GPU_QUESTIONS), (blue, GPU_QUESTIONS), (red.copy(), GPU_QUESTIONS[:2]), (None, GPU_QUESTIONS[:2])]
    before = dataclasses.replace(gpu_backend.counters, history=list(gpu_backend.counters.history))
    batched = gpu_backend.score_batch(items)
    after = gpu_backend.counters
    assert after.encoder_calls - before.encoder_calls == 1
    assert after.vision_runs - before.vision_runs == 2  # red and blue; the copy of red shares its encoding
    new_calls = after.history[len(before.history):]
    assert new_calls[0] == sum(len(q) for _, q in items)  # the whole batch in one LLM.generate
    assert len(new_calls) <= 2  # plus, at most, one call for rows the top-20 could not score
    for (image, questions), scores in zip(items, batched, strict=True):
        np.testing.assert_allclose(scores, gpu_reference.score(image, questions), atol=GPU_ATOL)


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["default", "reuse"])
def test_gpu_scores_never_mix_two_images(which, gpu_backend, gpu_reuse_backend, gpu_reference):
    """A, B, A: the second A equals the first (with KV reuse on, B's blocks are in the cache in between)."""
    backend = gpu_backend if which == "default" else gpu_reuse_backend
    red, blue = _solid((220, 20, 20)), _solid((20, 20, 220))
    first = backend.score(red, GPU_QUESTIONS)
    between = backend.score(blue, GPU_QUESTIONS)
    again = backend.score(red, GPU_QUESTIONS)
    np.testing.assert_allclose(again, first, atol=GPU_ATOL)
    np.testing.assert_allclose(between, gpu_reference.score(blue, GPU_QUESTIONS), atol=GPU_ATOL)
    together_red, together_blue = backend.score_batch([(red, GPU_QUESTIONS), (blue, GPU_QUESTIONS)])
    np.testing.assert_allclose(together_red, first, atol=GPU_ATOL)
    np.testing.assert_allclose(together_blue, between, atol=GPU_ATOL)


@pytest.mark.gpu
def test_gpu_every_returned_row_peaks_at_the_emitted_token(gpu_backend, gpu_reference):
    image = fit_pixel_budget(_solid((220, 20, 20)), gpu_backend.max_image_pixels)
    requests = [gpu_reference._request(gpu_reference.yes_no_prompt(True, q), image) for q in GPU_QUESTIONS]
    outputs = gpu_reference._run(requests, gpu_reference.score_params, [None] * len(requests))
    for output in outputs:
        row = first_token_logits(output)  # raises when the row is misaligned
        assert int(row.argmax()) == int(output.outputs[0].token_ids[0])
    if gpu_backend.logprob_params is not None:
        for output in gpu_reference._run(requests, gpu_backend.logprob_params, [None] * len(requests)):
            top = first_token_logprobs(output)
            assert max(top, key=top.get) == int(output.outputs[0].token_ids[0])


@pytest.mark.gpu
def test_gpu_prior_needs_no_image(gpu_backend):
    prior = gpu_backend.score(None, STATEMENTS)
    assert prior.shape == (3,) and np.all((prior > 0) & (prior < 1))


@pytest.mark.gpu
def test_gpu_reasoning_ends_in_a_json_rating(gpu_backend):
    answers = gpu_backend.reason(_solid((220, 20, 20)), ["the image is mostly red", "a dog is visible"])
    assert len(answers) == 2 and all(answers)
    assert all(parse_reasoning(a).parsed for a in answers), answers


@pytest.mark.gpu
def test_gpu_verdicts_agree_with_the_transformers_backend(gpu_backend):
    """The TensorRT-LLM stage and the transformers backend on the same checkpoint judge a small image set
    alike. Needs both libraries in one environment: the NGC TensorRT-LLM container pins transformers 4.56,
    and hf.py needs 5, so this runs where a transformers 5 install sits beside TensorRT-LLM."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"the transformers backend needs transformers>=5 (found {transformers.__version__})")
    from safejudge.backends.base import Models
    from safejudge.backends.hf import HFVisionLanguageModel
    from safejudge.compiled import compile_constitution
    from safejudge.constitution import load_constitution
    from safejudge.evaluators import JudgeOptions, judge_batched
    from safejudge.shipped import CONSTITUTIONS

    reference = HFVisionLanguageModel.from_pretrained(_gpu_model(), dtype="bfloat16", device="cuda")
    constitution = load_constitution(CONSTITUTIONS / "os-bench.yaml")
    options = JudgeOptions(relevance_filter=False, max_reasoning_calls=0, schedule="all")
    images = [_solid((220, 30, 30)), _solid((30, 30, 220)), _solid((250, 250, 250))]
    judges = [(Models(mllm=backend), compile_constitution(constitution, Models(mllm=backend)))
              for backend in (gpu_backend, reference)]
    for image in images:
        ours, theirs = (judge_batched(image, compiled, models, options) for models, compiled in judges)
        assert ours.decision() == theirs.decision()
