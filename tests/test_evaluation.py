"""The toy bench (exact labels, hard negatives), metrics, `safejudge eval` and `safejudge calibrate`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from safejudge.backends.onnx_demo import load_demo_models
from safejudge.cli import app
from safejudge.constitution import load_constitution
from safejudge.evaluation import (
    METHOD_NAMES,
    TOY_CONSTITUTION,
    Calibration,
    Metrics,
    calibrate,
    make_bench,
    rule_violated,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def constitution():
    return load_constitution(TOY_CONSTITUTION)


def test_bench_has_violating_borderline_and_benign_scenes_with_exact_labels(constitution):
    bench = make_bench(constitution, per_rule=4, benign=5, seed=11)
    rules = constitution.enabled_rules
    assert len(bench) == len(rules) * 8 + 5
    for item in bench:
        if item.split == "violating":
            assert item.made_for in item.violated
        elif item.split == "borderline":
            assert not item.violated, "a borderline scene must be safe under every rule"
        else:
            assert not item.violated and item.made_for is None
        assert item.violated == frozenset(r.id for r in rules if rule_violated(r, item.scene))
    armed = [i.scene for i in bench if i.made_for == "armed-person" and i.split == "borderline"]
    # The hard negatives are confusable: mostly the person and a weapon are both there, just not held.
    assert sum("person" in s.concepts and bool({"knife", "pistol"} & s.concepts) for s in armed) >= 2


def test_bench_is_deterministic_by_seed(constitution):
    first = make_bench(constitution, per_rule=2, benign=2, seed=5)
    again = make_bench(constitution, per_rule=2, benign=2, seed=5)
    assert [i.scene.objects for i in first] == [i.scene.objects for i in again]


def test_metrics_match_hand_counts():
    metrics = Metrics.of([True, True, False, False, True], [True, False, True, False, True])
    assert (metrics.precision, metrics.recall, metrics.accuracy) == (2 / 3, 2 / 3, 3 / 5)
    assert metrics.f1 == pytest.approx(2 / 3) and metrics.positives == 3
    assert Metrics.of([False], [False]).f1 == 0.0


def test_eval_prints_every_method_and_writes_json(tmp_path):
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["eval", "--per-rule", "2", "--benign", "2", "--seed", "7", "--json", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("prior-knowledge", "rule-question", "clue-no-debias", "clue-no-strategy2", "clue"):
        assert METHOD_NAMES[name] in result.output
    report = json.loads(out.read_text())
    assert report["images"] == 5 * 4 + 2
    clue = next(m for m in report["methods"] if m["method"] == "clue")
    assert set(clue["per_rule"]) == {"armed-person", "blood-with-person", "flame-near-house", "drug-use", "death-symbol"}
    assert clue["mllm_calls_per_image"] >= 1
    assert "real photos" in result.output


def test_calibrate_fits_thresholds_and_eval_uses_them(tmp_path, constitution):
    models = load_demo_models()
    bench = make_bench(constitution, per_rule=2, benign=2, seed=3)
    grid = {"alpha1_factor": (-0.1, -0.3), "alpha2_factor": (0.6, 0.8)}
    fitted, points = calibrate(constitution, models, bench, "toy seed 3", seed=3, grid=grid)
    assert len(points) == 4 and fitted.thresholds in [p.thresholds for p in points]
    assert fitted.dev_f1 == max(p.f1 for p in points) and fitted.dev_f1 >= fitted.default_f1 - 1e-9
    path = tmp_path / "calibration.json"
    path.write_text(fitted.model_dump_json())
    result = runner.invoke(app, ["eval", "--per-rule", "1", "--benign", "1", "--calibration", str(path)])
    assert result.exit_code == 0, result.output
    assert "calibrated thresholds" in result.output
    with pytest.raises(ValueError, match="calibration is for"):
        Calibration.load(path).check(constitution, "another-model")


def test_calibrate_command_writes_a_calibration_file(tmp_path):
    out = tmp_path / "calibration.json"
    result = runner.invoke(app, ["calibrate", "--out", str(out), "--per-rule", "1", "--benign", "1"])
    assert result.exit_code == 0, result.output
    assert Calibration.load(out).constitution == "toy-world"


def test_unknown_words_in_a_constitution_are_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TOY_CONSTITUTION.read_text().replace("a skull is visible", "a zombie is visible"))
    result = runner.invoke(app, ["demo", "--scenes", "2", "--constitution", str(bad)])
    assert result.exit_code == 2
    assert "zombie" in result.output
