"""TensorRT-LLM as the CLUE MLLM: the GPU production path.

Target: TensorRT-LLM 1.2.1, as shipped in NGC's `nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3`
(Triton tutorial "Deploying Hugging Face Qwen2.5-VL Model in Triton"), through the LLM API with the PyTorch
backend: the Hugging Face checkpoint loads as it is, no engine build. Checkpoints: Qwen2-VL and Qwen2.5-VL,
both "KV Cache Reuse: Yes" in TensorRT-LLM's multimodal feature support matrix
(docs/source/models/supported-models.md).

How the two MLLM calls map onto the LLM API:
- score: one request per question, `SamplingParams(max_tokens=1, top_k=1, return_generation_logits=True)`
  (`top_k=1` is greedy: `SamplingParams._greedy_decoding`). M comes from the first generated token's logits
  row with every Yes/No spelling (safejudge.decision). `output_log_probs` would only carry the sampled token,
  hence logits; and since a misaligned logits row would corrupt every score silently (tensorrtllm_backend#530),
  each row is checked to peak at the token the engine emitted.
- prefix reuse: every question about one image renders to the same system turn, image and opening words
  (safejudge.prompts.chat_messages). With `KvCacheConfig(enable_block_reuse=True)` the full KV blocks of that
  prefix are shared. Images are keyed by a content hash (`LLM.generate_async` wraps the input processor in
  `create_input_processor_with_hash` whenever a prompt carries `multi_modal_data`; PR #5444), so different
  images never share blocks. A block becomes reusable only after the context phase that filled it, so the
  first question of an image runs alone and the others follow as one in-flight batch (`warm_prefix`).
- reason: two greedy turns per question, each turn batched across questions.

Nothing here imports tensorrt_llm, torch or transformers at import time: CPU machines import this module
(tests, the backend registry) and only `TRTLLMVisionLanguageModel.load` needs the GPU stack.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from safejudge.decision import yes_no_token_ids, yes_probability
from safejudge.fingerprint import hf_fingerprint
from safejudge.images import conform
from safejudge.prompts import chat_messages, reasoning_turns, yes_no_question

TRTLLM_VERSION = "1.2.1"
TRITON_CONTAINER = "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"

# config.json model_type values whose TensorRT-LLM PyTorch model supports images and KV block reuse.
SUPPORTED_MODEL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl"})
# Qwen2(.5)-VL cut images into 14-pixel patches and merge 2x2 patches into one LLM token.
PIXELS_PER_VISUAL_TOKEN = 28 * 28
# TensorRT-LLM's Qwen2-VL input processor runs transformers' Qwen2VLImageProcessor, whose smart_resize
# refuses a long/short side ratio above 200. Padding to half of that leaves room for the rounding of the
# scale-down to max_image_pixels that follows: at the smallest budget (784 pixels) a 100:1 image becomes
# 280x2.8, floored to 280x2, which is 140:1.
MAX_ASPECT = 100
# System turn, one question and the chat markup, with room to spare.
TEXT_TOKEN_ALLOWANCE = 512
# A logits row may be cast (bf16 -> fp32) after the sampler read it: allow that much below the maximum.
GREEDY_TOLERANCE = 1e-3

SCORE_SAMPLING: dict[str, Any] = {"max_tokens": 1, "top_k": 1, "return_generation_logits": True}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def reason_sampling(max_new_tokens: int) -> dict[str, Any]:
    """Greedy, bounded generation for the two reasoning turns."""
    return {"max_tokens": max_new_tokens, "top_k": 1}


class TRTLLMSettings(BaseModel):
    """How to start the TensorRT-LLM engine; validated before any GPU work starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="checkpoint directory or Hugging Face hub id")
    max_new_tokens: int = Field(256, ge=1, le=4096, description="tokens per reasoning turn")
    max_batch_size: int = Field(64, ge=1, description="requests in flight at once")
    max_num_tokens: int = Field(8192, ge=1, description="tokens one engine step may process")
    max_seq_len: int = Field(4096, ge=1)
    max_image_pixels: int = Field(
        1280 * PIXELS_PER_VISUAL_TOKEN,
        ge=PIXELS_PER_VISUAL_TOKEN,
        description="larger images are scaled down to this many pixels (Qwen2-VL's recommended 1280 tokens)",
    )
    free_gpu_memory_fraction: float = Field(0.6, gt=0.0, lt=1.0, description="share of free GPU memory for KV")
    enable_block_reuse: bool = True
    warm_prefix: bool = Field(True, description="run an image's first question alone so the rest reuse its KV")
    tensor_parallel_size: int = Field(1, ge=1)
    dtype: Literal["auto", "bfloat16", "float16"] = "auto"

    @field_validator("model")
    @classmethod
    def _directory_or_hub_id(cls, model: str) -> str:
        directory = Path(model).expanduser()
        if directory.is_dir():
            return str(directory.resolve())  # the engine's worker processes may not share this working directory
        if _HUB_ID.match(model):
            return model
        raise ValueError(
            f"{model!r} is neither an existing checkpoint directory nor a hub id like 'Qwen/Qwen2-VL-7B-Instruct'"
        )

    @model_validator(mode="after")
    def _budgets_fit(self) -> TRTLLMSettings:
        prompt = self.max_prompt_tokens
        if self.max_num_tokens < prompt:
            raise ValueError(
                f"max_num_tokens={self.max_num_tokens} cannot hold one prompt of up to {prompt} tokens "
                f"(max_image_pixels/{PIXELS_PER_VISUAL_TOKEN} image tokens + {TEXT_TOKEN_ALLOWANCE} text); "
                "raise max_num_tokens or lower max_image_pixels"
            )
        # The summary turn holds the prompt, the first turn's answer and its own answer.
        needed = prompt + 2 * self.max_new_tokens
        if self.max_seq_len < needed:
            raise ValueError(
                f"max_seq_len={self.max_seq_len} is shorter than a reasoning exchange of up to {needed} tokens "
                f"(prompt {prompt} + 2 x max_new_tokens {self.max_new_tokens}); raise max_seq_len"
            )
        return self

    @classmethod
    def from_target(cls, target: str) -> TRTLLMSettings:
        """Settings from the part of a `trtllm:` model spec after the scheme: the model, then optional
        query-style overrides, e.g. `/models/Qwen2-VL-7B-Instruct?max_new_tokens=128&warm_prefix=false`."""
        model, _, query = target.partition("?")
        try:
            options = dict(parse_qsl(query, strict_parsing=bool(query)))
        except ValueError:
            raise ValueError(f"trtllm options {query!r} must be key=value pairs joined by '&'") from None
        return cls.model_validate({"model": model, **options})

    @property
    def max_prompt_tokens(self) -> int:
        return self.max_image_pixels // PIXELS_PER_VISUAL_TOKEN + TEXT_TOKEN_ALLOWANCE

    def llm_arguments(self) -> dict[str, Any]:
        """Keyword arguments of `tensorrt_llm.LLM` (1.2.1 LLM API reference), all but `kv_cache_config`."""
        return {
            "model": self.model,
            "backend": "pytorch",
            "tensor_parallel_size": self.tensor_parallel_size,
            "dtype": self.dtype,
            "max_batch_size": self.max_batch_size,
            "max_num_tokens": self.max_num_tokens,
            "max_seq_len": self.max_seq_len,
            # Needed for `return_generation_logits` (tests/unittest/llmapi/test_llm.py builds LLM this way).
            "gather_generation_logits": True,
            "trust_remote_code": False,
        }

    def kv_cache_arguments(self) -> dict[str, Any]:
        """Keyword arguments of `tensorrt_llm.llmapi.KvCacheConfig`."""
        return {
            "enable_block_reuse": self.enable_block_reuse,
            "free_gpu_memory_fraction": self.free_gpu_memory_fraction,
        }


class CheckpointReport(BaseModel):
    """What a checkpoint directory holds, and every reason it cannot serve as the TensorRT-LLM MLLM."""

    path: str
    model_type: str | None = None
    architectures: list[str] = []
    weight_files: list[str] = []
    yes_token_ids: list[int] = []
    no_token_ids: list[int] = []
    problems: list[str] = []

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_json(path: Path, problems: list[str]) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        problems.append(f"{path.name} is missing")
    except (OSError, json.JSONDecodeError) as exc:
        problems.append(f"{path.name} cannot be read: {exc}")
    return None


def _has_chat_template(directory: Path, tokenizer_config: dict | None) -> bool:
    if (directory / "chat_template.json").is_file() or (directory / "chat_template.jinja").is_file():
        return True
    return bool(tokenizer_config and tokenizer_config.get("chat_template"))


def inspect_checkpoint(directory: str | Path) -> CheckpointReport:
    """Check a Hugging Face checkpoint directory without loading weights or touching a GPU.

    Looks for what the TensorRT-LLM PyTorch backend and this backend need: a supported model_type, all
    weight shards, a fast tokenizer with single-token Yes/No, a chat template and an image processor.
    """
    directory = Path(directory).expanduser()
    report = CheckpointReport(path=str(directory))
    problems = report.problems
    if not directory.is_dir():
        problems.append(f"{directory} is not a directory")
        return report

    config = _read_json(directory / "config.json", problems)
    if config is not None:
        report.model_type = config.get("model_type")
        report.architectures = list(config.get("architectures") or [])
        if report.model_type not in SUPPORTED_MODEL_TYPES:
            problems.append(
                f"model_type {report.model_type!r} is not supported; use one of {sorted(SUPPORTED_MODEL_TYPES)}"
            )

    report.weight_files = sorted(p.name for p in directory.glob("*.safetensors"))
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        index = _read_json(index_path, problems) or {}
        missing = sorted(set(index.get("weight_map", {}).values()) - set(report.weight_files))
        if missing:
            problems.append(f"weight shards named in {index_path.name} are missing: {', '.join(missing)}")
    elif not report.weight_files:
        problems.append("no *.safetensors weights")

    tokenizer_config = _read_json(directory / "tokenizer_config.json", problems)
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            vocab = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab()
            report.yes_token_ids, report.no_token_ids = yes_no_token_ids(vocab)
        except Exception as exc:  # a bad file raises tokenizers' own Exception; no Yes/No raises ValueError
            problems.append(f"tokenizer.json: {exc}")
    else:
        problems.append("tokenizer.json is missing (a fast tokenizer is needed)")

    if not _has_chat_template(directory, tokenizer_config):
        problems.append("no chat template (chat_template.json, chat_template.jinja or tokenizer_config.json)")
    if not any((directory / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        problems.append("no image processor configuration (preprocessor_config.json or processor_config.json)")
    return report


def fit_pixel_budget(image: Image.Image, max_pixels: int) -> Image.Image:
    """The image padded to MAX_ASPECT (safejudge.images.conform) and scaled down (aspect kept) to at most
    max_pixels; images that fit are returned as they are.

    The Qwen2-VL processor would otherwise turn a 12-megapixel photo into about 16k image tokens, past
    any sensible max_num_tokens. It scales small images up itself.
    """
    image = conform(image, max_aspect=MAX_ASPECT)
    width, height = image.size
    if width * height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (width * height))
    size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def _as_array(logits: Any) -> np.ndarray:
    if hasattr(logits, "detach"):  # a torch tensor, possibly bf16 on the GPU
        logits = logits.detach().float().cpu().numpy()
    return np.asarray(logits, dtype=np.float32)


def first_token_logits(output: Any) -> np.ndarray:
    """The logits row of the first generated token of a `RequestOutput`, checked against the emitted token.

    `CompletionOutput.generation_logits` is [tokens, vocab] (or [beams, tokens, vocab]); the first row of
    the first beam is the answer. The emitted token must be the row's maximum: greedy decoding picks it,
    so anything else means the row belongs to another position.
    """
    completion = output.outputs[0]
    if completion.generation_logits is None:
        raise RuntimeError(
            "TensorRT-LLM returned no generation logits: the LLM must be built with "
            "gather_generation_logits=True and the request must set return_generation_logits=True"
        )
    logits = _as_array(completion.generation_logits)
    row = logits.reshape(-1, logits.shape[-1])[0]
    token = int(completion.token_ids[0])
    peak = float(row.max())
    if not 0 <= token < row.size or row[token] < peak - GREEDY_TOLERANCE * max(1.0, abs(peak)):
        emitted = float(row[token]) if 0 <= token < row.size else float("nan")
        raise RuntimeError(
            f"the generation logits do not match the emitted token {token} (its logit {emitted:.4f}, "
            f"row maximum {peak:.4f} at {int(row.argmax())}): the logits row is misaligned "
            "(see tensorrtllm_backend#530), so Yes/No scores from it would be wrong"
        )
    return row


class TRTLLMVisionLanguageModel:
    """The MLLM protocol (safejudge/backends/base.py) on a `tensorrt_llm.LLM` with a Qwen2(.5)-VL checkpoint.

    `llm` needs only `generate(inputs, sampling_params, use_tqdm=...)` returning one `RequestOutput` per input
    in order; `processor` is the checkpoint's Hugging Face processor (chat template and tokenizer).
    """

    def __init__(
        self,
        llm: Any,
        processor: Any,
        model_id: str,
        fingerprint: str,
        score_params: Any,
        reason_params: Any,
        max_image_pixels: int = 1280 * PIXELS_PER_VISUAL_TOKEN,
        warm_prefix: bool = True,
    ):
        self.llm = llm
        self.processor = processor
        self.model_id = model_id
        self.fingerprint = fingerprint
        self.score_params = score_params
        self.reason_params = reason_params
        self.max_image_pixels = max_image_pixels
        self.warm_prefix = warm_prefix
        self.yes_ids, self.no_ids = yes_no_token_ids(processor.tokenizer.get_vocab())

    @classmethod
    def load(cls, settings: TRTLLMSettings, model_id: str | None = None) -> TRTLLMVisionLanguageModel:
        """Start the engine on the GPU (minutes for a 7B model: weights load, CUDA graphs are captured)."""
        if Path(settings.model).expanduser().is_dir():
            report = inspect_checkpoint(settings.model)
            if not report.ok:
                raise ValueError(f"checkpoint {settings.model} cannot be served: " + "; ".join(report.problems))
        # Imported here: tensorrt_llm initialises CUDA and MPI on import, which CPU machines must never do.
        import tensorrt_llm
        from tensorrt_llm import LLM, SamplingParams
        from tensorrt_llm.llmapi import KvCacheConfig
        from transformers import AutoProcessor

        if tensorrt_llm.__version__ != TRTLLM_VERSION:
            warnings.warn(
                f"tensorrt_llm {tensorrt_llm.__version__} is not the targeted {TRTLLM_VERSION} "
                f"({TRITON_CONTAINER}); run the GPU tests of tests/test_trtllm.py before serving",
                stacklevel=2,
            )
        llm = LLM(**settings.llm_arguments(), kv_cache_config=KvCacheConfig(**settings.kv_cache_arguments()))
        return cls(
            llm,
            AutoProcessor.from_pretrained(settings.model),
            model_id=model_id or settings.model,
            fingerprint=hf_fingerprint(settings.model),  # after LLM(): a hub checkpoint is in the cache by now
            score_params=SamplingParams(**SCORE_SAMPLING),
            reason_params=SamplingParams(**reason_sampling(settings.max_new_tokens)),
            max_image_pixels=settings.max_image_pixels,
            warm_prefix=settings.warm_prefix,
        )

    @classmethod
    def from_target(cls, target: str, model_id: str | None = None) -> TRTLLMVisionLanguageModel:
        """The backend for a `trtllm:<model dir or hub id>[?option=value&...]` model spec (see TRTLLMSettings)."""
        return cls.load(TRTLLMSettings.from_target(target), model_id=model_id)

    def shutdown(self) -> None:
        """Stop the engine's executor processes and free the GPU."""
        self.llm.shutdown()

    # -- prompts ---------------------------------------------------------------------------------------

    def _render(self, image: bool, turns: Sequence[str], answers: Sequence[str] = ()) -> str:
        return self.processor.apply_chat_template(
            chat_messages(turns, image, answers), tokenize=False, add_generation_prompt=True
        )

    def yes_no_prompt(self, image: bool, statement: str) -> str:
        """The full one-token scoring prompt for one statement."""
        return self._render(image, [yes_no_question(statement)])

    @staticmethod
    def _request(prompt: str, image: Image.Image | None) -> dict[str, Any]:
        """An LLM API prompt: text with the image placeholder, the image itself as multi_modal_data."""
        if image is None:
            return {"prompt": prompt}
        return {"prompt": prompt, "multi_modal_data": {"image": [image]}}

    # -- engine calls ----------------------------------------------------------------------------------

    def _generate(self, groups: list[list[dict[str, Any]]], params: Any, imaged: list[bool]) -> list[list[Any]]:
        """Run groups of requests (one group per image) in at most two in-flight batches.

        With warm_prefix, the first request of every group with an image runs in the first batch; the rest
        run in the second, when those prefixes are in the KV cache. Outputs come back grouped and in order.
        """
        warm = [self.warm_prefix and image and len(group) > 1 for group, image in zip(groups, imaged, strict=True)]
        heads = [group[:1] for group, w in zip(groups, warm, strict=True) if w]
        rest = [group[1:] if w else group for group, w in zip(groups, warm, strict=True)]
        head_outputs = iter(self._run([r for head in heads for r in head], params))
        rest_outputs = iter(self._run([r for group in rest for r in group], params))
        grouped = []
        for w, remaining in zip(warm, rest, strict=True):
            head = [next(head_outputs)] if w else []
            grouped.append(head + [next(rest_outputs) for _ in remaining])
        return grouped

    def _run(self, requests: list[dict[str, Any]], params: Any) -> list[Any]:
        return list(self.llm.generate(requests, params, use_tqdm=False)) if requests else []

    def score(self, image: Image.Image | None, questions: Sequence[str]) -> np.ndarray:
        """M = P(Yes)/(P(Yes)+P(No)) per precondition statement, all questions of the image together."""
        return self.score_batch([(image, questions)])[0]

    def score_batch(self, items: Sequence[tuple[Image.Image | None, Sequence[str]]]) -> list[np.ndarray]:
        """`score` for several images (or none) at once: every question of every item shares the engine's
        in-flight batches, two engine calls in all, so a Triton dynamic batch keeps the GPU busy."""
        images = [None if image is None else fit_pixel_budget(image, self.max_image_pixels) for image, _ in items]
        groups = [
            [self._request(self.yes_no_prompt(image is not None, q), image) for q in questions]
            for image, (_, questions) in zip(images, items, strict=True)
        ]
        outputs = self._generate(groups, self.score_params, [image is not None for image in images])
        return [
            yes_probability(np.stack([first_token_logits(o) for o in group]), self.yes_ids, self.no_ids)
            if group
            else np.zeros(0, dtype=np.float64)
            for group in outputs
        ]

    def reason(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        """Two greedy turns per statement, batched: think step by step, then summarise as JSON."""
        image = fit_pixel_budget(image, self.max_image_pixels)
        turns = [reasoning_turns(statement) for statement in questions]
        first = [self._request(self._render(True, turn[:1]), image) for turn in turns]
        thoughts = [o.outputs[0].text.strip() for o in self._generate([first], self.reason_params, [True])[0]]
        second = [
            self._request(self._render(True, turn, [thought]), image)
            for turn, thought in zip(turns, thoughts, strict=True)
        ]
        return [o.outputs[0].text.strip() for o in self._generate([second], self.reason_params, [True])[0]]
