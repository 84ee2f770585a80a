"""Several requests judged at once, their MLLM calls merged: the served judge stage's dynamic batch.

Each request runs in its own worker thread, with the evaluators as they are; the MLLM it sees is a
`RequestMLLM` whose score and reason calls are handed to the dispatching thread and wait for their answer.
The dispatcher (the thread that called `CallMerger.run`: in the server, the stub's execute thread) answers
in rounds: once a call is pending it waits until every running request has asked, or MERGE_WAIT_S at most
(a request still decoding, detecting or waiting for a compile does not hold the others up for longer),
then answers every pending score call in ONE `score_batch` (each call alone if that fails, so that a call
that breaks the merge fails alone) and reasoning calls one by one. A lone request calls the model itself.
Only the dispatcher touches the model and runs `between_rounds` (the server polls Triton for cancelled
requests there: a Python-backend stub must not be called from several threads; concurrent BLS calls from
threads of one stub crashed tritonserver 2.51).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
from PIL import Image

from safejudge.backends.base import MLLM, score_batch

logger = logging.getLogger(__name__)

T = TypeVar("T")
POLL_S = 0.05  # how often an idle dispatcher runs between_rounds (cancellation checks)
MERGE_WAIT_S = 0.01  # at most this long a round waits for the requests that have not asked yet


@dataclass(eq=False)
class _Call:
    kind: str  # "score" | "reason"
    image: Image.Image | None
    questions: list[str]
    answer: object = None
    error: BaseException | None = None
    done: bool = False


class RequestMLLM:
    """One request's view of the shared model (the MLLM protocol). `before_call` runs in the request's
    thread before each call (the request's deadline check); other attributes are the model's."""

    def __init__(self, merger: CallMerger, before_call: Callable[[str], None] = lambda what: None):
        self._merger = merger
        self._before_call = before_call

    def score(self, image: Image.Image | None, questions: Sequence[str]) -> np.ndarray:
        self._before_call("an mllm score call")
        return self._merger.ask(_Call("score", image, list(questions)))

    def reason(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        self._before_call("an mllm reason call")
        return self._merger.ask(_Call("reason", image, list(questions)))

    def __getattr__(self, name: str):
        return getattr(self._merger.model, name)


@dataclass
class Outcome(Generic[T]):
    """A job's result, or the exception it raised, and when it finished (time.monotonic)."""

    value: T | None = None
    error: BaseException | None = None
    finished: float = 0.0


class CallMerger:
    """Runs jobs side by side and answers their MLLM calls in merged rounds; one `run` at a time.

    `model_lock` serialises every use of the model, the merged rounds and anyone else's (the constitution
    store compiles in a background thread through `locked`)."""

    def __init__(self, model: MLLM):
        self.model = model
        self.model_lock = threading.Lock()
        self._condition = threading.Condition()
        self._pending: list[_Call] = []
        self._running = 0
        self._inline = False
        self._between_rounds: Callable[[], None] = lambda: None

    def ask(self, call: _Call) -> object:
        if self._inline:
            _safely(self._between_rounds)
            self._answer([call])
        else:
            with self._condition:
                self._pending.append(call)
                self._condition.notify_all()
                while not call.done:
                    self._condition.wait()
        if call.error is not None:
            raise call.error
        return call.answer

    def run(self, jobs: Sequence[Callable[[], T]], between_rounds: Callable[[], None] = lambda: None) -> list[Outcome[T]]:
        """Each job in its own thread (a job reaches the model through a RequestMLLM of this merger); returns
        when all have finished, with each one's value or exception, in order."""
        outcomes: list[Outcome[T]] = [Outcome() for _ in jobs]
        _safely(between_rounds)  # a request cancelled while it queued is stopped before any work

        def work(index: int) -> None:
            try:
                outcomes[index].value = jobs[index]()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller with its request
                outcomes[index].error = exc
            finally:
                outcomes[index].finished = time.monotonic()

        if len(jobs) == 1:
            # A lone request asks the model itself, in this thread: no worker, no hand-over.
            self._inline, self._between_rounds = True, between_rounds
            try:
                work(0)
            finally:
                self._inline = False
            return outcomes

        def worker(index: int) -> None:
            try:
                work(index)
            finally:
                with self._condition:
                    self._running -= 1
                    self._condition.notify_all()

        with self._condition:
            self._running = len(jobs)
        workers = [threading.Thread(target=worker, args=(i,), name=f"judge-{i}", daemon=True) for i in range(len(jobs))]
        for worker in workers:
            worker.start()
        while True:
            with self._condition:
                if self._running and not self._pending:
                    self._condition.wait(timeout=POLL_S)
                # Give the other requests a moment to ask too: their calls then share this round.
                ends = time.monotonic() + MERGE_WAIT_S
                while self._pending and len(self._pending) < self._running and time.monotonic() < ends:
                    self._condition.wait(timeout=ends - time.monotonic())
                calls, self._pending = self._pending, []
                finished = not self._running and not calls
            _safely(between_rounds)
            if finished:
                break
            if calls:
                self._answer(calls)
                with self._condition:
                    for call in calls:
                        call.done = True
                    self._condition.notify_all()
        for worker in workers:
            worker.join()
        return outcomes

    def _answer(self, calls: list[_Call]) -> None:
        """Set every call's answer or error (the caller marks them done)."""
        left = list(calls)
        with self.model_lock:
            merged = [c for c in calls if c.kind == "score" and c.questions]
            if len(merged) > 1:
                try:
                    scores = score_batch(self.model, [(c.image, c.questions) for c in merged])
                except Exception:  # noqa: BLE001 - answered one by one below, where each fault stays with its call
                    logger.warning("the merged score call for %d requests failed; answering each on its own:\n%s",
                                   len(merged), traceback.format_exc())
                else:
                    for call, values in zip(merged, scores, strict=True):
                        call.answer = np.asarray(values, dtype=np.float64)
                    left = [c for c in calls if c not in merged]
            for call in left:
                try:
                    call.answer = (self.model.score(call.image, call.questions) if call.kind == "score"
                                   else self.model.reason(call.image, call.questions))
                except Exception as exc:  # noqa: BLE001 - raised again in the request's own thread
                    call.error = exc

    def locked(self) -> MLLM:
        """The model for use outside the rounds (another thread), serialised with them."""
        return LockedMLLM(self.model, self.model_lock)


def _safely(between_rounds: Callable[[], None]) -> None:
    """A failed cancellation check is logged, never raised: the batch's requests are still being judged
    (and their threads must be answered), only without knowing whether their clients left."""
    try:
        between_rounds()
    except Exception:  # noqa: BLE001
        logger.warning("checking the batch's requests for cancellation failed:\n%s", traceback.format_exc())


class LockedMLLM:
    """An MLLM whose calls hold a lock (the model is shared by threads)."""

    def __init__(self, model: MLLM, lock: threading.Lock):
        self._model = model
        self._lock = lock

    def score(self, image: Image.Image | None, questions: Sequence[str]) -> np.ndarray:
        with self._lock:
            return self._model.score(image, questions)

    def reason(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        with self._lock:
            return self._model.reason(image, questions)

    def __getattr__(self, name: str):
        return getattr(self._model, name)
