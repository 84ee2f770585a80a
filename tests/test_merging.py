"""Batches that merge, without Triton: requests judged side by side have their MLLM calls answered in merged
rounds (one score_batch per round), every fault stays with its request, and only the dispatching thread
touches the model and polls for cancellations."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safejudge.backends.base import UnsupportedQuestion, score_batch
from safejudge.backends.registry import ModelSpec
from safejudge import merging
from safejudge.merging import CallMerger, RequestMLLM
from safejudge.pipeline import FaultCode, JudgeRequest, JudgeStage, JudgeStageSettings
from safejudge.shipped import CONSTITUTIONS


class CountingMLLM:
    """Scores = question length / 100 (+ 0.5 with an image), after `delay_s` per model call; records the
    calls, the threads they ran in, and whether two ever overlapped."""

    model_id = "counting"
    fingerprint = "sha256:counting"

    def __init__(self, fail_merged: bool = False, delay_s: float = 0.0):
        self.fail_merged = fail_merged
        self.delay_s = delay_s
        self.score_calls = 0
        self.batch_calls: list[int] = []
        self.threads: set[str] = set()
        self.overlapped = False
        self._inside = 0

    def _enter(self) -> None:
        self.threads.add(threading.current_thread().name)
        self._inside += 1
        self.overlapped = self.overlapped or self._inside > 1
        time.sleep(self.delay_s)
        self._inside -= 1

    def score(self, image: Image.Image | None, questions: Sequence[str]) -> np.ndarray:
        self._enter()
        self.score_calls += 1
        if any(q.startswith("unknown") for q in questions):
            raise UnsupportedQuestion("unknown words")
        return expected(questions, image is not None)

    def score_batch(self, items):
        self._enter()
        self.batch_calls.append(len(items))
        if self.fail_merged or any(q.startswith("unknown") for _, questions in items for q in questions):
            raise RuntimeError("the merged call failed")
        return [expected(questions, image is not None) for image, questions in items]

    def reason(self, image, questions):
        self._enter()
        return ['{"rating": "No"}' for _ in questions]


class LoopingMLLM(CountingMLLM):
    """A backend without score_batch."""

    score_batch = None


IMAGE = Image.new("RGB", (4, 6))


def expected(questions: Sequence[str], image: bool = True) -> np.ndarray:
    return np.array([len(q) / 100 + (0.5 if image else 0.0) for q in questions])


def asking(merger: CallMerger, calls: Sequence[tuple[Image.Image | None, list[str]]]):
    """A job that makes these score calls one after another, as an evaluator does, and returns the scores."""
    def job():
        mllm = RequestMLLM(merger)
        return [mllm.score(image, questions) for image, questions in calls]

    return job


def test_concurrent_calls_meet_in_merged_rounds_and_each_gets_its_own_scores():
    mllm = CountingMLLM(delay_s=0.02)  # while a round runs, the other requests' calls pile up
    merger = CallMerger(mllm)
    plans = [[(IMAGE, ["a" * (i + 1)]), (None, ["bb", "c"]), (IMAGE, ["d" * i + "e"])] for i in range(6)]
    outcomes = merger.run([asking(merger, plan) for plan in plans])
    for plan, outcome in zip(plans, outcomes, strict=True):
        assert outcome.error is None
        for (image, questions), scores in zip(plan, outcome.value, strict=True):
            np.testing.assert_allclose(scores, expected(questions, image is not None))
    model_calls = mllm.score_calls + len(mllm.batch_calls)
    assert max(mllm.batch_calls) > 1 and model_calls < 18, (mllm.batch_calls, mllm.score_calls)
    assert sum(mllm.batch_calls) + mllm.score_calls == 18
    assert mllm.threads == {threading.current_thread().name} and not mllm.overlapped


def test_a_round_waits_briefly_for_the_requests_that_have_not_asked_yet_but_not_for_a_straggler(monkeypatch):
    mllm = CountingMLLM()
    merger = CallMerger(mllm)
    monkeypatch.setattr(merging, "MERGE_WAIT_S", 5.0)  # longer than any thread start: the test does not race

    def asking_after(delay_s: float, question: str):
        def job():
            time.sleep(delay_s)
            return RequestMLLM(merger).score(IMAGE, [question])
        return job

    # Asked 0, 2 and 4 ms apart: one round for all three.
    merger.run([asking_after(delay, q) for delay, q in ((0.0, "a"), (0.002, "bb"), (0.004, "ccc"))])
    assert (mllm.batch_calls, mllm.score_calls) == ([3], 0)
    # One request asks 1 s later (still decoding, say): the others wait MERGE_WAIT_S for it, not longer.
    monkeypatch.setattr(merging, "MERGE_WAIT_S", 0.05)
    started = time.monotonic()
    outcomes = merger.run([asking_after(delay, q) for delay, q in ((0.0, "a"), (0.0, "bb"), (1.0, "ccc"))])
    assert mllm.batch_calls[1] == 2 and mllm.score_calls == 1
    assert outcomes[0].finished - started < 0.5
    np.testing.assert_allclose(outcomes[2].value, expected(["ccc"]))


@pytest.mark.parametrize("fail_merged", [True, False])
def test_a_failing_merged_call_falls_back_to_each_call_alone_and_only_the_faulty_request_fails(fail_merged):
    """The merged call raises (a fault of the call, or of one request's questions): every call of that round
    is then answered on its own, and only the one at fault fails."""
    mllm = CountingMLLM(fail_merged=fail_merged, delay_s=0.02)
    merger = CallMerger(mllm)
    plans = [[(IMAGE, ["a"])], [(IMAGE, ["b b"])], [(IMAGE, ["cc" if fail_merged else "unknown word"])]]
    # The first call is answered alone while the others arrive; the next round merges them.
    outcomes = merger.run([asking(merger, plan) for plan in plans])
    assert mllm.batch_calls, "no round merged two calls"
    np.testing.assert_allclose(outcomes[0].value[0], expected(["a"]))
    np.testing.assert_allclose(outcomes[1].value[0], expected(["b b"]))
    if fail_merged:
        np.testing.assert_allclose(outcomes[2].value[0], expected(["cc"]))
    else:
        assert isinstance(outcomes[2].error, UnsupportedQuestion)


def test_a_request_that_raises_fails_alone_and_reasoning_is_answered_too():
    mllm = CountingMLLM()
    merger = CallMerger(mllm)

    def broken():
        RequestMLLM(merger).score(IMAGE, ["a"])
        raise KeyError("surprise")

    outcomes = merger.run([broken, asking(merger, [(IMAGE, ["bb"])]), lambda: RequestMLLM(merger).reason(IMAGE, ["q"])])
    assert isinstance(outcomes[0].error, KeyError)
    np.testing.assert_allclose(outcomes[1].value[0], expected(["bb"]))
    assert outcomes[2].value == ['{"rating": "No"}']
    assert all(o.finished > 0 for o in outcomes)


def test_a_lone_request_asks_the_model_in_the_calling_thread_and_is_polled_before_each_call():
    mllm = CountingMLLM()
    merger = CallMerger(mllm)
    polls = []
    (outcome,) = merger.run([asking(merger, [(IMAGE, ["a"]), (None, ["b"])])], lambda: polls.append(1))
    np.testing.assert_allclose(outcome.value[1], expected(["b"], image=False))
    assert mllm.threads == {threading.current_thread().name} and mllm.batch_calls == []
    assert len(polls) == 3  # on arrival, then before each call


def test_cancellation_is_polled_from_the_dispatcher_while_requests_compute_and_stops_their_next_call():
    mllm = CountingMLLM()
    merger = CallMerger(mllm)
    cancelled = threading.Event()
    pollers: set[str] = set()

    def poll():
        pollers.add(threading.current_thread().name)
        cancelled.set()

    def check(what: str) -> None:
        if cancelled.is_set():
            raise RuntimeError(f"cancelled before {what}")

    def slow():
        time.sleep(0.2)  # CPU work without model calls: the dispatcher keeps polling meanwhile
        return RequestMLLM(merger, check).score(IMAGE, ["a"])

    outcomes = merger.run([slow, slow], poll)
    assert pollers == {threading.current_thread().name}
    assert all("cancelled before an mllm score call" in str(o.error) for o in outcomes)


def test_a_failing_cancellation_check_never_strands_the_requests(caplog):
    merger = CallMerger(CountingMLLM())

    def poll():
        raise RuntimeError("the stub lost its connection")

    for jobs in ([asking(merger, [(IMAGE, ["a"])])], [asking(merger, [(IMAGE, ["a"])]) for _ in range(3)]):
        outcomes = merger.run(jobs, poll)
        assert all(o.error is None for o in outcomes)
        np.testing.assert_allclose(outcomes[0].value[0], expected(["a"]))
    assert "checking the batch's requests for cancellation failed" in caplog.text


def test_the_locked_model_waits_for_the_rounds():
    mllm = CountingMLLM(delay_s=0.01)
    merger = CallMerger(mllm)
    locked = merger.locked()
    stop = threading.Event()

    def compile_in_background():
        while not stop.is_set():
            locked.score(None, ["prior"])

    background = threading.Thread(target=compile_in_background)
    background.start()
    try:
        merger.run([asking(merger, [(IMAGE, ["a"]), (IMAGE, ["b"])]) for _ in range(4)])
    finally:
        stop.set()
        background.join()
    assert not mllm.overlapped and locked.model_id == "counting"


def test_score_batch_loops_score_for_a_backend_without_one_and_checks_shapes():
    mllm = LoopingMLLM()
    scores = score_batch(mllm, [(IMAGE, ["a", "bb"]), (None, ["c"])])
    assert mllm.score_calls == 2
    np.testing.assert_allclose(scores[1], expected(["c"], image=False))

    class Short(CountingMLLM):
        def score_batch(self, items):
            return [np.zeros(1) for _ in items]

    with pytest.raises(RuntimeError, match="shapes"):
        score_batch(Short(), [(IMAGE, ["a", "bb"])])


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_stage_answers_a_batch_request_by_request(tmp_path: Path):
    """JudgeStage.answer without Triton: verdicts, faults named per request, a cancelled request CANCELLED,
    and one metrics/log entry each."""
    constitutions = tmp_path / "constitutions"
    constitutions.mkdir()
    shutil.copy(CONSTITUTIONS / "general.yaml", constitutions)
    settings = JudgeStageSettings(models=ModelSpec(relevance=None), constitutions=constitutions,
                                  cache_dir=tmp_path / "cache")
    stage = JudgeStage(settings, mllm=CountingMLLM())
    options = json.dumps({"relevance_filter": False, "max_reasoning_calls": 0}).encode()
    requests = [
        JudgeRequest.single(png(0), b"general", options, request_id="good"),
        JudgeRequest.single(b"not an image", b"general", options),
        JudgeRequest.single(png(1), b"unknown", options),
        JudgeRequest.single(png(2), b"general", b'{"frames": 0}'),
        JudgeRequest.single(png(3), b"general", options),
    ]
    answers = stage.answer(requests, [lambda: False] * 4 + [lambda: True])
    (verdict,) = answers[0]
    assert json.loads(verdict)["request_id"] == "good" and json.loads(verdict)["constitution"] == "general"
    assert answers[1].code == FaultCode.INVALID_ARGUMENT and "cannot identify image file" in answers[1].message
    assert answers[2].code == FaultCode.INVALID_ARGUMENT and "unknown" in answers[2].message
    assert answers[3].code == FaultCode.INVALID_ARGUMENT and "OPTIONS" in answers[3].message
    assert answers[4].code == FaultCode.CANCELLED
