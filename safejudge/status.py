"""`safejudge status`: what a running server says about itself — health, models, constitutions, limits.

Health and readiness come from Triton; the models' settings from their configs (the model-config protocol,
which needs the token when the server has one); constitutions and their compile state from the
`safejudge_constitution_info` metric on the metrics port."""

from __future__ import annotations

import re
import urllib.request

import tritonclient.grpc as grpcclient
from pydantic import BaseModel
from tritonclient.utils import InferenceServerException

from safejudge.pipeline import JudgeStageSettings
from safejudge_client.client import DEFAULT_MODEL, BearerToken

MODELS = (DEFAULT_MODEL,)


class ModelStatus(BaseModel):
    name: str
    ready: bool
    instances: int = 0
    max_batch_size: int = 0
    max_queue_size: int = 0


class ConstitutionStatus(BaseModel):
    name: str
    version: str
    state: str
    calibrated: bool


class ServerStatus(BaseModel):
    url: str
    live: bool
    ready: bool
    models: list[ModelStatus] = []
    settings: JudgeStageSettings | None = None
    constitutions: list[ConstitutionStatus] = []
    problems: list[str] = []


def _constitutions(metrics_url: str) -> list[ConstitutionStatus]:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    found = []
    for labels, value in re.findall(r"^safejudge_constitution_info\{(.*)\} (\S+)$", text, flags=re.MULTILINE):
        if float(value) == 1:
            fields = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels))
            found.append(ConstitutionStatus(name=fields["constitution"], version=fields["version"],
                                            state=fields["state"], calibrated=fields["calibrated"] == "yes"))
    return sorted(found, key=lambda c: c.name)


def server_status(url: str, metrics_url: str, token: str | None = None, **tls) -> ServerStatus:
    with grpcclient.InferenceServerClient(url, **tls) as client:
        if token is not None:
            client.register_plugin(BearerToken(token))
        try:
            status = ServerStatus(url=url, live=client.is_server_live(client_timeout=10),
                                  ready=client.is_server_ready(client_timeout=10))
        except InferenceServerException as exc:
            return ServerStatus(url=url, live=False, ready=False, problems=[f"server unreachable: {exc.message()}"])
        for name in MODELS:
            model = ModelStatus(name=name, ready=client.is_model_ready(name, client_timeout=10))
            try:
                config = client.get_model_config(name, as_json=True, client_timeout=10)["config"]
            except InferenceServerException as exc:
                status.problems.append(f"{name}: config not readable: {exc.message()}")
            else:
                policy = config.get("dynamic_batching", {}).get("default_queue_policy", {})
                model = model.model_copy(update={
                    "instances": sum(int(g.get("count", 1)) for g in config.get("instance_group", [])),
                    "max_batch_size": int(config.get("max_batch_size", 0)),
                    "max_queue_size": int(policy.get("max_queue_size", 0)),
                })
                settings = config.get("parameters", {}).get("settings", {}).get("string_value")
                if settings:
                    status.settings = JudgeStageSettings.model_validate_json(settings)
            status.models.append(model)
    try:
        status.constitutions = _constitutions(metrics_url)
    except OSError as exc:
        status.problems.append(f"metrics not readable at {metrics_url}: {exc}")
    return status
