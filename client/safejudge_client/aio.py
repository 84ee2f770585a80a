"""asyncio client with the same API as JudgeClient, over tritonclient.grpc.aio."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import tritonclient.grpc.aio as aiogrpcclient
from tritonclient.utils import InferenceServerException
from typing_extensions import Self

from safejudge_client.client import (
    ImageInput,
    Options,
    _Connection,
    build_inputs,
    chunks,
    in_chunk,
    max_batch_size,
    parse_verdicts,
    probe_failed,
)
from safejudge_client.errors import JudgeError, from_triton
from safejudge_client.verdict import Verdict

T = TypeVar("T")


class AsyncJudgeClient(_Connection):
    """Judge images on a safejudge server from asyncio code; same timeouts, retries and errors as
    JudgeClient. Use `async with` or `await close()`."""

    grpc_module = aiogrpcclient

    async def judge(self, image: ImageInput, constitution: str, options: Options = None) -> Verdict:
        (verdict,) = await self._judge_rows([image], constitution, options)
        return verdict

    async def judge_many(
        self, images: Sequence[ImageInput], constitution: str, options: Options = None, *,
        batch_size: int | None = None, concurrency: int = 4,
    ) -> list[Verdict]:
        """Verdicts in the order of `images`: several images per request (batch_size, default the model's
        max_batch_size), up to `concurrency` requests in flight; as JudgeClient.judge_many."""
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not images:
            return []
        size = batch_size or await self.max_batch_size()
        slots = asyncio.Semaphore(concurrency)

        async def judge_chunk(rows: range) -> list[Verdict]:
            async with slots:
                try:
                    return await self._judge_rows([images[i] for i in rows], constitution, options)
                except JudgeError as exc:
                    raise in_chunk(exc, rows) from exc

        answers = await asyncio.gather(*(judge_chunk(rows) for rows in chunks(len(images), size)))
        return [verdict for verdicts in answers for verdict in verdicts]

    async def max_batch_size(self) -> int:
        """The most images one request may hold (the model's max_batch_size); asked once."""
        if self._max_batch_size is None:
            config = await self._with_retries(lambda: self._client.get_model_config(
                self.model_name, as_json=True, client_timeout=self.timeout_s))
            self._max_batch_size = max_batch_size(config)
        return self._max_batch_size

    async def _judge_rows(self, images: Sequence[ImageInput], constitution: str, options: Options) -> list[Verdict]:
        inputs = build_inputs(images, constitution, options)
        return parse_verdicts(await self._with_retries(lambda: self._infer(inputs)), len(images))

    async def is_live(self) -> bool:
        return await self._probe(lambda: self._client.is_server_live(client_timeout=self.timeout_s))

    async def is_ready(self) -> bool:
        async def server_and_model_ready() -> bool:
            return await self._client.is_server_ready(client_timeout=self.timeout_s) and (
                await self._client.is_model_ready(self.model_name, client_timeout=self.timeout_s)
            )

        return await self._probe(server_and_model_ready)

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _with_retries(self, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await call()
            except InferenceServerException as exc:
                error = from_triton(exc, self.timeout_s)
                if not self.retry.should_retry(error, attempt):
                    raise error from exc
            await asyncio.sleep(self.retry.delay(attempt))
            attempt += 1

    @staticmethod
    async def _probe(call: Callable[[], Awaitable[bool]]) -> bool:
        try:
            return bool(await call())
        except InferenceServerException as exc:
            error = probe_failed(exc)
            if error is None:
                return False
            raise error from exc
