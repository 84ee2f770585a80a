"""`safejudge serve` as a user runs it: the README's real-model command shape, as a subprocess, every flag
but the model and the ports at its default."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from safejudge.backends.tiny import ensure_tiny_model
from safejudge.shipped import PROJECT_ROOT
from safejudge_client import JudgeClient
from tests.serve_process import serve_process
from tests.test_reliability import png

pytestmark = pytest.mark.integration

SAFEJUDGE = Path(sys.executable).with_name("safejudge")


def test_the_readme_real_model_command_serves_every_shipped_constitution(tmp_path):
    # README: safejudge serve --mllm hf:Qwen/Qwen2-VL-2B-Instruct --dtype bfloat16 (a local directory here,
    # float32: this CPU may lack bf16 units; free ports so tests never collide with a running server).
    model = tmp_path / "Qwen2-VL-stand-in"
    shutil.copytree(ensure_tiny_model("qwen2-vl"), model)
    env = {**os.environ, "SAFEJUDGE_CACHE": str(tmp_path / "cache")}
    command = [str(SAFEJUDGE), "serve", "--mllm", f"hf:{model}", "--dtype", "float32",
               "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0"]
    with serve_process(command, PROJECT_ROOT, env) as served:
        output = "".join(served.output)
        assert "relevance: none, every rule is checked" in output, output
        assert "detector: none, Strategy 2 is off" in output, output
        assert "demo" not in output.lower() and "refused" not in output, output
        with JudgeClient(served.url, timeout_s=120) as client:
            for constitution in ("os-bench", "general"):
                verdict = client.judge(png(3), constitution, {"max_reasoning_calls": 0})
                assert verdict.constitution == constitution and verdict.rules_considered, verdict
                assert verdict.model_id.startswith(f"hf:{model}")
    assert served.returncode == 0 and "stopped" in served.output[-1], served.output[-1]
