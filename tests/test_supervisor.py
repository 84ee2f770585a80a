"""The stage supervisor's logic without a server (tests/test_reliability.py runs it against a real one): it
outlives its own errors with bounded backoff, retries a reload until it succeeds, tells a hung stage from a
busy one, and the stage answers its probes before any work, without logging or counting them."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest
from tritonclient.utils import InferenceServerException

import safejudge.server as server_module
from safejudge.pipeline import PROBE_ANSWER, PROBE_REQUEST_PREFIX, JudgeRequest, is_probe
from safejudge.server import ProbeSettings, Recovery, ServeSettings, StageSupervisor
from tests.test_pipeline import QUICK, make_stage, png


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(server_module, "BACKOFF_FIRST_S", 0.01)
    monkeypatch.setattr(server_module, "BACKOFF_MAX_S", 0.04)


@pytest.fixture
def process():
    """Stands in for tritonserver: a process that runs until the test ends."""
    child = subprocess.Popen(["sleep", "60"])
    yield child
    child.kill()
    child.wait()


def supervisor(process, probe: ProbeSettings | None = None) -> tuple[StageSupervisor, list[str]]:
    fake_server = SimpleNamespace(process=process, http_url="127.0.0.1:1", admin_key="key", ready_timeout=5.0,
                                  auth_token=None)
    events: list[str] = []
    watcher = StageSupervisor(fake_server, poll_s=0.01, probe=probe)
    watcher.on_event = events.append
    return watcher, events


def wait_until(condition, limit_s: float = 5.0) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


class FakeClient:
    """tritonclient.http's InferenceServerClient as the supervisor uses it, scripted per call name: a list of
    results or exceptions, taken in order (the last one repeats)."""

    def __init__(self, script: dict[str, list], calls: list[str]):
        self.script, self.calls = script, calls

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def _next(self, name):
        self.calls.append(name)
        outcomes = self.script[name]
        outcome = outcomes.pop(0) if len(outcomes) > 1 else outcomes[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome(self) if callable(outcome) else outcome

    def unload_model(self, model, headers=None):
        return self._next("unload_model")

    def load_model(self, model, headers=None):
        return self._next("load_model")

    def is_model_ready(self, model):
        return self._next("is_model_ready")

    def get_inference_statistics(self, model, headers=None):
        return {"model_stats": [{"execution_count": self._next("get_inference_statistics")}]}

    def infer(self, model, inputs, request_id="", headers=None, timeout=None):
        assert request_id.startswith(PROBE_REQUEST_PREFIX)
        return self._next("infer")


def scripted(watcher: StageSupervisor, script: dict[str, list]) -> list[str]:
    calls: list[str] = []
    watcher._client = lambda **timeouts: FakeClient(script, calls)
    return calls


def test_the_loop_outlives_its_own_errors_with_bounded_backoff(process, monkeypatch, fast_backoff):
    failures = iter([OSError("zero"), RuntimeError("one"), OSError("two"), ValueError("three"), KeyError("four"),
                     RuntimeError("five")])  # the first at construction: listed again by run()

    def listing(pid):
        error = next(failures, None)
        if error is not None:
            raise error
        return {}

    monkeypatch.setattr(server_module, "stub_processes", listing)
    watcher, events = supervisor(process)
    watcher.start()
    try:
        assert wait_until(lambda: len(events) == 5)
        time.sleep(0.1)
        assert watcher.is_alive(), "the supervisor stopped after its own errors"
        delays = [event.rsplit("retrying in ", 1)[1] for event in events]
        assert delays == ["0.01 s", "0.02 s", "0.04 s", "0.04 s", "0.04 s"]
        assert "RuntimeError: one" in events[0] and "OSError: two" in events[1]
    finally:
        watcher.stopping.set()
        watcher.join(5)
    assert not watcher.is_alive()


def test_a_reload_is_retried_until_it_succeeds_and_unloads_once(process, fast_backoff):
    watcher, events = supervisor(process)
    refused = ConnectionRefusedError(111, "Connection refused")
    calls = scripted(watcher, {
        "unload_model": [refused, TimeoutError("timed out"), None],
        "load_model": [InferenceServerException("failed to load"), RuntimeError("odd"), refused, None],
    })
    watcher._restore("safety_judge", 1234)
    assert calls == ["unload_model"] * 3 + ["load_model"] * 4
    assert len([event for event in events if "reload attempt" in event]) == 5
    (recovery,) = watcher.recoveries
    assert (recovery.model, recovery.pid, recovery.cause, recovery.error) == ("safety_judge", 1234, "died", None)
    assert recovery.seconds is not None and events[-1].startswith("stage safety_judge restored in")


def test_a_reload_stops_trying_only_when_the_supervisor_stops(process, fast_backoff):
    watcher, events = supervisor(process)
    scripted(watcher, {"unload_model": [ConnectionRefusedError(111, "Connection refused")], "load_model": [None]})
    stopper = threading.Timer(0.5, watcher.stopping.set)
    stopper.start()
    watcher._restore("safety_judge", 1234)
    failed = [event for event in events if "reload attempt" in event]
    assert len(failed) > 10, "retried all along (backoff capped at 0.04 s here)"
    assert watcher.recoveries == [Recovery("safety_judge", 1234, watcher.recoveries[0].died_at, None,
                                           "ConnectionRefusedError: [Errno 111] Connection refused", "died")]


PROBE = ProbeSettings(model="safety_judge", interval_s=0.01, deadline_s=0.05, misses=2)


@pytest.mark.parametrize(("infer", "executions", "outcome"), [
    ([None], [7], "answered"),  # the stage's probe answer
    ([InferenceServerException("image is empty", status="400")], [7], "answered"),  # a stage without probes
    ([TimeoutError("timed out")], [7, 7], "missed"),  # no answer, no batch finished
    ([TimeoutError("timed out")], [7, 8], "progress"),  # no answer, but the stage finishes batches: busy
    ([InferenceServerException("Exceeds maximum queue size", status="503")], [7, 7], "missed"),
    ([InferenceServerException("Exceeds maximum queue size", status="503")], [7, 9], "progress"),
    ([InferenceServerException("Stub process 'x' is not healthy.", status="500")], [7, 7], "missed"),
    ([InferenceServerException("has no available versions", status="404")], [7], "rejected"),
])
def test_a_probe_tells_hung_from_busy(process, infer, executions, outcome):
    watcher, _ = supervisor(process, PROBE)
    scripted(watcher, {"is_model_ready": [True], "get_inference_statistics": executions, "infer": infer})
    assert watcher._probe_once(PROBE, 1) == outcome


def test_a_stage_that_is_not_loaded_is_not_probed(process):
    watcher, _ = supervisor(process, PROBE)
    calls = scripted(watcher, {"is_model_ready": [False]})
    assert watcher._probe_once(PROBE, 1) == "not ready" and calls == ["is_model_ready"]


def test_two_misses_in_a_row_kill_the_stage_and_an_answer_resets_the_count(process, monkeypatch):
    outcomes = iter(["missed", "answered", "missed", "progress", "missed", "missed", "answered"])
    killed: list[str] = []
    watcher, events = supervisor(process, PROBE)
    monkeypatch.setattr(watcher, "_probe_once", lambda probe, number: next(outcomes, "answered"))
    monkeypatch.setattr(watcher, "_kill_hung", killed.append)
    thread = threading.Thread(target=watcher._probe_loop)
    thread.start()
    try:
        assert wait_until(lambda: killed)
        time.sleep(0.1)
    finally:
        watcher.stopping.set()
        thread.join(5)
    assert killed == ["safety_judge"]
    assert [event.split("(")[-1] for event in events if "unanswered" in event] == ["1 of 2)"] * 3 + ["2 of 2)"]


def test_probe_defaults_outlast_a_request_and_can_be_turned_off():
    probe = ServeSettings().probe()
    assert probe.deadline_s == ServeSettings().limits.request_timeout_s + server_module.PROBE_DEADLINE_MARGIN_S
    assert probe.model == "safety_judge" and probe.misses == 2 and probe.interval_s == 10.0
    assert ServeSettings(probe_deadline_s=5, probe_interval_s=1).probe() == ProbeSettings(interval_s=1, deadline_s=5)
    assert ServeSettings(probe_interval_s=0).probe() is None


# --- the stage's side ------------------------------------------------------------------------------------------


def probe_request(number: int = 1) -> JudgeRequest:
    return JudgeRequest.single(b"", b"", request_id=f"{PROBE_REQUEST_PREFIX}{number}")


def test_the_stage_answers_probes_before_any_work_without_logging_or_counting_them(tmp_path, caplog):
    stage = make_stage(tmp_path)
    caplog.set_level(logging.INFO, logger="safejudge.requests")
    assert stage.answer([probe_request()]) == [[PROBE_ANSWER]]
    assert stage.metrics.series == set() and caplog.records == []

    # Beside real requests in one batch: each answered as it would be alone, the probe still not counted.
    real = JudgeRequest.single(png(0), b"general", QUICK, request_id="r")
    bad = JudgeRequest.single(b"", b"general", request_id="not-a-probe")
    cancelled = [lambda: False] * 3
    verdict, probe_answer, fault = stage.answer([real, probe_request(2), bad], cancelled)
    assert probe_answer == [PROBE_ANSWER] and len(verdict) == 1 and '"request_id":"r"' in verdict[0]
    assert "image is empty" in fault.message
    assert [record.getMessage().count('"request_id"') for record in caplog.records] == [1, 1]
    assert PROBE_REQUEST_PREFIX not in caplog.text


def test_only_an_empty_image_with_the_probe_id_is_a_probe():
    assert is_probe(probe_request())
    assert not is_probe(JudgeRequest.single(png(0), b"general", request_id=f"{PROBE_REQUEST_PREFIX}1"))
    assert not is_probe(JudgeRequest.single(b"", b"", request_id="client-1"))


def test_a_probe_without_the_servers_token_is_refused_like_any_request(tmp_path):
    from safejudge.pipeline import FaultCode, token_digest

    stage = make_stage(tmp_path, token_sha256=token_digest("s3cret"))
    (refused,) = stage.answer([probe_request()])
    assert refused.code is FaultCode.UNAUTHENTICATED
    with_token = JudgeRequest(probe_request().rows, request_id=f"{PROBE_REQUEST_PREFIX}2", credentials=("Bearer s3cret",))
    assert stage.answer([with_token]) == [[PROBE_ANSWER]]
