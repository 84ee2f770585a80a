"""Model fingerprints: content digests with a memo, and hub snapshot commits."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import huggingface_hub.constants
import pytest

from safejudge import fingerprint
from safejudge.fingerprint import MEMO_FILE, content_digest, directory_digest, hf_fingerprint
from tests.files import rewrite_one_byte


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SAFEJUDGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files whose content gets hashed (memo misses), in order."""
    names: list[str] = []
    real = fingerprint._file_sha256

    def counting(path: Path) -> str:
        names.append(path.name)
        return real(path)

    monkeypatch.setattr(fingerprint, "_file_sha256", counting)
    return names


def model_directory(path: Path, weights: bytes = b"\x00\x01weights" * 1000) -> Path:
    """A model directory whose files were written an hour ago (files written just now are not memoised)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "qwen2_vl"}')
    (path / "model.safetensors").write_bytes(weights)
    (path / "README.md").write_text("notes")
    an_hour_ago = time.time_ns() - 3600 * 10**9
    for file in path.iterdir():
        os.utime(file, ns=(an_hour_ago, an_hour_ago))
    return path


def test_content_digest_follows_content_not_location(tmp_path: Path) -> None:
    first = model_directory(tmp_path / "a")
    copy = Path(shutil.copytree(first, tmp_path / "b"))
    digest = hf_fingerprint(first)
    assert digest.startswith("sha256:") and hf_fingerprint(copy) == digest

    (copy / "README.md").write_text("other notes")  # not a weight, config or tokenizer file
    assert hf_fingerprint(copy) == digest
    rewrite_one_byte(copy / "model.safetensors", 5000)
    assert hf_fingerprint(copy) != digest
    (first / "model.safetensors").rename(first / "other.safetensors")  # file names count too
    assert hf_fingerprint(first) != digest


def test_the_memo_rehashes_only_changed_files(tmp_path: Path, cache: Path, hashed: list[str]) -> None:
    directory = model_directory(tmp_path / "model")
    digest = hf_fingerprint(directory)
    assert sorted(hashed) == ["config.json", "model.safetensors"]
    memo = json.loads((cache / MEMO_FILE).read_text())["files"]
    assert {Path(key).name for key in memo} == {"config.json", "model.safetensors"}

    hashed.clear()
    assert hf_fingerprint(directory) == digest  # as a restart would: nothing read again
    assert hashed == []

    rewrite_one_byte(directory / "model.safetensors", 10)
    changed = hf_fingerprint(directory)
    assert changed != digest and hashed == ["model.safetensors"]
    # Written within the last RACY_NS: another write in the same mtime tick would go unseen, so it is hashed
    # again until it is older.
    assert hf_fingerprint(directory) == changed and hashed == ["model.safetensors"] * 2


def test_an_unreadable_memo_is_rebuilt(tmp_path: Path, cache: Path, hashed: list[str]) -> None:
    directory = model_directory(tmp_path / "model")
    digest = hf_fingerprint(directory)
    (cache / MEMO_FILE).write_text("{ truncated")
    hashed.clear()
    assert hf_fingerprint(directory) == digest and len(hashed) == 2
    hashed.clear()
    assert hf_fingerprint(directory) == digest and hashed == []


def test_memo_entries_of_deleted_files_are_dropped(tmp_path: Path, cache: Path) -> None:
    gone = model_directory(tmp_path / "gone")
    content_digest([gone / "config.json"])
    shutil.rmtree(gone)
    content_digest([model_directory(tmp_path / "kept") / "config.json"])
    memo = json.loads((cache / MEMO_FILE).read_text())["files"]
    assert [Path(key).parent.name for key in memo] == ["kept"]


def test_a_directory_without_model_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("no weights here")
    with pytest.raises(FileNotFoundError, match="no model files"):
        directory_digest(tmp_path, ["*.onnx"])


def test_a_hub_model_is_its_snapshot_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub cache layout: refs/main names the commit whose snapshot from_pretrained loaded."""
    hub = tmp_path / "hub"
    repo = hub / "models--org--tiny-vlm"
    (repo / "refs").mkdir(parents=True)
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))

    assert hf_fingerprint("org/tiny-vlm") == f"commit:{'a' * 40}"
    (repo / "refs" / "main").write_text("b" * 40)  # a new revision was pulled
    assert hf_fingerprint("org/tiny-vlm") == f"commit:{'b' * 40}"
    with pytest.raises(FileNotFoundError):  # not in the cache: never a network call
        hf_fingerprint("org/absent")
