"""gRPC client for safejudge: judge images against a named constitution on a safejudge (Triton) server.

    from safejudge_client import JudgeClient
    with JudgeClient("127.0.0.1:8001") as client:
        verdict = client.judge("photo.jpg", "os-bench")
"""

from safejudge_client.aio import AsyncJudgeClient
from safejudge_client.client import JudgeClient
from safejudge_client.errors import (
    AuthenticationError,
    DeadlineExceeded,
    InvalidRequest,
    JudgeError,
    ProtocolError,
    ServerUnavailable,
)
from safejudge_client.verdict import (
    SCHEMA_VERSION,
    DecidedBy,
    Explanation,
    FrameExplanation,
    Outcome,
    PreconditionEvidence,
    RuleExplanation,
    Strategy2View,
    Timing,
    Verdict,
    ViewKind,
    Violation,
)

__all__ = [
    "SCHEMA_VERSION",
    "AsyncJudgeClient",
    "AuthenticationError",
    "DeadlineExceeded",
    "DecidedBy",
    "Explanation",
    "FrameExplanation",
    "InvalidRequest",
    "JudgeClient",
    "JudgeError",
    "Outcome",
    "PreconditionEvidence",
    "RuleExplanation",
    "Strategy2View",
    "ProtocolError",
    "ServerUnavailable",
    "Timing",
    "Verdict",
    "ViewKind",
    "Violation",
]
