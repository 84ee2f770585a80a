"""Model fingerprints: a digest of what a model *is*, so caches keyed by it (compiled constitutions) miss
when the weights change under an unchanged model id.

A model loaded from the Hugging Face hub cache is its snapshot's commit hash; a model in a local directory
is the sha256 of its files' content. Hashing gigabytes at every start would be slow, so each file's digest
is memoised by (path, size, mtime, ctime, inode) in $SAFEJUDGE_CACHE/file-digests.json: a restart with
unchanged files reads no weights.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict, ValidationError

MEMO_FILE = "file-digests.json"
# What of a Hugging Face model directory decides its outputs: weights, configs, tokenizer and chat template.
HF_MODEL_FILES = ("*.safetensors", "*.bin", "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken")

# A file modified within this long of being hashed could be modified again within the same mtime tick (a few
# ms), unseen by its stat: such a digest is not memoised (git's "racily clean" rule).
RACY_NS = 2_000_000_000

_memo_lock = threading.Lock()  # one writer of the memo per process; other processes may lose an entry, no more


def cache_root() -> Path:
    """$SAFEJUDGE_CACHE, default ~/.cache/safejudge: the root of every cache safejudge keeps on disk."""
    return Path(os.environ.get("SAFEJUDGE_CACHE", "~/.cache/safejudge")).expanduser()


class _Digest(BaseModel):
    """One memoised file digest and the stat it was taken under."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int
    mtime_ns: int
    ctime_ns: int  # an in-place rewrite that restores the mtime (touch -r, cp -p) still moves the ctime
    inode: int
    sha256: str

    def matches(self, stat: os.stat_result) -> bool:
        return (self.size, self.mtime_ns, self.ctime_ns, self.inode) == (
            stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino,
        )


class _Memo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    files: dict[str, _Digest] = {}


def _memo_path() -> Path:
    return cache_root() / MEMO_FILE


def _read_memo(path: Path) -> _Memo:
    """The memo on disk; empty when missing or unreadable (it is only a cache: everything is rehashed)."""
    try:
        return _Memo.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return _Memo()


def atomic_write(path: Path, write: Callable[[IO], object], mode: str = "wb", suffix: str = "") -> None:
    """write(handle) into a temporary file beside `path`, then rename it over `path`: a concurrent reader
    sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=suffix)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_memo(path: Path, memo: _Memo) -> None:
    atomic_write(path, lambda handle: handle.write(memo.model_dump_json()), "w")


def _file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()  # streamed in chunks, never read whole


def _digest(path: Path, memo: _Memo, fresh: dict[str, _Digest]) -> str:
    """The file's sha256: memoised if its stat is unchanged, else hashed and added to `fresh`."""
    key = str(path.resolve())  # hub snapshots are symlinks to blobs: memoise the blob
    before = os.stat(key)
    known = memo.files.get(key)
    if known is not None and known.matches(before):
        return known.sha256
    sha256 = _file_sha256(Path(key))
    after = os.stat(key)
    settled = time.time_ns() - after.st_mtime_ns > RACY_NS
    if settled and (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size):
        fresh[key] = _Digest(
            size=after.st_size, mtime_ns=after.st_mtime_ns, ctime_ns=after.st_ctime_ns, inode=after.st_ino,
            sha256=sha256,
        )
    return sha256


def content_digest(paths: Iterable[Path]) -> str:
    """sha256 over the files' names and contents, in name order: the same files anywhere give the same digest.

    Each file's own digest is memoised (see the module docstring), so only new or changed files are read.
    """
    paths = list(paths)
    if not paths:
        raise ValueError("content_digest needs at least one file")
    memo_path = _memo_path()
    with _memo_lock:
        memo = _read_memo(memo_path)
        fresh: dict[str, _Digest] = {}
        named = sorted((Path(p).name, _digest(Path(p), memo, fresh)) for p in paths)
        if fresh:
            latest = _read_memo(memo_path)  # keep what other processes added meanwhile
            kept = {key: d for key, d in latest.files.items() if key not in fresh and os.path.exists(key)}
            _write_memo(memo_path, _Memo(files={**kept, **fresh}))
    whole = hashlib.sha256()
    for name, sha256 in named:
        whole.update(f"{name}\0{sha256}\n".encode())
    return f"sha256:{whole.hexdigest()}"


def directory_digest(directory: Path, patterns: Sequence[str]) -> str:
    """content_digest of the files directly in `directory` that match any of the glob patterns."""
    files = sorted({path for pattern in patterns for path in Path(directory).glob(pattern) if path.is_file()})
    if not files:
        raise FileNotFoundError(f"{directory}: no model files ({', '.join(patterns)}) to fingerprint")
    return content_digest(files)


def hf_fingerprint(source: str | Path) -> str:
    """What a Hugging Face model loaded from `source` is: a local directory's content digest, or for a hub id
    the commit of the snapshot in the hub cache (where from_pretrained just loaded it from)."""
    if Path(source).is_dir():
        return directory_digest(Path(source), HF_MODEL_FILES)
    from huggingface_hub import snapshot_download

    # local_files_only: resolves refs/main to .../snapshots/<commit> in the cache, no network.
    return f"commit:{Path(snapshot_download(str(source), local_files_only=True)).name}"
