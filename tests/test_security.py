"""TLS, mutual TLS and bearer tokens on a real served pipeline (demo models: they start in seconds).

Every test runs against server-only TLS (the deployed default) and mutual TLS. Certificates are made in the
test (trustme: a throwaway CA, a server and a client certificate).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from safejudge.backends.registry import coherent_spec
from safejudge.server import ADMIN_HEADER, ServeSettings, TritonServer
from safejudge_client import AuthenticationError, JudgeClient, ServerUnavailable
from tests.server_fixtures import CONSTITUTIONS

trustme = pytest.importorskip("trustme")
pytestmark = pytest.mark.integration

TOKEN = "s3cret-token_for.tests/only+1="


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("judge-client@example.org")
    files = {"ca": directory / "ca.pem", "token": directory / "token"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    for name, issued in (("server", server_cert), ("client", client_cert)):
        files[f"{name}_key"] = directory / f"{name}.key"
        files[f"{name}_cert"] = directory / f"{name}.pem"
        issued.private_key_pem.write_to_path(str(files[f"{name}_key"]))
        issued.cert_chain_pems[0].write_to_path(str(files[f"{name}_cert"]))
    files["token"].write_text(TOKEN + "\n")
    return files


@pytest.fixture(scope="module", params=["server-tls", "mutual-tls"])
def server(request, pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    constitutions = tmp_path_factory.mktemp("constitutions")
    (constitutions / "toy-world.yaml").write_text((CONSTITUTIONS / "toy-world.yaml").read_text())
    settings = ServeSettings(
        models=coherent_spec("demo:toy")[0],
        constitutions=constitutions,
        cache_dir=tmp_path_factory.mktemp("compiled"),
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        tls_ca=pki["ca"] if request.param == "mutual-tls" else None,
        auth_token_file=pki["token"],
    )
    with settings.server() as running:
        yield running


def mutual(server: TritonServer) -> bool:
    return server.tls.ca is not None


def client(server: TritonServer, pki, token: str | None = TOKEN, client_cert: bool | None = None,
           **options) -> JudgeClient:
    """A JudgeClient over TLS; with a client certificate where the server asks for one (unless told)."""
    client_cert = mutual(server) if client_cert is None else client_cert
    tls = {"private_key": str(pki["client_key"]), "certificate_chain": str(pki["client_cert"])} if client_cert else {}
    return JudgeClient(
        server.url, ssl=True, root_certificates=str(pki["ca"]), token=token, timeout_s=60, **tls, **options
    )


def np_image():
    from PIL import Image

    return Image.fromarray(np.full((96, 96, 3), 200, dtype=np.uint8), "RGB")


def test_a_client_with_certificate_and_token_is_judged(server, pki):
    with client(server, pki) as judge:
        assert judge.is_ready()
        verdict = judge.judge(np_image(), "toy-world")
    assert verdict.constitution == "toy-world"


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_without_the_right_token_inference_is_refused(server, pki, token):
    with client(server, pki, token=token, retries=0) as judge:
        assert judge.is_ready(), "health stays open for probes"
        with pytest.raises(AuthenticationError, match="requires a valid token"):
            judge.judge(np_image(), "toy-world")


def test_without_a_client_certificate_the_tls_handshake_fails(server, pki):
    if not mutual(server):
        pytest.skip("server-only TLS asks for no client certificate")
    with client(server, pki, client_cert=False, retries=0) as judge:
        with pytest.raises(ServerUnavailable):
            judge.judge(np_image(), "toy-world")


def test_plaintext_grpc_is_not_served(server):
    with grpcclient.InferenceServerClient(server.url) as plain:
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=5)


def test_http_needs_the_token_for_inference_but_not_for_probes(server):
    with httpclient.InferenceServerClient(server.http_url) as http:
        assert http.is_server_ready() and http.is_model_ready("safety_judge")
        with pytest.raises(InferenceServerException, match="restricted"):
            http.get_model_config("safety_judge")
        assert http.get_model_config("safety_judge", headers={"Authorization": f"Bearer {TOKEN}"})["name"] == "safety_judge"


def test_only_the_launcher_may_load_or_unload_models(server):
    with httpclient.InferenceServerClient(server.http_url) as http:
        for headers in (None, {"Authorization": f"Bearer {TOKEN}"}, {ADMIN_HEADER: "guessed"}):
            with pytest.raises(InferenceServerException, match="restricted"):
                http.unload_model("safety_judge", headers=headers)
        assert http.is_server_ready()


def test_status_reads_the_model_configs_with_the_token(server, pki):
    from safejudge.status import server_status

    tls = {"ssl": True, "root_certificates": str(pki["ca"]), "private_key": str(pki["client_key"]),
           "certificate_chain": str(pki["client_cert"])}
    found = server_status(server.url, server.metrics_url, TOKEN, **tls)
    assert found.ready and found.settings is not None and not found.problems, found
    refused = server_status(server.url, server.metrics_url, None, **tls)
    assert refused.settings is None and any("restricted" in p for p in refused.problems)


def plain_grpc_infer(server: TritonServer, pki, metadata: tuple = (), call_token: str | None = None):
    """One safety_judge request from a plain gRPC client (generated KServe stubs, no tritonclient wrapper), as a
    service in another language would send it: a token as standard gRPC call credentials over TLS."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    from tritonclient.utils import serialize_byte_tensor

    from safejudge_client.client import encode_image

    keys = {"private_key": pki["client_key"].read_bytes(), "certificate_chain": pki["client_cert"].read_bytes()}
    channel_credentials = grpc.ssl_channel_credentials(pki["ca"].read_bytes(), **(keys if mutual(server) else {}))
    if call_token is not None:
        channel_credentials = grpc.composite_channel_credentials(
            channel_credentials, grpc.access_token_call_credentials(call_token))
    request = service_pb2.ModelInferRequest(model_name="safety_judge")
    for name, value in (("IMAGE", encode_image(np_image())), ("CONSTITUTION", b"toy-world")):
        tensor = request.inputs.add(name=name, datatype="BYTES")
        tensor.shape.extend([1, 1])
        request.raw_input_contents.append(serialize_byte_tensor(np.array([[value]], dtype=object)).item())
    with grpc.secure_channel(server.url, channel_credentials) as channel:
        return service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=metadata, timeout=60)


def test_standard_grpc_call_credentials_are_accepted(server, pki):
    response = plain_grpc_infer(server, pki, call_token=TOKEN)
    assert response.outputs[0].name == "VERDICT" and b"toy-world" in response.raw_output_contents[0]
    # The same header written by hand (what service meshes and other languages' stubs send), and Triton's own.
    for key in ("authorization", "triton-grpc-protocol-authorization"):
        assert plain_grpc_infer(server, pki, metadata=((key, f"Bearer {TOKEN}"),)).outputs


@pytest.mark.parametrize("call_token, metadata", [
    (None, ()),
    ("wrong-token", ()),
    (None, (("authorization", f"Basic {TOKEN}"),)),
    (None, (("authorization", f"Bearer {TOKEN}x"),)),
])
def test_plain_grpc_without_the_token_is_refused(server, pki, call_token, metadata):
    import grpc

    with pytest.raises(grpc.RpcError) as refused:
        plain_grpc_infer(server, pki, metadata=metadata, call_token=call_token)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "This protocol is restricted" in refused.value.details()


def test_a_forwarded_token_does_not_open_the_other_protocols(server, pki):
    """Only inference is checked by the stage: model-config and statistics stay behind Triton's own check,
    which takes Triton's header."""
    with client(server, pki) as judge:
        assert judge.max_batch_size() == 8, "JudgeClient sends both headers"
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    keys = {"private_key": pki["client_key"].read_bytes(), "certificate_chain": pki["client_cert"].read_bytes()}
    credentials = grpc.ssl_channel_credentials(pki["ca"].read_bytes(), **(keys if mutual(server) else {}))
    with grpc.secure_channel(server.url, credentials) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError, match="restricted"):
            stub.ModelConfig(service_pb2.ModelConfigRequest(name="safety_judge"),
                             metadata=(("authorization", "Bearer guessed"),), timeout=10)
