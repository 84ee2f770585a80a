"""The gRPC client library and `safejudge judge`, against a real Triton server with an echo model."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from safejudge.cli import app
from safejudge.evaluators import JudgeOptions
from safejudge_client import (
    AsyncJudgeClient,
    DeadlineExceeded,
    InvalidRequest,
    JudgeClient,
    JudgeError,
    ProtocolError,
    ServerUnavailable,
    Verdict,
)
from safejudge_client.client import encode_image
from tests.client_fixtures import REJECT_MESSAGE, SLOW_S, echo_server, echo_url  # noqa: F401 (fixture)

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


def test_judge_many_keeps_the_order_of_the_images(client: JudgeClient) -> None:
    images = [image_bytes((10 + i, 5), "PNG") for i in range(6)]
    verdicts = client.judge_many(images, "echo", concurrency=3)
    assert [v.model_id for v in verdicts] == [received(data, f"PNG:{10 + i}x5") for i, data in enumerate(images)]


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
    assert [line["image"] for line in lines] == [str(p) for p in images]
    verdicts = [Verdict.model_validate(line["verdict"]) for line in lines]
    assert [v.model_id.rsplit(":", 1)[1] for v in verdicts] == ["16x16", "9x4"]
    assert json.loads(verdicts[0].evaluator) == {"evidence": "none"}


def test_cli_judge_errors_exit_2_with_one_line(echo_url: str, tmp_path: Path) -> None:  # noqa: F811
    image = write_png(tmp_path / "a.png")
    cases = {
        "unknown constitution 'reject'": ["judge", str(image), "-c", "reject", "--url", echo_url],
        "missing.png": ["judge", str(tmp_path / "missing.png"), "-c", "echo", "--url", echo_url],
        "--options is not valid JSON": ["judge", str(image), "-c", "echo", "--url", echo_url, "--options", "{"],
        "unavailable": ["judge", str(image), "-c", "echo", "--url", f"127.0.0.1:{unused_port()}"],
    }
    for expected, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (expected, result.output)
        errors = result.stderr.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], result.stderr
