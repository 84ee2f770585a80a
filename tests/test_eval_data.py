"""`safejudge eval` and `safejudge calibrate` on a user's folder of labelled images: generated toy scenes saved
as files with labels written from their ground truth give exactly the numbers of the generated-bench path;
label files are validated line by line; the served CLUE row; a real model class end to end."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from safejudge.backends.onnx_demo import load_demo_models
from safejudge.backends.registry import ModelSpec
from safejudge.calibration import Calibration
from safejudge.cli import DEMO_SPEC, app
from safejudge.constitution import load_constitution
from safejudge.evaluation import TOY_CONSTITUTION, BenchItem, Prediction, calibrate, make_bench
from safejudge.labels import load_labelled
from safejudge.server import ServeSettings, TritonServer

runner = CliRunner()
PER_RULE, BENIGN, SEED = 1, 2, 4  # 5 rules: 12 scenes
TOY_FLAGS = ["--per-rule", str(PER_RULE), "--benign", str(BENIGN), "--seed", str(SEED)]


@pytest.fixture(scope="module")
def constitution():
    return load_constitution(TOY_CONSTITUTION)


@pytest.fixture(scope="module")
def bench(constitution):
    return make_bench(constitution, per_rule=PER_RULE, benign=BENIGN, seed=SEED)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, bench) -> Path:
    """The bench's scenes as PNG files in sub-folders, and its ground truth as labels.jsonl (bench order)
    and labels.csv (shuffled)."""
    directory = tmp_path_factory.mktemp("labelled")
    records = []
    for index, item in enumerate(bench):
        path = Path(item.split) / f"scene-{index:02d}.png"
        (directory / path.parent).mkdir(exist_ok=True)
        item.scene.image.save(directory / path)
        records.append(
            {"path": path.as_posix(), "unsafe": item.unsafe, "rules": sorted(item.violated), "split": item.split}
        )
    (directory / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    shuffled = random.Random(0).sample(records, len(records))
    with (directory / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "unsafe", "rules", "split"])
        writer.writeheader()
        writer.writerows({**r, "unsafe": str(r["unsafe"]).lower(), "rules": ";".join(r["rules"])} for r in shuffled)
    return directory


def eval_json(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / f"report-{len(list(tmp_path.iterdir()))}.json"
    result = runner.invoke(app, ["eval", *args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.output


def numbers(report: dict) -> list[dict]:
    """Every measured number of every method except the time it took."""
    return [{k: v for k, v in m.items() if k != "ms_per_image"} for m in report["methods"]]


@pytest.fixture(scope="module")
def toy_report(tmp_path_factory) -> dict:
    return eval_json(tmp_path_factory.mktemp("toy"), *TOY_FLAGS)[0]


@pytest.mark.parametrize("labels", ["labels.jsonl", "labels.csv"])
def test_a_folder_of_toy_scenes_measures_exactly_what_the_generated_bench_does(tmp_path, folder, toy_report, labels):
    report, output = eval_json(tmp_path, "--images", str(folder), "--labels", str(folder / labels))
    assert numbers(report) == numbers(toy_report)
    assert (report["images"], report["unsafe_images"]) == (toy_report["images"], toy_report["unsafe_images"])
    assert report["bench"] == f"{folder / labels} (images in {folder})" != toy_report["bench"]
    assert [m["method"] for m in report["methods"]] == [
        "prior-knowledge", "whole-constitution", "rule-question", "clue-no-debias", "clue-no-strategy2", "clue",
    ]
    for description in ("whole constitution in one question", "CLUE (full)", "F1 per rule"):
        assert description in output
    assert "real photos" in output  # the demo models judged these files: they are told they are toys


def test_the_json_report_has_the_documented_shape(toy_report, constitution):
    clue = next(m for m in toy_report["methods"] if m["method"] == "clue")
    assert {"method", "precision", "recall", "f1", "per_rule"} <= set(clue)
    assert set(clue["per_rule"]) == {rule.id for rule in constitution.enabled_rules}
    assert {"precision", "recall", "f1"} <= set(clue["per_rule"]["armed-person"])
    assert next(m for m in toy_report["methods"] if m["method"] == "prior-knowledge")["per_rule"] == {}
    assert 0 < clue["f1"] <= 1 and clue["mllm_calls_per_image"] >= 1


def test_safe_images_default_to_benign_and_benign_fp_is_none_without_them(tmp_path, folder, constitution):
    lines = [json.loads(line) for line in (folder / "labels.jsonl").read_text().splitlines()]
    unsplit = [{k: v for k, v in r.items() if k != "split"} for r in lines]
    labels = tmp_path / "unsplit.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in unsplit))
    items = load_labelled(folder, labels, constitution)
    assert [i.split for i in items] == ["violating" if r["unsafe"] else "benign" for r in lines]
    only_unsafe = tmp_path / "unsafe.jsonl"
    only_unsafe.write_text("".join(json.dumps(r) + "\n" for r in lines if r["unsafe"]))
    report, output = eval_json(tmp_path, "--images", str(folder), "--labels", str(only_unsafe))
    assert all(m["benign_false_positive_rate"] is None for m in report["methods"])


BAD_LABELS = [
    # (file name, content, line of the error, what the message says)
    ("l.jsonl", '{"path": "violating/scene-00.png", "unsafe": true, "rules": ["armed-person"]}\n'
                '{"path": "missing.png", "unsafe": false}\n', 2, "image 'missing.png' not found"),
    ("l.jsonl", '\n{"path": "violating/scene-00.png", "unsafe": true, "rules": ["zombie"]}\n', 2,
     "rules: 'zombie' not in constitution toy-world"),
    ("l.jsonl", '{"path": "benign/scene-10.png", "unsafe": false, "rules": ["death-symbol"]}\n', 1,
     "unsafe is false but rules are given (death-symbol)"),
    ("l.jsonl", '{"path": "benign/scene-10.png", "unsafe": false}\n'
                '{"path": "./benign/scene-10.png", "unsafe": false}\n', 2,
     "duplicate path 'benign/scene-10.png' (first at line 1)"),
    ("l.jsonl", '{"path": "benign/scene-10.png", "unsafe": false\n', 1, "not valid JSON"),
    ("l.jsonl", '{"path": "benign/scene-10.png", "unsafe": "maybe"}\n', 1, "unsafe: Input should be a valid boolean"),
    ("l.jsonl", '{"path": "benign/scene-10.png", "unsafe": false, "colour": "red"}\n', 1, "colour: Extra inputs"),
    ("l.jsonl", '{"path": "../labels.jsonl", "unsafe": false}\n', 1, "must be relative to the images folder"),
    ("l.jsonl", '{"path": "benign/scene-10.png", "unsafe": false, "split": "violating"}\n', 1,
     "split 'violating' contradicts unsafe: false"),
    ("l.csv", "path,unsafe,rules\nviolating/scene-00.png,true,armed-person\nbenign/scene-10.png,false,death-symbol\n",
     3, "unsafe is false but rules are given"),
    ("l.csv", "path,unsafe,rules\nviolating/scene-00.png,true,armed-person;zombie\n", 2,
     "'zombie' not in constitution"),
    ("l.csv", "path,unsafe,rules\nbenign/scene-10.png,false,,extra\n", 2, "3 columns expected"),
    ("l.csv", "path,safe\nbenign/scene-10.png,false\n", 1, "header must name the columns"),
    ("l.csv", "path,unsafe\nbenign/scene-10.png,false\nbenign/scene-10.png,false\n", 3, "duplicate path"),
]


@pytest.mark.parametrize(("name", "content", "line", "message"), BAD_LABELS)
def test_label_problems_are_one_error_naming_file_and_line(tmp_path, folder, name, content, line, message):
    labels = tmp_path / name
    labels.write_text(content)
    for command in (["eval"], ["calibrate", "--out", str(tmp_path / "cal.json")]):
        result = runner.invoke(app, [*command, "--images", str(folder), "--labels", str(labels)])
        assert result.exit_code == 2, result.output
        assert f"error: {labels}:{line}: " in result.output and message in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "cal.json").exists()


def test_files_that_cannot_be_used_are_errors_naming_the_file(tmp_path, folder):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"path": "ok.png", "unsafe": false}\n{"path": "broken.png", "unsafe": false}\n')
    (tmp_path / "ok.png").write_bytes((folder / "benign" / "scene-10.png").read_bytes())
    cases = [
        (["--images", str(tmp_path), "--labels", str(labels)],
         f"{labels}:2: {tmp_path / 'broken.png'}: cannot identify"),
        (["--images", str(tmp_path), "--labels", str(tmp_path / "labels.txt")], "must be JSON Lines (.jsonl) or CSV"),
        (["--images", str(tmp_path / "nowhere"), "--labels", str(labels)], "the images folder does not exist"),
        (["--images", str(tmp_path)], "--images and --labels go together"),
        (["--images", str(tmp_path), "--labels", str(labels), "--url", "127.0.0.1:1", "--calibration", str(labels)],
         "--calibration needs the models in this process"),
        (["--images", str(tmp_path), "--labels", str(labels), "--mllm", "demo:toy", "--detector", "tiny:owlv2"],
         "cannot be combined"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["eval", *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    (tmp_path / "empty.csv").write_text("path,unsafe,rules\n")
    result = runner.invoke(app, ["eval", "--images", str(tmp_path), "--labels", str(tmp_path / "empty.csv")])
    assert result.exit_code == 2 and "no label records" in result.output


def test_calibrate_on_a_folder_writes_the_fit_of_the_generated_bench(tmp_path, folder, bench, constitution):
    out = tmp_path / "toy-world.calibration.json"
    result = runner.invoke(app, ["calibrate", "--images", str(folder), "--labels", str(folder / "labels.csv"),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    fitted = Calibration.load(out)
    fitted.check(constitution, "toy-vlm-demo")  # fitted for this constitution and model: the server applies it
    expected, _ = calibrate(constitution, load_demo_models(), bench, "generated", seed=SEED)
    assert (fitted.thresholds, fitted.dev_f1, fitted.default_f1, fitted.dev_images) == (
        expected.thresholds, expected.dev_f1, expected.default_f1, expected.dev_images,
    )
    assert fitted.dev_seed is None and fitted.dev_split == f"{folder / 'labels.csv'} (images in {folder})"
    report, output = eval_json(tmp_path, "--images", str(folder), "--labels", str(folder / "labels.jsonl"),
                               "--calibration", str(out))
    assert report["methods"][-1]["method"] == "clue-calibrated" and "calibrated thresholds" in output


def test_an_image_is_unsafe_if_any_judged_frame_is():
    frames = [Prediction(False, frozenset(), 1, 0), Prediction(True, frozenset({"a"}), 2, 1),
              Prediction(True, frozenset({"b"}), 1, 0)]
    assert Prediction.of_frames(frames) == Prediction(True, frozenset({"a", "b"}), 4, 1)
    assert Prediction.of_frames([Prediction(False, None, 1, 0)] * 2) == Prediction(False, None, 2, 0)


def test_a_real_model_class_runs_every_method_end_to_end(tmp_path, folder):
    """Random weights: the numbers mean nothing; the hub-class path (processor, chat template, scoring,
    reasoning) must run on the user's files."""
    labels = tmp_path / "few.jsonl"
    labels.write_text("".join(line + "\n" for line in (folder / "labels.jsonl").read_text().splitlines()[:2]))
    report, output = eval_json(tmp_path, "--images", str(folder), "--labels", str(labels),
                               "--mllm", "tiny:qwen2-vl", "--relevance", "none", "--detector", "none")
    assert report["model_id"].startswith("tiny:qwen2-vl") and report["images"] == 2
    assert len(report["methods"]) == 6 and all(0 <= m["f1"] <= 1 for m in report["methods"])
    assert "real photos" not in output


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory) -> Iterator[TritonServer]:
    directory = tmp_path_factory.mktemp("served")
    (directory / "toy-world.yaml").write_text(TOY_CONSTITUTION.read_text())
    settings = ServeSettings(
        models=ModelSpec(mllm=DEMO_SPEC, relevance=DEMO_SPEC, detector=DEMO_SPEC), constitutions=directory,
        cache_dir=tmp_path_factory.mktemp("compiled"), grpc_port=0, http_port=0, metrics_port=0,
    )
    with settings.server() as server:
        yield server


@pytest.mark.integration
def test_with_url_full_clue_is_measured_through_the_server(tmp_path, folder, toy_report, demo_server):
    report, output = eval_json(tmp_path, "--images", str(folder), "--labels", str(folder / "labels.jsonl"),
                               "--url", demo_server.url, "--concurrency", "3")
    served = numbers(report)
    assert [m["method"] for m in served] == ["clue-served"]
    in_process = next(m for m in numbers(toy_report) if m["method"] == "clue")
    assert {**served[0], "method": "clue", "description": in_process["description"]} == in_process
    assert report["model_id"] == "toy-vlm-demo"
    assert "only full CLUE is measured" in output and "baselines and ablations need direct model access" in output
    (tmp_path / "broken.png").write_bytes(b"not an image")
    labels = tmp_path / "broken.jsonl"
    labels.write_text('{"path": "broken.png", "unsafe": false}\n')
    result = runner.invoke(app, ["eval", "--images", str(tmp_path), "--labels", str(labels), "--url", demo_server.url])
    assert result.exit_code == 2 and f"{labels}:1: {tmp_path / 'broken.png'}: the server refused it" in result.output


def test_a_bench_item_is_a_scene_or_a_file(bench):
    with pytest.raises(ValueError, match="either a generated scene or an image file"):
        BenchItem(frozenset(), False, "benign", scene=bench[0].scene, path=Path("x.png"))
    with pytest.raises(ValueError, match="either a generated scene or an image file"):
        BenchItem(frozenset(), False, "benign")
