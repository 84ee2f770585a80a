"""A user's labelled images for `safejudge eval` and `safejudge calibrate`: a folder of image files and a labels
file with one record per image, as JSON Lines (`.jsonl`) or CSV (`.csv`).

    {"path": "street/0001.jpg", "unsafe": true, "rules": ["knife-held"]}
    {"path": "street/0002.jpg", "unsafe": false, "split": "borderline"}

    path,unsafe,rules,split
    street/0001.jpg,true,knife-held;blood-visible,
    street/0002.jpg,false,,borderline

`path` is relative to the folder; `rules` are the ids of every rule the image violates (CSV: separated by
`;`); `split` is optional: `benign` (the default for a safe image; the report's "benign FP" is measured on
these), `borderline` (a safe hard negative) or `violating` (the default for an unsafe image). Every problem
is a BenchError naming the labels file and line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from safejudge.constitution import Constitution, validation_summary
from safejudge.evaluation import BenchError, BenchItem

CSV_COLUMNS = ("path", "unsafe", "rules", "split")
CSV_RULE_SEPARATOR = ";"


class LabelRecord(BaseModel):
    """One labelled image."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="the image file, relative to the images folder")
    unsafe: bool
    rules: list[str] = Field(default_factory=list, description="every rule the image violates")
    split: Literal["violating", "borderline", "benign"] | None = None

    @field_validator("path")
    @classmethod
    def _relative(cls, path: str) -> str:
        normal = PurePosixPath(path.replace("\\", "/"))
        if normal.is_absolute() or ".." in normal.parts:
            raise ValueError(f"must be relative to the images folder, inside it: {path!r}")
        return str(normal)

    @model_validator(mode="after")
    def _consistent(self) -> LabelRecord:
        if not self.unsafe and self.rules:
            raise ValueError(f"unsafe is false but rules are given ({', '.join(self.rules)})")
        if self.split is not None and (self.split == "violating") != self.unsafe:
            raise ValueError(f"split {self.split!r} contradicts unsafe: {str(self.unsafe).lower()}")
        return self


def _jsonl(path: Path, text: str) -> Iterator[tuple[int, object]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchError(f"{path}:{number}: not valid JSON: {exc.msg}") from None


def _csv(path: Path, text: str) -> Iterator[tuple[int, object]]:
    reader = csv.DictReader(text.splitlines())
    columns = reader.fieldnames or []
    missing = [c for c in ("path", "unsafe") if c not in columns]
    unknown = [c for c in columns if c not in CSV_COLUMNS]
    if missing or unknown:
        problem = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}"
        raise BenchError(f"{path}:1: header must name the columns {', '.join(CSV_COLUMNS)} (split optional): {problem}")
    for row in reader:
        if None in row or None in row.values():
            raise BenchError(f"{path}:{reader.line_num}: {len(columns)} columns expected")
        rules = [rule.strip() for rule in (row.get("rules") or "").split(CSV_RULE_SEPARATOR) if rule.strip()]
        yield reader.line_num, {**row, "rules": rules, "split": row.get("split") or None}


READERS = {".jsonl": _jsonl, ".csv": _csv}


def load_labelled(images: Path, labels: Path, constitution: Constitution) -> list[BenchItem]:
    """The labelled images, validated: each exists, names only rules of the constitution, appears once."""
    reader = READERS.get(labels.suffix.lower())
    if reader is None:
        found = labels.suffix or "no extension"
        raise BenchError(f"{labels}: labels must be JSON Lines (.jsonl) or CSV (.csv), not {found}")
    if not images.is_dir():
        raise BenchError(f"{images}: the images folder does not exist")
    try:
        text = labels.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchError(f"{labels}: cannot read: {exc}") from exc
    known = {rule.id for rule in constitution.rules}
    first_line: dict[str, int] = {}
    items = []
    for number, raw in reader(labels, text):
        where = f"{labels}:{number}"
        try:
            record = LabelRecord.model_validate(raw)
        except ValidationError as exc:
            raise BenchError(f"{where}: {validation_summary(exc, 'record')}") from None
        unknown = [rule for rule in record.rules if rule not in known]
        if unknown:
            raise BenchError(
                f"{where}: rules: {', '.join(map(repr, unknown))} not in constitution {constitution.name} "
                f"(its rules: {', '.join(sorted(known))})"
            )
        if record.path in first_line:
            raise BenchError(f"{where}: duplicate path {record.path!r} (first at line {first_line[record.path]})")
        first_line[record.path] = number
        file = images / record.path
        if not file.is_file():
            raise BenchError(f"{where}: image {record.path!r} not found in {images}")
        split = record.split or ("violating" if record.unsafe else "benign")
        items.append(BenchItem(frozenset(record.rules), record.unsafe, split, path=file, origin=where))
    if not items:
        raise BenchError(f"{labels}: no label records")
    return items


