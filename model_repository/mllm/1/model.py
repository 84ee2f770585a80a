"""Triton adapter: PIXELS?, QUESTIONS, MODE -> SCORES, ANSWERS via safejudge.pipeline.MLLMStage."""

import numpy as np
import triton_python_backend_utils as pb_utils

from safejudge.pipeline import INVALID_REQUEST_TAG, InvalidRequest, MLLMStage, stage_parameters, stage_spec


class TritonPythonModel:
    def initialize(self, args):
        self.stage = MLLMStage(stage_spec(stage_parameters(args["model_config"])))

    def execute(self, requests):
        # Dynamic batching hands over several requests; each asks about its own image (or none).
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        pixels = pb_utils.get_input_tensor_by_name(request, "PIXELS")
        questions = pb_utils.get_input_tensor_by_name(request, "QUESTIONS").as_numpy()[0]
        mode = pb_utils.get_input_tensor_by_name(request, "MODE").as_numpy()[0, 0]
        try:
            scores, answers = self.stage.run(
                None if pixels is None else pixels.as_numpy()[0],
                [q.decode() for q in questions],
                mode.decode(),
            )
        except InvalidRequest as exc:
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(INVALID_REQUEST_TAG + str(exc), pb_utils.TritonError.INVALID_ARG)
            )
        return pb_utils.InferenceResponse(
            [
                pb_utils.Tensor("SCORES", scores[np.newaxis]),
                pb_utils.Tensor("ANSWERS", np.array([[a.encode() for a in answers]], dtype=object).reshape(1, -1)),
            ]
        )
