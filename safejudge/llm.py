"""Text-only LLM clients for offline constitution authoring (objectify rules, extract preconditions).

Two real clients behind one protocol: any OpenAI-compatible chat endpoint over HTTP (vLLM, llama.cpp
server, Ollama, a hosted API) and a local GGUF model run in-process by llama.cpp via `xllamacpp`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class TextLLM(Protocol):
    """Anything that answers a chat: the authoring loops need nothing else."""

    def complete(self, messages: Sequence[ChatMessage]) -> str: ...


class LLMError(RuntimeError):
    """The LLM could not produce an answer (unreachable, refused, failed)."""


class LLMNotConfigured(LLMError):
    """No usable LLM: missing endpoint, package or model file. The message says what to provide."""


class _AnswerMessage(BaseModel):
    content: str | None = None


class _Choice(BaseModel):
    message: _AnswerMessage


class ChatCompletion(BaseModel):
    """The part of an OpenAI chat-completion response we read (llama.cpp answers in the same shape)."""

    model_config = ConfigDict(extra="ignore")

    choices: list[_Choice]

    def text(self) -> str:
        if not self.choices or not self.choices[0].message.content:
            raise LLMError("the LLM returned no text (empty choices or content)")
        return self.choices[0].message.content


def _chat_text(payload: Any, source: str) -> str:
    try:
        return ChatCompletion.model_validate(payload).text()
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"]
        raise LLMError(f"{source} answered with something that is not a chat completion: {problem}") from exc


class OpenAICompatibleLLM:
    """POST <base_url>/chat/completions; the API key, if any, comes from the environment variable api_key_env."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 120.0,
        temperature: float = 0.0,
        max_tokens: int = 1024,
    ) -> None:
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise LLMNotConfigured(f"the OpenAI-compatible endpoint needs an http(s) base URL, got {base_url!r}")
        if not model:
            raise LLMNotConfigured("the OpenAI-compatible endpoint needs a model name")
        try:
            import httpx  # the build extra; `constitution lint` must work without it
        except ImportError as exc:
            raise LLMNotConfigured("an OpenAI-compatible endpoint needs httpx: pip install 'safejudge[build]'") from exc
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout_s = timeout_s
        api_key = os.environ.get(api_key_env)
        # One connection pool for the whole authoring loop (objectify makes several calls per rule).
        self._client = httpx.Client(
            timeout=timeout_s, headers={"Authorization": f"Bearer {api_key}"} if api_key else {}
        )
        self.temperature = temperature
        self.max_tokens = max_tokens

    def complete(self, messages: Sequence[ChatMessage]) -> str:
        import httpx

        body = {
            "model": self.model,
            "messages": [message.model_dump() for message in messages],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        try:
            response = self._client.post(self.url, json=body)
        except httpx.TimeoutException as exc:
            raise LLMError(f"{self.url} did not answer within {self.timeout_s:g} s") from exc
        except httpx.HTTPError as exc:
            raise LLMNotConfigured(f"cannot reach the LLM endpoint {self.url}: {exc}") from exc
        if response.status_code >= 400:
            raise LLMError(f"{self.url} answered HTTP {response.status_code}: {response.text[:200]}")
        try:
            payload = response.json()
        except ValueError as exc:
            raise LLMError(f"{self.url} answered with non-JSON: {response.text[:200]!r}") from exc
        return _chat_text(payload, self.url)


class LlamaCppLLM:
    """A local GGUF model run by llama.cpp in this process (the `xllamacpp` package, CPU wheel).

    The model loads once here; each complete() is one chat completion with the model's own chat template.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        context_tokens: int = 4096,
        max_tokens: int = 1024,
        threads: int = 1,
        temperature: float = 0.0,
        verbose: bool = False,
    ) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise LLMNotConfigured(f"GGUF model file not found: {path}")
        try:
            import xllamacpp
        except ImportError as exc:
            raise LLMNotConfigured(
                "running a GGUF model needs the xllamacpp package: pip install 'safejudge[build]'"
            ) from exc
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = context_tokens
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        if not verbose:
            params.verbosity = -1  # llama.cpp logs every load and request to stderr otherwise
        self.model_path = path
        self.max_tokens = max_tokens
        self.temperature = temperature
        try:
            self._server = xllamacpp.Server(params)
        except Exception as exc:  # the binding raises plain RuntimeError/ValueError on a bad model file
            raise LLMNotConfigured(f"llama.cpp cannot load {path}: {exc}") from exc

    def complete(self, messages: Sequence[ChatMessage]) -> str:
        request = {
            "messages": [message.model_dump() for message in messages],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        try:
            payload = self._server.handle_chat_completions(request)
        except ValueError as exc:
            raise LLMError(f"llama.cpp rejected the request: {exc}") from exc
        if isinstance(payload, dict) and "error" in payload:
            raise LLMError(f"llama.cpp failed: {payload['error']}")
        return _chat_text(payload, f"llama.cpp ({self.model_path.name})")


# openai:<base_url>:<model>. The base URL may carry a port and a path; the model name (which may itself
# contain ':', as in Ollama's "llama3:8b") is everything after the colon that ends the URL.
_OPENAI_SPEC = re.compile(r"^openai:(https?://[^/\s:]+(?::\d+)?(?:/[^\s:]*)?):(\S+)$")
LLM_SPEC_HELP = "openai:<base_url>:<model> (e.g. openai:http://127.0.0.1:8000/v1:qwen2.5-7b) or gguf:<path>"


def llm_from_spec(spec: str | None) -> TextLLM:
    """Build a client from a one-string spec, as the CLI and environment give it."""
    if not spec:
        raise LLMNotConfigured(f"no LLM configured: pass --llm {LLM_SPEC_HELP}, or set SAFEJUDGE_LLM")
    if spec.startswith("gguf:"):
        return LlamaCppLLM(spec.removeprefix("gguf:"))
    match = _OPENAI_SPEC.match(spec)
    if match:
        return OpenAICompatibleLLM(match.group(1), match.group(2))
    raise LLMNotConfigured(f"cannot read LLM spec {spec!r}: expected {LLM_SPEC_HELP}")
