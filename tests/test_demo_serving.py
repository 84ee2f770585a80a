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


def safe_and_unsafe_scene() -> tuple[bytes, bytes]:
    """A toy scene the demo engine judges safe and one it judges unsafe, as PNG."""
    constitution = load_constitution(CONSTITUTIONS / "toy-world.yaml")
    models = load_demo_models()
    compiled = compile_constitution(constitution, models)
    found = {}
    for item in demo_scenes(constitution, 12, seed=5):
        found.setdefault(judge_batched(item.scene.image, compiled, models).safe, png(item.scene.image))
    return found[True], found[False]


def batch_inputs(rows: list[tuple[bytes, bytes]]) -> list:
    import numpy as np
    import tritonclient.grpc as grpcclient

    tensors = []
    for index, name in enumerate(("IMAGE", "CONSTITUTION")):
        tensor = grpcclient.InferInput(name, [len(rows), 1], "BYTES")
        values = np.empty((len(rows), 1), dtype=object)
        for row, pair in enumerate(rows):
            values[row, 0] = pair[index]
        tensor.set_data_from_numpy(values)
        tensors.append(tensor)
    return tensors


def test_every_image_of_a_batched_request_is_judged(demo_server):
    """The issue's reproduction: IMAGE/CONSTITUTION [2, 1] = (a safe scene, an unsafe one) was answered with
    ONE verdict, `safe: true`, the unsafe image never judged. Now: [2, 1] verdicts, each as the image alone."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from safejudge_client import Verdict

    safe, unsafe = safe_and_unsafe_scene()
    with grpcclient.InferenceServerClient(demo_server.url) as raw, JudgeClient(demo_server.url, timeout_s=60) as client:
        alone = [client.judge(image, "toy-world") for image in (safe, unsafe)]
        result = raw.infer("safety_judge", batch_inputs([(safe, b"toy-world"), (unsafe, b"toy-world")]))
        array = result.as_numpy("VERDICT")
        assert array.shape == (2, 1)
        batched = [Verdict.model_validate_json(raw_verdict) for raw_verdict in array[:, 0]]
        assert [v.decision() for v in batched] == [v.decision() for v in alone] == [(True, ()), alone[1].decision()]
        assert not alone[1].safe
        many = client.judge_many([safe, unsafe, unsafe, safe], "toy-world", batch_size=4)
        assert [v.safe for v in many] == [True, False, False, True]
        with pytest.raises(InferenceServerException, match="row 1 of 3: .*cannot identify image file") as refused:
            raw.infer("safety_judge", batch_inputs([(safe, b"toy-world"), (b"junk", b"toy-world"),
                                                    (unsafe, b"toy-world")]))
        assert "INVALID_ARGUMENT" in str(refused.value.status())
        with pytest.raises(InferenceServerException, match="batch-size must be <= 8"):
            raw.infer("safety_judge", batch_inputs([(safe, b"toy-world")] * 9))
        assert client.judge(unsafe, "toy-world").decision() == alone[1].decision(), "still serving"


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
