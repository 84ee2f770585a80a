"""perf_analyzer (Triton's load generator, 2.51 from the tritonclient wheel) against the served pipeline.

The input-data encoding and the CSV reading are checked here without a server; the integration tests fetch
the program (once, into the cache) and run it against the real session server.
"""

from __future__ import annotations

import base64
import json
import struct

import pytest
import tritonclient.grpc as grpcclient
from pydantic import ValidationError
from tritonclient.utils import deserialize_bytes_tensor

from safejudge.evaluators import JudgeOptions
from safejudge.perf import (
    MODEL,
    PerfAnalyzerError,
    PerfSettings,
    bytes_element,
    input_data,
    install_perf_analyzer,
    read_csv_report,
    run_perf_analyzer,
)

pytest_plugins = ["tests.server_fixtures"]

CSV_HEADER = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
    "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency"
)


def decoded(element: dict[str, str]) -> bytes:
    return base64.b64decode(element["b64"])


@pytest.mark.parametrize("value", [b"", b"os-bench", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40])
def test_bytes_element_is_tritons_serialized_string(value: bytes) -> None:
    raw = decoded(bytes_element(value))
    assert struct.unpack("<I", raw[:4])[0] == len(value)
    assert list(deserialize_bytes_tensor(raw)) == [value]


def test_input_data_has_one_request_per_image_with_every_input() -> None:
    images = [b"first image", b"second", b"third"]
    options = JudgeOptions(relevance_filter=False, max_reasoning_calls=0)
    data = input_data(images, "os-bench", options)
    assert [decoded(entry["IMAGE"])[4:] for entry in data["data"]] == images
    for entry in data["data"]:
        assert decoded(entry["CONSTITUTION"])[4:] == b"os-bench"
        assert JudgeOptions.model_validate_json(decoded(entry["OPTIONS"])[4:]) == options
    json.dumps(data)  # perf_analyzer reads it as JSON


@pytest.mark.parametrize(("text", "maximum"), [("4", 4), ("1:4", 4), ("1:8:2", 8), ("6:2", 6)])
def test_concurrency_range_maximum(text: str, maximum: int) -> None:
    assert PerfSettings(concurrency_range=text).max_concurrency() == maximum


@pytest.mark.parametrize("text", ["1,2,4", "1:", "a:b", ""])
def test_concurrency_range_rejects_other_syntax(text: str) -> None:
    with pytest.raises(ValidationError, match="concurrency_range"):
        PerfSettings(concurrency_range=text)


def test_csv_report_rows_in_perf_analyzer_units(tmp_path) -> None:
    report = tmp_path / "perf.csv"
    report.write_text(f"{CSV_HEADER}\n1,7.5,26,191,2,170,125803,1094,3,134250,153199,155960,172516\n"
                      "2,9.0,30,1607,5,180,217228,1124,3,212938,274863,286073,341442\n")
    rows = read_csv_report(report)
    assert [row.concurrency for row in rows] == [1, 2]
    assert rows[1].infer_per_s == 9.0 and rows[1].p99_us == 341442 and rows[1].server_queue_us == 5
    assert rows[0].server_compute_us == 125803


def test_csv_report_without_rows_is_an_error(tmp_path) -> None:
    report = tmp_path / "perf.csv"
    report.write_text(CSV_HEADER + "\n")
    with pytest.raises(PerfAnalyzerError, match="no measurements"):
        read_csv_report(report)


def successful_requests(url: str) -> int:
    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(MODEL, as_json=True)
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))


@pytest.mark.integration
def test_perf_analyzer_measures_the_served_pipeline(triton_server) -> None:
    tool = install_perf_analyzer()
    settings = PerfSettings(images=2, image_size=64, concurrency_range="1:2", measurement_interval_ms=3000,
                            stability_percentage=100, max_trials=8, timeout_s=180, results=None)
    before = successful_requests(triton_server.url)
    command, rows = run_perf_analyzer(tool, triton_server.url, settings)
    assert [row.concurrency for row in rows] == [1, 2]
    assert all(row.infer_per_s > 0 and 0 < row.p50_us <= row.p99_us for row in rows)
    # perf_analyzer's requests really reached safety_judge, and were answered without error.
    assert successful_requests(triton_server.url) - before >= len(rows)
    assert command[command.index("-m") + 1] == MODEL


@pytest.mark.integration
def test_perf_analyzer_failure_is_reported_with_the_servers_message(triton_server) -> None:
    tool = install_perf_analyzer()
    settings = PerfSettings(constitution="no-such-constitution", images=1, image_size=32, concurrency_range="1",
                            measurement_interval_ms=500, max_trials=3, timeout_s=60, results=None)
    with pytest.raises(PerfAnalyzerError, match="no-such-constitution"):
        run_perf_analyzer(tool, triton_server.url, settings)


def test_cli_rejects_bad_settings_with_one_line():
    from typer.testing import CliRunner

    from safejudge.cli import app

    result = CliRunner().invoke(app, ["perf-analyzer", "--images", "0"])
    assert result.exit_code == 2, result.output
    assert "images" in result.output
