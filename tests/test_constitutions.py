"""The shipped constitutions: valid, lint-clean, shaped as designed; and malformed copies fail with file:line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from safejudge.authoring import MAX_PRECONDITION_WORDS, lint
from safejudge.cli import app
from safejudge.constitution import load_constitution

SHIPPED = Path(__file__).resolve().parent.parent / "constitutions"
OS_BENCH = SHIPPED / "os-bench.yaml"
GENERAL = SHIPPED / "general.yaml"
UNSAFEBENCH_CATEGORIES = {
    "hate", "harassment", "violence", "self-harm", "sexual", "shocking", "illegal-activity", "deception",
    "political", "health", "spam",
}

runner = CliRunner()


@pytest.mark.parametrize("path", [OS_BENCH, GENERAL], ids=lambda p: p.name)
def test_shipped_file_passes_check_and_lint(path: Path):
    checked = runner.invoke(app, ["constitution", "check", str(path)])
    assert checked.exit_code == 0, checked.output
    linted = runner.invoke(app, ["constitution", "lint", str(path)])
    assert linted.exit_code == 0, linted.output
    assert lint(load_constitution(path)) == []


@pytest.mark.parametrize("path", [OS_BENCH, GENERAL], ids=lambda p: p.name)
def test_shipped_preconditions_are_short_and_central_objects_single_things(path: Path):
    constitution = load_constitution(path)
    alternatives = [alt for rule in constitution.rules for item in rule.preconditions for alt in item]
    assert all(len(alt.text.split()) <= MAX_PRECONDITION_WORDS for alt in alternatives)
    assert any(alt.central_object for alt in alternatives)
    assert any(len(item) > 1 for rule in constitution.rules for item in rule.preconditions), "no OR item"


def test_os_bench_has_the_papers_fourteen_objectified_rules():
    rules = load_constitution(OS_BENCH).rules
    assert len(rules) == 14
    assert [rule.objectiveness for rule in rules] == [10] + [9] * 13
    assert all(rule.original and rule.original != rule.text for rule in rules)
    # The paper's example chain: "[people visible] OR [animals visible]" AND ...
    first_items = [[alt.text for alt in rule.preconditions[0]] for rule in rules]
    assert ["People are visible", "Animals are visible"] in first_items


def test_general_covers_the_unsafebench_categories():
    rules = load_constitution(GENERAL).rules
    assert 25 <= len(rules) <= 35
    assert {rule.category for rule in rules} == UNSAFEBENCH_CATEGORIES


def _line_of(text: str, needle: str, occurrence: int = 1) -> int:
    lines = [number for number, line in enumerate(text.splitlines(), start=1) if line == needle]
    return lines[occurrence - 1]


def _check(tmp_path: Path, text: str) -> str:
    broken = tmp_path / "broken.yaml"
    broken.write_text(text)
    result = runner.invoke(app, ["constitution", "check", str(broken)])
    assert result.exit_code == 2
    return result.stderr


def test_rule_without_preconditions_is_reported_at_its_line(tmp_path: Path):
    text = OS_BENCH.read_text()
    start = text.index("    preconditions:\n", text.index("id: exposed-genitals"))
    end = text.index("\n\n", start)
    broken = text[:start] + text[end + 1 :]
    line = _line_of(broken, "  - id: exposed-genitals")
    assert f"broken.yaml:{line}: rules[0].preconditions: Field required" in _check(tmp_path, broken)


def test_unknown_key_is_reported_at_its_line(tmp_path: Path):
    broken = OS_BENCH.read_text().replace(
        "    title: Uncovered buttocks\n", "    title: Uncovered buttocks\n    colour: red\n"
    )
    line = _line_of(broken, "    colour: red")
    assert f"broken.yaml:{line}: rules[1].colour: unknown key" in _check(tmp_path, broken)


def test_duplicate_rule_id_is_reported(tmp_path: Path):
    broken = OS_BENCH.read_text().replace("id: uncovered-buttocks", "id: exposed-genitals")
    line = _line_of(broken, "  - id: exposed-genitals", occurrence=2)
    assert f"broken.yaml:{line}: rules[1].id: duplicate rule id 'exposed-genitals'" in _check(tmp_path, broken)
