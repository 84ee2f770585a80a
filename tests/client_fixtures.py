"""A real Triton server with a tiny `safety_judge` echo model, for the client library's tests.

The model speaks the production wire format (IMAGE, CONSTITUTION, optional OPTIONS -> VERDICT) but
judges nothing, so client behaviour is tested without any ML model. What it answers:
- model_id: "<sha256 of the IMAGE bytes received>:<PIL format>:<width>x<height>" (proves the bytes arrived intact)
- evaluator: the OPTIONS JSON received, or "no-options" when the request had no OPTIONS input
- constitution "unsafe": one violation (rule "r1"); "reject": INVALID_ARGUMENT; "garbage": a VERDICT that is
  not Verdict JSON; "slow": answers after SLOW_S seconds; an IMAGE Pillow cannot open: INVALID_ARGUMENT.
The server is started with H3's launcher (safejudge.server.TritonServer).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

SLOW_S = 1.0
REJECT_MESSAGE = "unknown constitution 'reject'; known: echo, unsafe"

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


def first_string(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)[0]


def answer(request):
    image = first_string(request, "IMAGE")
    constitution = first_string(request, "CONSTITUTION").decode()
    options = first_string(request, "OPTIONS")
    if constitution == "slow":
        time.sleep({SLOW_S})
    if constitution == "reject":
        raise ValueError({REJECT_MESSAGE!r})
    try:
        with Image.open(io.BytesIO(image)) as decoded:
            description = f"{{decoded.format}}:{{decoded.width}}x{{decoded.height}}"
    except Exception as exc:
        raise ValueError(f"IMAGE is not a decodable image: {{exc}}")
    if constitution == "garbage":
        return b"this is not a verdict"
    safe = constitution != "unsafe"
    violations = [] if safe else [
        {{"rule_id": "r1", "title": "Rule one", "category": "test", "severity": "high", "reason": "scripted"}}
    ]
    return json.dumps({{
        "safe": safe,
        "constitution": constitution,
        "constitution_version": "1",
        "violations": violations,
        "evaluator": options.decode() if options is not None else "no-options",
        "model_id": f"{{hashlib.sha256(image).hexdigest()}}:{{description}}",
    }}).encode()


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                verdict = answer(request)
            except ValueError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            tensor = pb_utils.Tensor("VERDICT", np.array([[verdict]], dtype=np.object_))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses
"""


def write_echo_repository(root: Path) -> Path:
    model = root / "safety_judge"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(ECHO_CONFIG)
    (model / "1" / "model.py").write_text(ECHO_MODEL)
    return root


def echo_server(root: Path):
    """A TritonServer (not started) serving the echo repository on free ports."""
    from safejudge.server import TritonServer

    return TritonServer(
        write_echo_repository(root), grpc_port=0, http_port=0, metrics_port=0, ready_timeout=60, grace_period=5
    )


@pytest.fixture(scope="module")
def echo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """gRPC address of a running echo server, shared by a test module."""
    with echo_server(tmp_path_factory.mktemp("echo-repository")) as server:
        yield server.url
