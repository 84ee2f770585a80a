"""The served pipeline's stage logic, free of Triton: each model_repository/<stage>/1/model.py only moves
tensors into and out of these classes and turns a StageFault into the matching Triton error.

    safety_judge  IMAGE, CONSTITUTION, OPTIONS? -> VERDICT   decode and validate the image, sample its frames,
                  relevance, the CLUE engine (judge_frames); the MLLM is the `mllm` model, reached over BLS
    mllm          PIXELS?, QUESTIONS, MODE -> SCORES, ANSWERS (dynamic batching); answers only requests
                  that carry the server's pipeline key, i.e. the safety_judge stage

Every request is answered on its own: a request's fault is INVALID_ARGUMENT, an overloaded, restarting or
expired state is UNAVAILABLE, a cancelled request CANCELLED, and anything else INTERNAL with a message; the
other requests of the same batch are unaffected (`answer_each`).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from safejudge.backends.base import MLLM, Models, UnsupportedQuestion, score_batch
from safejudge.backends.registry import ModelSpec, load_detector, load_mllm, load_relevance
from safejudge.evaluators import JudgeOptions, judge_frames
from safejudge.images import ImageError, ImageLimits, decode_image
from safejudge.metrics import ConstitutionGauge, MetricSink, record_error, record_verdict
from safejudge.store import ConstitutionCompiling, ConstitutionStore, UnknownConstitution
from safejudge_client.verdict import Verdict

logger = logging.getLogger(__name__)
request_log = logging.getLogger("safejudge.requests")

MODES = ("score", "reason", "id")
# The request parameter that carries the pipeline key on the judge's BLS calls to the mllm stage.
PIPELINE_KEY_PARAMETER = "safejudge-pipeline-key"

T = TypeVar("T")


class FaultCode(str, Enum):
    """What a stage answers when a request cannot be served; model.py maps each to a Triton error code."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # the request is wrong: retrying it cannot help
    UNAVAILABLE = "UNAVAILABLE"  # overloaded, restarting, expired: retry later
    CANCELLED = "CANCELLED"  # the client cancelled the request
    INTERNAL = "INTERNAL"  # a fault of the server


# Fault code -> the name of pb_utils.TritonError's code (model.py files look it up there).
TRITON_ERROR_CODES = {
    FaultCode.INVALID_ARGUMENT: "INVALID_ARG",
    FaultCode.UNAVAILABLE: "UNAVAILABLE",
    FaultCode.CANCELLED: "CANCELLED",
    FaultCode.INTERNAL: "INTERNAL",
}


class StageFault(Exception):
    """A request that gets an error answer instead of a result; the message says why."""

    code = FaultCode.INTERNAL


class InvalidRequest(StageFault, ValueError):
    """The request itself is wrong (the client's fault); served as INVALID_ARGUMENT with this message."""

    code = FaultCode.INVALID_ARGUMENT


class Unavailable(StageFault):
    """The server cannot serve this request now (a stage restarting, a full queue, an expired deadline)."""

    code = FaultCode.UNAVAILABLE


class Cancelled(StageFault):
    code = FaultCode.CANCELLED


# Triton 2.51 hands a BLS caller every error as INTERNAL: a stage prefixes its messages with their code so
# that the caller can answer with the right one.
def tagged(code: FaultCode, message: str) -> str:
    return f"[safejudge:{code.value}] {message}"


def untag(message: str) -> tuple[FaultCode | None, str]:
    for code in FaultCode:
        tag = f"[safejudge:{code.value}] "
        if tag in message:
            return code, message.split(tag, 1)[1]
    return None, message


# What Triton itself says when a model cannot take a request right now (measured on 2.51): a stage that is
# being reloaded, whose process died, whose queue is full, or a request that waited past its timeout.
_TRANSIENT_MESSAGES = ("is not ready", "is not healthy", "has no available versions", "unknown model",
                       "Exceeds maximum queue size", "Request timeout expired")


def fault_from_bls(stage: str, message: str) -> StageFault:
    """The fault to answer when a BLS call to `stage` failed with this (always INTERNAL) message."""
    code, text = untag(message)
    if code is FaultCode.INVALID_ARGUMENT:
        return InvalidRequest(text)
    if code is FaultCode.UNAVAILABLE or (code is None and any(m in message for m in _TRANSIENT_MESSAGES)):
        return Unavailable(f"the {stage} stage cannot take requests right now ({text.strip()}); retry shortly")
    return StageFault(f"the {stage} stage failed: {text.strip()}")


@dataclass(frozen=True)
class Fault:
    """An error answer for one request."""

    code: FaultCode
    message: str


def answer_each(items: Sequence[T], handle: Callable[[T], object], stage: str) -> list[object | Fault]:
    """handle(item) for every request of a batch, each on its own: a fault answers that request only.

    Unexpected exceptions are the server's fault: INTERNAL, with the exception named and logged in full.
    """
    answers: list[object | Fault] = []
    for item in items:
        try:
            answers.append(handle(item))
        except StageFault as exc:
            answers.append(Fault(exc.code, str(exc)))
        except Exception as exc:  # noqa: BLE001 - one request's failure must not fail the batch
            logger.error("%s stage: internal error:\n%s", stage, traceback.format_exc())
            answers.append(Fault(FaultCode.INTERNAL, f"internal error in the {stage} stage: {type(exc).__name__}: {exc}"))
    return answers


@dataclass(frozen=True)
class Deadline:
    """When the work for one request stops being worth doing: its timeout passed or its client cancelled."""

    expires_at: float
    timeout_s: float
    cancelled: Callable[[], bool] = lambda: False

    @classmethod
    def after(cls, timeout_s: float, cancelled: Callable[[], bool] = lambda: False) -> Deadline:
        return cls(time.monotonic() + timeout_s, timeout_s, cancelled)

    def remaining_s(self) -> float:
        return self.expires_at - time.monotonic()

    def check(self, before: str) -> None:
        """Raise Cancelled / Unavailable instead of starting `before` for a request nobody waits for."""
        if self.cancelled():
            raise Cancelled(f"request cancelled by the client; stopped before {before}")
        if self.remaining_s() <= 0:
            raise Unavailable(f"request timeout of {self.timeout_s:g} s expired; stopped before {before}")


def stage_parameters(model_config_json: str) -> dict[str, str]:
    """The string parameters of a stage, from the model config JSON Triton hands to initialize()."""
    config = json.loads(model_config_json)
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def read_pipeline_key(path: str | Path) -> str:
    key = Path(path).read_text().strip()
    if not key:
        raise RuntimeError(f"pipeline key file {path} is empty")
    return key


def check_pipeline_key(parameters_json: str, expected: str) -> None:
    """The mllm stage serves only the pipeline: requests from anyone else are refused."""
    try:
        given = str(json.loads(parameters_json or "{}").get(PIPELINE_KEY_PARAMETER, ""))
    except (ValueError, AttributeError):
        given = ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise InvalidRequest("the mllm model is internal to the safety_judge pipeline; send requests to safety_judge")


def _readable(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
    )


class RequestLimits(BaseModel):
    """What one served request may ask for, and what it gets when it does not say (serve flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: ImageLimits = Field(default_factory=ImageLimits)
    frames: int = Field(8, ge=1, description="frames judged per animated image unless a request says otherwise")
    max_request_frames: int = Field(32, ge=1)
    reasoning_calls: int = Field(8, ge=0, description="reasoning calls per image unless a request says otherwise")
    max_request_reasoning_calls: int = Field(64, ge=0)
    request_timeout_s: float = Field(60.0, gt=0, description="deadline of a request that brings none")


def parse_options(raw: bytes | None, limits: RequestLimits | None = None) -> JudgeOptions:
    """OPTIONS JSON (absent: defaults) -> JudgeOptions. With limits (the served path), an unset frame count
    or reasoning budget takes the server's default and a larger one than the server allows is refused."""
    try:
        options = JudgeOptions() if raw is None else JudgeOptions.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidRequest(f"OPTIONS is not valid JudgeOptions JSON: {_readable(exc)}") from exc
    if limits is None:
        return options
    frames = limits.frames if options.frames is None else options.frames
    reasoning = limits.reasoning_calls if options.max_reasoning_calls is None else options.max_reasoning_calls
    if frames > limits.max_request_frames:
        raise InvalidRequest(f"OPTIONS frames: {frames} is above this server's limit of {limits.max_request_frames}")
    if reasoning > limits.max_request_reasoning_calls:
        raise InvalidRequest(
            f"OPTIONS max_reasoning_calls: {reasoning} is above this server's limit of "
            f"{limits.max_request_reasoning_calls}"
        )
    return options.model_copy(update={"frames": frames, "max_reasoning_calls": reasoning})


def pixels_image(pixels: np.ndarray) -> Image.Image:
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InvalidRequest(f"PIXELS must be uint8 [height, width, 3], got {pixels.dtype} {list(pixels.shape)}")
    return Image.fromarray(pixels, "RGB")


def _text(value: bytes, name: str) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{name} is not UTF-8 text: {exc}") from exc


@dataclass(frozen=True)
class MLLMRequest:
    """One validated request to the mllm stage."""

    mode: str
    image: Image.Image | None = None
    questions: tuple[str, ...] = ()


class MLLMStage:
    """The `mllm` model: answers yes/no questions (score), reasons (reason) about one image or none, or
    names the loaded model (id: ANSWERS = [model_id, fingerprint, preferred schedule]: the judge reports the
    id, keys compiled constitutions by id and fingerprint, and follows the backend's schedule).

    A dynamic batch is answered by `answer`: every request is read and validated on its own, and the score
    requests of the batch go to the model in one merged call (`backends.base.score_batch`)."""

    def __init__(self, mllm: MLLM):
        self.mllm = mllm

    @classmethod
    def load(cls, spec: ModelSpec) -> MLLMStage:
        return cls(load_mllm(spec))

    @staticmethod
    def parse(pixels: np.ndarray | None, questions: Sequence[bytes], mode: bytes) -> MLLMRequest:
        """A request's tensors, validated (InvalidRequest names what is wrong)."""
        mode_text = _text(mode, "MODE")
        if mode_text not in MODES:
            raise InvalidRequest(f"MODE must be one of {', '.join(MODES)}, got {mode_text!r}")
        if mode_text == "id":
            return MLLMRequest(mode_text)
        texts = tuple(_text(q, "QUESTIONS") for q in questions)
        image = None if pixels is None else pixels_image(pixels)
        if mode_text == "reason" and image is None and texts:
            raise InvalidRequest("MODE reason needs PIXELS")
        return MLLMRequest(mode_text, image, texts)

    def run(self, request: MLLMRequest) -> tuple[np.ndarray, list[str]]:
        """The answer to one request: (SCORES, ANSWERS)."""
        if request.mode == "id":
            identity = [self.mllm.model_id, getattr(self.mllm, "fingerprint", ""),
                        getattr(self.mllm, "preferred_schedule", None) or ""]
            return np.zeros(0, dtype=np.float32), identity
        if not request.questions:
            return np.zeros(0, dtype=np.float32), []
        try:
            if request.mode == "score":
                return np.asarray(self.mllm.score(request.image, list(request.questions)), dtype=np.float32), []
            return np.zeros(0, dtype=np.float32), list(self.mllm.reason(request.image, list(request.questions)))
        except UnsupportedQuestion as exc:
            raise InvalidRequest(f"the model {self.mllm.model_id} cannot answer this: {exc}") from exc

    def answer(self, requests: Sequence[T], read: Callable[[T], MLLMRequest]) -> list[object | Fault]:
        """The answer or fault of every request of a batch; read(request) -> its MLLMRequest (or a fault).

        Score requests with questions are merged into one model call when there are several; if that call
        fails, each of them is answered on its own, so a request that breaks the merged call fails alone."""
        answers = answer_each(requests, read, "mllm")
        merged = [i for i, a in enumerate(answers) if isinstance(a, MLLMRequest) and a.mode == "score" and a.questions]
        if len(merged) > 1:
            try:
                scores = score_batch(self.mllm, [(answers[i].image, list(answers[i].questions)) for i in merged])
            except Exception:  # noqa: BLE001 - answered one by one below, where each fault stays with its request
                logger.warning("mllm stage: the merged score call for %d requests failed; answering each on its "
                               "own:\n%s", len(merged), traceback.format_exc())
            else:
                for i, values in zip(merged, scores, strict=True):
                    answers[i] = (np.asarray(values, dtype=np.float32), [])
        pending = [i for i, a in enumerate(answers) if isinstance(a, MLLMRequest)]
        for i, answer in zip(pending, answer_each([answers[i] for i in pending], self.run, "mllm"), strict=True):
            answers[i] = answer
        return answers


class JudgeStageSettings(BaseModel):
    """The safety_judge stage's configuration (a model parameter, JSON)."""

    model_config = ConfigDict(extra="forbid")

    models: ModelSpec
    constitutions: Path
    cache_dir: Path
    limits: RequestLimits = Field(default_factory=RequestLimits)


class JudgeStage:
    """The `safety_judge` model: image decoding and frame sampling, relevance and the detector in process,
    judge_frames over the compiled constitution; `mllm` is the mllm stage seen through the MLLM interface.

    Every answered request is counted on `metrics` (safejudge.metrics) and logged as one JSON line with its
    request id (logger `safejudge.requests`)."""

    def __init__(self, settings: JudgeStageSettings, mllm: MLLM, metrics: MetricSink | None = None):
        self.settings = settings
        spec = settings.models
        self.models = Models(mllm=mllm, relevance=load_relevance(spec), detector=load_detector(spec))
        self.store = ConstitutionStore(settings.constitutions, self.models, settings.cache_dir)
        self.metrics = metrics
        self.constitution_gauge = ConstitutionGauge(metrics) if metrics is not None else None

    def deadline(self, timeout_us: int, cancelled: Callable[[], bool]) -> Deadline:
        """The request's own timeout (Triton's `timeout` parameter, microseconds) or the server's default."""
        timeout_s = timeout_us / 1e6 if timeout_us > 0 else self.settings.limits.request_timeout_s
        return Deadline.after(timeout_s, cancelled)

    def judge(
        self, image: bytes, constitution: bytes, options: bytes | None, deadline: Deadline, request_id: str = ""
    ) -> str:
        """Verdict JSON for one request."""
        request_id = request_id or uuid.uuid4().hex
        started, name = time.monotonic(), None
        try:
            name = _text(constitution, "CONSTITUTION")
            verdict = self._judge(image, name, options, deadline)
        except Exception as exc:
            kind = exc.code.value if isinstance(exc, StageFault) else FaultCode.INTERNAL.value
            self._account(request_id, name, started, error=(kind, str(exc)))
            raise
        verdict.request_id = request_id
        self._account(request_id, name, started, verdict=verdict)
        return verdict.model_dump_json()

    def _judge(self, image: bytes, name: str, options: bytes | None, deadline: Deadline) -> Verdict:
        limits = self.settings.limits
        parsed = parse_options(options, limits)
        try:
            decoded = decode_image(image, limits.image, frames=parsed.frames)
        except ImageError as exc:
            raise InvalidRequest(str(exc)) from exc
        try:
            compiled = self.store.get(name, timeout_s=max(deadline.remaining_s(), 0.0))
        except UnknownConstitution as exc:
            raise InvalidRequest(str(exc)) from exc
        except ConstitutionCompiling as exc:
            raise Unavailable(str(exc)) from exc
        deadline.check("judging")
        return judge_frames(
            decoded.frames, compiled, self.models, parsed,
            frame_indices=decoded.frame_indices, frame_count=decoded.frame_count,
        )

    def _account(
        self, request_id: str, constitution: str | None, started: float,
        verdict: Verdict | None = None, error: tuple[str, str] | None = None,
    ) -> None:
        seconds = time.monotonic() - started
        event = {"event": "verdict" if verdict else "error", "request_id": request_id, "constitution": constitution,
                 "ms": round(seconds * 1000, 1)}
        if verdict is not None:
            event |= {"safe": verdict.safe, "violations": verdict.violated_rule_ids, "frames": len(verdict.frames_judged),
                      "mllm_calls": verdict.mllm_calls, "reasoning_calls": verdict.reasoning_calls}
        else:
            event |= {"kind": error[0], "message": error[1][:500]}
        request_log.info("%s", json.dumps(event))
        if self.metrics is None:
            return
        if verdict is not None:
            record_verdict(self.metrics, verdict, seconds)
        else:
            record_error(self.metrics, error[0], constitution, seconds)
        # The request's get() has just read the directory: report that, without another pass over it.
        self.constitution_gauge.update(self.store.status(refresh=False))
