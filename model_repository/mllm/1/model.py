"""Triton adapter: PIXELS?, QUESTIONS, MODE -> SCORES, ANSWERS via safejudge.pipeline.MLLMStage."""

import numpy as np
import triton_python_backend_utils as pb_utils

from safejudge.pipeline import (
    TRITON_ERROR_CODES,
    Fault,
    MLLMStage,
    ModelSpec,
    check_pipeline_key,
    read_pipeline_key,
    stage_parameters,
    tagged,
)


class TritonPythonModel:
    def initialize(self, args):
        parameters = stage_parameters(args["model_config"])
        self.stage = MLLMStage.load(ModelSpec.model_validate_json(parameters["model_spec"]))
        self.key = read_pipeline_key(parameters["pipeline_key_file"])

    def execute(self, requests):
        # Dynamic batching hands over several requests; each asks about its own image (or none) and gets
        # its own answer or error. Their score questions run in one merged model call (MLLMStage.answer).
        return [self._response(answer) for answer in self.stage.answer(requests, self._read)]

    def _read(self, request):
        check_pipeline_key(request.parameters(), self.key)
        pixels = pb_utils.get_input_tensor_by_name(request, "PIXELS")
        return self.stage.parse(
            None if pixels is None else pixels.as_numpy()[0],
            list(pb_utils.get_input_tensor_by_name(request, "QUESTIONS").as_numpy()[0]),
            pb_utils.get_input_tensor_by_name(request, "MODE").as_numpy()[0, 0],
        )

    @staticmethod
    def _response(answer):
        if isinstance(answer, Fault):
            # Tagged: a BLS caller sees every error as INTERNAL and reads the code back from the message.
            code = getattr(pb_utils.TritonError, TRITON_ERROR_CODES[answer.code])
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(tagged(answer.code, answer.message), code))
        scores, answers = answer
        return pb_utils.InferenceResponse(
            [
                pb_utils.Tensor("SCORES", scores[np.newaxis]),
                pb_utils.Tensor("ANSWERS", np.array([[a.encode() for a in answers]], dtype=object).reshape(1, -1)),
            ]
        )
