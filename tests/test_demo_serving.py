"""The default served models (the toy-world demo) on a real Triton server: verdicts equal the in-process
engine, a constitution the demo vocabulary cannot express is refused with INVALID_ARGUMENT, and
`safejudge demo --served` shows verdicts over gRPC."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from safejudge.backends.onnx_demo import inexpressible, load_demo_models
from safejudge.backends.registry import ModelSpec
from safejudge.cli import DEMO_SPEC, app
from safejudge.compiled import all_statements, compile_constitution
from safejudge.constitution import load_constitution
from safejudge.evaluation import demo_scenes
from safejudge.evaluators import judge_batched
from safejudge.server import ServeSettings, TritonServer
from safejudge.shipped import PROJECT_ROOT
from safejudge_client import InvalidRequest, JudgeClient

pytestmark = pytest.mark.integration
CONSTITUTIONS = PROJECT_ROOT / "constitutions"


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    directory = tmp_path_factory.mktemp("demo-constitutions")
    for name in ("toy-world.yaml", "os-bench.yaml"):
        shutil.copy(CONSTITUTIONS / name, directory / name)
    settings = ServeSettings(
        models=ModelSpec(mllm=DEMO_SPEC, relevance=DEMO_SPEC, detector=DEMO_SPEC),
        constitutions=directory,
        cache_dir=tmp_path_factory.mktemp("compiled"),
        grpc_port=0,
        http_port=0,
        metrics_port=0,
    )
    with settings.server() as server:
        yield server


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_served_demo_verdicts_equal_the_in_process_engine(demo_server):
    constitution = load_constitution(CONSTITUTIONS / "toy-world.yaml")
    models = load_demo_models()
    compiled = compile_constitution(constitution, models)
    items = demo_scenes(constitution, 6, seed=3)
    violations = 0
    with JudgeClient(demo_server.url, timeout_s=60) as client:
        for item in items:
            served = client.judge(png(item.scene.image), "toy-world")
            expected = judge_batched(item.scene.image, compiled, models)
            assert served.decision() == expected.decision(), item.scene.describe()
            assert [v.reason for v in served.violations] == [v.reason for v in expected.violations]
            violations += len(served.violations)
    assert violations > 0, "the sample should contain violating scenes"


def test_a_violating_frame_behind_a_benign_first_frame_is_found(demo_server):
    """An animation (APNG, lossless) whose first and last frames are benign and whose middle frame violates:
    the served verdict names that frame and the rules it violates, as the engine judges it alone."""
    constitution = load_constitution(CONSTITUTIONS / "toy-world.yaml")
    models = load_demo_models()
    compiled = compile_constitution(constitution, models)
    verdicts = {}
    for item in demo_scenes(constitution, 12, seed=5):
        verdicts.setdefault(judge_batched(item.scene.image, compiled, models).safe, (item.scene.image, None))
    (benign, _), (violating, _) = verdicts[True], verdicts[False]
    expected = judge_batched(violating, compiled, models)
    buffer = io.BytesIO()
    benign.save(buffer, format="PNG", save_all=True, append_images=[violating, benign.copy()], duration=100)
    with JudgeClient(demo_server.url, timeout_s=60) as client:
        served = client.judge(buffer.getvalue(), "toy-world")
        first_only = client.judge(buffer.getvalue(), "toy-world", {"frames": 1})
    assert (served.frame_count, served.frames_judged) == (3, [0, 1, 2])
    assert not served.safe and served.violated_rule_ids == expected.violated_rule_ids
    assert all(v.frames == [1] for v in served.violations)
    assert first_only.safe and first_only.frames_judged == [0], "judging only the first frame misses it"


def test_a_constitution_the_demo_vocabulary_cannot_express_is_refused(demo_server):
    assert inexpressible(all_statements(load_constitution(CONSTITUTIONS / "os-bench.yaml").enabled_rules))
    assert not inexpressible(all_statements(load_constitution(CONSTITUTIONS / "toy-world.yaml").enabled_rules))
    scene = demo_scenes(load_constitution(CONSTITUTIONS / "toy-world.yaml"), 1, seed=0)[0].scene
    with JudgeClient(demo_server.url, timeout_s=60, retries=0) as client:
        with pytest.raises(InvalidRequest, match="cannot answer"):
            client.judge(png(scene.image), "os-bench")
        assert client.judge(png(scene.image), "toy-world").constitution == "toy-world"  # still serving


def test_demo_command_judges_over_grpc():
    result = CliRunner().invoke(app, ["demo", "--served", "--scenes", "3", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "served by Triton" in result.output
    assert "must never be used to judge real photos" in result.output
    assert "verdicts name exactly the truly violated rules" in result.output
