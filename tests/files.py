"""File helpers shared by tests."""

from __future__ import annotations

from pathlib import Path


def rewrite_one_byte(path: Path, offset: int) -> None:
    """Flip one byte in place: same size, same inode; only the content (and the mtime) change."""
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
