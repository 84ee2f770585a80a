"""The launcher (safejudge.server) against the real tritonserver binary, on small throwaway repositories.

The full safejudge pipeline is exercised in tests/test_integration.py; these tests cover starting,
readiness, shutdown, /dev/shm cleanup and the failure modes that would otherwise hang or leak.
"""

from __future__ import annotations

import glob
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from safejudge.backends.registry import ModelSpec
from safejudge.shipped import PROJECT_ROOT
from safejudge.server import (
    STUB_NAME,
    ServerError,
    ServeSettings,
    TritonInstall,
    TritonServer,
    find_triton,
    pbtxt_string,
    render_repository,
)
from safejudge_client import JudgeClient

pytestmark = pytest.mark.integration

ADD_ONE_CONFIG = """
name: "add_one"
backend: "python"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: ${instances} } ]
parameters { key: "label" value: { string_value: ${label} } }
"""

ADD_ONE_MODEL = """
import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.increment = len(json.loads(args["model_config"])["parameters"]["label"]["string_value"])

    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy() + self.increment)]
            )
            for r in requests
        ]
"""


def write_repository(root: Path, model_source: str = ADD_ONE_MODEL) -> Path:
    model = root / "add_one"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(ADD_ONE_CONFIG)
    (model / "1" / "model.py").write_text(model_source)
    return root


def small_server(root: Path, **options) -> TritonServer:
    options = {"ready_timeout": 60.0, "grace_period": 5.0, **options}
    return TritonServer(
        write_repository(root, options.pop("model_source", ADD_ONE_MODEL)),
        template_values={"instances": "1", "label": pbtxt_string('a "quoted" label')},
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        **options,
    )


def add_one(url: str, values: list[float]) -> np.ndarray:
    x = grpcclient.InferInput("X", [1, len(values)], "FP32")
    x.set_data_from_numpy(np.array([values], dtype=np.float32))
    with grpcclient.InferenceServerClient(url) as client:
        return client.infer("add_one", [x]).as_numpy("Y")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_serves_then_stops_and_removes_shm_regions(tmp_path):
    server = small_server(tmp_path)
    with server:
        # Rendered parameters arrive intact: the label is 16 characters long, quotes included.
        np.testing.assert_array_equal(add_one(server.url, [1.0, 2.5]), [[17.0, 18.5]])
        assert server.shm_regions(), "the Python backend should hold /dev/shm regions under the unique prefix"
        assert server.url.startswith("127.0.0.1:")
        pid, run_dir = server.process.pid, server.run_dir
        assert (run_dir / "backends" / "python" / "triton_python_backend_stub").is_file()
    assert server.process is None
    assert not process_alive(pid)
    assert server.shm_regions() == []
    assert not run_dir.exists()
    with pytest.raises(InferenceServerException):
        add_one(server.url, [1.0])


def test_stop_after_the_server_was_killed_still_cleans_up(tmp_path):
    server = small_server(tmp_path).start()
    regions = server.shm_regions()
    assert regions
    os.killpg(server.process.pid, signal.SIGKILL)  # no chance to clean up after itself
    server.process.wait()
    assert all(region.exists() for region in regions)
    server.stop()
    assert server.shm_regions() == []


def test_stub_with_missing_library_is_refused_before_starting(tmp_path):
    other = "3.12" if sys.version_info[:2] != (3, 12) else "3.11"
    started = time.monotonic()
    with pytest.raises(ServerError, match=rf"stub .* cannot load: libpython{other}\.so.* not found"):
        stub = TritonInstall.from_wheel().stub.parents[1] / other / STUB_NAME
        small_server(tmp_path, stub=stub).start()
    assert time.monotonic() - started < 10


def test_hanging_stub_hits_the_readiness_deadline(tmp_path):
    # Passes the ldd check (not a dynamic executable) but never connects: the server waits forever.
    stub, pid_file = tmp_path / "hanging_stub", tmp_path / "stub.pid"
    stub.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 600\n")
    stub.chmod(0o755)
    server = small_server(tmp_path / "repository", stub=stub, ready_timeout=4.0, grace_period=2.0)
    started = time.monotonic()
    with pytest.raises(ServerError, match=r"(?s)not ready after 4 s.*last log lines:\n.*loading: add_one"):
        server.start()
    assert time.monotonic() - started < 4.0 + 2.0 + 10.0
    assert server.process is None and server.run_dir is None
    assert server.shm_regions() == []
    assert not process_alive(int(pid_file.read_text())), "the hanging stub must be killed with the server"


def test_model_that_fails_to_load_reports_the_server_log(tmp_path):
    broken = "raise ImportError('this model cannot be imported')\n"
    with pytest.raises(ServerError, match=r"(?s)exited with code .*this model cannot be imported"):
        small_server(tmp_path, model_source=broken).start()


def test_placeholder_without_value_names_the_file(tmp_path):
    write_repository(tmp_path / "source")
    with pytest.raises(ServerError, match=r"add_one/config.pbtxt: placeholder 'label' has no value"):
        render_repository(tmp_path / "source", tmp_path / "rendered", {"instances": "1"})


def test_serve_settings_fill_every_placeholder_of_the_model_repository(tmp_path):
    settings = ServeSettings(constitutions=Path("constitutions"), cache_dir=tmp_path / "cache", judge_instances=2,
                             max_batch=4)
    render_repository(settings.repository, tmp_path / "rendered", settings.template_values())
    assert sorted(p.name for p in (tmp_path / "rendered").iterdir()) == ["safety_judge"]
    judge_config = (tmp_path / "rendered" / "safety_judge" / "config.pbtxt").read_text()
    assert "count: 2" in judge_config and "max_batch_size: 4" in judge_config and "${" not in judge_config
    assert "max_queue_size: 64" in judge_config and "max_queue_delay_microseconds: 0" in judge_config
    assert str(Path("constitutions").resolve()) in judge_config


def test_instances_fill_the_cores_at_the_models_threads(tmp_path):
    cores = len(os.sched_getaffinity(0))
    real = ServeSettings(models=ModelSpec(mllm="hf:some/model"), cache_dir=tmp_path)
    assert (real.instances(), real.threads_per_instance()) == (1, cores)
    tiny = ServeSettings(models=ModelSpec(mllm="tiny:qwen2-vl"), cache_dir=tmp_path)
    assert (tiny.instances(), tiny.threads_per_instance()) == (cores, 1)
    two = ServeSettings(models=ModelSpec(mllm="hf:some/model"), cache_dir=tmp_path, judge_instances=2)
    assert (two.instances(), two.threads_per_instance()) == (2, max(1, cores // 2))
    shaped = ServeSettings(models=ModelSpec(mllm="tiny:qwen2-vl-2b-shape", threads=3), cache_dir=tmp_path)
    assert (shaped.instances(), shaped.threads_per_instance()) == (max(1, cores // 3), 3)


def test_serve_settings_reject_a_missing_constitution_directory(tmp_path):
    with pytest.raises(ServerError, match="constitution directory .*nowhere does not exist"):
        ServeSettings(constitutions=tmp_path / "nowhere").template_values()


def test_cli_serve_rejects_bad_flags_with_one_readable_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "safejudge.cli", "serve", "--constitutions", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "error: constitution directory" in result.stderr and "does not exist" in result.stderr


def test_cli_serve_answers_then_stops_cleanly_on_sigterm(tmp_path):
    """`safejudge serve` end to end with its default (demo) models: ready line, the toy-model notice and the
    refusal of a constitution the demo vocabulary cannot express, one real verdict over gRPC, SIGTERM,
    clean exit."""
    constitutions = tmp_path / "constitutions"
    constitutions.mkdir()
    for name in ("general.yaml", "toy-world.yaml"):
        (constitutions / name).write_text((PROJECT_ROOT / "constitutions" / name).read_text())
    command = [sys.executable, "-m", "safejudge.cli", "serve", "--grpc-port", "0", "--http-port", "0"]
    command += ["--metrics-port", "0", "--constitutions", str(constitutions)]
    command += ["--ready-timeout", "240"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in process.stdout:  # the CLI gives up by itself after --ready-timeout
            lines.append(line)
            if "is refused" in line:  # the last line printed at start
                break
        output = "".join(lines)
        url = re.search(r"ready: gRPC (\S+)", output)
        shm_prefix = re.search(r"shared memory: (\S+)\*", output)
        assert url and shm_prefix, output
        assert "NOTE: serving the demo models" in output and "constitution 'general' is refused" in output
        image = io.BytesIO()
        Image.new("RGB", (96, 96), (200, 30, 30)).save(image, format="PNG")
        with JudgeClient(url.group(1)) as client:
            verdict = client.judge(image.getvalue(), "toy-world", {"relevance_filter": False})
        assert verdict.constitution == "toy-world" and verdict.rules_considered  # no relevance filter: all rules
        assert verdict.model_id == "toy-vlm-demo"
        assert glob.glob(shm_prefix.group(1) + "*")
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output + rest
    assert "stopped" in rest
    assert glob.glob(shm_prefix.group(1) + "*") == []


def fake_triton_home(root: Path) -> Path:
    """A directory laid out like an NVIDIA container's /opt/tritonserver (empty files: selection only)."""
    for relative in ("bin/tritonserver", "backends/python/libtriton_python.so", f"backends/python/{STUB_NAME}", "lib/x"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).touch()
    return root


def test_the_environments_own_triton_is_chosen_over_the_wheel(tmp_path):
    home = fake_triton_home(tmp_path / "opt-tritonserver")
    container = find_triton("auto", container_home=home)
    assert (container.binary, container.stub, container.library_dirs) == (
        home / "bin/tritonserver", home / "backends/python" / STUB_NAME, (home / "lib",)
    )
    wheel = find_triton("auto", container_home=tmp_path / "absent")
    assert "nvidia-pytriton" in wheel.origin and wheel.binary.name == "tritonserver"
    assert find_triton("wheel", container_home=home).origin == wheel.origin
    assert find_triton(str(home)).binary == container.binary
    (home / "backends/python" / STUB_NAME).unlink()
    with pytest.raises(ServerError, match=rf"is not a Triton installation: .*{STUB_NAME} is missing"):
        find_triton(str(home))

