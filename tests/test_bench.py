"""`safejudge bench` on the tiny model, in process: the report, the agreement check, the plots."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from safejudge.bench import Run, VerdictMismatch, check_agreement, scaled_constitution
from safejudge.cli import app
from safejudge.constitution import load_constitution
from safejudge.server import PROJECT_ROOT
from safejudge_client.verdict import Verdict


def test_bench_in_process_reports_ratios_and_writes_results(tmp_path):
    results = tmp_path / "RESULTS.md"
    result = CliRunner().invoke(
        app,
        ["bench", "--no-served", "--images", "2", "--sequential-images", "1", "--rules", "3,6",
         "--sizes", "64", "--constitution-rules", "3", "--results", str(results)],
    )
    assert result.exit_code == 0, result.output
    report = results.read_text()
    assert "| sequential (paper's loop) | 1 |" in report and "| engine in process | 2 |" in report
    # The HF backend's default schedule ("waves") asks only what can still change the verdict, so the engine
    # may run fewer tokens than the minimum for every question of the considered rules; never more.
    tokens = re.search(r"tokens processed per image: engine \*\*([0-9.]+)×\*\* the minimum", report)
    assert tokens and float(tokens.group(1)) <= 1.0
    assert (tmp_path / "throughput_vs_rules.png").stat().st_size > 1000


def test_disagreeing_verdicts_fail_the_benchmark():
    def verdict(safe: bool) -> Verdict:
        return Verdict(safe=safe, constitution="c", constitution_version="1")

    reference, other = Run("reference", verdicts=[verdict(True)]), Run("other", verdicts=[verdict(False)])
    with pytest.raises(VerdictMismatch, match="other disagrees with reference on image 0"):
        check_agreement(reference, other)


def test_scaled_constitutions_never_share_questions():
    base = load_constitution(PROJECT_ROOT / "constitutions" / "os-bench.yaml")
    scaled = scaled_constitution(base, 30)
    assert len(scaled.rules) == 30 and len({rule.id for rule in scaled.rules}) == 30
    copies = [rule for rule in scaled.rules if rule.id.startswith(base.rules[0].id)]
    assert len({rule.preconditions[0][0].text for rule in copies}) == len(copies) == 3


def test_bench_command_rejects_bad_numbers_with_one_line():
    result = CliRunner().invoke(app, ["bench", "--concurrency", "one,two"])
    assert result.exit_code == 2 and "--concurrency must be comma-separated integers" in result.output
