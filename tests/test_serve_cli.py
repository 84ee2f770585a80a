"""`safejudge serve` as a user runs it: the README's real-model command shape, as a subprocess, every flag
but the model and the ports at its default."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safejudge.backends.tiny import ensure_tiny_model
from safejudge.server import PROJECT_ROOT
from safejudge_client import JudgeClient
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
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, "serve exited while starting:\n" + "".join(lines)
            lines.append(line)
            if line.startswith("ready:"):
                break
        output = "".join(lines)
        url = re.search(r"gRPC (\S+)", lines[-1]).group(1)
        assert "relevance: none, every rule is checked" in output, output
        assert "detector: none, Strategy 2 is off" in output, output
        assert "demo" not in output.lower() and "refused" not in output, output
        with JudgeClient(url, timeout_s=120) as client:
            for constitution in ("os-bench", "general"):
                verdict = client.judge(png(3), constitution, {"max_reasoning_calls": 0})
                assert verdict.constitution == constitution and verdict.rules_considered, verdict
                assert verdict.model_id.startswith(f"hf:{model}")
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and "stopped" in rest, rest
