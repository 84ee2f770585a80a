"""Triton adapter: IMAGE, CONSTITUTION, OPTIONS? -> VERDICT via safejudge.pipeline.JudgeStage.

The judge reaches the `mllm` model over BLS, through the MLLM interface the evaluators use.
"""

import functools
import logging
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from safejudge.metrics import DEFINITIONS, LATENCY_BUCKETS, LabelledMetrics
from safejudge.pipeline import (
    PIPELINE_KEY_PARAMETER,
    TRITON_ERROR_CODES,
    Fault,
    JudgeStage,
    JudgeStageSettings,
    answer_each,
    fault_from_bls,
    read_pipeline_key,
    stage_parameters,
)


class MLLMOverBLS:
    """The `mllm` model seen as a safejudge MLLM (backends.base.MLLM), for the request being judged.

    Each call first checks the request's deadline (no work for a request nobody waits for) and passes the
    time left on as the BLS timeout, so the mllm queue drops it too. The compile thread has no deadline.
    """

    def __init__(self, key):
        self.parameters = {PIPELINE_KEY_PARAMETER: key}
        self.local = threading.local()

    @functools.cached_property
    def _identity(self):
        return [answer.decode() for answer in self._ask(None, [], "id", "ANSWERS")]

    @property
    def model_id(self):
        return self._identity[0]

    @property
    def fingerprint(self):
        return self._identity[1]

    @property
    def preferred_schedule(self):
        """The mllm backend's own (e.g. "waves" for Hugging Face models: its prefix cache spans the waves)."""
        return self._identity[2] or None

    def _ask(self, image, questions, mode, output):
        deadline, timeout_us = getattr(self.local, "deadline", None), 0
        if deadline is not None:
            deadline.check(f"an mllm {mode} call")
            timeout_us = max(1, int(deadline.remaining_s() * 1e6))
        inputs = [
            pb_utils.Tensor("QUESTIONS", np.array([[q.encode() for q in questions]], dtype=object).reshape(1, -1)),
            pb_utils.Tensor("MODE", np.array([[mode.encode()]], dtype=object)),
        ]
        if image is not None:
            inputs.append(pb_utils.Tensor("PIXELS", np.asarray(image, dtype=np.uint8)[np.newaxis]))
        response = pb_utils.InferenceRequest(
            model_name="mllm", inputs=inputs, requested_output_names=[output],
            parameters=self.parameters, timeout=timeout_us,
        ).exec()
        if response.has_error():
            raise fault_from_bls("mllm", response.error().message())
        return pb_utils.get_output_tensor_by_name(response, output).as_numpy()[0]

    def score(self, image, questions):
        return self._ask(image, questions, "score", "SCORES")

    def reason(self, image, questions):
        return [answer.decode() for answer in self._ask(image, questions, "reason", "ANSWERS")]


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
        parameters = stage_parameters(args["model_config"])
        self.mllm = MLLMOverBLS(read_pipeline_key(parameters["pipeline_key_file"]))
        settings = JudgeStageSettings.model_validate_json(parameters["settings"])
        self.stage = JudgeStage(settings, self.mllm, triton_metrics())

    def execute(self, requests):
        return [self._response(answer) for answer in answer_each(requests, self._judge, "safety_judge")]

    def _judge(self, request):
        options = pb_utils.get_input_tensor_by_name(request, "OPTIONS")
        deadline = self.stage.deadline(request.timeout(), request.is_cancelled)
        self.mllm.local.deadline = deadline
        try:
            return self.stage.judge(
                pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()[0, 0],
                pb_utils.get_input_tensor_by_name(request, "CONSTITUTION").as_numpy()[0, 0],
                None if options is None else options.as_numpy()[0, 0],
                deadline,
                request.request_id(),
            )
        finally:
            self.mllm.local.deadline = None

    @staticmethod
    def _response(answer):
        if isinstance(answer, Fault):
            code = getattr(pb_utils.TritonError, TRITON_ERROR_CODES[answer.code])
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(answer.message, code))
        return pb_utils.InferenceResponse([pb_utils.Tensor("VERDICT", np.array([[answer.encode()]], dtype=object))])
