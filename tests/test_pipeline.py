"""The stage logic of the served pipeline without Triton: per-request faults, request limits and deadlines."""

from __future__ import annotations

import time

import pytest

from safejudge.backends.base import UnsupportedQuestion
from safejudge.pipeline import (
    Cancelled,
    Deadline,
    Fault,
    FaultCode,
    InvalidRequest,
    RequestLimits,
    Unavailable,
    fault_of,
    parse_options,
)


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
