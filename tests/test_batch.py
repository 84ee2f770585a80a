"""`safejudge judge` at scale (safejudge/batch.py): inputs, output lines, exit codes, and resume after Ctrl-C, kill -9
and a server restart, on a real served pipeline with the demo models (they start in seconds).

Interrupted runs are CLI subprocesses over many copies of a few toy scenes at concurrency 1, so that there is
time to interrupt them mid-run; the other runs go through typer's CliRunner.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from safejudge.backends.registry import coherent_spec
from safejudge import batch
from safejudge.batch import BatchError, Inputs, Judging, expand_inputs, run
from safejudge.cli import app
from safejudge.server import ServeSettings, TritonServer, stub_processes
from safejudge_client import JudgeClient, ServerUnavailable, Verdict
from tests.server_fixtures import CONSTITUTIONS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
COPIES = 80  # images of an interrupted run: a few seconds at concurrency 1
runner = CliRunner()


@pytest.fixture(scope="module")
def constitutions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("constitutions")
    (directory / "toy-world.yaml").write_text((CONSTITUTIONS / "toy-world.yaml").read_text())
    return directory


@pytest.fixture(scope="module")
def server(constitutions: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    settings = ServeSettings(
        models=coherent_spec("demo:toy")[0], constitutions=constitutions, cache_dir=tmp_path_factory.mktemp("compiled"),
        grpc_port=0, http_port=0, metrics_port=0,
    )
    with settings.server() as running:
        yield running


@pytest.fixture(scope="module")
def scenes(server: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Toy scenes as PNG files, split by the server's verdict: {"safe": [...], "unsafe": [...]}."""
    from safejudge.constitution import load_constitution
    from safejudge.evaluation import demo_scenes

    directory = tmp_path_factory.mktemp("scenes")
    split: dict[str, list[Path]] = {"safe": [], "unsafe": []}
    with JudgeClient(server.url, timeout_s=60) as client:
        for index, item in enumerate(demo_scenes(load_constitution(CONSTITUTIONS / "toy-world.yaml"), 8, 0)):
            path = directory / f"scene{index}.png"
            item.scene.image.save(path)
            split["safe" if client.judge(path, "toy-world").safe else "unsafe"].append(path)
    assert split["safe"] and split["unsafe"], split
    return split


@pytest.fixture(scope="module")
def many(scenes: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """COPIES images in nested folders, some unsafe (so a complete run exits 1)."""
    root = tmp_path_factory.mktemp("many")
    sources = scenes["safe"] + scenes["unsafe"]
    paths = []
    for index in range(COPIES):
        path = root / f"part{index % 3}" / f"img{index:03d}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(sources[index % len(sources)].read_bytes())
        paths.append(path)
    return paths


def judge(*args: str, input: str | None = None):
    return runner.invoke(app, ["judge", *args], input=input)


def records(out: Path) -> list[dict]:
    """The out file's lines, checked to be whole; CSV rows as dicts."""
    text = out.read_text()
    assert text.endswith("\n"), "the file ends in a partial line"
    if out.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        assert len(rows) == len(text.splitlines()) - 1, "one physical line per row, after the header"
        return rows
    return [json.loads(line) for line in text.splitlines()]


def assert_one_line_per_input(out: Path, inputs: list[Path]) -> list[dict]:
    lines = records(out)
    paths = [line["path"] for line in lines]
    assert len(paths) == len(set(paths)), "duplicate lines"
    assert sorted(paths) == sorted(map(str, inputs))
    return lines


def start_cli(out: Path, server: TritonServer, folder: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'client'}"}
    command = [sys.executable, "-m", "safejudge.cli", "judge", str(folder), "-c", "toy-world", "--url", server.url,
               "--out", str(out), "--concurrency", "1", *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_lines(out: Path, count: int, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if out.exists() and out.read_bytes().count(b"\n") - (out.suffix == ".csv") >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"fewer than {count} lines in {out} after {timeout_s} s")


# Inputs


def test_inputs_folders_recursive_globs_stdin_in_a_fixed_order_each_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("b/z.png", "b/deep/er/y.JPG", "a.webp", "b/notes.txt", "c/x.tiff", "c/y.gif", "d/q.BMP"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    stdin = io.StringIO("d/q.BMP\n\n  c/x.tiff \nb/notes.txt\n")
    found = expand_inputs(["b", "c/*", "a.webp", "./b/z.png", "-"], stdin).images
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "b/deep/er/y.JPG", "b/z.png",  # the folder: image extensions only, sorted
        "c/x.tiff", "c/y.gif",  # the glob, sorted
        "a.webp",  # ./b/z.png: already there
        "d/q.BMP", "b/notes.txt",  # stdin: c/x.tiff already there; a file named explicitly is judged
    ]
    assert all(p.is_absolute() for p in found)
    for arguments, message in ((["missing.png"], "no such file or folder"), (["c/*.jpg"], "no file matches c/*.jpg")):
        with pytest.raises(BatchError, match=re.escape(message)):
            expand_inputs(arguments, io.StringIO())


def unlistable(monkeypatch, *folders: Path) -> None:
    """Listing these folders fails as it would without permission (tests run as root, who may read anything)."""
    scandir = os.scandir

    def refusing(path=".", *args):
        if Path(path) in folders:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path, *args)

    monkeypatch.setattr(os, "scandir", refusing)


def test_every_file_in_a_folder_is_judged_or_reported(tmp_path: Path, monkeypatch) -> None:
    for name in ("a/1.png", "a/2.jfif", "a/3.heic", "a/README", "a/locked/4.png", "real/5.png", "real/deeper/6.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a" / "link").symlink_to(tmp_path / "real")  # followed
    (tmp_path / "real" / "deeper" / "loop").symlink_to(tmp_path / "real")  # searched once
    unlistable(monkeypatch, tmp_path / "a" / "locked")
    found = expand_inputs([str(tmp_path / "a")], io.StringIO())
    assert [p.relative_to(tmp_path).as_posix() for p in found.images] == [
        "a/1.png", "a/link/5.png", "a/link/deeper/6.png"]
    assert found.unreadable_folders == {tmp_path / "a" / "locked": "Permission denied"}
    assert found.other_files == {".jfif": 1, ".heic": 1, "": 1}
    assert found.repeated_folders == [tmp_path / "a" / "link" / "deeper" / "loop"]
    more = expand_inputs([str(tmp_path / "a")], io.StringIO(), batch.IMAGE_EXTENSIONS | batch.normalise_extensions(
        ["JFIF,.heic"]))
    assert {p.name for p in more.images} == {"1.png", "2.jfif", "3.heic", "5.png", "6.png"}
    assert more.other_files == {"": 1}
    with pytest.raises(BatchError, match="--include takes file extensions"):
        batch.normalise_extensions([".,"])


def test_a_run_reports_what_it_did_not_judge(server: TritonServer, scenes, tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "images"
    (folder / "locked").mkdir(parents=True)
    (folder / "scene.png").write_bytes(scenes["safe"][0].read_bytes())
    (folder / "copy.jfif").write_bytes(b"a JPEG by another name")
    (folder / "notes").write_text("no extension")
    unlistable(monkeypatch, folder / "locked")
    out = tmp_path / "out.jsonl"
    result = judge(str(folder), "-c", "toy-world", "--url", server.url, "--out", str(out))
    assert result.exit_code == 2, result.output  # an input (the folder) has an error
    lines = {line["path"]: line for line in records(out)}
    assert lines[str(folder / "scene.png")]["safe"] is True
    assert lines[str(folder / "locked")]["error"] == {"kind": "unreadable",
                                                      "message": "cannot list this folder: Permission denied"}
    assert "not judged: 2 files with other extensions in the folders (.jfif 1, no extension 1)" in result.stderr
    included = judge(str(folder), "-c", "toy-world", "--url", server.url, "--include", "jfif", "--json")
    assert '"kind":"invalid"' in included.stdout and "copy.jfif" in included.stdout, included.output


def test_missing_inputs_and_misplaced_flags_are_bad_arguments(tmp_path: Path) -> None:
    cases = {
        "no such file or folder": [str(tmp_path / "missing.png"), "-c", "toy-world"],
        "no images to judge": [str(tmp_path), "-c", "toy-world"],
        "--url: only without --local": [str(tmp_path), "-c", "toy-world", "--local", "--url", "h:1"],
        "--mllm: only with --local": [str(tmp_path), "-c", "toy-world", "--mllm", "demo:toy"],
    }
    for expected, args in cases.items():
        result = judge(*args)
        assert result.exit_code == 2, (expected, result.output)
        assert result.stderr.splitlines() == [result.stderr.strip()] and expected in result.stderr, result.stderr


def flaky_judges(calls: list[Path], answers: int, outage_s: float, concurrency: int = 1):
    """Judging on a fake server that answers `answers` requests, is then unavailable for outage_s seconds
    (forever: inf), then answers again."""
    down: list[float] = []

    @asynccontextmanager
    async def connect():
        async def judge(path: Path) -> Verdict:
            calls.append(path)
            if len(calls) > answers and (not down or time.monotonic() - down[0] < outage_s):
                down[:] = down or [time.monotonic()]
                raise ServerUnavailable("connection refused", "UNAVAILABLE")
            return Verdict(safe=True, constitution="c", constitution_version="1")

        yield Judging("server at test", judge, concurrency=concurrency)

    return connect


def test_a_server_that_stays_unavailable_stops_the_run_and_the_next_run_goes_on(tmp_path: Path) -> None:
    images = [tmp_path / f"{index}.png" for index in range(5)]
    for image in images:
        image.write_bytes(b"x")
    calls: list[Path] = []
    out = tmp_path / "out.jsonl"
    stopped = r"server at test unavailable for \d s \(--max-outage 0.5\): connection refused; 2 of 5 inputs are in"
    with pytest.raises(BatchError, match=stopped):
        run(Inputs(images), flaky_judges(calls, 2, float("inf")), out, max_outage_s=0.5)
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == list(map(str, images[:2]))
    calls.clear()
    assert run(Inputs(images), flaky_judges(calls, 5, 0), out).exit_code == 0
    assert calls == images[2:]
    assert_one_line_per_input(out, images)


def test_a_server_never_reached_stops_the_run_at_once(tmp_path: Path) -> None:
    """A wrong --url is not an outage to wait for: only a server that answered in this run is waited for."""
    images = [tmp_path / f"{index}.png" for index in range(3)]
    for image in images:
        image.write_bytes(b"x")
    started = time.monotonic()
    with pytest.raises(BatchError, match="^server at test unavailable: connection refused$"):
        run(Inputs(images), flaky_judges([], 0, float("inf")), tmp_path / "out.jsonl")
    assert time.monotonic() - started < 5


def test_an_outage_is_waited_for_and_the_run_goes_on_without_losing_or_repeating_inputs(tmp_path: Path, capsys) -> None:
    images = [tmp_path / f"{index}.png" for index in range(12)]
    for image in images:
        image.write_bytes(b"x")
    calls: list[Path] = []
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    summary = run(Inputs(images), flaky_judges(calls, 4, 2.5, concurrency=3), out, max_outage_s=60)
    assert summary.exit_code == 0 and summary.judged_now == 12
    assert 2.5 <= time.monotonic() - started < 15
    assert_one_line_per_input(out, images)
    retried = [path for path in images if calls.count(path) > 1]
    assert retried, "requests refused during the outage were sent again"
    stderr = capsys.readouterr().err
    assert "server at test unavailable for 0 s, retrying (gives up after 60 s): connection refused" in stderr
    assert re.search(r"server at test back after [2-9] s", stderr), stderr


# Lines and exit codes


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_lines_and_exit_codes(server: TritonServer, scenes, tmp_path: Path, suffix: str) -> None:
    safe, unsafe = scenes["safe"][:2], scenes["unsafe"][:2]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    base = ["-c", "toy-world", "--url", server.url]

    out = tmp_path / f"safe{suffix}"
    assert judge(*map(str, safe), *base, "--out", str(out)).exit_code == 0
    assert_one_line_per_input(out, safe)

    out = tmp_path / f"mixed{suffix}"
    result = judge(*map(str, safe + unsafe), *base, "--out", str(out))
    assert result.exit_code == 1, result.output
    lines = {Path(line["path"]): line for line in assert_one_line_per_input(out, safe + unsafe)}
    assert "4 images: 2 safe, 2 unsafe, 0 errors" in result.stderr and "unsafe by rule: " in result.stderr
    assert "latency: p50 " in result.stderr
    for path in unsafe:
        line = lines[path]
        if suffix == ".csv":
            assert line["safe"] == "false" and line["violated_rules"] and line["reasons"]
            assert float(line["latency_ms"]) > 0
        else:  # the full verdict, with per-rule evidence
            assert line["safe"] is False
            assert line["violated_rules"] == [v["rule_id"] for v in line["verdict"]["violations"]]
            assert all(v["evidence"] for v in line["verdict"]["violations"])

    out = tmp_path / f"errors{suffix}"
    result = judge(str(bad), *map(str, safe), *base, "--out", str(out))
    assert result.exit_code == 2, result.output
    assert f"error: {bad}: " in result.stderr and "errors by kind: invalid 1" in result.stderr
    (line,) = [line for line in assert_one_line_per_input(out, [bad, *safe]) if line["path"] == str(bad)]
    kind = line["error_kind"] if suffix == ".csv" else line["error"]["kind"]
    message = line["error"] if suffix == ".csv" else line["error"]["message"]
    assert kind == "invalid" and "cannot identify image file" in message
    if suffix == ".csv":
        assert line["safe"] == "" and line["violated_rules"] == ""
    else:
        assert "safe" not in line and "verdict" not in line


def test_an_invalid_image_is_final_and_a_transient_error_is_judged_again(server, scenes, tmp_path: Path) -> None:
    bad, image = tmp_path / "bad.png", scenes["safe"][0]
    bad.write_bytes(b"not an image")
    out = tmp_path / "out.jsonl"
    base = [str(bad), str(image), "-c", "toy-world", "--url", server.url, "--out", str(out)]
    assert judge(*base).exit_code == 2
    invalid = next(line for line in out.read_text().splitlines() if str(bad) in line)
    # As if the image's request had timed out in that run: a transient error, so the next run judges it again.
    timed_out = {"path": str(image), "error": {"kind": "timeout", "message": "no answer in 1 s"}, "latency_ms": 1000}
    out.write_text(f"{invalid}\n{json.dumps(timed_out)}\n")

    result = judge(*base)
    assert result.exit_code == 2, result.output  # the invalid image still errs
    first, second = out.read_text().splitlines()
    assert first == invalid, "the invalid image is not judged again"
    assert json.loads(second)["path"] == str(image) and json.loads(second)["safe"] is True
    assert "judged now: 1 " in result.stderr and "1 already in" in result.stderr


def test_stdin_and_json_on_stdout_in_input_order(server: TritonServer, scenes) -> None:
    images = scenes["unsafe"][:1] + scenes["safe"][:2]
    result = judge("-", "-c", "toy-world", "--url", server.url, "--json", input="".join(f"{p}\n" for p in images))
    assert result.exit_code == 1, result.output
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == list(map(str, images))


def test_a_request_fault_stops_the_run_without_lines(server: TritonServer, scenes, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    result = judge(*map(str, scenes["safe"]), "-c", "no-such", "--url", server.url, "--out", str(out))
    assert result.exit_code == 2
    expected = f"error: server at {server.url}: unknown constitution 'no-such'; known: toy-world"
    assert result.stderr.splitlines() == [expected]
    assert out.read_text() == "path,safe,violated_rules,reasons,error_kind,error,latency_ms\n"


def test_in_process_judges_like_the_server(server, scenes, constitutions: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SAFEJUDGE_CACHE", str(tmp_path / "cache"))
    images = scenes["safe"] + scenes["unsafe"]
    served, local = tmp_path / "served.jsonl", tmp_path / "local.jsonl"
    assert judge(*map(str, images), "-c", "toy-world", "--url", server.url, "--out", str(served)).exit_code == 1
    local_flags = ["--local", "--constitutions", str(constitutions)]
    result = judge(*map(str, images), "-c", "toy-world", *local_flags, "--out", str(local))
    assert result.exit_code == 1, result.output

    def decisions(out: Path) -> dict:
        return {line["path"]: (line["safe"], line["violated_rules"]) for line in records(out)}

    assert decisions(local) == decisions(served)
    unknown = judge(*map(str, images), "-c", "nope", *local_flags)
    assert unknown.exit_code == 2 and "unknown constitution 'nope'" in unknown.stderr, unknown.output
    # In process the user is the operator: options a server refuses without --allow-lenient-options are theirs.
    lenient = ["--options", '{"fail_closed": false, "thresholds": {"beta": 0.9}}']
    assert judge(*map(str, images), "-c", "toy-world", *local_flags, *lenient).exit_code == 1
    refused = judge(*map(str, images), "-c", "toy-world", "--url", server.url, *lenient)
    assert refused.exit_code == 2 and "--allow-lenient-options" in refused.stderr, refused.output


# Resume after interruptions


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_resume_after_ctrl_c(server: TritonServer, many: list[Path], tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"out{suffix}"
    process = start_cli(out, server, many[0].parents[1])
    wait_for_lines(out, 5, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "interrupted: run the same command again to resume" in stderr
    before = out.read_text().splitlines()
    assert 5 <= len(records(out)) < COPIES

    result = judge(str(many[0].parents[1]), "-c", "toy-world", "--url", server.url, "--out", str(out))
    assert result.exit_code == 1, result.output
    assert_one_line_per_input(out, many)
    assert out.read_text().splitlines()[: len(before)] == before, "lines of the first run are kept, not judged again"


def test_resume_after_kill_9_drops_a_partial_line(server: TritonServer, many: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    process = start_cli(out, server, many[0].parents[1])
    wait_for_lines(out, 5, process)
    process.kill()
    process.communicate(timeout=30)
    before = out.read_text().splitlines()
    assert 5 <= len(before) - 1 < COPIES
    with out.open("a") as file:  # as if the kill had cut a write short
        file.write(f"{many[-1]},true,,,")

    result = judge(str(many[0].parents[1]), "-c", "toy-world", "--url", server.url, "--out", str(out))
    assert result.exit_code == 1, result.output
    assert_one_line_per_input(out, many)
    assert out.read_text().splitlines()[: len(before)] == before


def test_a_server_stage_restart_mid_run_is_ridden_out(server: TritonServer, many: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    recoveries = len(server.supervisor.recoveries)
    process = start_cli(out, server, many[0].parents[1])
    wait_for_lines(out, 5, process)
    (stub,) = [pid for pid, model in stub_processes(server.process.pid).items() if model == "safety_judge"]
    os.kill(stub, signal.SIGKILL)
    at_kill = len(records(out))
    stdout, stderr = process.communicate(timeout=90)
    assert process.returncode == 1, stderr  # some unsafe, no errors
    assert len(server.supervisor.recoveries) == recoveries + 1 and server.supervisor.recoveries[-1].seconds
    lines = assert_one_line_per_input(out, many)
    assert at_kill < COPIES and not any("error" in line for line in lines)


def test_a_run_outlives_a_server_restart(constitutions: Path, many: list[Path], tmp_path: Path) -> None:
    """The issue's reproduction: the server stopped and started again 3 s later on the same port ended the run
    at once (exit 2, '84 of 1201 inputs are in out.jsonl'). Now the run waits, goes on, and ends complete.
    --retries 0: the client's own retries (about 11 s) would hide a restart this short from the run."""
    settings = ServeSettings(
        models=coherent_spec("demo:toy")[0], constitutions=constitutions, cache_dir=tmp_path / "compiled",
        grpc_port=0, http_port=0, metrics_port=0,
    )
    first = settings.server().start()
    out = tmp_path / "out.jsonl"
    process = start_cli(out, first, many[0].parents[1], "--retries", "0")
    try:
        wait_for_lines(out, 5, process)
        first.stop()
        at_stop = len(records(out))
        time.sleep(3)
        same_ports = settings.model_copy(
            update={"grpc_port": first.grpc_port, "http_port": first.http_port, "metrics_port": first.metrics_port})
        with same_ports.server():
            stdout, stderr = process.communicate(timeout=120)
    finally:
        first.stop()
        process.kill()
    assert process.returncode == 1, stderr  # some unsafe, no errors: the run went on to the end
    assert at_stop < COPIES, "the server stopped mid-run"
    lines = assert_one_line_per_input(out, many)
    assert not any("error" in line for line in lines)
    assert re.search(r"server at \S+ unavailable for \d+ s, retrying", stderr), stderr
    assert re.search(r"server at \S+ back after \d+ s", stderr), stderr
