"""A real Triton server with a tiny `safety_judge` echo model, for the client library's tests.

The model speaks the production wire format (IMAGE, CONSTITUTION, optional OPTIONS [N, 1] -> VERDICT [N, 1],
a failing row failing its request with "row i of N: ...") but judges nothing, so client behaviour is tested
without any ML model. What it answers for each row:
- model_id: "<sha256 of the IMAGE bytes received>:<PIL format>:<width>x<height>" (proves the bytes arrived intact)
- evaluator: the OPTIONS JSON received, or "no-options" when the request had no OPTIONS input
- constitution "unsafe": one violation (rule "r1"); "reject": INVALID_ARGUMENT; "garbage": a VERDICT that is
  not Verdict JSON; "slow": answers after SLOW_S seconds; an IMAGE Pillow cannot open: INVALID_ARGUMENT.
- "future": a verdict as a newer server might write it (FUTURE_VERDICT: unknown fields and enum values).
- "deadline": evaluator is Triton's request timeout in microseconds as the model sees it (0: none).
- "recovering": OPTIONS {"status": "INTERNAL" | "NOT_FOUND", "message": ..., "until": <epoch s>}: that error
  until the time has come, then a verdict (a stage or model that is being restarted).
The server is started with H3's launcher (safejudge.server.TritonServer).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

SLOW_S = 1.0
REJECT_MESSAGE = "unknown constitution 'reject'; known: echo, unsafe"
FUTURE_EVIDENCE = {
    "item": 0, "alternative": 0, "text": "a knife is visible", "score": 0.9, "outcome": "satisfied",
    "decided_by": "oracle", "frame": 3, "heatmap": [[0.1]],
}
FUTURE_VERDICT = {
    "schema_version": 9, "safe": False, "constitution": "future", "constitution_version": "7",
    "violations": [{
        "rule_id": "r1", "title": "Rule one", "category": "test", "severity": "high", "reason": "scripted",
        "evidence": [FUTURE_EVIDENCE], "frames": [3], "confidence": 0.97,
    }],
    "frame_count": 5, "frames_judged": [0, 3], "request_id": "req-7", "region": {"x": 1},
    "timing": {"total_ms": 4.0, "gpu_ms": 2.0},
}

ECHO_CONFIG = """
name: "safety_judge"
backend: "python"
max_batch_size: 8
input [
  { name: "IMAGE", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "CONSTITUTION", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "OPTIONS", data_type: TYPE_STRING, dims: [ 1 ], optional: true }
]
output [ { name: "VERDICT", data_type: TYPE_STRING, dims: [ 1 ] } ]
instance_group [ { count: 2, kind: KIND_CPU } ]
"""

ECHO_MODEL = f"""
import hashlib
import io
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image


def row_strings(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else list(tensor.as_numpy().reshape(-1))


class Failure(Exception):  # answered as an error response with this pb_utils.TritonError code
    def __init__(self, message, code="INVALID_ARG"):
        super().__init__(message)
        self.code = code


def answer(request, image, constitution, options):
    constitution = constitution.decode()
    if constitution == "slow":
        time.sleep({SLOW_S})
    if constitution == "reject":
        raise Failure({REJECT_MESSAGE!r})
    if constitution == "recovering":
        outage = json.loads(options)
        if time.time() < outage["until"]:
            raise Failure(outage["message"], outage["status"])
    try:
        with Image.open(io.BytesIO(image)) as decoded:
            description = f"{{decoded.format}}:{{decoded.width}}x{{decoded.height}}"
    except Exception as exc:
        raise Failure(f"IMAGE is not a decodable image: {{exc}}")
    if constitution == "garbage":
        return b"this is not a verdict"
    if constitution == "future":
        return {json.dumps(FUTURE_VERDICT)!r}.encode()
    evaluator = options.decode() if options is not None else "no-options"
    if constitution == "deadline":
        evaluator = str(request.timeout())
    safe = constitution != "unsafe"
    violations = [] if safe else [
        {{"rule_id": "r1", "title": "Rule one", "category": "test", "severity": "high", "reason": "scripted"}}
    ]
    return json.dumps({{
        "safe": safe,
        "constitution": constitution,
        "constitution_version": "1",
        "violations": violations,
        "evaluator": evaluator,
        "model_id": f"{{hashlib.sha256(image).hexdigest()}}:{{description}}",
    }}).encode()


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            images = row_strings(request, "IMAGE")
            constitutions = row_strings(request, "CONSTITUTION")
            options = row_strings(request, "OPTIONS") or [None] * len(images)
            verdicts = np.empty((len(images), 1), dtype=np.object_)
            try:
                for row, inputs in enumerate(zip(images, constitutions, options)):
                    try:
                        verdicts[row, 0] = answer(request, *inputs)
                    except Failure as exc:
                        if len(images) > 1:
                            exc.args = (f"row {{row}} of {{len(images)}}: {{exc}}",)
                        raise
            except Failure as exc:
                error = pb_utils.TritonError(str(exc), getattr(pb_utils.TritonError, exc.code))
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            tensor = pb_utils.Tensor("VERDICT", verdicts)
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses
"""


def write_echo_repository(root: Path) -> Path:
    model = root / "safety_judge"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(ECHO_CONFIG)
    (model / "1" / "model.py").write_text(ECHO_MODEL)
    return root


def echo_server(root: Path, extra_args: Sequence[str] = ()):
    """A TritonServer (not started) serving the echo repository on free ports."""
    from safejudge.server import TritonServer

    return TritonServer(
        write_echo_repository(root),
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        ready_timeout=60,
        grace_period=5,
        extra_args=extra_args,
    )


@pytest.fixture(scope="module")
def echo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """gRPC address of a running echo server, shared by a test module."""
    with echo_server(tmp_path_factory.mktemp("echo-repository")) as server:
        yield server.url
