"""Compiled constitutions on disk, and the hot-reloading store that serves them by name.

A compiled constitution is cached as one .npz file (no pickle): a JSON header (the constitution, the
models' ids and fingerprints, the priors) and the rule embeddings. Its key hashes everything the compiled
values depend on: the constitution's content, the prompt wording and what the models are (their
fingerprints, safejudge.fingerprint), so a changed YAML or a retrained, re-exported or updated model
simply misses the cache.

Compiling scores every precondition statement with the MLLM: minutes for a real model. It happens once
per server, not once per process: processes sharing the cache directory take an exclusive lock on
`<cache file>.lock` around compile-and-save, and a process that waited for the lock loads the file the
other one wrote.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from safejudge import prompts
from safejudge.backends.base import MLLM, Models, RelevanceEncoder
from safejudge.calibration import CALIBRATION_SUFFIX, Calibration
from safejudge.compiled import CompiledConstitution, compile_constitution
from safejudge.constitution import Constitution, ConstitutionError, load_constitution
from safejudge.fingerprint import atomic_write, cache_root

logger = logging.getLogger(__name__)

# Bump when compile_constitution's output or the file's header changes meaning (scoring, embedding
# normalisation, what the key covers), so caches written by an older build are not served. The prompt
# wording is part of the key by itself.
COMPILED_FORMAT_VERSION = 2
# A constitution file that changed is read once it has been unchanged this long (it may be half written).
SETTLE_S = 0.5


def default_cache_dir() -> Path:
    """$SAFEJUDGE_CACHE/compiled, default ~/.cache/safejudge/compiled (beside the tiny models' cache)."""
    return cache_root() / "compiled"


def _identity(model: MLLM | RelevanceEncoder | None) -> list[str]:
    # The id as well as the fingerprint: the id carries what loading adds to the files (e.g. the dtype).
    return ["-", "-"] if model is None else [model.model_id, model.fingerprint]


def cache_key(constitution: Constitution, models: Models) -> str:
    words = [prompts.SYSTEM, prompts.YES_NO]  # the priors are answers to exactly these words
    parts = [
        constitution.content_hash(),
        *_identity(models.mllm),
        *_identity(models.relevance),
        str(COMPILED_FORMAT_VERSION),
        *words,
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def cache_path(cache_dir: str | Path, constitution: Constitution, models: Models) -> Path:
    return Path(cache_dir) / f"{constitution.name}-{cache_key(constitution, models)}.npz"


class _CompiledHeader(BaseModel):
    """The JSON part of a compiled-constitution file."""

    model_config = ConfigDict(extra="forbid")

    format_version: int
    constitution: Constitution
    mllm_id: str
    mllm_fingerprint: str
    relevance_id: str | None
    relevance_fingerprint: str | None
    priors: dict[str, float]


class CompiledFileError(ValueError):
    """A compiled-constitution file that cannot be read back; the message names the file."""


def save_compiled(compiled: CompiledConstitution, path: str | Path) -> Path:
    """Write atomically (temporary file + rename), so concurrent readers never see half a file."""
    path = Path(path)
    header = _CompiledHeader(
        format_version=COMPILED_FORMAT_VERSION,
        constitution=compiled.constitution,
        mllm_id=compiled.mllm_id,
        mllm_fingerprint=compiled.mllm_fingerprint,
        relevance_id=compiled.relevance_id,
        relevance_fingerprint=compiled.relevance_fingerprint,
        priors=compiled.priors,
    )
    arrays = {"header": np.array(header.model_dump_json())}
    if compiled.rule_embeddings is not None:
        arrays["rule_embeddings"] = np.asarray(compiled.rule_embeddings, dtype=np.float32)
    atomic_write(path, lambda handle: np.savez(handle, **arrays), suffix=".npz")
    return path


def load_compiled(path: str | Path) -> CompiledConstitution:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            header = _CompiledHeader.model_validate_json(str(data["header"]))
            embeddings = data["rule_embeddings"] if "rule_embeddings" in data.files else None
    except (OSError, ValueError, KeyError) as exc:  # pydantic's ValidationError is a ValueError
        raise CompiledFileError(f"{path}: not a readable compiled constitution: {exc}") from exc
    if header.format_version != COMPILED_FORMAT_VERSION:
        raise CompiledFileError(f"{path}: format version {header.format_version}, expected {COMPILED_FORMAT_VERSION}")
    rules = len(header.constitution.enabled_rules)
    if embeddings is not None and embeddings.shape[0] != rules:
        raise CompiledFileError(f"{path}: {embeddings.shape[0]} rule embeddings for {rules} enabled rules")
    return CompiledConstitution(
        constitution=header.constitution,
        mllm_id=header.mllm_id,
        mllm_fingerprint=header.mllm_fingerprint,
        priors=header.priors,
        relevance_id=header.relevance_id,
        relevance_fingerprint=header.relevance_fingerprint,
        rule_embeddings=embeddings,
    )


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive flock on lock_file (created if missing); other processes queue here.

    The file is left in place: unlinking it would let a late process lock a fresh file while an earlier one
    still holds the old. The lock goes with the open file, so a process that dies releases it.
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def compile_cached(
    constitution: Constitution, models: Models, cache_dir: str | Path
) -> tuple[CompiledConstitution, bool]:
    """The compiled constitution from the cache, or compiled now and saved; True when it came from the cache.

    Compiling happens under the cache file's lock: of the processes sharing cache_dir that miss at once,
    one compiles and the others load what it saved.
    """
    path = cache_path(cache_dir, constitution, models)
    with suppress(CompiledFileError):  # a bad file is reported and replaced under the lock below
        if path.exists():
            return load_compiled(path), True  # no lock: a read-only cache directory serves too
    with _exclusive(path.with_name(f"{path.name}.lock")):
        if path.exists():
            try:
                return load_compiled(path), True  # saved by another process while this one waited
            except CompiledFileError as exc:
                logger.warning("recompiling: %s", exc)
        compiled = compile_constitution(constitution, models)
        save_compiled(compiled, path)
    return compiled, False


class UnknownConstitution(KeyError):
    """A constitution name the store does not serve; the message lists the ones it does."""

    def __init__(self, name: str, known: list[str], invalid_files: list[str], settling_files: Sequence[str] = ()):
        message = f"unknown constitution {name!r}; known: {', '.join(known) or 'none'}"
        if invalid_files:
            message += f" (invalid files not served: {', '.join(invalid_files)})"
        if settling_files:
            message += f" (files still being written, not read yet: {', '.join(settling_files)})"
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConstitutionCompiling(Exception):
    """The constitution is still being compiled when the caller's timeout ran out. The compile goes on and a
    later get() returns its result: a temporary condition (serve it as "unavailable, retry")."""

    def __init__(self, name: str, waited_s: float):
        super().__init__(f"constitution {name!r} is still compiling ({waited_s:.0f} s so far); retry shortly")
        self.name = name
        self.waited_s = waited_s  # since the compile started, not since this caller asked


_Signature = tuple[int, int, int]  # mtime_ns, size, inode


def _signature(path: Path) -> _Signature | None:
    """The file's signature; None if it is gone (deleted between listing and stat)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


@dataclass
class _Source:
    """One YAML file: the signature of the version read last (None: never read), the last version that
    validated (None: none did), and a newer signature seen but not read yet, with when it was first seen."""

    signature: _Signature | None = None
    constitution: Constitution | None = None
    pending: tuple[_Signature, float] | None = None


@dataclass
class _Compile:
    """One compile of one version of a constitution: running, or done (then it is the memo)."""

    source: Constitution
    started: float = field(default_factory=time.monotonic)
    # A plain Future on a daemon thread, not an executor: executors join their threads at interpreter exit,
    # which would hold a server's shutdown for the rest of a compile that nobody needs any more.
    future: Future = field(default_factory=Future)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class ConstitutionState(BaseModel):
    """What the store knows of one constitution file right now (for `safejudge status` and metrics)."""

    name: str
    version: str = ""
    file: str
    state: Literal["compiled", "compiling", "failed", "not compiled", "invalid"]
    calibrated: bool = False


class ConstitutionStore:
    """Serves the compiled constitutions of every *.yaml / *.yml file in a directory, by name.

    Every call stats the directory's files and re-reads those whose mtime, size or inode changed, so an
    added or edited file is served without a restart. An edit that does not validate is logged and the
    last good version keeps being served.

    Publishing a file: write it elsewhere on the same filesystem and rename it into the directory (atomic:
    a reader sees the old file or the new one). A file written in place is read only once it has been
    unchanged for settle_s (by its mtime, or by this store's clock); until then the last good version is
    served. That covers editors and copies, but not a writer that pauses longer than settle_s mid-file.

    Compiled results come from / go to `cache_dir` (see compile_cached). A compile runs in a background
    thread, once per version of a constitution however many callers want it, and never under the store's
    lock: while one constitution compiles, the others are served. Thread-safe.
    """

    def __init__(
        self, directory: str | Path, models: Models, cache_dir: str | Path | None = None, settle_s: float = SETTLE_S
    ):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"constitution directory not found: {self.directory}")
        self.models = models
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.settle_s = settle_s
        self._lock = threading.Lock()  # guards the bookkeeping below; never held while compiling or waiting
        self._sources: dict[Path, _Source] = {}
        self._settling: dict[Path, float] = {}  # changed files not read yet -> when they may be (monotonic)
        self._served: dict[str, Constitution] = {}
        self._compiles: dict[str, _Compile] = {}  # by name: the latest compile started for it

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._refresh())

    def served_names(self) -> frozenset[str]:
        """The names the last get() or status() found in the directory, without re-reading it."""
        with self._lock:
            return frozenset(self._served)

    def status(self, refresh: bool = True) -> list[ConstitutionState]:
        """Every constitution file and its compile state (calibrated: thresholds from a calibration file).
        refresh=False reports what the last get() saw, without re-reading the directory."""
        states = []
        with self._lock:
            if refresh:
                self._refresh()
            for path, source in sorted(self._sources.items()):
                constitution = source.constitution
                if constitution is None or self._served.get(constitution.name) is not constitution:
                    states.append(ConstitutionState(name=constitution.name if constitution else path.stem,
                                                    file=path.name, state="invalid"))
                    continue
                job, state, calibrated = self._compiles.get(constitution.name), "not compiled", False
                if job is not None and job.source is constitution:
                    if not job.future.done():
                        state = "compiling"
                    elif job.future.exception() is not None:
                        state = "failed"
                    else:
                        state = "compiled"
                        calibrated = job.future.result().constitution.thresholds != constitution.thresholds
                states.append(ConstitutionState(name=constitution.name, version=constitution.version,
                                                file=path.name, state=state, calibrated=calibrated))
        return states

    def get(self, name: str, timeout_s: float | None = None) -> CompiledConstitution:
        """The compiled constitution `name`, compiled in the background on first use and after its file changed.

        Waits at most timeout_s (None: as long as it takes) for its compile, then raises ConstitutionCompiling;
        the compile goes on, and a later get() returns its result. A failed compile raises its error to
        every caller waiting for it, and the next get() compiles again. A name that may be in a file still
        being written is waited for (within timeout_s) before UnknownConstitution is raised.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        job = self._compile_for(name, deadline)
        try:
            return job.future.result(timeout=_remaining(deadline))
        except TimeoutError:
            if not job.future.done():  # else the compile raised a TimeoutError of its own, or just finished
                raise ConstitutionCompiling(name, time.monotonic() - job.started) from None
        return job.future.result()

    def _compile_for(self, name: str, deadline: float | None) -> _Compile:
        """The compile of the served version of `name`, started now unless one is done or running."""
        while True:
            with self._lock:
                served = self._refresh()
                if name in served:
                    return self._compile(name, served[name])
                ready = min(self._settling.values(), default=None)
                if ready is None or (deadline is not None and ready > deadline):
                    raise self._unknown(name)
            time.sleep(max(0.0, ready - time.monotonic()))

    def _compile(self, name: str, constitution: Constitution) -> _Compile:
        job = self._compiles.get(name)
        if job is not None and job.source is constitution:
            return job
        job = self._compiles[name] = _Compile(constitution)
        threading.Thread(target=self._run, args=(name, job), name=f"compile-{name}", daemon=True).start()
        return job

    def _run(self, name: str, job: _Compile) -> None:
        try:
            compiled, cached = compile_cached(self._calibrated(job.source), self.models, self.cache_dir)
        except BaseException as exc:  # whatever it is, every waiter must hear of it rather than wait forever
            logger.error("compiling constitution %r failed (retried on its next request): %s", name, exc)
            with self._lock:
                if self._compiles.get(name) is job:
                    del self._compiles[name]  # before waking the waiters, so that a retry compiles again
            job.future.set_exception(exc)
            return
        how = "loaded from the cache" if cached else "compiled"
        logger.info("constitution %r %s in %.1f s", name, how, time.monotonic() - job.started)
        job.future.set_result(compiled)

    def _unknown(self, name: str) -> UnknownConstitution:
        invalid = sorted(p.name for p, s in self._sources.items() if s.signature and s.constitution is None)
        return UnknownConstitution(name, sorted(self._served), invalid, sorted(p.name for p in self._settling))

    def _calibrated(self, constitution: Constitution) -> Constitution:
        """The constitution with the thresholds of a `<anything>.calibration.json` in the directory that was
        fitted for exactly this constitution (content hash) and this MLLM; unchanged if there is none."""
        for path in sorted(self.directory.glob(f"*{CALIBRATION_SUFFIX}")):
            try:
                calibration = Calibration.load(path)
                if calibration.constitution != constitution.name:
                    continue
                calibration.check(constitution, self.models.mllm.model_id)
            except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
                logger.warning("%s: calibration not applied: %s", path.name, exc)
                continue
            logger.info("%s: calibrated thresholds %s", path.name, calibration.thresholds)
            return calibration.applied_to(constitution)
        return constitution

    def _refresh(self) -> dict[str, Constitution]:
        """Re-read changed files that have settled; the constitutions served now, by name (the first file wins
        a name clash). Changed files that have not settled yet are left in self._settling."""
        paths = sorted(p for p in self.directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        changed = False
        for path in set(self._sources) - set(paths):
            logger.info("constitution file removed: %s", path)
            del self._sources[path]
            changed = True
        self._settling = {}
        for path in paths:
            source = self._sources.setdefault(path, _Source())
            changed |= self._reread(path, source)
        if changed:
            self._served = self._by_name()
            self._compiles = {name: job for name, job in self._compiles.items() if name in self._served}
        return self._served

    def _reread(self, path: Path, source: _Source) -> bool:
        """Read the file again if it changed and has settled; True when it was read."""
        signature = _signature(path)
        if signature is None:
            return False
        if source.signature == signature:
            source.pending = None
            return False
        now = time.monotonic()
        if source.pending is None or source.pending[0] != signature:
            source.pending = (signature, now)
        # Unchanged for settle_s: by the mtime (so a restart reads old files at once) or by our own clock
        # since we first saw this signature (so a file with an mtime in the future is read all the same).
        age = max(time.time() - signature[0] / 1e9, now - source.pending[1])
        if age < self.settle_s:
            self._settling[path] = now + self.settle_s - age
            return False
        try:
            constitution, error = load_constitution(path), None
        except ConstitutionError as exc:
            constitution, error = None, exc
        if _signature(path) != signature:  # written again while it was read: read it once it settles
            self._settling[path] = now + self.settle_s
            return False
        source.signature, source.pending = signature, None
        if error is not None:
            state = "still serving its last good version" if source.constitution else "not served"
            logger.error("invalid constitution file, %s:\n%s", state, error)
            return False
        source.constitution = constitution
        return True

    def _by_name(self) -> dict[str, Constitution]:
        served: dict[str, Constitution] = {}
        for path, source in sorted(self._sources.items()):
            if source.constitution is None:
                continue
            name = source.constitution.name
            if name in served:
                logger.error("%s: constitution name %r is already served from another file; ignored", path, name)
                continue
            served[name] = source.constitution
        return served
