"""Triton adapter: IMAGE (encoded bytes) -> PIXELS via safejudge.pipeline.image_pixels."""

import numpy as np
import triton_python_backend_utils as pb_utils

from safejudge.pipeline import InvalidRequest, image_pixels


class TritonPythonModel:
    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        data = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()[0, 0]
        try:
            pixels = image_pixels(data)
        except InvalidRequest as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
        return pb_utils.InferenceResponse([pb_utils.Tensor("PIXELS", pixels[np.newaxis])])
