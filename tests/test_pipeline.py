"""The stage logic of the served pipeline without Triton: per-request faults, BLS error codes, the pipeline
key, request limits and deadlines."""

from __future__ import annotations

import json
import time

import pytest

from safejudge.pipeline import (
    PIPELINE_KEY_PARAMETER,
    Cancelled,
    Deadline,
    Fault,
    FaultCode,
    InvalidRequest,
    RequestLimits,
    Unavailable,
    answer_each,
    check_pipeline_key,
    fault_from_bls,
    parse_options,
    tagged,
)


def test_each_request_of_a_batch_gets_its_own_answer_or_fault():
    def handle(item):
        if item == "bad":
            raise InvalidRequest("bad request")
        if item == "busy":
            raise Unavailable("queue full")
        if item == "bug":
            raise KeyError("surprise")
        return item.upper()

    answers = answer_each(["a", "bad", "b", "busy", "bug", "c"], handle, "test")
    assert answers[0] == "A" and answers[2] == "B" and answers[5] == "C"
    assert answers[1] == Fault(FaultCode.INVALID_ARGUMENT, "bad request")
    assert answers[3] == Fault(FaultCode.UNAVAILABLE, "queue full")
    assert answers[4].code == FaultCode.INTERNAL and "KeyError" in answers[4].message and "test stage" in answers[4].message


@pytest.mark.parametrize(
    "message, fault_type, text",
    [
        (tagged(FaultCode.INVALID_ARGUMENT, "MODE must be one of score"), InvalidRequest, "MODE must be one of score"),
        (tagged(FaultCode.UNAVAILABLE, "overloaded"), Unavailable, "overloaded"),
        ("Failed for execute the inference request. Model 'mllm' is not ready.", Unavailable, "is not ready"),
        ("Stub process 'mllm_0_0' is not healthy.", Unavailable, "retry shortly"),
        ("[request id: <id_unknown>] Exceeds maximum queue size", Unavailable, "queue size"),
        ("Request timeout expired", Unavailable, "timeout expired"),
        ("CUDA error: out of memory", None, "the mllm stage failed: CUDA error"),
    ],
)
def test_bls_errors_keep_their_meaning(message, fault_type, text):
    fault = fault_from_bls("mllm", message)
    assert text in str(fault)
    if fault_type is None:
        assert fault.code == FaultCode.INTERNAL
    else:
        assert isinstance(fault, fault_type)


def test_only_the_pipeline_key_opens_the_mllm_stage():
    check_pipeline_key(json.dumps({PIPELINE_KEY_PARAMETER: "k3y"}), "k3y")
    for parameters in ("", "{}", "not json", "[1]", json.dumps({PIPELINE_KEY_PARAMETER: "k3"})):
        with pytest.raises(InvalidRequest, match="internal to the safety_judge pipeline"):
            check_pipeline_key(parameters, "k3y")


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
