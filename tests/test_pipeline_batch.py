"""Batches that merge, without Triton: the mllm stage answers a dynamic batch's score requests in one model
call and keeps every fault with its request."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from safejudge.backends.base import UnsupportedQuestion, score_batch
from safejudge.pipeline import Fault, FaultCode, InvalidRequest, MLLMStage


class CountingMLLM:
    """Scores = question length / 100 (+ 0.5 with an image); counts score and score_batch calls."""

    model_id = "counting"
    fingerprint = "sha256:counting"

    def __init__(self, fail_merged: bool = False):
        self.fail_merged = fail_merged
        self.score_calls = 0
        self.batch_calls: list[int] = []

    def score(self, image: Image.Image | None, questions: Sequence[str]) -> np.ndarray:
        self.score_calls += 1
        if any(q.startswith("unknown") for q in questions):
            raise UnsupportedQuestion("unknown words")
        return np.array([len(q) / 100 + (0.5 if image is not None else 0.0) for q in questions])

    def score_batch(self, items):
        self.batch_calls.append(len(items))
        if self.fail_merged or any(q.startswith("unknown") for _, questions in items for q in questions):
            raise RuntimeError("the merged call failed")
        return [np.array([len(q) / 100 + (0.5 if image is not None else 0.0) for q in qs]) for image, qs in items]

    def reason(self, image, questions):
        return ['{"rating": "No"}' for _ in questions]


class LoopingMLLM(CountingMLLM):
    """A backend without score_batch."""

    score_batch = None


PIXELS = np.zeros((4, 6, 3), dtype=np.uint8)


def request(questions: Sequence[str], mode: str = "score", pixels: np.ndarray | None = PIXELS):
    return (pixels, [q.encode() for q in questions], mode.encode())


def answer(stage: MLLMStage, requests):
    return stage.answer(requests, lambda r: stage.parse(*r))


def expected(questions: Sequence[str], image: bool = True) -> list[float]:
    return [len(q) / 100 + (0.5 if image else 0.0) for q in questions]


def test_a_batch_of_score_requests_is_one_merged_call():
    mllm = CountingMLLM()
    batch = [request(["a b", "c"]), request(["dd"], pixels=None), request(["eee", "f", "gg"])]
    answers = answer(MLLMStage(mllm), batch)
    assert mllm.batch_calls == [3] and mllm.score_calls == 0
    np.testing.assert_allclose(answers[0][0], expected(["a b", "c"]), rtol=1e-6)
    np.testing.assert_allclose(answers[1][0], expected(["dd"], image=False), rtol=1e-6)
    np.testing.assert_allclose(answers[2][0], expected(["eee", "f", "gg"]), rtol=1e-6)
    assert all(a[0].dtype == np.float32 and a[1] == [] for a in answers)


def test_a_lone_request_and_other_modes_are_answered_on_their_own():
    mllm = CountingMLLM()
    answers = answer(MLLMStage(mllm), [request(["a"]), request(["b"], "reason"), request([], "id"), request([])])
    assert mllm.batch_calls == [] and mllm.score_calls == 1
    assert answers[1][1] == ['{"rating": "No"}'] and answers[2][1] == ["counting", "sha256:counting", ""]
    assert answers[3][0].size == 0


def test_a_bad_request_inside_the_batch_is_isolated():
    mllm = CountingMLLM()
    batch = [request(["a"]), request(["b"], "poem"), request(["c"], pixels=np.zeros((4, 4), np.uint8)),
             request(["dd"]), request(["e"], "reason", pixels=None)]
    answers = answer(MLLMStage(mllm), batch)
    assert mllm.batch_calls == [2], "the valid score requests still share one call"
    np.testing.assert_allclose(answers[0][0], expected(["a"]), rtol=1e-6)
    np.testing.assert_allclose(answers[3][0], expected(["dd"]), rtol=1e-6)
    for index, message in ((1, "MODE must be one of"), (2, "PIXELS must be uint8 [height, width, 3]"),
                           (4, "MODE reason needs PIXELS")):
        assert isinstance(answers[index], Fault) and answers[index].code == FaultCode.INVALID_ARGUMENT
        assert message in answers[index].message


def test_a_request_the_reader_rejects_gets_its_own_fault():
    mllm = CountingMLLM()
    stage = MLLMStage(mllm)

    def read(r):
        if r == "no key":
            raise InvalidRequest("the mllm model is internal")
        return stage.parse(*r)

    answers = stage.answer([request(["a"]), "no key", request(["b"])], read)
    assert answers[1] == Fault(FaultCode.INVALID_ARGUMENT, "the mllm model is internal")
    assert mllm.batch_calls == [2]


@pytest.mark.parametrize("fail_merged", [True, False])
def test_a_failing_merged_call_falls_back_to_each_request_alone(fail_merged):
    """The merged call raises (a fault of the call, or of one request's questions): every request is then
    scored on its own, and only the one at fault fails."""
    mllm = CountingMLLM(fail_merged=fail_merged)
    batch = [request(["a"]), request(["b b"]), request(["cc"] if fail_merged else ["unknown word"])]
    answers = answer(MLLMStage(mllm), batch)
    assert mllm.batch_calls == [3] and mllm.score_calls == 3
    np.testing.assert_allclose(answers[0][0], expected(["a"]), rtol=1e-6)
    np.testing.assert_allclose(answers[1][0], expected(["b b"]), rtol=1e-6)
    if fail_merged:
        np.testing.assert_allclose(answers[2][0], expected(["cc"]), rtol=1e-6)
    else:
        assert answers[2].code == FaultCode.INVALID_ARGUMENT and "cannot answer this" in answers[2].message


def test_score_batch_loops_score_for_a_backend_without_one_and_checks_shapes():
    mllm = LoopingMLLM()
    image = Image.new("RGB", (2, 2))
    scores = score_batch(mllm, [(image, ["a", "bb"]), (None, ["c"])])
    assert mllm.score_calls == 2
    np.testing.assert_allclose(scores[1], expected(["c"], image=False))

    class Short(CountingMLLM):
        def score_batch(self, items):
            return [np.zeros(1) for _ in items]

    with pytest.raises(RuntimeError, match="shapes"):
        score_batch(Short(), [(image, ["a", "bb"])])
