"""The gRPC client library and `safejudge judge`, against a real Triton server with an echo model."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from tritonclient.utils import InferenceServerException
from typer.testing import CliRunner

from safejudge.cli import app
from safejudge.evaluators import JudgeOptions
from safejudge_client import (
    SCHEMA_VERSION,
    AsyncJudgeClient,
    AuthenticationError,
    DecidedBy,
    DeadlineExceeded,
    InvalidRequest,
    JudgeClient,
    JudgeError,
    Outcome,
    ProtocolError,
    ServerUnavailable,
    Verdict,
)
from safejudge_client.client import MAX_BACKOFF_S, encode_image
from safejudge_client.errors import from_triton
from tests.client_fixtures import (  # noqa: F401 (echo_url is a fixture)
    REJECT_MESSAGE,
    SLOW_S,
    echo_server,
    echo_url,
)

pytestmark = pytest.mark.integration


def image_bytes(size: tuple[int, int], image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 90)).save(buffer, format=image_format)
    return buffer.getvalue()


def received(data: bytes, description: str) -> str:
    """The echo model's model_id for an image it received intact."""
    return f"{hashlib.sha256(data).hexdigest()}:{description}"


def unused_port() -> int:
    from safejudge.server import free_port

    return free_port()


@pytest.fixture
def client(echo_url: str):  # noqa: F811
    with JudgeClient(echo_url, timeout_s=10) as judge_client:
        yield judge_client


def test_judge_returns_a_typed_verdict_for_an_image_file(client: JudgeClient, tmp_path: Path) -> None:
    data = image_bytes((40, 30), "PNG")
    path = tmp_path / "scene.png"
    path.write_bytes(data)

    verdict = client.judge(path, "echo")

    assert isinstance(verdict, Verdict)
    assert verdict.safe and verdict.violations == []
    assert verdict.constitution == "echo"
    assert verdict.model_id == received(data, "PNG:40x30")
    assert client.judge(str(path), "echo").model_id == verdict.model_id


def test_bytes_are_sent_unchanged_and_pil_images_as_png(client: JudgeClient) -> None:
    jpeg = image_bytes((17, 9), "JPEG")
    assert client.judge(jpeg, "echo").model_id == received(jpeg, "JPEG:17x9")

    for mode in ("RGB", "RGBA", "L", "CMYK"):
        image = Image.new(mode, (21, 13))
        assert client.judge(image, "echo").model_id == received(encode_image(image), "PNG:21x13"), mode


def test_options_are_sent_as_json_only_when_given(client: JudgeClient) -> None:
    png = image_bytes((8, 8), "PNG")
    assert client.judge(png, "echo").evaluator == "no-options"
    assert json.loads(client.judge(png, "echo", {"evidence": "none", "max_reasoning_calls": 2}).evaluator) == {
        "evidence": "none",
        "max_reasoning_calls": 2,
    }
    # A pydantic model sends only the fields that were set, so the server's defaults stay in charge.
    sent = client.judge(png, "echo", JudgeOptions(strategy2=False)).evaluator
    assert json.loads(sent) == {"strategy2": False}


def test_unsafe_verdict_lists_the_violated_rules(client: JudgeClient) -> None:
    verdict = client.judge(image_bytes((8, 8), "PNG"), "unsafe")
    assert not verdict.safe
    assert verdict.violated_rule_ids == ["r1"]
    assert verdict.decision() == (False, ("r1",))


def test_invalid_argument_raises_invalid_request_with_the_message_and_is_never_retried(echo_url: str) -> None:  # noqa: F811
    with JudgeClient(echo_url, retries=3, backoff_s=5.0) as client:
        started = time.monotonic()
        with pytest.raises(InvalidRequest) as rejected:
            client.judge(image_bytes((8, 8), "PNG"), "reject")
        assert time.monotonic() - started < 4  # a retry would have slept 5 s first
        assert rejected.value.message == REJECT_MESSAGE
        assert rejected.value.status == "INVALID_ARGUMENT"

        with pytest.raises(InvalidRequest, match="IMAGE is not a decodable image"):
            client.judge(b"definitely not an image", "echo")
        # The server keeps serving after bad requests.
        assert client.judge(image_bytes((8, 8), "PNG"), "echo").safe


def test_a_verdict_that_is_not_verdict_json_raises_protocol_error(client: JudgeClient) -> None:
    with pytest.raises(ProtocolError, match="VERDICT is not a valid Verdict"):
        client.judge(image_bytes((8, 8), "PNG"), "garbage")


def test_a_newer_servers_verdict_parses(client: JudgeClient) -> None:
    verdict = client.judge(image_bytes((8, 8), "PNG"), "future")  # unknown fields at every level, enum value "oracle"

    assert verdict.schema_version == 9 and verdict.request_id == "req-7"
    assert (verdict.frame_count, verdict.frames_judged) == (5, [0, 3])
    (violation,) = verdict.violations
    assert violation.frames == [3]
    (evidence,) = violation.evidence
    assert evidence.frame == 3
    assert evidence.outcome is Outcome.SATISFIED  # a known value keeps its enum type
    assert evidence.decided_by == "oracle" and not isinstance(evidence.decided_by, DecidedBy)
    assert verdict.timing.total_ms == 4.0
    dumped = verdict.model_dump(mode="json")
    assert "region" not in dumped and "confidence" not in dumped["violations"][0]
    assert dumped["violations"][0]["evidence"][0]["decided_by"] == "oracle"  # passed on unchanged


def test_a_verdict_without_the_new_fields_gets_their_defaults(client: JudgeClient) -> None:
    verdict = client.judge(image_bytes((8, 8), "PNG"), "unsafe")
    assert verdict.schema_version == SCHEMA_VERSION == 2
    assert (verdict.frame_count, verdict.frames_judged, verdict.request_id) == (1, [0], "")
    assert verdict.violations[0].frames == [0]


def test_the_client_timeout_is_sent_as_the_servers_request_timeout(echo_url: str) -> None:  # noqa: F811
    png = image_bytes((8, 8), "PNG")
    with JudgeClient(echo_url, timeout_s=7.5) as client:
        assert client.judge(png, "deadline").evaluator == "7500000"  # microseconds, as the model sees it
    with JudgeClient(echo_url, timeout_s=None) as client:
        assert client.judge(png, "deadline").evaluator == "0"  # no deadline: no server-side timeout

    async def judge_async() -> str:
        async with AsyncJudgeClient(echo_url, timeout_s=2) as client:
            return (await client.judge(png, "deadline")).evaluator

    assert asyncio.run(judge_async()) == "2000000"


RESTARTING = {  # Triton 2.51's answers while a model or a stage process is being restarted
    "INTERNAL": "Failed to process the request(s) for model 'safety_judge_0_0', message: Stub process "
    "'safety_judge_0_0' is not healthy.",
    "NOT_FOUND": "Request for unknown model: 'safety_judge' has no available versions",
}


@pytest.mark.parametrize("status", sorted(RESTARTING))
def test_a_restarting_model_or_stage_is_retried_until_it_answers(echo_url: str, status: str) -> None:  # noqa: F811
    png = image_bytes((8, 8), "PNG")

    def outage(seconds: float) -> dict:
        return {"status": status, "message": RESTARTING[status], "until": time.time() + seconds}

    with JudgeClient(echo_url, retries=20, backoff_s=0.05) as client:
        started = time.monotonic()
        assert client.judge(png, "recovering", outage(0.6)).safe
        assert time.monotonic() - started >= 0.6
    with JudgeClient(echo_url, retries=0) as client:
        with pytest.raises(ServerUnavailable) as unavailable:
            client.judge(png, "recovering", outage(60))
    assert unavailable.value.status == status
    assert unavailable.value.message == RESTARTING[status]


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        ("UNAVAILABLE", "This protocol is restricted, expecting header 'triton-grpc-protocol-authorization'",
         AuthenticationError),
        ("UNAVAILABLE", "failed to connect to all addresses", ServerUnavailable),
        ("INTERNAL", RESTARTING["INTERNAL"], ServerUnavailable),
        ("INTERNAL", "Failed to process the request(s): division by zero", JudgeError),
        ("NOT_FOUND", RESTARTING["NOT_FOUND"], ServerUnavailable),
        ("NOT_FOUND", "Request for unknown model: 'no_such_model' is not found", JudgeError),
        ("INVALID_ARGUMENT", "is not healthy", InvalidRequest),  # the texts count only with their status
    ],
)
def test_errors_are_classified_by_status_and_message(status: str, message: str, expected: type) -> None:
    error = from_triton(InferenceServerException(message, status=f"StatusCode.{status}"))
    assert type(error) is expected
    assert error.status == status and message in error.message


def test_default_retries_ride_out_a_stage_restart_of_10_s() -> None:
    with JudgeClient(f"127.0.0.1:{unused_port()}") as client:
        delays = [client.retry.delay(attempt) for attempt in range(client.retry.retries)]
    assert delays == [0.2, 0.4, 0.8, 1.6, 3.2, MAX_BACKOFF_S]
    assert sum(delays) > 10


def test_deadline_raises_deadline_exceeded_without_retrying(echo_url: str) -> None:  # noqa: F811
    with JudgeClient(echo_url, timeout_s=0.3, retries=3, backoff_s=1.0) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="0.3 s"):
            client.judge(image_bytes((8, 8), "PNG"), "slow")
        assert time.monotonic() - started < SLOW_S


def test_unknown_model_is_a_judge_error_with_the_server_message(echo_url: str) -> None:  # noqa: F811
    with JudgeClient(echo_url, model_name="no_such_model") as client:
        with pytest.raises(JudgeError, match="no_such_model") as failed:
            client.judge(image_bytes((8, 8), "PNG"), "echo")
        assert failed.value.status == "NOT_FOUND"
        assert not client.is_ready()
        assert client.is_live()


def test_ready_and_live_probes(client: JudgeClient) -> None:
    assert client.is_ready() and client.is_live()
    with JudgeClient(f"127.0.0.1:{unused_port()}", timeout_s=2) as nobody:
        assert not nobody.is_ready() and not nobody.is_live()


def test_wrong_port_raises_server_unavailable_after_every_retry() -> None:
    with JudgeClient(f"127.0.0.1:{unused_port()}", retries=3, backoff_s=0.1) as client:
        started = time.monotonic()
        with pytest.raises(ServerUnavailable) as unavailable:
            client.judge(image_bytes((8, 8), "PNG"), "echo")
        elapsed = time.monotonic() - started
    assert unavailable.value.status == "UNAVAILABLE"
    assert 0.1 + 0.2 + 0.4 <= elapsed < 5  # three backoffs, then it gave up


def test_retries_until_a_starting_server_is_ready(tmp_path: Path) -> None:
    server = echo_server(tmp_path)  # ports are chosen now, the process starts below
    starter = threading.Thread(target=server.start)
    try:
        with JudgeClient(server.url, retries=40, backoff_s=0.1) as client:
            starter.start()
            verdict = client.judge(image_bytes((8, 8), "PNG"), "echo")
        assert verdict.safe
    finally:
        starter.join()
        server.stop()


def test_default_retries_ride_out_a_stage_process_that_dies_and_is_reloaded(tmp_path: Path) -> None:
    png = image_bytes((8, 8), "PNG")
    with echo_server(tmp_path) as server, JudgeClient(server.url) as client:
        assert client.judge(png, "echo").safe
        stubs = subprocess.run(
            ["pgrep", "-P", str(server.process.pid), "-f", "triton_python_backend_stub"],
            capture_output=True, text=True, check=True,
        ).stdout.split()
        assert len(stubs) == 2  # one per model instance
        for pid in stubs:
            os.kill(int(pid), signal.SIGKILL)
        with JudgeClient(server.url, retries=0) as impatient:
            with pytest.raises(ServerUnavailable, match="is not healthy"):
                impatient.judge(png, "echo")
        # The launcher's supervisor reloads the model whose stage died; the default retries wait for it.
        assert client.judge(png, "echo").safe
        assert [r.model for r in server.supervisor.recoveries] == ["safety_judge"]


TOKEN = "s3cret.token-42"


@pytest.fixture(scope="module")
def restricted_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An echo server whose inference calls need `Bearer TOKEN` (health calls need nothing)."""
    restriction = f"--grpc-restricted-protocol=inference:authorization=Bearer {TOKEN}"
    with echo_server(tmp_path_factory.mktemp("restricted-repository"), extra_args=[restriction]) as server:
        yield server.url


def test_a_restricted_server_answers_only_requests_with_the_token(restricted_url: str) -> None:
    png = image_bytes((8, 8), "PNG")
    for token in (None, "wrong-token"):
        with JudgeClient(restricted_url, token=token, retries=3, backoff_s=5.0) as client:
            assert client.is_ready() and client.is_live()  # health probes need no token
            started = time.monotonic()
            with pytest.raises(AuthenticationError) as refused:
                client.judge(png, "echo")
            assert time.monotonic() - started < 4  # a retry would have slept 5 s first
        assert refused.value.message.startswith("the server requires a valid token: ")
        assert "triton-grpc-protocol-authorization" in refused.value.message
    with JudgeClient(restricted_url, token=TOKEN) as client:
        assert client.judge(png, "echo").safe
        assert client.is_ready()
        # Every tritonclient call (infer and probes alike) takes its headers from here.
        headers = dict(client._client._get_metadata(None))
    assert headers == {"authorization": f"Bearer {TOKEN}", "triton-grpc-protocol-authorization": f"Bearer {TOKEN}"}

    async def scenario() -> None:
        async with AsyncJudgeClient(restricted_url, token=TOKEN) as client:
            assert (await client.judge(png, "unsafe")).violated_rule_ids == ["r1"]
        async with AsyncJudgeClient(restricted_url) as client:
            with pytest.raises(AuthenticationError):
                await client.judge(png, "echo")

    asyncio.run(scenario())


def request_counts(url: str) -> tuple[int, int]:
    """(requests answered, images judged) by the server's safety_judge so far (Triton's statistics)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as stats_client:
        (stats,) = stats_client.get_inference_statistics("safety_judge", as_json=True)["model_stats"]
    return int(stats["inference_stats"]["success"].get("count", 0)), int(stats.get("inference_count", 0))


def test_judge_many_sends_several_images_per_request_and_keeps_their_order(client: JudgeClient, echo_url) -> None:  # noqa: F811
    images = [image_bytes((10 + i, 5), "PNG") for i in range(11)]
    before = request_counts(echo_url)
    verdicts = client.judge_many(images, "echo", concurrency=3)  # the model's max_batch_size: 8
    after = request_counts(echo_url)
    assert [v.model_id for v in verdicts] == [received(data, f"PNG:{10 + i}x5") for i, data in enumerate(images)]
    assert (after[0] - before[0], after[1] - before[1]) == (2, 11), "11 images in 2 requests (8 + 3)"
    assert client.max_batch_size() == 8
    assert len(client.judge_many(images[:5], "echo", batch_size=2)) == 5
    assert client.judge_many([], "echo") == []


def test_judge_many_names_the_images_of_a_refused_request(client: JudgeClient) -> None:
    images = [image_bytes((8, 8), "PNG")] * 5
    images[3] = b"not an image"
    with pytest.raises(InvalidRequest) as refused:
        client.judge_many(images, "echo", batch_size=2)
    assert refused.value.message.startswith("images[2:4]: row 1 of 2: IMAGE is not a decodable image"), refused.value


def test_async_judge_many_batches_the_same_way(echo_url: str) -> None:  # noqa: F811
    images = [image_bytes((10 + i, 5), "PNG") for i in range(9)]

    async def scenario() -> tuple[list[Verdict], tuple[int, int]]:
        async with AsyncJudgeClient(echo_url, timeout_s=10) as client:
            assert await client.max_batch_size() == 8
            with pytest.raises(InvalidRequest, match=r"^images\[8\]: IMAGE is not a decodable image"):
                await client.judge_many([*images[:8], b"junk"], "echo")
            before = request_counts(echo_url)
            return await client.judge_many(images, "unsafe", batch_size=4, concurrency=2), before

    verdicts, before = asyncio.run(scenario())
    after = request_counts(echo_url)
    assert [v.model_id.rsplit(":", 1)[1] for v in verdicts] == [f"{10 + i}x5" for i in range(9)]
    assert not any(v.safe for v in verdicts)
    assert after[0] - before[0] == 3, "9 images in requests of 4, 4 and 1"


def test_async_client_has_the_same_behaviour(echo_url: str) -> None:  # noqa: F811
    png = image_bytes((12, 7), "PNG")

    async def scenario() -> None:
        async with AsyncJudgeClient(echo_url, timeout_s=10, retries=2, backoff_s=5.0) as client:
            assert await client.is_ready() and await client.is_live()
            verdict = await client.judge(png, "echo", {"evidence": "none"})
            assert verdict.model_id == received(png, "PNG:12x7")
            assert json.loads(verdict.evaluator) == {"evidence": "none"}
            many = await client.judge_many([png, image_bytes((3, 4), "PNG")], "unsafe", concurrency=2)
            assert [v.model_id.rsplit(":", 1)[1] for v in many] == ["12x7", "3x4"]
            assert not any(v.safe for v in many)
            started = time.monotonic()
            with pytest.raises(InvalidRequest) as rejected:
                await client.judge(png, "reject")
            assert rejected.value.message == REJECT_MESSAGE
            assert time.monotonic() - started < 4  # a retry would have slept 5 s first
            with pytest.raises(ProtocolError):
                await client.judge(png, "garbage")
        async with AsyncJudgeClient(echo_url, timeout_s=0.3) as impatient:
            with pytest.raises(DeadlineExceeded):
                await impatient.judge(png, "slow")
        async with AsyncJudgeClient(f"127.0.0.1:{unused_port()}", retries=2, backoff_s=0.1) as nobody:
            assert not await nobody.is_ready()
            with pytest.raises(ServerUnavailable):
                await nobody.judge(png, "echo")

    asyncio.run(scenario())


def test_bad_arguments_fail_before_any_request(tmp_path: Path) -> None:
    with JudgeClient(f"127.0.0.1:{unused_port()}", retries=0) as client:
        with pytest.raises(FileNotFoundError, match="missing.png"):
            client.judge(tmp_path / "missing.png", "echo")
        with pytest.raises(TypeError, match="int"):
            client.judge(42, "echo")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="constitution"):
            client.judge(b"png", " ")
        with pytest.raises(TypeError, match="options"):
            client.judge(b"png", "echo", ["evidence"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="host:port"):
        JudgeClient("grpc://127.0.0.1:8001")
    with pytest.raises(ValueError, match="retries"):
        JudgeClient(retries=-1)
    with pytest.raises(ValueError, match="timeout_s"):
        AsyncJudgeClient(timeout_s=0)
    for token in ("", "two words", "line\n", "naïve"):
        with pytest.raises(ValueError, match="token"):
            JudgeClient(token=token)
    with pytest.raises(ValueError, match="go together"):
        JudgeClient(private_key="client.key")
    with pytest.raises(FileNotFoundError, match="TLS file not found: ca.pem"):
        JudgeClient(ssl=True, root_certificates="ca.pem")


def test_the_client_package_imports_without_safejudge() -> None:
    code = (
        "import sys; sys.modules['safejudge'] = None\n"  # any `import safejudge...` now raises ImportError
        "import safejudge_client\n"
        "from safejudge_client import JudgeClient, AsyncJudgeClient, Verdict\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] == 'safejudge' and sys.modules[m] is not None]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# `safejudge judge` against the same server

runner = CliRunner()


def write_png(path: Path, size: tuple[int, int] = (16, 16)) -> Path:
    path.write_bytes(image_bytes(size, "PNG"))
    return path


def test_cli_judge_exit_codes_and_table(echo_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.chdir(tmp_path)  # a short path keeps the table's image column unwrapped
    image = write_png(Path("a.png"))

    safe = runner.invoke(app, ["judge", str(image), "-c", "echo", "--url", echo_url])
    assert safe.exit_code == 0, safe.output
    assert "a.png" in safe.stdout and "safe" in safe.stdout

    unsafe = runner.invoke(app, ["judge", str(image), "-c", "unsafe", "--url", echo_url])
    assert unsafe.exit_code == 1, unsafe.output
    assert "UNSAFE" in unsafe.stdout and "r1: scripted" in unsafe.stdout


def test_cli_judge_json_lines(echo_url: str, tmp_path: Path) -> None:  # noqa: F811
    images = [write_png(tmp_path / "a.png", (16, 16)), write_png(tmp_path / "b.png", (9, 4))]
    result = runner.invoke(
        app,
        ["judge", *map(str, images), "-c", "echo", "--url", echo_url, "--json", "--options", '{"evidence": "none"}'],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in images]
    verdicts = [Verdict.model_validate(line["verdict"]) for line in lines]
    assert [v.model_id.rsplit(":", 1)[1] for v in verdicts] == ["16x16", "9x4"]
    assert json.loads(verdicts[0].evaluator) == {"evidence": "none"}


def test_cli_judge_errors_exit_2_with_one_line(echo_url: str, tmp_path: Path) -> None:  # noqa: F811
    image = write_png(tmp_path / "a.png")
    cases = {
        "unknown constitution 'reject'": ["judge", str(image), "-c", "reject", "--url", echo_url],
        "missing.png": ["judge", str(tmp_path / "missing.png"), "-c", "echo", "--url", echo_url],
        "--options is not valid JSON": ["judge", str(image), "-c", "echo", "--url", echo_url, "--options", "{"],
        "unavailable": ["judge", str(image), "-c", "echo", "--url", f"127.0.0.1:{unused_port()}", "--retries", "1"],
    }
    for expected, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (expected, result.output)
        errors = result.stderr.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], result.stderr


def test_cli_judge_token_file(restricted_url: str, tmp_path: Path) -> None:
    image = write_png(tmp_path / "a.png")
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")  # as `echo` writes it
    judge = ["judge", str(image), "-c", "echo", "--url", restricted_url]

    allowed = runner.invoke(app, [*judge, "--token-file", str(token_file)])
    assert allowed.exit_code == 0, allowed.output

    (tmp_path / "blank").write_text(" \n")
    cases = {
        "requires a valid token": judge,
        "cannot read --token-file": [*judge, "--token-file", str(tmp_path / "missing")],
        "is empty": [*judge, "--token-file", str(tmp_path / "blank")],
    }
    for expected, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (expected, result.output)
        errors = result.stderr.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], result.stderr


def test_cli_judge_tls_files_go_to_the_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safejudge_client

    image = str(write_png(tmp_path / "a.png"))
    missing = runner.invoke(app, ["judge", image, "-c", "echo", "--tls-ca", str(tmp_path / "ca.pem")])
    assert missing.exit_code == 2
    assert missing.stderr.splitlines() == [f"error: TLS file not found: {tmp_path / 'ca.pem'}"]

    class Constructed(Exception):
        pass

    def record(url: str, **kwargs: object) -> None:
        raise Constructed(kwargs)

    monkeypatch.setattr(safejudge_client, "AsyncJudgeClient", record)
    cases = {
        (): {"ssl": False},
        ("--tls-ca", "ca.pem", "--retries", "0"): {"ssl": True, "root_certificates": "ca.pem", "retries": 0},
        ("--tls-ca", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "k.pem"): {
            "ssl": True, "root_certificates": "ca.pem", "certificate_chain": "c.pem", "private_key": "k.pem",
        },
    }
    for args, expected in cases.items():
        result = runner.invoke(app, ["judge", image, "-c", "echo", *args])
        assert isinstance(result.exception, Constructed), result.output
        (kwargs,) = result.exception.args
        assert {k: v for k, v in kwargs.items() if k != "timeout_s"} == expected
