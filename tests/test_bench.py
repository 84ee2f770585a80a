"""`safejudge bench` on the tiny model, in process: the planned regimes, the checks that fail a run, the
report, the JSON and the plots."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from safejudge import bench
from safejudge.bench import (
    REGIMES,
    DegenerateRegime,
    Run,
    VerdictMismatch,
    check_agreement,
    check_both_verdicts,
    planned_score,
    regime_plans,
    scaled_constitution,
)
from safejudge.cli import app
from safejudge.constitution import Thresholds, load_constitution
from safejudge.decision import quick_decision
from safejudge.evaluators import JudgeOptions
from safejudge.shipped import PROJECT_ROOT
from safejudge_client.verdict import Outcome, Verdict

OS_BENCH = PROJECT_ROOT / "constitutions" / "os-bench.yaml"
SMALL = ["--no-served", "--images", "3", "--sequential-images", "2", "--rules", "3", "--sizes", "64",
         "--constitution-rules", "3"]


def verdict(safe: bool) -> Verdict:
    return Verdict(safe=safe, constitution="c", constitution_version="1")


@pytest.fixture(scope="module")
def small_bench(tmp_path_factory):
    """One bench run in every regime (3 images, 3 rules), shared by the tests below."""
    out = tmp_path_factory.mktemp("bench")
    result = CliRunner().invoke(app, ["bench", *SMALL, "--results", str(out / "RESULTS.md"), "--json", str(out / "b.json")])
    assert result.exit_code == 0, result.output
    return out, {entry["name"]: entry for entry in json.loads((out / "b.json").read_text())["regimes"]}


def test_json_names_every_regime_with_its_figures(small_bench):
    out, regimes = small_bench
    document = json.loads((out / "b.json").read_text())
    assert set(regimes) == {"worst", "best", "mixed"} and document["served_overhead_ms"] is None
    for entry in regimes.values():
        assert {"name", "speedup", "tokens_vs_loop_minimum", "safe", "unsafe", "agreement"} <= set(entry)
        assert entry["speedup"] > 0 and entry["tokens_vs_loop_minimum"] >= 1.0


def test_every_regime_judges_safe_and_unsafe_images_and_the_paths_agree(small_bench):
    _, regimes = small_bench
    for entry in regimes.values():
        assert entry["safe"] >= 1 and entry["unsafe"] >= 1 and entry["safe"] + entry["unsafe"] == 3
        assert entry["agreement"] is True and entry["problems"] == []


def test_planned_outcomes_stop_the_loop_early_in_the_best_case(small_bench):
    _, regimes = small_bench
    assert regimes["best"]["loop_forward_passes"] < regimes["mixed"]["loop_forward_passes"] <= regimes["worst"][
        "loop_forward_passes"]
    # In the worst case the loop asks every question: the engine runs exactly the loop's needed minimum.
    assert regimes["worst"]["tokens_vs_loop_minimum"] == pytest.approx(1.0)
    # The engine's default on this backend (waves) asks only what can still change the verdict.
    assert regimes["best"]["tokens_vs_loop_minimum"] <= 1.15


def test_report_states_regimes_goals_and_plots(small_bench):
    out, _ = small_bench
    report = (out / "RESULTS.md").read_text()
    for name in REGIMES:
        assert f"- `{name}`: " in report and f"| {name} | 2 / 3 |" in report
    assert "| | | | | engine |" in report and "the loop's needed minimum (goal ≤ 1.15×" in report
    assert (out / "throughput_vs_rules.png").stat().st_size > 1000


def test_plans_realise_the_regimes_on_the_shipped_constitution():
    rules = load_constitution(OS_BENCH).enabled_rules
    questions = {name: [len(p.questions) for p in regime_plans(name, rules, 4, seed=3)] for name in REGIMES}
    every = sum(len(item) for rule in rules for item in rule.preconditions)
    first_items = sum(len(rule.preconditions[0]) for rule in rules)
    assert questions["worst"] == [every] * 4 and questions["best"][1::2] == [first_items] * 2  # safe: item 1 fails
    assert sum(questions["best"]) < sum(questions["mixed"]) < sum(questions["worst"])
    for name in REGIMES:
        plans = regime_plans(name, rules, 4, seed=3)
        assert [bool(p.violated) for p in plans] == [True, False, True, False]
        assert [p.holds for p in plans] == [p.holds for p in regime_plans(name, rules, 4, seed=3)]  # seeded


@pytest.mark.parametrize("prior", [1e-4, 0.05, 0.3, 0.58, 0.9, 0.9999])
def test_planned_scores_fail_at_alpha1_and_hold_at_alpha2(prior):
    thresholds = Thresholds()
    assert quick_decision(planned_score(True, prior, thresholds), prior, thresholds).outcome == Outcome.SATISFIED
    assert quick_decision(planned_score(False, prior, thresholds), prior, thresholds).outcome == Outcome.FAILED


def test_a_regime_whose_verdicts_are_all_alike_fails_the_benchmark():
    with pytest.raises(DegenerateRegime, match="all 3 verdicts are safe"):
        check_both_verdicts("regime best, engine", [verdict(True)] * 3)
    check_both_verdicts("regime best, engine", [verdict(True), verdict(False)])


def test_the_bench_exits_non_zero_when_a_regime_judges_every_image_alike(tmp_path, monkeypatch):
    original = bench.make_plan
    monkeypatch.setattr(bench, "make_plan", lambda regime, rules, unsafe, rng: original(regime, rules, False, rng))
    result = CliRunner().invoke(
        app, ["bench", *SMALL, "--images", "2", "--regimes", "best", "--results", str(tmp_path / "R.md"),
              "--json", str(tmp_path / "b.json")],
    )
    assert result.exit_code == 1 and "benchmark invalid (DegenerateRegime)" in result.output
    assert "all 2 verdicts are safe" in result.output and not (tmp_path / "R.md").exists()
    assert json.loads((tmp_path / "b.json").read_text())["regimes"][0]["agreement"] is False


def test_disagreeing_verdicts_fail_the_benchmark():
    reference, other = Run("reference", verdicts=[verdict(True)]), Run("other", verdicts=[verdict(False)])
    with pytest.raises(VerdictMismatch, match="other disagrees with reference on image 0"):
        check_agreement(reference, other)


def test_scaled_constitutions_never_share_questions():
    base = load_constitution(OS_BENCH)
    scaled = scaled_constitution(base, 30)
    assert len(scaled.rules) == 30 and len({rule.id for rule in scaled.rules}) == 30
    copies = [rule for rule in scaled.rules if rule.id.startswith(base.rules[0].id)]
    assert len({rule.preconditions[0][0].text for rule in copies}) == len(copies) == 3


def test_bench_command_rejects_bad_numbers_and_regimes_with_one_line():
    result = CliRunner().invoke(app, ["bench", "--concurrency", "one,two"])
    assert result.exit_code == 2 and "--concurrency must be comma-separated integers" in result.output
    result = CliRunner().invoke(app, ["bench", "--regimes", "fastest"])
    assert result.exit_code == 2 and "regimes must be some of worst, best, mixed" in result.output


def test_planned_mllm_runs_the_real_call_and_replaces_only_image_scores():
    import numpy as np
    from PIL import Image

    from safejudge.bench import ImagePlan, PlanError, PlannedMLLM

    class Backend:
        model_id, fingerprint, calls = "fake", "fake", []

        def score(self, image, questions):
            self.calls.append((image is not None, list(questions)))
            return np.full(len(questions), 0.5)

    backend, thresholds = Backend(), Thresholds()
    planned = PlannedMLLM(backend, {"a": 0.4, "b": 0.4}, thresholds)
    image = Image.new("RGB", (8, 8))
    planned.plan(image, ImagePlan({"a": True, "b": False}, unsafe_target=True))
    scores = planned.score(image, ["a", "b"])
    assert [quick_decision(s, 0.4, thresholds).outcome for s in scores] == [Outcome.SATISFIED, Outcome.FAILED]
    assert list(planned.score(None, ["a"])) == [0.5]  # priors pass through
    assert backend.calls == [(True, ["a", "b"]), (False, ["a"])] and planned.asked[id(image)] == ["a", "b"]
    with pytest.raises(PlanError, match="an image without a plan"):
        planned.score(Image.new("RGB", (8, 8)), ["a"])
    # The engine's default schedule is still the backend's own.
    assert JudgeOptions().schedule_for(planned) == "all"
    Backend.preferred_schedule = "waves"
    assert JudgeOptions().schedule_for(PlannedMLLM(backend, {}, thresholds)) == "waves"
