"""Triton adapter: PIXELS, CONSTITUTION, OPTIONS?, EMBEDDING -> VERDICT via safejudge.pipeline.JudgeStage.

The judge reaches the `mllm` model over BLS, through the MLLM interface the evaluators use.
"""

import functools
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from safejudge.pipeline import INVALID_REQUEST_TAG, InvalidRequest, JudgeStage, stage_parameters, stage_spec


class MLLMOverBLS:
    """The `mllm` model seen as a safejudge MLLM (backends.base.MLLM).

    BLS works only inside execute(), so the model id is asked for on first use, not in initialize().
    """

    @functools.cached_property
    def model_id(self):
        return self._ask(None, [], "id", "ANSWERS")[0].decode()

    def _ask(self, image, questions, mode, output):
        inputs = [
            pb_utils.Tensor("QUESTIONS", np.array([[q.encode() for q in questions]], dtype=object).reshape(1, -1)),
            pb_utils.Tensor("MODE", np.array([[mode.encode()]], dtype=object)),
        ]
        if image is not None:
            inputs.append(pb_utils.Tensor("PIXELS", np.asarray(image, dtype=np.uint8)[np.newaxis]))
        response = pb_utils.InferenceRequest(
            model_name="mllm", inputs=inputs, requested_output_names=[output]
        ).exec()
        if response.has_error():
            message = response.error().message()
            # BLS reports every error as INTERNAL; the mllm stage marks the request's own faults.
            if INVALID_REQUEST_TAG in message:
                raise InvalidRequest(message.split(INVALID_REQUEST_TAG, 1)[1])
            raise RuntimeError(f"mllm stage failed: {message}")
        return pb_utils.get_output_tensor_by_name(response, output).as_numpy()[0]

    def score(self, image, questions):
        return self._ask(image, questions, "score", "SCORES")

    def reason(self, image, questions):
        return [answer.decode() for answer in self._ask(image, questions, "reason", "ANSWERS")]


class TritonPythonModel:
    def initialize(self, args):
        parameters = stage_parameters(args["model_config"])
        self.stage = JudgeStage(
            stage_spec(parameters, threads=1),
            Path(parameters["constitutions"]),
            Path(parameters["cache_dir"]),
            MLLMOverBLS(),
        )

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        options = pb_utils.get_input_tensor_by_name(request, "OPTIONS")
        try:
            verdict = self.stage.judge(
                pb_utils.get_input_tensor_by_name(request, "PIXELS").as_numpy()[0],
                pb_utils.get_input_tensor_by_name(request, "CONSTITUTION").as_numpy()[0, 0],
                None if options is None else options.as_numpy()[0, 0],
                pb_utils.get_input_tensor_by_name(request, "EMBEDDING").as_numpy()[0],
            )
        except InvalidRequest as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
        return pb_utils.InferenceResponse([pb_utils.Tensor("VERDICT", np.array([[verdict.encode()]], dtype=object))])
