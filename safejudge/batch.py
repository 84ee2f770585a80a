"""`safejudge judge` at scale: expand the inputs, judge them concurrently on a server (or in process), show
progress, write one line per input to a resumable JSON Lines or CSV file, and summarise.

The --out file is the run's state. Each input's line is written whole, with one write, as soon as the input
is done (in completion order). On start, a trailing partial line (the process was killed mid-write) is
dropped, and so are the lines of inputs that failed for a reason that may pass (a timeout, a server fault,
an unreadable file): those inputs are judged again. Inputs with a verdict, or with an error that is the
input's own fault (the image was rejected: INVALID_ARGUMENT), are skipped.

A server that goes away (a restart, a rolling update, a stage reloading) is waited for: every request in
flight is retried with backoff until the server answers again, for up to `max_outage_s` of one outage, and
the run goes on; nothing is written for an input until it has its answer. Failures that are no input's fault
stop the run instead of writing a line: the server stays unavailable longer than that, the token is refused,
or the server rejects the request whatever the image (unknown constitution, bad options); the inputs not
judged yet are judged by the next run.
"""

from __future__ import annotations

import asyncio
import csv
import glob
import io
import json
import math
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from pydantic import BaseModel, Field, ValidationError, model_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from safejudge_client import (
    AuthenticationError,
    DeadlineExceeded,
    InvalidRequest,
    JudgeError,
    ProtocolError,
    ServerUnavailable,
    Verdict,
)

if TYPE_CHECKING:
    from safejudge.backends.registry import ModelSpec

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".mpo", ".apng"})
GLOB_CHARACTERS = frozenset("*?[")
# INVALID_ARGUMENT answers that no image could avoid: the request's constitution or options are wrong
# (messages of store.UnknownConstitution, pipeline.parse_options and pipeline.fault_of's UnsupportedQuestion).
REQUEST_FAULTS = ("unknown constitution", "OPTIONS", "the model ")
INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C
DEFAULT_MAX_OUTAGE_S = 600.0  # a rolling update or a node drain, with a real model's load time, fits
OUTAGE_BACKOFF_S = (1.0, 30.0)  # first and longest wait between retries of a request during an outage


class BatchError(Exception):
    """The run cannot start or go on; the message is one readable line (the CLI exits 2 with it)."""


# Inputs


@dataclass
class Inputs:
    """What the arguments name: the images to judge, and everything met that will not be judged."""

    images: list[Path]
    unreadable_folders: dict[Path, str] = field(default_factory=dict)  # folder -> why it could not be listed
    other_files: Counter = field(default_factory=Counter)  # files in folders with other extensions, by extension
    repeated_folders: list[Path] = field(default_factory=list)  # reached again through a link: not searched twice


def normalise_extensions(extensions: Iterable[str]) -> frozenset[str]:
    """`.JPG`, `jfif`, `heic,heif` -> {".jpg", ".jfif", ".heic", ".heif"}."""
    found = set()
    for value in extensions:
        for extension in value.split(","):
            extension = extension.strip().lower()
            if not extension.strip("."):
                raise BatchError(f"--include takes file extensions such as .jfif, not {value!r}")
            found.add("." + extension.lstrip("."))
    return frozenset(found)


def expand_inputs(arguments: Sequence[str], stdin: TextIO, extensions: frozenset[str] = IMAGE_EXTENSIONS) -> Inputs:
    """The images to judge, absolute, each once, in argument order: a file as given, a folder's files with one
    of `extensions` (recursively, sorted, links to folders followed, each folder searched once), the sorted
    matches of a glob pattern the shell did not expand, and for `-` the paths (or folders, or patterns) on the
    lines of stdin. Folders that cannot be listed and files with other extensions are reported in Inputs."""
    inputs = Inputs([])
    found: dict[Path, None] = {}
    searched: set[tuple[int, int]] = set()
    for argument in arguments:
        names = [line.strip() for line in stdin if line.strip()] if argument == "-" else [argument]
        for name in names:
            found.update(dict.fromkeys(_expand(name, extensions, inputs, searched)))
    if not found and not inputs.unreadable_folders:
        raise BatchError(f"no images to judge in {' '.join(arguments)} (folders are searched for "
                         f"{', '.join(sorted(extensions))}; --include adds extensions)")
    for path in [*found, *inputs.unreadable_folders]:
        if "\n" in str(path) or "\r" in str(path):
            raise BatchError(f"paths with line breaks are not supported: {str(path)!r}")
    inputs.images = list(found)
    return inputs


def _expand(name: str, extensions: frozenset[str], inputs: Inputs, searched: set[tuple[int, int]]) -> list[Path]:
    path = Path(os.path.abspath(name))
    if path.is_dir():
        return _search(path, extensions, inputs, searched)
    if path.is_file():
        return [path]
    if GLOB_CHARACTERS & set(name):
        matches = sorted(glob.glob(name, recursive=True))
        if not matches:
            raise BatchError(f"no file matches {name}")
        return [image for match in matches for image in _expand(match, extensions, inputs, searched)]
    raise BatchError(f"no such file or folder: {path}")


def _search(folder: Path, extensions: frozenset[str], inputs: Inputs, searched: set[tuple[int, int]]) -> list[Path]:
    """The files of `folder` and its sub-folders with one of `extensions`, sorted; links to folders are followed,
    a folder reached twice (a link loop, two links to one folder) is searched once."""
    images = []

    def unreadable(error: OSError) -> None:
        inputs.unreadable_folders[Path(error.filename)] = error.strerror or str(error)

    def first_visit(directory: Path) -> bool:
        try:
            status = directory.stat()
        except OSError as error:  # a broken link or a folder removed meanwhile
            unreadable(error)
            return False
        if (status.st_dev, status.st_ino) in searched:
            inputs.repeated_folders.append(directory)
            return False
        searched.add((status.st_dev, status.st_ino))
        return True

    if not first_visit(folder):
        return []
    for root, folders, files in os.walk(folder, onerror=unreadable, followlinks=True):
        folders[:] = [name for name in sorted(folders) if first_visit(Path(root, name))]
        for file in files:
            suffix = Path(file).suffix.lower()
            if suffix in extensions:
                images.append(Path(root, file))
            else:
                inputs.other_files[suffix] += 1
    return sorted(images)


# Output lines


class ErrorKind(str, Enum):
    INVALID = "invalid"  # the image was rejected (cannot be decoded, over a limit): final, never judged again
    UNREADABLE = "unreadable"  # the file could not be read
    TIMEOUT = "timeout"  # no answer within --timeout
    PROTOCOL = "protocol"  # the answer was not a valid verdict
    INTERNAL = "internal"  # the server (or the in-process judge) failed


class InputError(BaseModel):
    kind: ErrorKind
    message: str


class JudgedInput(BaseModel):
    """One output line: an input's path and its verdict or its error."""

    path: str = Field(description="absolute path of the input")
    safe: bool | None = Field(None, description="None: the input has an error")
    violated_rules: list[str] = Field(default_factory=list)
    error: InputError | None = None
    latency_ms: float | None = Field(None, description="the judge call as the caller saw it, retries included")
    verdict: Verdict | None = Field(None, description="the full verdict with per-rule evidence (JSON Lines only)")

    @classmethod
    def judged(cls, path: Path, verdict: Verdict, latency_ms: float) -> JudgedInput:
        return cls(path=str(path), safe=verdict.safe, violated_rules=verdict.violated_rule_ids,
                   latency_ms=latency_ms, verdict=verdict)

    @model_validator(mode="after")
    def _verdict_or_error(self) -> JudgedInput:
        if (self.safe is None) == (self.error is None):
            raise ValueError("a line has either safe (a verdict) or an error")
        return self

    @property
    def final(self) -> bool:
        """A later run skips this input (else it is judged again)."""
        return self.error is None or self.error.kind is ErrorKind.INVALID


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _JsonLines:
    header = ""

    @staticmethod
    def dump(line: JudgedInput) -> str:
        return line.model_dump_json(exclude_none=True) + "\n"

    @staticmethod
    def load(text: str) -> JudgedInput:
        return JudgedInput.model_validate_json(text)


class _Csv:
    columns = ("path", "safe", "violated_rules", "reasons", "error_kind", "error", "latency_ms")
    header = ",".join(columns) + "\n"

    @classmethod
    def dump(cls, line: JudgedInput) -> str:
        violations = line.verdict.violations if line.verdict else []
        row = [
            line.path,
            "" if line.safe is None else str(line.safe).lower(),
            " ".join(line.violated_rules),
            " | ".join(f"{v.rule_id}: {_one_line(v.reason)}" for v in violations),
            line.error.kind.value if line.error else "",
            _one_line(line.error.message) if line.error else "",
            "" if line.latency_ms is None else f"{line.latency_ms:.1f}",
        ]
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(row)
        return buffer.getvalue()

    @classmethod
    def load(cls, text: str) -> JudgedInput:
        values = dict(zip(cls.columns, next(csv.reader([text])), strict=True))
        return JudgedInput(
            path=values["path"],
            safe=values["safe"] or None,
            violated_rules=values["violated_rules"].split(),
            error=InputError(kind=values["error_kind"], message=values["error"]) if values["error_kind"] else None,
            latency_ms=values["latency_ms"] or None,
        )


class OutputFile:
    """The --out file: JSON Lines, or CSV when its name ends in .csv. One line per input, written whole."""

    def __init__(self, path: Path):
        self.path = path
        self.format = _Csv if path.suffix.lower() == ".csv" else _JsonLines
        self._fd: int | None = None

    def resume(self) -> dict[str, JudgedInput]:
        """The final lines already in the file, by path. A trailing partial line, the lines of inputs to judge
        again and repeated paths are dropped; when there are any, the file is rewritten without them
        (atomically: a kill leaves the old file or the new one)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise BatchError(f"cannot read --out {self.path}: {exc.strerror}") from exc
        complete, newline, partial = data.rpartition(b"\n")
        texts = complete.decode(errors="replace").split("\n") if newline else []
        dropped = bool(partial)
        if self.format.header and texts:
            if texts[0] + "\n" != self.format.header:
                raise BatchError(f"{self.path} is not a `safejudge judge` CSV (its first line is not "
                                 f"{self.format.header.strip()}); use another --out")
            texts = texts[1:]
        kept: dict[str, JudgedInput] = {}
        kept_texts = []  # as they are: a CSV line's reasons are not read back
        for number, text in enumerate(texts, 2 if self.format.header else 1):
            try:
                line = self.format.load(text) if text else None
            except (ValidationError, ValueError, csv.Error) as exc:
                problem = _one_line(str(exc))[:200]
                raise BatchError(f"{self.path}:{number}: not a line `safejudge judge` writes ({problem}); "
                                 "use another --out") from exc
            if line is not None and line.final and line.path not in kept:
                kept[line.path] = line
                kept_texts.append(text)
            else:
                dropped = True
        if dropped:
            self._rewrite(kept_texts)
        return kept

    def _rewrite(self, texts: Iterable[str]) -> None:
        temporary = self.path.with_name(f".{self.path.name}.rewrite")
        try:
            with temporary.open("w", encoding="utf-8", newline="") as file:
                file.write(self.format.header + "".join(f"{text}\n" for text in texts))
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except OSError as exc:
            raise BatchError(f"cannot rewrite --out {self.path}: {exc.strerror}") from exc

    def __enter__(self) -> OutputFile:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise BatchError(f"cannot write --out {self.path}: {exc.strerror}") from exc
        if self.format.header and os.fstat(self._fd).st_size == 0:
            self._write(self.format.header)
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.close(self._fd)

    def append(self, line: JudgedInput) -> None:
        self._write(self.format.dump(line))

    def _write(self, text: str) -> None:
        data = text.encode()
        while data:  # one write; a regular file only writes less when interrupted, then the rest follows
            data = data[os.write(self._fd, data):]


# Judging


@dataclass(frozen=True)
class Judging:
    """Where inputs are judged: a name for messages, the call, and how many calls may run at once."""

    source: str
    judge: Callable[[Path], Awaitable[Verdict]]
    concurrency: int


JudgeFactory = Callable[[], AbstractAsyncContextManager[Judging]]


def on_server(url: str, constitution: str, options: dict | None, concurrency: int, **client_options) -> JudgeFactory:
    """Judging over gRPC with the asyncio client: `client_options` are AsyncJudgeClient's (timeout_s, retries, TLS,
    token); it retries while the server is unavailable, e.g. while a stage restarts."""

    @asynccontextmanager
    async def connect():
        import safejudge_client

        try:
            client = safejudge_client.AsyncJudgeClient(url, **client_options)
        except (ValueError, FileNotFoundError) as exc:
            raise BatchError(str(exc)) from exc
        async with client:
            yield Judging(f"server at {url}", lambda path: client.judge(path, constitution, options), concurrency)

    return connect


def in_process(
    spec: ModelSpec, constitutions: Path, constitution: str, options: dict | None, timeout_s: float
) -> JudgeFactory:
    """Judging in this process, one image at a time, by the server's own safety_judge stage logic (decoding and
    validation, frame sampling, options and limits, the compiled-constitution store, judge_frames) over the
    models of `spec`; its faults become the errors the client would raise for them."""

    @asynccontextmanager
    async def load():
        from tritonclient.utils import InferenceServerException

        from safejudge.backends.base import UnsupportedQuestion
        from safejudge.backends.registry import ModelSpecError
        from safejudge.pipeline import (
            Fault, JudgeRequest, JudgeStage, JudgeStageSettings, RequestLimits, StageFault, parse_options,
        )
        from safejudge.store import UnknownConstitution, default_cache_dir
        from safejudge_client.errors import from_triton

        # In process the user is the operator: every option of the judgement is theirs to choose.
        settings = JudgeStageSettings(models=spec, constitutions=constitutions, cache_dir=default_cache_dir(),
                                      limits=RequestLimits(allow_lenient_options=True))
        raw_options = None if options is None else json.dumps(options).encode()
        try:
            parse_options(raw_options, settings.limits)
            stage = JudgeStage(settings)
            stage.store.get(constitution)  # compile now: an unknown or unreadable constitution stops here
        except UnsupportedQuestion as exc:
            raise BatchError(f"constitution {constitution!r} cannot be judged by {spec.mllm}: {exc}") from exc
        except (StageFault, ModelSpecError, UnknownConstitution, FileNotFoundError) as exc:
            raise BatchError(str(exc)) from exc

        def judge(path: Path) -> Verdict:
            request = JudgeRequest.single(path.read_bytes(), constitution.encode(), raw_options,
                                          timeout_us=round(timeout_s * 1e6))
            (answer,) = stage.answer([request])
            if isinstance(answer, Fault):
                raise from_triton(InferenceServerException(answer.message, status=answer.code.value), timeout_s)
            return Verdict.model_validate_json(answer[0])

        yield Judging("in-process judge", lambda path: asyncio.to_thread(judge, path), concurrency=1)

    return load


class Outage:
    """The server's unavailability as the run's workers see it: since when it has lasted (from the first
    request refused after the last answer), how long each request waits before it is sent again, and when
    the run gives up. Only a server that has answered in this run is waited for: one never reached (a wrong
    --url, a server not started) stops the run after the client's own retries. `report` is told when an
    outage starts, goes on and ends."""

    def __init__(self, source: str, max_outage_s: float, report: Callable[[str], None] = lambda text: None):
        if max_outage_s < 0:
            raise BatchError(f"the outage limit must be >= 0 seconds, got {max_outage_s:g}")
        self.source = source
        self.max_outage_s = max_outage_s
        self.report = report
        self.since: float | None = None
        self.reached = False

    def retry_after(self, error: ServerUnavailable, attempt: int) -> float:
        """Seconds to wait before sending a refused request again (its `attempt`-th retry); BatchError once
        the outage has lasted max_outage_s, or at once while the server has not answered in this run."""
        if not self.reached:
            raise BatchError(f"{self.source} unavailable: {_one_line(error.message)}") from error
        now = time.monotonic()
        if self.since is None:
            self.since = now
        lasted = now - self.since
        if lasted >= self.max_outage_s:
            raise BatchError(f"{self.source} unavailable for {lasted:.0f} s (--max-outage {self.max_outage_s:g}): "
                             f"{_one_line(error.message)}") from error
        delay = min(OUTAGE_BACKOFF_S[0] * 2**attempt, OUTAGE_BACKOFF_S[1], self.max_outage_s - lasted)
        self.report(f"{self.source} unavailable for {lasted:.0f} s, retrying (gives up after "
                    f"{self.max_outage_s:g} s): {_one_line(error.message)[:120]}")
        return delay

    def answered(self) -> None:
        """The server answered a request: an outage, if any, is over."""
        self.reached = True
        if self.since is not None:
            since, self.since = self.since, None
            self.report(f"{self.source} back after {time.monotonic() - since:.0f} s")


def _input_error(exc: JudgeError | OSError, source: str) -> InputError:
    """The error line of an input; BatchError for a failure that is no input's fault (the run stops)."""
    request_fault = isinstance(exc, InvalidRequest) and exc.message.startswith(REQUEST_FAULTS)
    if isinstance(exc, AuthenticationError) or request_fault:
        raise BatchError(f"{source}: {_one_line(exc.message)}") from exc
    kind = (
        ErrorKind.UNREADABLE if isinstance(exc, OSError)
        else ErrorKind.INVALID if isinstance(exc, InvalidRequest)
        else ErrorKind.TIMEOUT if isinstance(exc, DeadlineExceeded)
        else ErrorKind.PROTOCOL if isinstance(exc, ProtocolError)
        else ErrorKind.INTERNAL
    )
    return InputError(kind=kind, message=_one_line(str(exc)))


def _milliseconds_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1e3, 1)


async def _judge_all(
    paths: list[Path], judging: Judging, done: Callable[[JudgedInput], None], outage: Outage
) -> None:
    """Every path judged, `judging.concurrency` at a time; done(line) as each finishes; a request the server
    refuses as unavailable is sent again until it answers (Outage). A BatchError stops all."""
    waiting = iter(paths)

    async def judge(path: Path) -> JudgedInput:
        started = time.perf_counter()
        attempt = 0
        while True:
            try:
                verdict = await judging.judge(path)
            except ServerUnavailable as exc:
                await asyncio.sleep(outage.retry_after(exc, attempt))
                attempt += 1
                continue
            except (JudgeError, OSError) as exc:
                if isinstance(exc, JudgeError):
                    outage.answered()
                error = _input_error(exc, judging.source)
                return JudgedInput(path=str(path), error=error, latency_ms=_milliseconds_since(started))
            outage.answered()
            return JudgedInput.judged(path, verdict, _milliseconds_since(started))

    async def worker() -> None:
        for path in waiting:  # shared by the workers: each takes the next path
            done(await judge(path))

    workers = [asyncio.ensure_future(worker()) for _ in range(min(judging.concurrency, len(paths)))]
    try:
        await asyncio.gather(*workers)
    finally:  # on a BatchError or Ctrl-C: requests in flight are cancelled and get no line
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


# Progress, summary, results


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f} images/s" if task.speed else "", style="progress.data.speed")


def _percentile(ordered: list[float], fraction: float) -> float:
    """Nearest rank."""
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@dataclass
class Summary:
    """What a run found: one line per input done (this run's and those already in --out)."""

    lines: list[JudgedInput]
    inputs: int
    judged_now: int
    elapsed_s: float
    out: Path | None
    interrupted: bool = False
    found: Inputs = field(default_factory=lambda: Inputs([]))  # what the arguments named, judged or not

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return INTERRUPTED
        if any(line.error for line in self.lines):
            return 2
        return 1 if any(line.safe is False for line in self.lines) else 0

    def report(self) -> list[str]:
        errors = Counter(line.error.kind.value for line in self.lines if line.error)
        unsafe = sum(line.safe is False for line in self.lines)
        done = f"{len(self.lines)} of {self.inputs}" if len(self.lines) < self.inputs else f"{self.inputs}"
        count = errors.total()
        report = [f"{done} images: {len(self.lines) - unsafe - count} safe, {unsafe} unsafe, "
                  f"{count} error{'' if count == 1 else 's'}"]
        resumed = f"{len(self.lines) - self.judged_now} already in {self.out}" if self.out else ""
        if self.judged_now:
            rate = self.judged_now / self.elapsed_s
            report.append(f"judged now: {self.judged_now} in {self.elapsed_s:.1f} s ({rate:.1f} images/s)"
                          + (f"; {resumed}" if resumed else ""))
        else:
            report.append("nothing judged now" + (f": {resumed}" if resumed else ""))
        rules = Counter(rule for line in self.lines for rule in line.violated_rules)
        if rules:
            report.append("unsafe by rule: " + ", ".join(f"{rule} {count}" for rule, count in rules.most_common()))
        if errors:
            report.append("errors by kind: " + ", ".join(f"{kind} {count}" for kind, count in errors.most_common()))
        latencies = sorted(line.latency_ms for line in self.lines if line.safe is not None and line.latency_ms)
        if latencies:
            p50, p95 = _percentile(latencies, 0.5), _percentile(latencies, 0.95)
            report.append(f"latency: p50 {p50:.0f} ms, p95 {p95:.0f} ms")
        other_files, repeated = self.found.other_files, self.found.repeated_folders
        if other_files:
            kinds = ", ".join(f"{extension or 'no extension'} {count}" for extension, count in other_files.most_common())
            count = other_files.total()
            report.append(f"not judged: {count} file{'' if count == 1 else 's'} with other extensions in the "
                          f"folders ({kinds}); --include EXT judges them too")
        if repeated:
            report.append(f"searched once: {len(repeated)} folder(s) reached again through links, e.g. {repeated[0]}")
        if self.interrupted:
            report.append("interrupted" + (f": run the same command again to resume {self.out}" if self.out else ""))
        return report


def _print_results(lines: Sequence[JudgedInput], as_json: bool) -> None:
    """The verdicts on stdout: JSON Lines (as --out writes them) or a table, one row per judged image."""
    if as_json:
        for line in lines:
            print(_JsonLines.dump(line), end="")
        return
    table = Table(expand=True)
    table.add_column("image", overflow="fold", ratio=1)
    for name in ("verdict", "MLLM calls", "ms"):
        table.add_column(name, no_wrap=True)
    # One line per violated rule, cut to the table's width: the full reasons and evidence are in --json.
    table.add_column("violated rules: why", no_wrap=True, overflow="ellipsis", ratio=2)
    for line in lines:
        if line.verdict is None:
            continue
        verdict = line.verdict
        violated = "\n".join(f"{v.rule_id}: {v.reason}" for v in verdict.violations) or "-"
        label = "[green]safe[/green]" if verdict.safe else "[bold red]UNSAFE[/bold red]"
        path = os.path.relpath(line.path) if line.path.startswith(os.getcwd() + os.sep) else line.path
        table.add_row(Text(path), label, str(verdict.mllm_calls), f"{verdict.timing.total_ms:.0f}", violated)
    if table.row_count:
        Console().print(table)


def run(
    found: Inputs, judges: JudgeFactory, out: Path | None = None, as_json: bool = False,
    max_outage_s: float = DEFAULT_MAX_OUTAGE_S,
) -> Summary:
    """Judge the images not already in `out` with the judging `judges` opens, and write an error line for each
    folder that could not be listed; progress and the summary on stderr, without --out (or with as_json) the
    results on stdout. An unavailable server is waited for up to max_outage_s per outage. Ctrl-C ends the run
    with `interrupted` set."""
    inputs = [*found.images, *found.unreadable_folders]
    output = OutputFile(out) if out is not None else None
    already = output.resume() if output is not None else {}
    lines = {str(path): already[str(path)] for path in inputs if str(path) in already}
    todo = [path for path in found.images if str(path) not in lines]
    unlisted = [JudgedInput(path=str(folder), error=InputError(kind=ErrorKind.UNREADABLE,
                                                               message=f"cannot list this folder: {reason}"))
                for folder, reason in found.unreadable_folders.items() if str(folder) not in lines]
    now: list[JudgedInput] = []
    console = Console(stderr=True)
    columns = (TextColumn("judging"), BarColumn(), MofNCompleteColumn(), _RateColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[unsafe]} unsafe, {task.fields[errors]} errors"),
               TextColumn("{task.fields[outage]}", style="yellow"))
    tally = Counter(unsafe=sum(line.safe is False for line in lines.values()),
                    errors=sum(line.error is not None for line in lines.values()))
    started = time.perf_counter()

    async def judge_todo() -> None:
        nonlocal started
        async with judges() as judging:
            started = time.perf_counter()  # after loading models or connecting
            with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
                task = progress.add_task("", total=len(inputs), completed=len(lines), outage="", **tally)

                def report(text: str) -> None:
                    """An outage's start and end are one line each; while it lasts, the progress line says so."""
                    ongoing = outage.since is not None
                    if not ongoing or not progress.tasks[task].fields["outage"]:
                        progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
                    progress.update(task, outage=text if ongoing else "")

                outage = Outage(judging.source, max_outage_s, report)

                def done(line: JudgedInput) -> None:
                    if output is not None:
                        output.append(line)
                    lines[line.path] = line
                    now.append(line)
                    if line.error:
                        progress.console.print(f"error: {line.path}: {line.error.message}", markup=False,
                                               highlight=False, soft_wrap=True)
                    tally["unsafe"] += line.safe is False
                    tally["errors"] += line.error is not None
                    progress.update(task, advance=1, **tally)

                for line in unlisted:
                    done(line)
                await _judge_all(todo, judging, done, outage)

    interrupted = False
    try:
        with output if output is not None else nullcontext():
            if todo or unlisted:
                asyncio.run(judge_todo())
    except KeyboardInterrupt:
        interrupted = True
    except BatchError as exc:
        if output is not None and lines:
            raise BatchError(f"{exc}; {len(lines)} of {len(inputs)} inputs are in {out}: run the same command "
                             "again to resume") from exc
        raise
    summary = Summary([lines[str(p)] for p in inputs if str(p) in lines], len(inputs), len(now),
                      time.perf_counter() - started, out, interrupted, found)
    order = {str(path): index for index, path in enumerate(inputs)}
    if out is None or as_json:
        _print_results(sorted(now, key=lambda line: order[line.path]), as_json)
    for text in summary.report():
        console.print(text, markup=False, highlight=False, soft_wrap=True)
    return summary
