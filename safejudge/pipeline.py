"""The served stage's logic, free of Triton: model_repository/safety_judge/1/model.py only moves tensors into
and out of JudgeStage and turns a Fault into the matching Triton error.

    safety_judge  IMAGE, CONSTITUTION, OPTIONS? [N, 1] -> VERDICT [N, 1]   per row: decode and validate the
                  image, sample its frames, relevance, the CLUE engine (judge_frames) with the MLLM in the same
                  process; the rows of a dynamic batch of requests are judged side by side, their MLLM calls
                  merged (safejudge.merging)

Every request is answered on its own: a request's fault is INVALID_ARGUMENT, an overloaded, restarting or
expired state is UNAVAILABLE, a cancelled request CANCELLED, and anything else INTERNAL with a message; the
other requests of the same batch are unaffected. A request of N rows gets N verdicts in row order, or one
error naming the row that caused it.
"""

from __future__ import annotations

import hashlib
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

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from safejudge.backends.base import MLLM, Models, UnsupportedQuestion
from safejudge.backends.registry import ModelSpec, load_detector, load_mllm, load_relevance
from safejudge.constitution import Thresholds, validation_summary
from safejudge.evaluators import JudgeOptions, judge_frames
from safejudge.images import ImageError, ImageLimits, decode_image
from safejudge.merging import CallMerger, Outcome, RequestMLLM
from safejudge.metrics import ConstitutionGauge, MetricSink, record_error, record_verdict
from safejudge.store import ConstitutionCompiling, ConstitutionStore, UnknownConstitution
from safejudge_client.verdict import Verdict

logger = logging.getLogger(__name__)
request_log = logging.getLogger("safejudge.requests")


class FaultCode(str, Enum):
    """What a stage answers when a request cannot be served; model.py maps each to a Triton error code."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # the request is wrong: retrying it cannot help
    UNAVAILABLE = "UNAVAILABLE"  # overloaded, restarting, expired: retry later
    CANCELLED = "CANCELLED"  # the client cancelled the request
    INTERNAL = "INTERNAL"  # a fault of the server
    UNAUTHENTICATED = "UNAUTHENTICATED"  # the server requires a token and the request had none or a wrong one


# Fault code -> the name of pb_utils.TritonError's code (model.py files look it up there). The Python backend
# has no UNAUTHENTICATED: a refused token is answered as Triton answers it for every other protocol
# (UNAVAILABLE, "This protocol is restricted ..."), which safejudge_client raises as AuthenticationError.
TRITON_ERROR_CODES = {
    FaultCode.INVALID_ARGUMENT: "INVALID_ARG",
    FaultCode.UNAVAILABLE: "UNAVAILABLE",
    FaultCode.CANCELLED: "CANCELLED",
    FaultCode.INTERNAL: "INTERNAL",
    FaultCode.UNAUTHENTICATED: "UNAVAILABLE",
}
# Request metadata that may carry the token: the standard gRPC / HTTP header, and the one Triton's
# --grpc-restricted-protocol checks. The launcher forwards them to the stage (safejudge/server.py).
CREDENTIAL_HEADERS = ("authorization", "triton-grpc-protocol-authorization")


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


class Unauthenticated(StageFault):
    code = FaultCode.UNAUTHENTICATED


@dataclass(frozen=True)
class Fault:
    """An error answer for one request."""

    code: FaultCode
    message: str


def fault_of(exc: BaseException, stage: str = "safety_judge") -> Fault:
    """The error answer for a request whose handling raised `exc`. A StageFault keeps its code; a question
    the model cannot take is the request's fault; anything else is the server's: INTERNAL, with the
    exception named and logged in full."""
    if isinstance(exc, StageFault):
        return Fault(exc.code, str(exc))
    if isinstance(exc, UnsupportedQuestion):
        return Fault(FaultCode.INVALID_ARGUMENT, f"the model cannot answer this: {exc}")
    logger.error("%s stage: internal error:\n%s", stage, "".join(traceback.format_exception(exc)))
    return Fault(FaultCode.INTERNAL, f"internal error in the {stage} stage: {type(exc).__name__}: {exc}")


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


class RequestLimits(BaseModel):
    """What one served request may ask for, and what it gets when it does not say (serve flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: ImageLimits = Field(default_factory=ImageLimits)
    frames: int = Field(8, ge=1, description="frames judged per animated image unless a request says otherwise")
    max_request_frames: int = Field(32, ge=1)
    reasoning_calls: int = Field(8, ge=0, description="reasoning calls per image unless a request says otherwise")
    max_request_reasoning_calls: int = Field(64, ge=0)
    request_timeout_s: float = Field(60.0, gt=0, description="deadline of a request that brings none")
    allow_lenient_options: bool = Field(
        False,
        description="let requests make the judgement more lenient than the constitution (fail_closed: false, "
        "strategy2: false, a threshold moved in its lenient direction); by default only stricter overrides",
    )


LENIENT_FLAG = "--allow-lenient-options"


def parse_options(raw: bytes | None, limits: RequestLimits | None = None) -> JudgeOptions:
    """OPTIONS JSON (absent: defaults) -> JudgeOptions. With limits (the served path), an unset frame count
    or reasoning budget takes the server's default and a larger one than the server allows is refused."""
    try:
        options = JudgeOptions() if raw is None else JudgeOptions.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidRequest(f"OPTIONS is not valid JudgeOptions JSON: {validation_summary(exc)}") from exc
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


def lenient_choices(options: JudgeOptions, base: Thresholds | None = None) -> list[str]:
    """What in `options` judges more leniently than the policy: fail_closed or strategy2 turned off, and
    with `base` (the constitution's thresholds, calibrated) every threshold moved in its lenient direction."""
    found = [f"{name}: false" for name in ("fail_closed", "strategy2") if not getattr(options, name)]
    return found + ([] if base is None else [f"thresholds.{change}" for change in base.loosened_by(options.thresholds)])


def check_policy(options: JudgeOptions, base: Thresholds, limits: RequestLimits) -> None:
    """Refuse OPTIONS that judge more leniently than the constitution's (calibrated) thresholds and the
    server's fail-closed Strategy 2 engine, unless the operator allows it."""
    lenient = [] if limits.allow_lenient_options else lenient_choices(options, base)
    if lenient:
        raise InvalidRequest(f"OPTIONS {'; '.join(lenient)} would judge more leniently than this server's policy; "
                             f"the operator allows that with `safejudge serve {LENIENT_FLAG}`")


def credential_values(parameters_json: str) -> tuple[str, ...]:
    """The values of every credential header in a request's parameters (Triton's JSON, where a forwarded
    header and a parameter of the same name both appear)."""
    pairs = json.loads(parameters_json or "{}", object_pairs_hook=list)
    return tuple(value for key, value in pairs if key.lower() in CREDENTIAL_HEADERS and isinstance(value, str))


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authenticated(credentials: Sequence[str], digest: str) -> bool:
    """Whether any credential is `Bearer <the token>`; compared as SHA-256 digests, in constant time."""
    expected = bytes.fromhex(digest)
    found = False
    for value in credentials:
        scheme, _, token = value.strip().partition(" ")
        matches = hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(), expected)
        found |= matches and scheme.lower() == "bearer"
    return found


def _text(value: bytes, name: str) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{name} is not UTF-8 text: {exc}") from exc


class JudgeStageSettings(BaseModel):
    """The safety_judge stage's configuration (a model parameter, JSON)."""

    model_config = ConfigDict(extra="forbid")

    models: ModelSpec
    constitutions: Path
    cache_dir: Path
    limits: RequestLimits = Field(default_factory=RequestLimits)
    token_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="requests must carry `Bearer <token>` with this SHA-256"
    )


@dataclass(frozen=True)
class JudgeRow:
    """One image of a request, with its constitution and options."""

    image: bytes
    constitution: bytes
    options: bytes | None = None


@dataclass(frozen=True)
class JudgeRequest:
    """One request as the stage takes it: its rows (the batch dimension of its inputs) and its metadata."""

    rows: tuple[JudgeRow, ...]
    timeout_us: int = 0  # Triton's `timeout` request parameter; 0: the server's default
    request_id: str = ""
    credentials: tuple[str, ...] = ()  # credential_values of its parameters

    @classmethod
    def single(cls, image: bytes, constitution: bytes, options: bytes | None = None, **metadata) -> JudgeRequest:
        return cls((JudgeRow(image, constitution, options),), **metadata)

    @classmethod
    def from_arrays(cls, images, constitutions, options=None, **metadata) -> JudgeRequest:
        """From the [N, 1] arrays of a Triton request (OPTIONS may be absent)."""
        rows = tuple(
            JudgeRow(images[i, 0], constitutions[i, 0], None if options is None else options[i, 0])
            for i in range(len(images))
        )
        return cls(rows, **metadata)


UNKNOWN_CONSTITUTION = "(unknown)"  # the metrics label of a name no constitution has: never a valid name

# The launcher's supervisor (safejudge.server.StageSupervisor) checks that the stage still answers with a request
# whose id starts with this and whose IMAGE is empty. A stage that did not know it would still answer it at
# once, INVALID_ARGUMENT "image is empty", but would log and count it as a client's error.
PROBE_REQUEST_PREFIX = "safejudge-probe-"
PROBE_ANSWER = '{"probe": "alive"}'


def is_probe(request: JudgeRequest) -> bool:
    return request.request_id.startswith(PROBE_REQUEST_PREFIX) and all(row.image == b"" for row in request.rows)


class JudgeStage:
    """The `safety_judge` model: image decoding and frame sampling, relevance, the detector and the MLLM in
    process, judge_frames over the compiled constitution. The requests of a dynamic batch are judged side
    by side (one thread each) and their MLLM calls merged into rounds (safejudge.merging.CallMerger).

    Every answered request is counted on `metrics` (safejudge.metrics) and logged as one JSON line with its
    request id (logger `safejudge.requests`), from the calling thread."""

    def __init__(self, settings: JudgeStageSettings, metrics: MetricSink | None = None, mllm: MLLM | None = None):
        self.settings = settings
        spec = settings.models
        self.merger = CallMerger(load_mllm(spec) if mllm is None else mllm)
        self.relevance, self.detector = load_relevance(spec), load_detector(spec)
        # The store compiles in a background thread: its MLLM calls wait for the merged rounds' lock.
        self.store = ConstitutionStore(
            settings.constitutions, Models(self.merger.locked(), self.relevance, self.detector), settings.cache_dir
        )
        self.metrics = metrics
        self.constitution_gauge = ConstitutionGauge(metrics) if metrics is not None else None

    def deadline(self, timeout_us: int, cancelled: Callable[[], bool] = lambda: False) -> Deadline:
        """The request's own timeout (Triton's `timeout` parameter, microseconds) or the server's default."""
        timeout_s = timeout_us / 1e6 if timeout_us > 0 else self.settings.limits.request_timeout_s
        return Deadline.after(timeout_s, cancelled)

    def answer(
        self, requests: Sequence[JudgeRequest], cancelled: Sequence[Callable[[], bool]] = ()
    ) -> list[list[str] | Fault]:
        """For each request, the Verdict JSON of each of its rows (in order) or one Fault. cancelled[i]() says
        whether request i's client gave up; it is called from this thread only, between the merged rounds.
        The supervisor's probes (is_probe), once their token is checked, get PROBE_ANSWER before any work and
        are neither logged nor counted."""
        started = time.monotonic()
        flags = [False] * len(requests)
        deadlines = [self.deadline(r.timeout_us, lambda i=i: flags[i]) for i, r in enumerate(requests)]
        refused = {i: self._refusal(r) for i, r in enumerate(requests)}
        probes = {i for i, r in enumerate(requests) if refused[i] is None and is_probe(r)}
        jobs = [(i, row) for i, r in enumerate(requests) if refused[i] is None and i not in probes for row in r.rows]

        def poll() -> None:
            for i, is_cancelled in enumerate(cancelled):
                flags[i] = flags[i] or is_cancelled()

        outcomes = iter(self.merger.run([lambda i=i, row=row: self._judge(row, deadlines[i]) for i, row in jobs], poll))
        return [
            [PROBE_ANSWER] * len(request.rows) if i in probes
            else self._account(request, started, refused[i] or [next(outcomes) for _ in request.rows])
            for i, request in enumerate(requests)
        ]

    def _refusal(self, request: JudgeRequest) -> Outcome[Verdict] | None:
        """The outcome of a request refused before any work: a missing or wrong token."""
        digest = self.settings.token_sha256
        if digest is None or authenticated(request.credentials, digest):
            return None
        error = Unauthenticated(
            "This protocol is restricted: safety_judge needs the header 'authorization: Bearer <token>' (or "
            "'triton-grpc-protocol-authorization: Bearer <token>') with this server's token"
        )
        return Outcome(error=error, finished=time.monotonic())

    def _judge(self, row: JudgeRow, deadline: Deadline) -> Verdict:
        """In the row's own thread."""
        limits = self.settings.limits
        name = _text(row.constitution, "CONSTITUTION")
        parsed = parse_options(row.options, limits)
        try:
            decoded = decode_image(row.image, limits.image, frames=parsed.frames)
        except ImageError as exc:
            raise InvalidRequest(str(exc)) from exc
        try:
            compiled = self.store.get(name, timeout_s=max(deadline.remaining_s(), 0.0))
        except UnknownConstitution as exc:
            raise InvalidRequest(str(exc)) from exc
        except ConstitutionCompiling as exc:
            raise Unavailable(str(exc)) from exc
        check_policy(parsed, compiled.constitution.thresholds, limits)
        deadline.check("judging")
        models = Models(RequestMLLM(self.merger, deadline.check), self.relevance, self.detector)
        return judge_frames(
            decoded.frames, compiled, models, parsed,
            frame_indices=decoded.frame_indices, frame_count=decoded.frame_count,
        )

    def _account(
        self, request: JudgeRequest, started: float, outcomes: Outcome[Verdict] | list[Outcome[Verdict]]
    ) -> list[str] | Fault:
        """The answer to one request (its rows' verdicts, or one Fault naming the row that failed it), logged
        and counted: each verdict of an answered request, or the request's one error."""
        request_id = request.request_id or uuid.uuid4().hex
        rows = len(request.rows)
        listed = [outcomes] if isinstance(outcomes, Outcome) else outcomes
        faults = [(row, fault_of(o.error), o) for row, o in enumerate(listed) if o.error is not None]
        if faults:
            # A row the client got wrong explains the failure best; else the first row that failed.
            row, fault, outcome = min(faults, key=lambda f: (f[1].code is not FaultCode.INVALID_ARGUMENT, f[0]))
            if rows > 1:
                fault = Fault(fault.code, f"row {row} of {rows}: {fault.message}")
            constitution = self._constitution_label(request.rows[row].constitution)
            seconds = outcome.finished - started
            request_log.info("%s", json.dumps({
                "request_id": request_id, "constitution": constitution, "ms": round(seconds * 1000, 1),
                "event": "error", "kind": fault.code.value, "message": fault.message[:500],
            }))
            if self.metrics is not None:
                record_error(self.metrics, fault.code.value, constitution, seconds)
            return self._gauged(fault)
        answers = []
        for row, outcome in enumerate(outcomes):
            verdict, seconds = outcome.value, outcome.finished - started
            verdict.request_id = request_id if rows == 1 else f"{request_id}/{row}"
            request_log.info("%s", json.dumps({
                "request_id": verdict.request_id, "constitution": verdict.constitution, "ms": round(seconds * 1000, 1),
                "event": "verdict", "safe": verdict.safe, "violations": verdict.violated_rule_ids,
                "frames": len(verdict.frames_judged), "mllm_calls": verdict.mllm_calls,
                "reasoning_calls": verdict.reasoning_calls,
            }))
            if self.metrics is not None:
                record_verdict(self.metrics, verdict, seconds)
            answers.append(verdict.model_dump_json())
        return self._gauged(answers)

    def _gauged(self, answer: list[str] | Fault) -> list[str] | Fault:
        if self.metrics is not None:
            # The request's get() has just read the directory: report that, without another pass over it.
            self.constitution_gauge.update(self.store.status(refresh=False))
        return answer

    def _constitution_label(self, name: bytes) -> str:
        """A request's constitution as a metrics label: a served name, else UNKNOWN_CONSTITUTION (labels from
        request strings would let any client add series without bound)."""
        try:
            text = name.decode()
        except UnicodeDecodeError:
            return UNKNOWN_CONSTITUTION
        return text if text in self.store.served_names() else UNKNOWN_CONSTITUTION
