"""Triton adapter: PIXELS -> EMBEDDING via safejudge.pipeline.RelevanceStage."""

import numpy as np
import triton_python_backend_utils as pb_utils

from safejudge.pipeline import RelevanceStage, stage_parameters, stage_spec


class TritonPythonModel:
    def initialize(self, args):
        self.stage = RelevanceStage(stage_spec(stage_parameters(args["model_config"]), threads=1))

    def execute(self, requests):
        responses = []
        for request in requests:
            pixels = pb_utils.get_input_tensor_by_name(request, "PIXELS").as_numpy()[0]
            embedding = self.stage.embed(pixels)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("EMBEDDING", embedding[np.newaxis])]))
        return responses
