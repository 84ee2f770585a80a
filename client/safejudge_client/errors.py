"""Typed errors of the safejudge client; each carries the server's message and the gRPC status."""

from __future__ import annotations

from tritonclient.utils import InferenceServerException


class JudgeError(Exception):
    """Any failed judge request. `status` is the gRPC status name (e.g. "INTERNAL"), or None."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status


class InvalidRequest(JudgeError):
    """The server rejected the request (INVALID_ARGUMENT): bad image, unknown constitution, bad options.
    Retrying the same request cannot succeed."""


class ServerUnavailable(JudgeError):
    """The server could not be reached, was not ready or was restarting a model or one of its stages
    (also after every retry)."""


class AuthenticationError(JudgeError):
    """The server requires a valid token and the request had none or a wrong one. Never retried."""


class DeadlineExceeded(JudgeError):
    """The request did not finish within the client's timeout."""


class ProtocolError(JudgeError):
    """The server answered, but not with a valid VERDICT (missing output or bad Verdict JSON)."""


_BY_STATUS: dict[str, type[JudgeError]] = {
    "INVALID_ARGUMENT": InvalidRequest,
    "UNAVAILABLE": ServerUnavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
}

# Answers whose status alone would classify them wrongly, recognised by Triton 2.51's messages.
_BY_MESSAGE: list[tuple[str, str, type[JudgeError]]] = [
    # --grpc-restricted-protocol: a missing or wrong header is UNAVAILABLE, but retrying cannot help.
    ("UNAVAILABLE", "This protocol is restricted", AuthenticationError),
    # The model is being reloaded (e.g. after a crash): "Request for unknown model: 'm' has no available versions".
    ("NOT_FOUND", "has no available versions", ServerUnavailable),
    # A stage's process died and is being restarted: "Stub process 'm_0_0' is not healthy".
    ("INTERNAL", "is not healthy", ServerUnavailable),
]


def status_name(exc: InferenceServerException) -> str | None:
    """The gRPC status name: tritonclient reports "StatusCode.UNAVAILABLE", this returns "UNAVAILABLE"."""
    status = exc.status()
    return status.removeprefix("StatusCode.") if status else None


def _error_type(status: str | None, message: str) -> type[JudgeError]:
    for known_status, text, error_type in _BY_MESSAGE:
        if status == known_status and text in message:
            return error_type
    return _BY_STATUS.get(status or "", JudgeError)


def from_triton(exc: InferenceServerException, timeout_s: float | None = None) -> JudgeError:
    """The typed error for a tritonclient exception, keeping the server's message."""
    status = status_name(exc)
    message = exc.message() or str(exc)
    error_type = _error_type(status, message)
    if error_type is DeadlineExceeded and timeout_s is not None:
        message = f"no answer within the client timeout of {timeout_s:g} s ({message})"
    elif error_type is AuthenticationError:
        message = f"the server requires a valid token: {message}"
    return error_type(message, status)
