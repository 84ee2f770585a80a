"""Blocking gRPC client for the `safety_judge` model of a safejudge (Triton) server.

Wire format: inputs IMAGE (BYTES [N,1], the encoded image files), CONSTITUTION (BYTES [N,1], a constitution
name per image), OPTIONS (BYTES [N,1], JSON, only when given); output VERDICT (BYTES [N,1], Verdict JSON per
image, in order). N is 1 for `judge` and up to the model's max_batch_size for `judge_many`; a request whose
image (row) is rejected fails whole, its message naming the row. The request helpers here are shared with the
asyncio client (aio.py).
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image
from pydantic import BaseModel, ValidationError
from tritonclient.utils import InferenceServerException
from typing_extensions import Self

from safejudge_client.errors import DeadlineExceeded, JudgeError, ProtocolError, ServerUnavailable, from_triton
from safejudge_client.verdict import Verdict

ImageInput = str | os.PathLike | bytes | Image.Image
Options = Mapping[str, Any] | BaseModel | None

DEFAULT_URL = "127.0.0.1:8001"
DEFAULT_MODEL = "safety_judge"
DEFAULT_RETRIES = 6  # backoffs 0.2 + 0.4 + ... + 5 = 11.2 s: enough to ride out a stage restart (~10 s)
MAX_BACKOFF_S = 5.0
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}

T = TypeVar("T")


def encode_image(image: ImageInput) -> bytes:
    """The bytes to send as IMAGE: a file's bytes unchanged, raw bytes unchanged, a PIL image as PNG."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, Image.Image):
        if image.mode not in _PNG_MODES:  # e.g. CMYK cannot be stored as PNG
            image = image.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        return path.read_bytes()
    raise TypeError(f"image must be a path, bytes or a PIL.Image, not {type(image).__name__}")


def encode_options(options: Options) -> bytes | None:
    """OPTIONS JSON from a dict or a pydantic model (e.g. safejudge's JudgeOptions); None sends nothing."""
    if options is None:
        return None
    if isinstance(options, BaseModel):
        return options.model_dump_json(exclude_unset=True).encode()
    if isinstance(options, Mapping):
        return json.dumps(dict(options)).encode()
    raise TypeError(f"options must be a dict or a pydantic model, not {type(options).__name__}")


def _bytes_input(name: str, rows: Sequence[bytes]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [len(rows), 1], "BYTES")
    array = np.empty((len(rows), 1), dtype=np.object_)  # element by element: numpy would split equal bytes
    for row, data in enumerate(rows):
        array[row, 0] = data
    tensor.set_data_from_numpy(array)
    return tensor


def build_inputs(images: Sequence[ImageInput], constitution: str, options: Options) -> list[grpcclient.InferInput]:
    """One request judging `images` (its rows) under one constitution with the same options."""
    if not isinstance(constitution, str) or not constitution.strip():
        raise ValueError(f"constitution must be a non-empty name, got {constitution!r}")
    if not images:
        raise ValueError("a request needs at least one image")
    rows = len(images)
    inputs = [_bytes_input("IMAGE", [encode_image(image) for image in images]),
              _bytes_input("CONSTITUTION", [constitution.encode()] * rows)]
    options_json = encode_options(options)
    if options_json is not None:
        inputs.append(_bytes_input("OPTIONS", [options_json] * rows))
    return inputs


def parse_verdicts(result: grpcclient.InferResult, rows: int) -> list[Verdict]:
    """The verdict of each row, in order; ProtocolError unless there is exactly one per row."""
    array = result.as_numpy("VERDICT")
    if array is None or array.size != rows:
        found = "none" if array is None else f"{array.size}"
        raise ProtocolError(f"the response has {found} VERDICT values for {rows} image(s)")
    try:
        return [Verdict.model_validate_json(raw) for raw in array.reshape(-1)]
    except ValidationError as exc:
        raise ProtocolError(f"VERDICT is not a valid Verdict: {exc}") from exc


def chunks(count: int, size: int) -> list[range]:
    """The rows of each request judge_many sends: consecutive runs of at most `size` of `count` images."""
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def in_chunk(error: JudgeError, rows: range) -> JudgeError:
    """The error of one judge_many request, saying which images it held (the server names the row)."""
    where = f"images[{rows.start}]" if len(rows) == 1 else f"images[{rows.start}:{rows.stop}]"
    return type(error)(f"{where}: {error.message}", error.status)


def max_batch_size(config: Mapping[str, Any]) -> int:
    """The most rows one request may have, from the model's config JSON (0: the model does not batch)."""
    return max(1, int(config.get("config", config).get("max_batch_size", 0)))


# gRPC's own name-resolver schemes (https://github.com/grpc/grpc/blob/master/doc/naming.md): `dns:///name:port`
# resolves every address behind a name (a headless Service), `ipv4:a:p,b:q` lists addresses.
GRPC_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")


def check_endpoint(url: str, timeout_s: float | None) -> None:
    if "://" in url and not url.startswith(GRPC_TARGET_SCHEMES):
        raise ValueError(f"url must be host:port or a gRPC target such as dns:///host:port, got {url!r}")
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")


def check_tls_files(root_certificates: str | None, private_key: str | None, certificate_chain: str | None) -> None:
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("private_key and certificate_chain (a client certificate) go together")
    for path in (root_certificates, private_key, certificate_chain):
        # tritonclient would fail on a missing file half-way through constructing its client.
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"TLS file not found: {path}")


def channel_options(channel_args: Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]] | None:
    """The gRPC channel options for tritonclient, with `channel_args` added (a key given there wins).

    tritonclient uses its `channel_args` *instead of* its defaults, which lift gRPC's 4 MiB message limit
    and set keepalive; passed on as they are, ("grpc.lb_policy_name", "round_robin") alone would make
    every image over 4 MiB fail. None: tritonclient's defaults unchanged."""
    if channel_args is None:
        return None
    keepalive = grpcclient.KeepAliveOptions()
    options: dict[str, Any] = {
        "grpc.max_send_message_length": grpcclient.MAX_GRPC_MESSAGE_SIZE,
        "grpc.max_receive_message_length": grpcclient.MAX_GRPC_MESSAGE_SIZE,
        "grpc.keepalive_time_ms": keepalive.keepalive_time_ms,
        "grpc.keepalive_timeout_ms": keepalive.keepalive_timeout_ms,
        "grpc.keepalive_permit_without_calls": keepalive.keepalive_permit_without_calls,
        "grpc.http2.max_pings_without_data": keepalive.http2_max_pings_without_data,
    }
    for pair in channel_args:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
            raise TypeError(f"channel_args must be (name, value) pairs, got {pair!r}")
        options[pair[0]] = pair[1]
    return list(options.items())


class BearerToken(grpcclient.InferenceServerClientPlugin):
    """Adds the token to every call: `authorization` for proxies, and the header Triton's
    --grpc-restricted-protocol=<protocols>:authorization=Bearer <token> checks (triton-grpc-protocol-<key>)."""

    def __init__(self, token: str):
        # gRPC metadata values are printable ASCII; a token read from a file may end in a newline.
        if not re.fullmatch(r"[\x21-\x7e]+", token):
            raise ValueError("token must be non-empty printable ASCII without spaces")
        self._value = f"Bearer {token}"

    def __call__(self, request: grpcclient.Request) -> None:
        request.headers["authorization"] = self._value
        request.headers["triton-grpc-protocol-authorization"] = self._value


@dataclass(frozen=True)
class RetryPolicy:
    """Retry only when the server is unavailable (not started yet, restarting, model or stage reloading);
    a rejected request (INVALID_ARGUMENT, a missing token) or a deadline is never retried."""

    retries: int
    backoff_s: float

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0:
            raise ValueError("retries and backoff_s must be >= 0")

    def should_retry(self, error: JudgeError, attempt: int) -> bool:
        return isinstance(error, ServerUnavailable) and attempt < self.retries

    def delay(self, attempt: int) -> float:
        return min(self.backoff_s * 2**attempt, MAX_BACKOFF_S)


def probe_failed(exc: InferenceServerException) -> JudgeError | None:
    """For is_ready/is_live: None when the server simply is not there (answer False), else the error."""
    error = from_triton(exc)
    return None if isinstance(error, (ServerUnavailable, DeadlineExceeded)) else error


class _Connection:
    """What both clients share: endpoint, deadline, retry policy and the tritonclient connection
    (`grpc_module` is tritonclient.grpc or tritonclient.grpc.aio)."""

    grpc_module: Any = grpcclient

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout_s: float | None = 30.0,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = 0.2,
        token: str | None = None,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
        model_name: str = DEFAULT_MODEL,
        channel_args: Sequence[tuple[str, Any]] | None = None,
    ):
        check_endpoint(url, timeout_s)
        check_tls_files(root_certificates, private_key, certificate_chain)
        self.url = url
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.retry = RetryPolicy(retries, backoff_s)
        self._max_batch_size: int | None = None
        plugin = BearerToken(token) if token is not None else None
        self._client = self.grpc_module.InferenceServerClient(
            url,
            ssl=ssl,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            channel_args=channel_options(channel_args),
        )
        if plugin is not None:
            self._client.register_plugin(plugin)

    def _infer(self, inputs: list[grpcclient.InferInput]) -> Any:
        """The infer call (a coroutine for the asyncio client). `timeout` (microseconds) is Triton's request
        timeout: a server whose queue policy rejects expired requests drops work its client gave up on."""
        server_timeout_us = None if self.timeout_s is None else round(self.timeout_s * 1e6)
        return self._client.infer(self.model_name, inputs, client_timeout=self.timeout_s, timeout=server_timeout_us)


class JudgeClient(_Connection):
    """Judge images on a safejudge server over gRPC.

    timeout_s bounds each attempt (gRPC deadline and Triton's request timeout; None: no deadline). Up to
    `retries` more attempts follow an answer that the server is unavailable or restarting a model, after
    backoff_s, 2*backoff_s, ... (at most MAX_BACKOFF_S) seconds. A token is sent with every call.
    channel_args: extra gRPC channel options, e.g. [("grpc.lb_policy_name", "round_robin")] with
    url="dns:///safejudge-headless:8001" to spread requests over every replica (docs/deploy.md).
    Thread-safe; use as a context manager or call close().
    """

    def judge(self, image: ImageInput, constitution: str, options: Options = None) -> Verdict:
        """The verdict for one image (path, bytes of an image file, or PIL image) under a named constitution."""
        (verdict,) = self._judge_rows([image], constitution, options)
        return verdict

    def judge_many(
        self, images: Sequence[ImageInput], constitution: str, options: Options = None, *,
        batch_size: int | None = None, concurrency: int = 4,
    ) -> list[Verdict]:
        """Verdicts in the order of `images`: several images per request (batch_size, default the model's
        max_batch_size, read once from the server), up to `concurrency` requests in flight. The first failed
        request raises its error, naming its images (and the server the row that failed it)."""
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not images:
            return []
        size = batch_size or self.max_batch_size()

        def judge_chunk(rows: range) -> list[Verdict]:
            try:
                return self._judge_rows([images[i] for i in rows], constitution, options)
            except JudgeError as exc:
                raise in_chunk(exc, rows) from exc

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return [v for verdicts in pool.map(judge_chunk, chunks(len(images), size)) for v in verdicts]

    def max_batch_size(self) -> int:
        """The most images one request may hold (the model's max_batch_size); asked once."""
        if self._max_batch_size is None:
            config = self._with_retries(lambda: self._client.get_model_config(
                self.model_name, as_json=True, client_timeout=self.timeout_s))
            self._max_batch_size = max_batch_size(config)
        return self._max_batch_size

    def _judge_rows(self, images: Sequence[ImageInput], constitution: str, options: Options) -> list[Verdict]:
        inputs = build_inputs(images, constitution, options)
        return parse_verdicts(self._with_retries(lambda: self._infer(inputs)), len(images))

    def is_live(self) -> bool:
        return self._probe(lambda: self._client.is_server_live(client_timeout=self.timeout_s))

    def is_ready(self) -> bool:
        """The server is ready and so is the `safety_judge` model; False when it cannot be reached."""
        return self._probe(
            lambda: (
                self._client.is_server_ready(client_timeout=self.timeout_s)
                and self._client.is_model_ready(self.model_name, client_timeout=self.timeout_s)
            )
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _with_retries(self, call: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return call()
            except InferenceServerException as exc:
                error = from_triton(exc, self.timeout_s)
                if not self.retry.should_retry(error, attempt):
                    raise error from exc
            time.sleep(self.retry.delay(attempt))
            attempt += 1

    @staticmethod
    def _probe(call: Callable[[], bool]) -> bool:
        try:
            return bool(call())
        except InferenceServerException as exc:
            error = probe_failed(exc)
            if error is None:
                return False
            raise error from exc
