"""Compiled constitutions on disk, and the hot-reloading store that serves them by name.

A compiled constitution is cached as one .npz file (no pickle): a JSON header (the constitution, the
model ids, the priors) and the rule embeddings. Its key hashes everything the compiled values depend
on, so a changed YAML or a different model simply misses the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from safejudge import prompts
from safejudge.backends.base import Models
from safejudge.calibration import CALIBRATION_SUFFIX, Calibration
from safejudge.compiled import CompiledConstitution, compile_constitution
from safejudge.constitution import Constitution, ConstitutionError, load_constitution

logger = logging.getLogger(__name__)

# Bump when compile_constitution's output changes meaning (scoring, embedding normalisation), so caches
# written by an older build are not served. The prompt wording is part of the key by itself.
COMPILED_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """$SAFEJUDGE_CACHE/compiled, default ~/.cache/safejudge/compiled (beside the tiny models' cache)."""
    return Path(os.environ.get("SAFEJUDGE_CACHE", "~/.cache/safejudge")).expanduser() / "compiled"


def cache_key(constitution: Constitution, mllm_id: str, relevance_id: str | None) -> str:
    model_ids = [mllm_id, relevance_id or "-"]
    words = [prompts.SYSTEM, prompts.YES_NO]  # the priors are answers to exactly these words
    parts = [constitution.content_hash(), *model_ids, str(COMPILED_FORMAT_VERSION), *words]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def cache_path(cache_dir: str | Path, constitution: Constitution, models: Models) -> Path:
    relevance_id = models.relevance.model_id if models.relevance else None
    return Path(cache_dir) / f"{constitution.name}-{cache_key(constitution, models.mllm.model_id, relevance_id)}.npz"


class _CompiledHeader(BaseModel):
    """The JSON part of a compiled-constitution file."""

    model_config = ConfigDict(extra="forbid")

    format_version: int
    constitution: Constitution
    mllm_id: str
    relevance_id: str | None
    priors: dict[str, float]


class CompiledFileError(ValueError):
    """A compiled-constitution file that cannot be read back; the message names the file."""


def save_compiled(compiled: CompiledConstitution, path: str | Path) -> Path:
    """Write atomically (temporary file + rename), so concurrent readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = _CompiledHeader(
        format_version=COMPILED_FORMAT_VERSION,
        constitution=compiled.constitution,
        mllm_id=compiled.mllm_id,
        relevance_id=compiled.relevance_id,
        priors=compiled.priors,
    )
    arrays = {"header": np.array(header.model_dump_json())}
    if compiled.rule_embeddings is not None:
        arrays["rule_embeddings"] = np.asarray(compiled.rule_embeddings, dtype=np.float32)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
        priors=header.priors,
        relevance_id=header.relevance_id,
        rule_embeddings=embeddings,
    )


def compile_cached(
    constitution: Constitution, models: Models, cache_dir: str | Path
) -> tuple[CompiledConstitution, bool]:
    """The compiled constitution from the cache, or compiled now and saved; True when it came from the cache."""
    path = cache_path(cache_dir, constitution, models)
    if path.exists():
        try:
            return load_compiled(path), True
        except CompiledFileError as exc:
            logger.warning("recompiling: %s", exc)
    compiled = compile_constitution(constitution, models)
    save_compiled(compiled, path)
    return compiled, False


class ConstitutionCompiling(RuntimeError):
    """placeholder"""


class UnknownConstitution(KeyError):
    """A constitution name the store does not serve; the message lists the ones it does."""

    def __init__(self, name: str, known: list[str], invalid_files: list[str]):
        message = f"unknown constitution {name!r}; known: {', '.join(known) or 'none'}"
        if invalid_files:
            message += f" (invalid files not served: {', '.join(invalid_files)})"
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class _Source:
    """One YAML file: its stat signature and the last version of it that validated (None: never)."""

    signature: tuple[int, int, int]
    constitution: Constitution | None


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:  # deleted between listing and stat
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class ConstitutionStore:
    """Serves the compiled constitutions of every *.yaml / *.yml file in a directory, by name.

    Every call stats the directory's files and re-reads only those whose mtime, size or inode changed,
    so an added or edited file is served without a restart. An edit that does not validate is logged
    and the last good version keeps being served. Compiled results come from / go to `cache_dir`.
    Thread-safe.
    """

    def __init__(self, directory: str | Path, models: Models, cache_dir: str | Path | None = None):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"constitution directory not found: {self.directory}")
        self.models = models
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._lock = threading.Lock()
        self._sources: dict[Path, _Source] = {}
        self._served: dict[str, Constitution] = {}
        self._compiled: dict[str, tuple[Constitution, CompiledConstitution]] = {}  # by name, with its source

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._refresh())

    def get(self, name: str, timeout_s: float | None = None) -> CompiledConstitution:
        with self._lock:
            served = self._refresh()
            if name not in served:
                invalid = sorted(p.name for p, s in self._sources.items() if s.constitution is None)
                raise UnknownConstitution(name, sorted(served), invalid)
            constitution = served[name]
            source, compiled = self._compiled.get(name, (None, None))
            if source is not constitution:  # first use, or the file changed since it was compiled
                compiled, _ = compile_cached(self._calibrated(constitution), self.models, self.cache_dir)
                self._compiled[name] = (constitution, compiled)
            return compiled

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
        """Re-read changed files; the constitutions served now, by name (the first file wins a name clash)."""
        paths = sorted(p for p in self.directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        changed = False
        for path in set(self._sources) - set(paths):
            logger.info("constitution file removed: %s", path)
            del self._sources[path]
            changed = True
        for path in paths:
            signature = _signature(path)
            known = self._sources.get(path)
            if signature is None or (known is not None and known.signature == signature):
                continue
            changed = True
            try:
                self._sources[path] = _Source(signature, load_constitution(path))
            except ConstitutionError as exc:
                last_good = known.constitution if known else None
                state = "still serving its last good version" if last_good else "not served"
                logger.error("invalid constitution file, %s:\n%s", state, exc)
                self._sources[path] = _Source(signature, last_good)
        if changed:
            self._served = self._by_name()
            self._compiled = {name: c for name, c in self._compiled.items() if name in self._served}
        return self._served

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
