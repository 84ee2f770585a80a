"""Faults and overload on a real served pipeline (tiny models): a killed stage comes back, also while the
supervisor's own connections fail; a hung stage is noticed by the supervisor's probe and comes back; a flood
of requests whose clients give up does not starve a fresh one (nor gets the busy stage restarted by the
probe); one bad request does not fail its batch.

Measured figures are printed (pytest -s) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from safejudge_client import JudgeClient, JudgeError
from safejudge.server import ServeSettings, TritonServer, free_port, stub_processes
from tests.server_fixtures import CONSTITUTIONS, SERVED_SPEC

pytestmark = pytest.mark.integration

RESTORE_LIMIT_S = 30.0
# The module's server probes safety_judge every second with an 8 s deadline (two misses: a hang is taken
# after about 17 s without an answer and without a finished batch).
PROBE_INTERVAL_S = 1.0
PROBE_DEADLINE_S = 8.0
HUNG_RESTORE_LIMIT_S = 60.0
UNREADY_LIMIT_S = 5.0
FRESH_LIMIT_S = 3.0


def png(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def inputs(image: bytes, constitution: str = "os-bench", module=grpcclient) -> list:
    tensors = []
    for name, value in (("IMAGE", image), ("CONSTITUTION", constitution.encode())):
        tensor = module.InferInput(name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[value]], dtype=object))
        tensors.append(tensor)
    return tensors


def judge_once(url: str, timeout_s: float = 30.0) -> tuple[str, str, float]:
    """(status, message, seconds) of one plain request: status "OK" on a verdict."""
    started = time.monotonic()
    try:
        with grpcclient.InferenceServerClient(url) as client:
            client.infer("safety_judge", inputs(png(0)), client_timeout=timeout_s, timeout=int(timeout_s * 1e6))
        return "OK", "", time.monotonic() - started
    except InferenceServerException as exc:
        return (exc.status() or "").removeprefix("StatusCode."), exc.message() or "", time.monotonic() - started


def stub_rss_mb(server: TritonServer) -> dict[str, float]:
    """RSS of the stages' current processes (old instances of an earlier reload may still be going)."""
    sizes = {}
    for pid, model in stub_processes(server.process.pid).items():
        if pid in server.supervisor.retiring:
            continue
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                sizes[f"{model}:{pid}"] = int(line.split()[1]) / 1024
    return sizes


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    settings = ServeSettings(
        models=SERVED_SPEC,
        constitutions=CONSTITUTIONS,
        cache_dir=tmp_path_factory.mktemp("compiled"),
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        max_queue=16,
        ready_timeout=300,
        probe_interval_s=PROBE_INTERVAL_S,
        probe_deadline_s=PROBE_DEADLINE_S,
    )
    with settings.server() as running:
        # The first request compiles os-bench. Short deadlines, retried: a batch waiting for the compile ends
        # at its request's deadline, so the probe sees batches finish and takes the stage for busy, not hung.
        started = time.monotonic()
        while judge_once(running.url, timeout_s=5)[0] != "OK":
            assert time.monotonic() - started < 180, "os-bench did not compile within 180 s"
        assert running.supervisor.recoveries == [], "the probe must not restart a stage that compiles"
        yield running


def wait_for(condition, limit_s: float, step_s: float = 0.1) -> float | None:
    """Seconds until condition() was true, None if it was not within limit_s."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if condition():
            return time.monotonic() - started
        time.sleep(step_s)
    return None


def stage_processes(server: TritonServer, model: str = "safety_judge") -> set[int]:
    """The stage's current processes: not old instances of an earlier reload that Triton is still unloading."""
    processes = stub_processes(server.process.pid)
    return {pid for pid, name in processes.items() if name == model and pid not in server.supervisor.retiring}


@pytest.fixture
def supervisor_events(server):
    """The supervisor's events from now on (they still reach its log too); its settings are put back after."""
    supervisor = server.supervisor
    events: list[str] = []
    original, grace = supervisor.on_event, supervisor.retire_grace_s
    supervisor.on_event = lambda message: (events.append(message), original(message))
    yield events
    supervisor.on_event, supervisor.retire_grace_s, supervisor.http_url = original, grace, server.http_url


def test_a_killed_stage_is_reported_unready_fails_fast_and_comes_back(server):
    model = "safety_judge"
    pid = min(pid for pid, name in stub_processes(server.process.pid).items() if name == model)  # one of its instances
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    unready_after = None
    while time.monotonic() - killed_at < UNREADY_LIMIT_S:
        if not server.is_ready():
            unready_after = time.monotonic() - killed_at
            break
        time.sleep(0.05)
    assert unready_after is not None, f"readiness still true {UNREADY_LIMIT_S} s after the {model} stage died"

    # Inside the restart window a request fails fast with a retryable status, never hangs. While the public
    # stage itself reloads, Triton answers NOT_FOUND "has no available versions" (the client retries it).
    status, message, seconds = judge_once(server.url, timeout_s=10)
    if status != "OK":
        assert seconds < 2.0, f"{status} after {seconds:.1f} s: {message}"
        retryable = status == "UNAVAILABLE" or (status == "NOT_FOUND" and "has no available versions" in message)
        retryable = retryable or (status == "INTERNAL" and "is not healthy" in message)
        assert retryable, f"{status}: {message}"

    restored_after = None
    while time.monotonic() - killed_at < RESTORE_LIMIT_S:
        if judge_once(server.url, timeout_s=10)[0] == "OK":
            restored_after = time.monotonic() - killed_at
            break
        time.sleep(0.2)
    assert restored_after is not None, f"the {model} stage was not restored within {RESTORE_LIMIT_S} s"
    assert server.is_ready()
    recovery = server.supervisor.recoveries[-1]
    assert (recovery.model, recovery.pid) == (model, pid) and recovery.seconds is not None
    print(f"\n{model}: unready after {unready_after:.2f} s, window answer {status} in {seconds:.2f} s, "
          f"verdicts again after {restored_after:.1f} s (supervisor: reloaded in {recovery.seconds:.1f} s)")


FLOOD_IN_FLIGHT = 256
FLOOD_S = 15.0
FLOOD_DEADLINE_S = 1.0


async def flood(url: str) -> dict[str, int]:
    """FLOOD_IN_FLIGHT loops, each re-sending its request as soon as it failed or timed out, for FLOOD_S."""
    outcomes: dict[str, int] = {}
    stop_at = time.monotonic() + FLOOD_S
    async with aiogrpcclient.InferenceServerClient(url) as client:

        async def loop(index: int) -> None:
            image = png(index % 8)
            while time.monotonic() < stop_at:
                try:
                    await client.infer(
                        "safety_judge", inputs(image, module=aiogrpcclient),
                        client_timeout=FLOOD_DEADLINE_S, timeout=int(FLOOD_DEADLINE_S * 1e6),
                    )
                    outcome = "OK"
                except InferenceServerException as exc:
                    outcome = (exc.status() or "error").removeprefix("StatusCode.")
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

        await asyncio.gather(*(loop(index) for index in range(FLOOD_IN_FLIGHT)))
    return outcomes


def test_after_a_flood_of_abandoned_requests_a_fresh_one_is_answered_quickly(server):
    before = stub_rss_mb(server)
    recoveries = len(server.supervisor.recoveries)
    outcomes = asyncio.run(flood(server.url))
    # A fresh client as deployed (JudgeClient, default retries): the queue may still hold the flood's last
    # requests for up to their 1 s deadline, and a full queue answers UNAVAILABLE, which the client retries.
    started = time.monotonic()
    with JudgeClient(server.url, timeout_s=30) as client:
        try:
            client.judge(png(0), "os-bench")
            status, message = "OK", ""
        except JudgeError as exc:
            status, message = exc.status, exc.message
    fresh_s = time.monotonic() - started
    after = stub_rss_mb(server)
    print(f"\nflood: {FLOOD_IN_FLIGHT} in flight for {FLOOD_S:.0f} s with {FLOOD_DEADLINE_S:g} s deadlines: {outcomes}; "
          f"fresh request {status} in {fresh_s:.2f} s; stub RSS MB before {before} after {after}")
    assert sum(outcomes.values()) > FLOOD_IN_FLIGHT, "the flood must have sent requests"
    assert status == "OK", f"{status}: {message}"
    assert fresh_s < FRESH_LIMIT_S, f"a fresh request took {fresh_s:.1f} s after the flood"
    assert set(before) == set(after), "no stage may have died or restarted during the flood"
    # The supervisor probes every second with an 8 s deadline throughout: a busy stage is not taken for hung.
    assert len(server.supervisor.recoveries) == recoveries, server.supervisor.recoveries[recoveries:]
    for stub, size in before.items():
        assert after[stub] < size * 1.5 + 64, f"{stub} grew from {size:.0f} to {after[stub]:.0f} MB"


def test_one_bad_request_in_a_batch_fails_alone(server):
    """Concurrent requests are judged side by side in one execution: one that is not an image gets
    INVALID_ARGUMENT, the rest of the batch its verdicts."""

    def ask(image: bytes) -> str:
        try:
            with grpcclient.InferenceServerClient(server.url) as client:
                client.infer("safety_judge", inputs(image), client_timeout=60)
            return "OK"
        except InferenceServerException as exc:
            return f"{exc.status()}: {exc.message()}"

    def statistics() -> tuple[int, int]:
        with grpcclient.InferenceServerClient(server.url) as client:
            stats = client.get_inference_statistics("safety_judge", as_json=True)["model_stats"][0]
        return int(stats["inference_count"]), int(stats["execution_count"])

    images = [png(seed) for seed in range(5)] + [b"not an image"] + [png(seed) for seed in range(5, 7)]
    for _ in range(5):  # batching is up to the scheduler: retry until one execution held several requests
        requests_before, executions_before = statistics()
        with ThreadPoolExecutor(len(images)) as pool:
            answers = list(pool.map(ask, images))
        requests_after, executions_after = statistics()
        for image, answer in zip(images, answers, strict=True):
            if image == b"not an image":
                assert "INVALID_ARGUMENT" in answer and "cannot identify image file" in answer, answer
            else:
                assert answer == "OK", answer
        if executions_after - executions_before < requests_after - requests_before:
            return
    pytest.fail("safety_judge never judged concurrent requests together")


def test_the_supervisor_outlives_refused_connections_and_restores_the_stage(server, supervisor_events):
    """The supervisor's HTTP address points at a closed port (real refused connections inside it) while a
    stage dies: every failed reload is logged and retried with backoff; once HTTP answers, the stage is back."""
    supervisor = server.supervisor
    model = "safety_judge"
    stage_pids = stage_processes(server, model)
    pid = min(stage_pids)
    recoveries_before = len(supervisor.recoveries)
    supervisor.retire_grace_s = 5.0

    def failed() -> list[str]:
        return [e for e in supervisor_events if "reload attempt" in e and "ConnectionRefusedError" in e]

    supervisor.http_url = f"127.0.0.1:{free_port()}"  # nothing listens there
    try:
        os.kill(pid, signal.SIGKILL)
        # Backoff 1 s, 2 s, 4 s: the third attempt is about 3 s after the first.
        assert wait_for(lambda: len(failed()) >= 3, 20.0) is not None, supervisor_events
        assert supervisor.is_alive()
        assert len(supervisor.recoveries) == recoveries_before, "no recovery while the server cannot be reached"
        assert "retrying in 1 s" in failed()[0] and "retrying in 2 s" in failed()[1], failed()
    finally:
        supervisor.http_url = server.http_url
    # The other instance of safety_judge may still answer: the reload itself is what must happen.
    restored_after = wait_for(lambda: len(supervisor.recoveries) > recoveries_before, RESTORE_LIMIT_S)
    assert restored_after is not None, f"not restored within {RESTORE_LIMIT_S} s of HTTP answering: {supervisor_events}"
    assert judge_once(server.url, timeout_s=30)[0] == "OK"
    recovery = supervisor.recoveries[-1]
    assert (recovery.model, recovery.pid, recovery.cause, recovery.error) == (model, pid, "died", None)
    assert server.is_ready() and supervisor.is_alive()
    # Triton finishes an unload in the background; the supervisor kills an old instance still there after its
    # grace period (shortened here).
    replaced = wait_for(lambda: not stage_pids & set(stub_processes(server.process.pid)), 30.0)
    assert replaced is not None, "every instance of the stage is replaced"
    retired = [e for e in supervisor_events if "old process" in e]
    print(f"\nrefused connections: {len(failed())} failed reloads logged; reloaded {restored_after:.1f} s after "
          f"HTTP answered again ({recovery.seconds:.1f} s after the death was noticed); old instances gone "
          f"{replaced:.1f} s later ({len(retired)} killed by the supervisor after its grace period)")


def test_a_hung_stage_is_noticed_by_the_probe_and_restored(server, supervisor_events):
    """Every safety_judge process stopped (SIGSTOP: alive, never answering): the probe misses twice, the
    supervisor kills the stopped processes and reloads the model."""
    supervisor = server.supervisor
    model = "safety_judge"
    pids = sorted(stage_processes(server, model))
    recoveries_before = len(supervisor.recoveries)
    stopped_at = time.monotonic()
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        # Triton's Python backend answers INTERNAL "Stub process ... is not healthy" after its health check
        # (about 1 s), or the request waits: no verdict either way, and Triton never restarts the stub.
        status, message, seconds = judge_once(server.url, timeout_s=3)
        assert status != "OK", "a stopped stage answered"
        print(f"\nwhile hung: {status} after {seconds:.1f} s: {message}")
        noticed = wait_for(lambda: len(supervisor.recoveries) > recoveries_before
                           or any("stopped answering" in e for e in supervisor_events), HUNG_RESTORE_LIMIT_S)
        assert noticed is not None, f"the hang was not noticed within {HUNG_RESTORE_LIMIT_S} s: {supervisor_events}"
        noticed_after = time.monotonic() - stopped_at
        restored = wait_for(lambda: judge_once(server.url, timeout_s=10)[0] == "OK",
                            HUNG_RESTORE_LIMIT_S - noticed_after, 0.2)
        assert restored is not None, f"no verdict within {HUNG_RESTORE_LIMIT_S} s of the hang: {supervisor_events}"
        restored_after = time.monotonic() - stopped_at
    finally:
        for pid in pids:  # nothing stays stopped, whatever happened
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    recovery = supervisor.recoveries[-1]
    assert (recovery.model, recovery.cause, recovery.error) == (model, "hung", None) and recovery.pid in pids
    assert not set(pids) & set(stub_processes(server.process.pid)), "the stopped processes were replaced"
    misses = [e for e in supervisor_events if "probe unanswered" in e]
    assert len(misses) == 2, supervisor_events
    print(f"\nhung stage: noticed (killed) {noticed_after:.1f} s after SIGSTOP, verdicts again after "
          f"{restored_after:.1f} s (supervisor: reloaded in {recovery.seconds:.1f} s); events: {supervisor_events}")
