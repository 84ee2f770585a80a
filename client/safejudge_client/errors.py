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
    """The server could not be reached or was not ready (UNAVAILABLE), also after every retry."""


class DeadlineExceeded(JudgeError):
    """The request did not finish within the client's timeout."""


class ProtocolError(JudgeError):
    """The server answered, but not with a valid VERDICT (missing output or bad Verdict JSON)."""


_BY_STATUS: dict[str, type[JudgeError]] = {
    "INVALID_ARGUMENT": InvalidRequest,
    "UNAVAILABLE": ServerUnavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
}


def status_name(exc: InferenceServerException) -> str | None:
    """The gRPC status name: tritonclient reports "StatusCode.UNAVAILABLE", this returns "UNAVAILABLE"."""
    status = exc.status()
    return status.removeprefix("StatusCode.") if status else None


def from_triton(exc: InferenceServerException, timeout_s: float | None = None) -> JudgeError:
    """The typed error for a tritonclient exception, keeping the server's message."""
    status = status_name(exc)
    error_type = _BY_STATUS.get(status or "", JudgeError)
    message = exc.message() or str(exc)
    if error_type is DeadlineExceeded and timeout_s is not None:
        message = f"no answer within the client timeout of {timeout_s:g} s ({message})"
    return error_type(message, status)
