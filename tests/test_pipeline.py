"""The stage logic of the served pipeline without Triton: per-request faults, request limits and deadlines; requests
of several rows, the operator's policy, tokens and bounded metric labels."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safejudge.backends.base import UnsupportedQuestion
from safejudge.backends.registry import ModelSpec
from safejudge.pipeline import (
    UNKNOWN_CONSTITUTION,
    Cancelled,
    Deadline,
    Fault,
    FaultCode,
    InvalidRequest,
    JudgeRequest,
    JudgeRow,
    JudgeStage,
    JudgeStageSettings,
    RequestLimits,
    Unavailable,
    authenticated,
    credential_values,
    fault_of,
    parse_options,
    token_digest,
)
from safejudge.shipped import CONSTITUTIONS
from tests.test_merging import CountingMLLM


def test_each_failure_becomes_the_answer_that_names_it():
    assert fault_of(InvalidRequest("bad request")) == Fault(FaultCode.INVALID_ARGUMENT, "bad request")
    assert fault_of(Unavailable("queue full")) == Fault(FaultCode.UNAVAILABLE, "queue full")
    assert fault_of(Cancelled("gone")).code == FaultCode.CANCELLED
    unsupported = fault_of(UnsupportedQuestion("no such word"))
    assert unsupported.code == FaultCode.INVALID_ARGUMENT and "cannot answer this: no such word" in unsupported.message
    bug = fault_of(KeyError("surprise"), "test")
    assert bug.code == FaultCode.INTERNAL and "KeyError" in bug.message and "test stage" in bug.message


def test_served_options_take_the_server_defaults_and_respect_its_limits():
    limits = RequestLimits(frames=4, max_request_frames=6, reasoning_calls=3, max_request_reasoning_calls=5)
    served = parse_options(None, limits)
    assert (served.frames, served.max_reasoning_calls) == (4, 3)
    assert parse_options(b'{"frames": 6, "max_reasoning_calls": 0}', limits).frames == 6
    with pytest.raises(InvalidRequest, match="frames: 7 is above this server's limit of 6"):
        parse_options(b'{"frames": 7}', limits)
    with pytest.raises(InvalidRequest, match="max_reasoning_calls: 9 is above this server's limit of 5"):
        parse_options(b'{"max_reasoning_calls": 9}', limits)
    assert parse_options(None).max_reasoning_calls is None, "in process, no budget unless asked"


def test_a_deadline_stops_work_nobody_waits_for():
    Deadline.after(10).check("scoring")
    with pytest.raises(Unavailable, match="request timeout of 0.01 s expired; stopped before scoring"):
        expired = Deadline.after(0.01)
        time.sleep(0.02)
        expired.check("scoring")
    with pytest.raises(Cancelled, match="cancelled by the client"):
        Deadline.after(10, cancelled=lambda: True).check("scoring")


# The stage itself (JudgeStage.answer) on a scripted model: rows, the operator's policy, tokens, metric labels.

QUICK = json.dumps({"relevance_filter": False, "max_reasoning_calls": 0}).encode()


def png(seed: int, size: tuple[int, int] = (32, 24)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class RecordingSink:
    """A MetricSink that keeps every series it was asked for."""

    def __init__(self):
        self.series: set[tuple[str, tuple]] = set()

    def _record(self, name, labels, value=1.0):
        self.series.add((name, tuple(sorted(labels.items()))))

    add = observe = set = _record


def make_stage(tmp_path: Path, **settings) -> JudgeStage:
    constitutions = tmp_path / "constitutions"
    constitutions.mkdir(parents=True, exist_ok=True)
    shutil.copy(CONSTITUTIONS / "general.yaml", constitutions)
    stage_settings = JudgeStageSettings(models=ModelSpec(relevance=None), constitutions=constitutions,
                                        cache_dir=tmp_path / "cache", **settings)
    return JudgeStage(stage_settings, RecordingSink(), mllm=CountingMLLM())


def without_timing(verdict_json: str) -> dict:
    verdict = json.loads(verdict_json)
    for volatile in ("timing", "request_id"):
        verdict.pop(volatile)
    return verdict


def gif(frames: int) -> bytes:
    images = [Image.open(io.BytesIO(png(seed))) for seed in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:])
    return buffer.getvalue()


def test_every_row_of_a_request_is_judged_as_it_would_be_alone(tmp_path):
    stage = make_stage(tmp_path)
    images = [png(0), gif(3), gif(2)]
    (batched,) = stage.answer([JudgeRequest(tuple(JudgeRow(image, b"general", QUICK) for image in images),
                                            request_id="r")])
    alone = [stage.answer([JudgeRequest.single(image, b"general", QUICK)])[0][0] for image in images]
    assert len(batched) == 3
    assert [without_timing(v) for v in batched] == [without_timing(v) for v in alone]
    assert [json.loads(v)["request_id"] for v in batched] == ["r/0", "r/1", "r/2"]
    # The rows differ (frames): a row answered with another row's verdict would show.
    assert [json.loads(v)["frame_count"] for v in batched] == [1, 3, 2]


def test_a_bad_row_fails_its_request_naming_the_row_and_leaves_other_requests_alone(tmp_path):
    stage = make_stage(tmp_path)
    bad = JudgeRequest((JudgeRow(png(0), b"general", QUICK), JudgeRow(b"junk", b"general", QUICK),
                        JudgeRow(png(1), b"nope", QUICK)))
    good = JudgeRequest.single(png(2), b"general", QUICK)
    failed, answered = stage.answer([bad, good])
    assert failed.code == FaultCode.INVALID_ARGUMENT
    assert failed.message.startswith("row 1 of 3: ") and "cannot identify image file" in failed.message
    assert len(answered) == 1 and json.loads(answered[0])["constitution"] == "general"
    # A verdict is counted only when its request is answered with it.
    verdicts = [labels for name, labels in stage.metrics.series if name == "safejudge_verdicts_total"]
    assert len(verdicts) == 1


def test_metric_labels_come_from_a_bounded_set(tmp_path):
    stage = make_stage(tmp_path)
    stage.answer([JudgeRequest.single(png(0), b"general", QUICK)])
    before = set(stage.metrics.series)
    stage.answer([JudgeRequest.single(png(0), f"flood-{i}".encode(), QUICK) for i in range(50)]
                 + [JudgeRequest.single(png(0), b"\xff\xfe", QUICK)])
    added = stage.metrics.series - before
    assert added, "the errors were counted"
    labels = {value for _, pairs in added for key, value in pairs if key == "constitution"}
    assert labels == {UNKNOWN_CONSTITUTION}
    assert len(added) <= 2, added  # one error counter (kind) and one histogram (constitution) series


@pytest.mark.parametrize("options, lenient", [
    ({"fail_closed": False}, "fail_closed: false"),
    ({"strategy2": False}, "strategy2: false"),
    ({"thresholds": {"relevance": 0.9}}, "thresholds.relevance: 0.9"),
    ({"thresholds": {"alpha1_factor": -0.1}}, "thresholds.alpha1_factor: -0.1"),
    ({"thresholds": {"alpha2_factor": 0.95}}, "thresholds.alpha2_factor: 0.95"),
    ({"thresholds": {"beta": 0.7}}, "thresholds.beta: 0.7"),
    ({"thresholds": {"detector_confidence": 0.01}}, "thresholds.detector_confidence: 0.01"),
])
def test_a_request_may_not_loosen_the_operators_policy(tmp_path, options, lenient):
    stage = make_stage(tmp_path)
    (answer,) = stage.answer([JudgeRequest.single(png(0), b"general", json.dumps(options).encode())])
    assert isinstance(answer, Fault) and answer.code == FaultCode.INVALID_ARGUMENT
    assert lenient in answer.message and "--allow-lenient-options" in answer.message
    allowed = make_stage(tmp_path / "allowed", limits=RequestLimits(allow_lenient_options=True))
    (answer,) = allowed.answer([JudgeRequest.single(png(0), b"general", json.dumps(options).encode())])
    assert isinstance(answer, list), answer


@pytest.mark.parametrize("options", [
    {"thresholds": {"relevance": 0.1, "alpha1_factor": -0.5, "alpha2_factor": 0.5, "beta": 0.3}},
    {"relevance_filter": False, "evidence": "none", "explain": True, "max_reasoning_calls": 3, "schedule": "all"},
    {"thresholds": {"beta": 0.6}},  # the constitution's own value
])
def test_stricter_overrides_and_other_options_stay_allowed(tmp_path, options):
    stage = make_stage(tmp_path)
    (answer,) = stage.answer([JudgeRequest.single(png(0), b"general", json.dumps(options).encode())])
    assert isinstance(answer, list), answer


def test_lenient_is_measured_against_the_constitutions_own_thresholds(tmp_path):
    constitutions = tmp_path / "constitutions"
    constitutions.mkdir()
    text = (CONSTITUTIONS / "general.yaml").read_text()
    stricter_beta = text.replace("name: general", "name: general\nthresholds: {beta: 0.4}", 1)
    (constitutions / "general.yaml").write_text(stricter_beta)
    stage = JudgeStage(JudgeStageSettings(models=ModelSpec(relevance=None), constitutions=constitutions,
                                          cache_dir=tmp_path / "cache"), mllm=CountingMLLM())
    (answer,) = stage.answer([JudgeRequest.single(png(0), b"general", b'{"thresholds": {"beta": 0.5}}')])
    assert isinstance(answer, Fault) and "this constitution's is 0.4" in answer.message


def test_a_token_is_required_when_configured_and_compared_by_digest(tmp_path):
    stage = make_stage(tmp_path, token_sha256=token_digest("s3cret"))
    request = JudgeRequest.single(png(0), b"general", QUICK)
    refused = [stage.answer([JudgeRequest(request.rows, credentials=c)])[0]
               for c in ((), ("Bearer wrong",), ("s3cret",), ("Basic s3cret",))]
    assert all(isinstance(a, Fault) and a.code == FaultCode.UNAUTHENTICATED for a in refused), refused
    assert "This protocol is restricted" in refused[0].message
    for credentials in (("Bearer s3cret",), ("bearer s3cret",), ("Bearer wrong", "Bearer s3cret")):
        (answer,) = stage.answer([JudgeRequest(request.rows, credentials=credentials)])
        assert isinstance(answer, list), (credentials, answer)
    assert stage.merger.model.score_calls + sum(stage.merger.model.batch_calls) > 0


def test_credentials_are_read_from_forwarded_headers_and_parameters():
    parameters = ('{"authorization":"spoof","authorization":"Bearer a",'
                  '"triton-grpc-protocol-authorization":"Bearer b","x":1}')
    assert credential_values(parameters) == ("spoof", "Bearer a", "Bearer b")
    assert credential_values('{"Authorization":"Bearer c"}') == ("Bearer c",)
    assert credential_values("") == ()
    assert authenticated(("Bearer a",), token_digest("a")) and not authenticated(("Bearer ab",), token_digest("a"))


def test_lenient_choices_name_what_loosens_the_policy():
    from safejudge.bench import BenchSettings
    from safejudge.constitution import Thresholds
    from safejudge.evaluators import JudgeOptions
    from safejudge.pipeline import lenient_choices

    assert lenient_choices(BenchSettings().options, Thresholds()) == [], "the bench's options need no flag"
    options = JudgeOptions(fail_closed=False, thresholds={"relevance": 0.3, "beta": 0.1})
    assert lenient_choices(options, Thresholds()) == [
        "fail_closed: false", "thresholds.relevance: 0.3 (this constitution's is 0.22)"]
    assert lenient_choices(options) == ["fail_closed: false"]
