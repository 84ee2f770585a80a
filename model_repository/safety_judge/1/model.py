"""Triton adapter: IMAGE, CONSTITUTION, OPTIONS? [N, 1] -> VERDICT [N, 1] via safejudge.pipeline.JudgeStage.

A dynamic batch is judged side by side, the MLLM in this process; every call into Triton (cancellation
checks, metrics) is made from this, the execute thread.
"""

import logging

import numpy as np
import triton_python_backend_utils as pb_utils

from safejudge.metrics import DEFINITIONS, LATENCY_BUCKETS, LabelledMetrics
from safejudge.pipeline import (
    TRITON_ERROR_CODES,
    Fault,
    JudgeRequest,
    JudgeStage,
    JudgeStageSettings,
    credential_values,
    stage_parameters,
)


def triton_metrics():
    """safejudge.metrics' sink on Triton's custom-metrics API (served on the metrics port)."""
    kinds = {"counter": "COUNTER", "gauge": "GAUGE", "histogram": "HISTOGRAM"}
    families = {
        d.name: pb_utils.MetricFamily(d.name, d.description, getattr(pb_utils.MetricFamily, kinds[d.kind]))
        for d in DEFINITIONS
    }
    return LabelledMetrics(
        lambda d, labels: families[d.name].Metric(labels=labels, **({"buckets": list(LATENCY_BUCKETS)} if d.kind == "histogram" else {}))
    )


class TritonPythonModel:
    def initialize(self, args):
        # One JSON line per answered request (safejudge.requests) in the server log.
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        settings = JudgeStageSettings.model_validate_json(stage_parameters(args["model_config"])["settings"])
        self.stage = JudgeStage(settings, triton_metrics())

    def execute(self, requests):
        answers = self.stage.answer([self._read(request) for request in requests],
                                    [request.is_cancelled for request in requests])
        return [self._response(answer) for answer in answers]

    @staticmethod
    def _read(request):
        options = pb_utils.get_input_tensor_by_name(request, "OPTIONS")
        return JudgeRequest.from_arrays(
            pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy(),
            pb_utils.get_input_tensor_by_name(request, "CONSTITUTION").as_numpy(),
            None if options is None else options.as_numpy(),
            timeout_us=request.timeout(),
            request_id=request.request_id(),
            credentials=credential_values(request.parameters()),
        )

    @staticmethod
    def _response(answer):
        if isinstance(answer, Fault):
            code = getattr(pb_utils.TritonError, TRITON_ERROR_CODES[answer.code])
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(answer.message, code))
        verdicts = np.array([[verdict.encode()] for verdict in answer], dtype=object)
        return pb_utils.InferenceResponse([pb_utils.Tensor("VERDICT", verdicts)])
