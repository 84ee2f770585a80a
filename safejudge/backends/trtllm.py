"""TensorRT-LLM as the CLUE MLLM: the GPU production path.

Target: TensorRT-LLM 1.2.1, as shipped in NGC's `nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3`
(Triton tutorial "Deploying Hugging Face Qwen2.5-VL Model in Triton"), through the LLM API with the PyTorch
backend: the Hugging Face checkpoint loads as it is, no engine build. Default checkpoint: Qwen2.5-VL-7B-Instruct.
What 1.2.1 can and cannot do for "one image, ~40 yes/no questions" is in docs/gpu.md
("What TensorRT-LLM 1.2.1 can and cannot do"); the two routes here (the `route` setting):

- encode_once (Qwen2.5-VL): `tensorrt_llm.MultimodalEncoder` runs the vision tower once per distinct image
  of a call and returns `disaggregated_params` (embedding handles, mrope position handles); every question
  about that image is then an ordinary request carrying those handles with
  `request_type="context_and_generation"` (upstream's pattern:
  tests/unittest/_torch/multimodal/test_mm_encoder_standalone.py). Each question needs its own mrope
  position ids (their length is the question's prompt length): they are the encoder's positions up to the
  end of the shared prefix, then one more per text token (`extend_positions`). Each image carries its own
  8-integer content hash (`image_hash_key`), so KV blocks of two images are never mixed when reuse is on.
- per_question (Qwen2-VL, which has no encoder/prefill split on 1.2.1, or an install without it): every
  question carries the image and the engine encodes it again (40 questions = 40 vision runs); KV block
  reuse (`enable_block_reuse`, off by default: upstream bugs #5038, #14125, #7357) can share the prefix
  prefill. The legacy engine route (`trtllm-build` + `multimodal_encoders`) is not implemented.

Either way one `score_batch` call (a whole Triton dynamic batch) is one `LLM.generate` with every question
of every image (two with `warm_prefix` under reuse), plus one for rows that need full logits.

Yes/No: M = P(Yes)/(P(Yes)+P(No)) summing every Yes/No spelling (safejudge.decision). Read from the top-20
logprobs (`SamplingParams(max_tokens=1, top_k=1, logprobs=20)`, light) when they hold a Yes and a No spelling
and the spellings they miss could move M by at most LOGPROB_TOLERANCE; otherwise the request is rerun with
full generation logits (`return_generation_logits=True`). Either reading is checked to peak at the token the
engine emitted: a misaligned row (tensorrtllm_backend#530) raises instead of producing wrong scores.

`probe_capabilities()` checks the installed TensorRT-LLM for each capability used and `choose_route` decides
(and logs) the route; both are plain Python, tested with fake modules.

Nothing here imports tensorrt_llm, torch or transformers at import time: CPU machines import this module
(tests, the backend registry) and only `TRTLLMVisionLanguageModel.load` needs the GPU stack.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import logging
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from safejudge.decision import yes_no_token_ids, yes_probability
from safejudge.fingerprint import hf_fingerprint
from safejudge.images import conform, pixel_digest
from safejudge.prompts import chat_messages, reasoning_turns, yes_no_question

logger = logging.getLogger(__name__)

TRTLLM_VERSION = "1.2.1"
TRITON_CONTAINER = "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"
DEFAULT_CHECKPOINT = "Qwen/Qwen2.5-VL-7B-Instruct"

# config.json model_type values whose TensorRT-LLM PyTorch model supports images and KV block reuse.
SUPPORTED_MODEL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl"})
# ... and those whose model supports the encoder/prefill split on 1.2.1 ("Qwen2VLModel does not support
# disaggregated inference yet").
ENCODE_ONCE_MODEL_TYPES = frozenset({"qwen2_5_vl"})
# Qwen2(.5)-VL cut images into 14-pixel patches and merge 2x2 patches into one LLM token.
PIXELS_PER_VISUAL_TOKEN = 28 * 28
IMAGE_PAD = "<|image_pad|>"
# TensorRT-LLM's Qwen2-VL input processor runs transformers' Qwen2VLImageProcessor, whose smart_resize
# refuses a long/short side ratio above 200. Padding to half of that leaves room for the rounding of the
# scale-down to max_image_pixels that follows: at the smallest budget (784 pixels) a 100:1 image becomes
# 280x2.8, floored to 280x2, which is 140:1.
MAX_ASPECT = 100
# System turn, one question and the chat markup, with room to spare.
TEXT_TOKEN_ALLOWANCE = 512
# A logits row may be cast (bf16 -> fp32) after the sampler read it: allow that much below the maximum.
GREEDY_TOLERANCE = 1e-3
# Top-k logprobs per scoring request, and how far the Yes/No spellings missing from them may move M.
TOP_LOGPROBS = 20
LOGPROB_TOLERANCE = 0.01

# Full-vocabulary reading (the fallback, and the whole path with yes_no_from=logits).
SCORE_SAMPLING: dict[str, Any] = {"max_tokens": 1, "top_k": 1, "return_generation_logits": True}
# Top-k reading: 20 (token, logprob) pairs instead of a vocabulary-sized row (0.6 MB for Qwen).
LOGPROB_SAMPLING: dict[str, Any] = {"max_tokens": 1, "top_k": 1, "logprobs": TOP_LOGPROBS}

Route = Literal["encode_once", "per_question"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def reason_sampling(max_new_tokens: int) -> dict[str, Any]:
    """Greedy, bounded generation for the two reasoning turns."""
    return {"max_tokens": max_new_tokens, "top_k": 1}


class TRTLLMSettings(BaseModel):
    """How to start the TensorRT-LLM engine; validated before any GPU work starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="checkpoint directory or Hugging Face hub id")
    route: Literal["auto", "encode_once", "per_question"] = Field(
        "auto",
        description="encode_once: vision once per image (Qwen2.5-VL); per_question: the image with every "
        "question; auto: encode_once when the model and the installed TensorRT-LLM allow it",
    )
    yes_no_from: Literal["logprobs", "logits"] = Field(
        "logprobs", description="logprobs: top-20 logprobs, full logits where they miss a spelling; logits: always"
    )
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
    enable_block_reuse: bool = Field(False, description="KV prefix reuse; off until the GPU tests prove it")
    warm_prefix: bool = Field(True, description="with reuse: an image's first question alone, then the rest")
    encoder_max_batch_size: int = Field(
        1, ge=1, description="images per vision-encoder step (upstream's Qwen2.5-VL test needs 1 for exact outputs)"
    )
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
            f"{model!r} is neither an existing checkpoint directory nor a hub id like '{DEFAULT_CHECKPOINT}'"
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
        query-style overrides, e.g. `/models/Qwen2.5-VL-7B-Instruct?max_new_tokens=128&route=per_question`."""
        model, _, query = target.partition("?")
        try:
            options = dict(parse_qsl(query, strict_parsing=bool(query)))
        except ValueError:
            raise ValueError(f"trtllm options {query!r} must be key=value pairs joined by '&'") from None
        return cls.model_validate({"model": model, **options})

    @property
    def max_prompt_tokens(self) -> int:
        return self.max_image_pixels // PIXELS_PER_VISUAL_TOKEN + TEXT_TOKEN_ALLOWANCE

    @property
    def effective_warm_prefix(self) -> bool:
        """Warming a prefix only pays when its blocks can be reused."""
        return self.warm_prefix and self.enable_block_reuse

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

    def encoder_arguments(self) -> dict[str, Any]:
        """Keyword arguments of `tensorrt_llm.MultimodalEncoder` (encode_once route)."""
        return {"model": self.model, "max_batch_size": self.encoder_max_batch_size}


# -- what the installed TensorRT-LLM can do ----------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """What `probe_capabilities` found in the installed TensorRT-LLM."""

    version: str | None = None
    multimodal_encoder: bool = False  # tensorrt_llm.MultimodalEncoder
    disaggregated_fields: frozenset[str] = frozenset()  # fields of tensorrt_llm.llmapi.DisaggregatedParams
    shared_tensor: bool = False  # tensorrt_llm._torch.shared_tensor.SharedTensorContainer (mrope handles)
    sampling_fields: frozenset[str] = frozenset()  # fields of tensorrt_llm.SamplingParams
    problems: tuple[str, ...] = ()

    @property
    def embedding_handles(self) -> bool:
        return {"request_type", "multimodal_embedding_handles", "multimodal_hashes"} <= self.disaggregated_fields

    @property
    def mrope_handles(self) -> bool:
        return {"mrope_position_ids_handle", "mrope_position_deltas_handle"} <= self.disaggregated_fields

    @property
    def logprobs(self) -> bool:
        return "logprobs" in self.sampling_fields

    @property
    def generation_logits(self) -> bool:
        return "return_generation_logits" in self.sampling_fields

    @property
    def encode_once(self) -> bool:
        return self.multimodal_encoder and self.embedding_handles and self.mrope_handles and self.shared_tensor

    def missing_for_encode_once(self) -> list[str]:
        missing = []
        if not self.multimodal_encoder:
            missing.append("tensorrt_llm.MultimodalEncoder")
        if not self.embedding_handles:
            missing.append("DisaggregatedParams.multimodal_embedding_handles/multimodal_hashes")
        if not self.mrope_handles:
            missing.append("DisaggregatedParams.mrope_position_ids_handle/mrope_position_deltas_handle")
        if not self.shared_tensor:
            missing.append("tensorrt_llm._torch.shared_tensor.SharedTensorContainer")
        return missing


def _field_names(cls: Any) -> frozenset[str]:
    if cls is None:
        return frozenset()
    if dataclasses.is_dataclass(cls):
        return frozenset(f.name for f in dataclasses.fields(cls))
    fields = getattr(cls, "model_fields", None)  # pydantic models (SamplingParams in some releases)
    if isinstance(fields, Mapping):
        return frozenset(fields)
    try:
        return frozenset(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return frozenset()


MULTIMODAL_ENCODER_MODULES = ("tensorrt_llm", "tensorrt_llm._torch.multimodal.mm_encoder")


def _find_multimodal_encoder(import_module: Callable[[str], Any]) -> str | None:
    """The module that exports MultimodalEncoder: the package itself in 1.2, its _torch home before."""
    for name in MULTIMODAL_ENCODER_MODULES:
        try:
            if hasattr(import_module(name), "MultimodalEncoder"):
                return name
        except ImportError:
            continue
    return None


def _multimodal_encoder_class() -> Any:
    name = _find_multimodal_encoder(importlib.import_module)
    if name is None:
        raise RuntimeError("this tensorrt_llm has no MultimodalEncoder; use route=per_question")
    return importlib.import_module(name).MultimodalEncoder


def probe_capabilities(import_module: Callable[[str], Any] = importlib.import_module) -> Capabilities:
    """Check, without starting anything, each TensorRT-LLM capability this backend uses.

    `import_module` is importlib's by default; tests pass one that returns fake modules.
    """
    problems = []
    try:
        trt = import_module("tensorrt_llm")
    except ImportError as exc:
        return Capabilities(problems=(f"tensorrt_llm cannot be imported: {exc}",))
    try:
        disaggregated = getattr(import_module("tensorrt_llm.llmapi"), "DisaggregatedParams", None)
    except ImportError as exc:
        disaggregated = None
        problems.append(f"tensorrt_llm.llmapi cannot be imported: {exc}")
    try:
        shared = hasattr(import_module("tensorrt_llm._torch.shared_tensor"), "SharedTensorContainer")
    except ImportError as exc:
        shared = False
        problems.append(f"tensorrt_llm._torch.shared_tensor cannot be imported: {exc}")
    return Capabilities(
        version=getattr(trt, "__version__", None),
        multimodal_encoder=_find_multimodal_encoder(import_module) is not None,
        disaggregated_fields=_field_names(disaggregated),
        shared_tensor=shared,
        sampling_fields=_field_names(getattr(trt, "SamplingParams", None)),
        problems=tuple(problems),
    )


@dataclass(frozen=True)
class RouteDecision:
    route: Route
    yes_no_from: Literal["logprobs", "logits"]
    notes: tuple[str, ...]


def choose_route(settings: TRTLLMSettings, model_type: str | None, capabilities: Capabilities) -> RouteDecision:
    """The route and the Yes/No reading for this model on this install, with one note per choice made.

    An explicit `route=encode_once` that cannot be honoured is refused with the reasons; `auto` falls back.
    """
    notes = []
    if not capabilities.generation_logits:
        raise ValueError(
            f"tensorrt_llm {capabilities.version} has no SamplingParams.return_generation_logits, which every "
            "route needs (the logits reading and the fallback of the logprobs reading)"
        )
    blockers = capabilities.missing_for_encode_once()
    if model_type not in ENCODE_ONCE_MODEL_TYPES:
        blockers.insert(0, f"model_type {model_type!r} has no encoder/prefill split on TensorRT-LLM 1.2.1 "
                           f"(only {sorted(ENCODE_ONCE_MODEL_TYPES)})")
    if settings.route == "encode_once" and blockers:
        raise ValueError("route=encode_once is not possible here: " + "; ".join(blockers))
    if settings.route == "per_question" or blockers:
        route: Route = "per_question"
        why = "as asked" if settings.route == "per_question" else "because " + "; ".join(blockers)
        notes.append(f"route per_question ({why}): the vision encoder runs once per question")
    else:
        route = "encode_once"
        notes.append("route encode_once: MultimodalEncoder once per image, handles shared by its questions")
    yes_no_from = settings.yes_no_from
    if yes_no_from == "logprobs" and not capabilities.logprobs:
        yes_no_from = "logits"
        notes.append(f"yes/no from logits: tensorrt_llm {capabilities.version} has no SamplingParams.logprobs")
    else:
        notes.append(f"yes/no from {yes_no_from}" + (" (full logits where they miss a spelling)"
                                                      if yes_no_from == "logprobs" else ""))
    notes.append(f"KV block reuse {'on' if settings.enable_block_reuse else 'off'}")
    return RouteDecision(route, yes_no_from, tuple(notes))


# -- keys and positions for the encode_once route ---------------------------------------------------


def image_hash_key(image: Image.Image) -> list[int]:
    """The image's content hash as DisaggregatedParams wants it: 8 signed 32-bit integers.

    Mode and size are hashed with the pixels, so two images whose bytes happen to agree never share a key.
    """
    return [int(v) for v in np.frombuffer(pixel_digest(image), dtype="<i4")]


def expanded_prefix_length(encoded_ids: Sequence[int], question_ids: Sequence[int], image_token_id: int,
                           image_tokens: int) -> int:
    """How many leading positions (with the image placeholder expanded to `image_tokens` tokens) a question's
    prompt shares with the prompt the image was encoded with.

    Both are token ids with the single, unexpanded image placeholder. The shared part must include the image.
    """
    shared = 0
    for a, b in zip(encoded_ids, question_ids):
        if a != b:
            break
        shared += 1
    if image_token_id not in question_ids[:shared] or question_ids.count(image_token_id) != 1:
        raise ValueError("the question's prompt does not share the image and what precedes it with the encoded "
                         "prompt; its mrope positions cannot be derived")
    return shared + image_tokens - 1


def extend_positions(positions: np.ndarray, prefix: int, length: int) -> np.ndarray:
    """mrope position ids ([3, ..., L]) for a prompt of `length` tokens that shares the first `prefix` with
    the prompt `positions` belong to and has only text after them.

    After the image, Qwen2(.5)-VL give text tokens one position each, the same in all three sections, counting
    on from the last shared token: so the shared part is copied and the rest counts up.
    """
    positions = np.asarray(positions)
    if not 0 < prefix <= min(length, positions.shape[-1]):
        raise ValueError(f"shared prefix {prefix} must be within both prompts ({positions.shape[-1]}, {length})")
    last = positions[..., prefix - 1 : prefix]
    if not np.all(last == last[:1]):
        raise ValueError("the last shared position is not a text token (its three mrope sections differ)")
    steps = np.arange(1, length - prefix + 1, dtype=positions.dtype)
    return np.concatenate([positions[..., :prefix], last + steps], axis=-1)


def _dump_size(handle: Any) -> int | None:
    """The leading size recorded in a shared-tensor handle (`tensor_size`), when it has one."""
    size = handle.get("tensor_size") if isinstance(handle, Mapping) else None
    return int(size[0]) if size else None


class TensorHandles(Protocol):
    """Reads and writes the shared-tensor handles DisaggregatedParams carry (cudaIPC on a GPU). Stateless, so
    concurrent calls never free each other's tensors: whoever dumps keeps the returned object alive."""

    def load(self, handle: Any) -> tuple[np.ndarray, Any]:
        """The tensor behind a handle as an array, and what `dump` needs to make a tensor like it."""
        ...

    def dump(self, array: np.ndarray, like: Any) -> tuple[Any, Any]:
        """A handle to a new tensor holding `array`, and the tensor, to keep alive while the handle is in use."""
        ...


class SharedTensorHandles:
    """TensorHandles on `tensorrt_llm._torch.shared_tensor.SharedTensorContainer` (GPU only; not run on CPU)."""

    def __init__(self):
        from tensorrt_llm._torch.shared_tensor import SharedTensorContainer

        self._container = SharedTensorContainer

    def load(self, handle: Any) -> tuple[np.ndarray, Any]:
        tensor = self._container.from_dict(handle).get_local_view()
        return tensor.detach().cpu().numpy(), (tensor.device, tensor.dtype)

    def dump(self, array: np.ndarray, like: Any) -> tuple[Any, Any]:
        import torch

        device, dtype = like
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)
        return self._container.from_tensor(tensor).dump_to_dict(), tensor


@dataclass
class EncodedImage:
    """One image after the vision encoder: its key, the encoder's handles and what its questions derive from."""

    hash_key: list[int]
    params: Any  # the encoder output's DisaggregatedParams
    prompt_ids: list[int]  # the encoded prompt, image placeholder unexpanded
    positions: np.ndarray  # that prompt's mrope position ids
    positions_like: Any  # what TensorHandles.dump needs to make position tensors like the encoder's
    image_tokens: int


@dataclass
class Encoding:
    """The images of one call after the encoder, and the tensors its requests' handles point to: they live as
    long as this object, i.e. until the call returns."""

    images: dict[tuple[int, ...], EncodedImage] = field(default_factory=dict)
    keep: list[Any] = field(default_factory=list)


@dataclass
class TRTLLMCounters:
    """What the backend sent, for tests and benchmarks: read as differences."""

    engine_calls: int = 0  # LLM.generate calls
    requests: int = 0  # requests in them
    encoder_calls: int = 0  # MultimodalEncoder.generate calls
    vision_runs: int = 0  # images through the vision tower (encoder inputs, or requests carrying an image)
    logits_fallbacks: int = 0  # requests rerun with full logits because the top-k missed a spelling
    history: list[int] = field(default_factory=list)  # requests per LLM.generate call, in order


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




def _logprob_value(value: Any) -> float:
    return float(getattr(value, "logprob", value))  # tensorrt_llm's Logprob(logprob, rank), or a bare float


def first_token_logprobs(output: Any) -> dict[int, float] | None:
    """The first generated token's top-k {token id: logprob} of a `RequestOutput`, checked against the
    emitted token; None when the request returned no logprobs.

    Greedy decoding emits the most likely token, so it must be in the top-k and have the largest logprob.
    """
    completion = output.outputs[0]
    logprobs = getattr(completion, "logprobs", None)
    if not logprobs:
        return None
    top = {int(token): _logprob_value(value) for token, value in logprobs[0].items()}
    token = int(completion.token_ids[0])
    peak = max(top.values())
    if token not in top or top[token] < peak - GREEDY_TOLERANCE * max(1.0, abs(peak)):
        raise RuntimeError(
            f"the top-k logprobs do not peak at the emitted token {token} (its logprob {top.get(token)}, "
            f"maximum {peak:.4f}): the logprobs are misaligned, so Yes/No scores from them would be wrong"
        )
    return top


def yes_probability_from_top(
    top: Mapping[int, float], yes_ids: Sequence[int], no_ids: Sequence[int], tolerance: float = LOGPROB_TOLERANCE
) -> float | None:
    """M = P(Yes)/(P(Yes)+P(No)) from top-k logprobs, or None when they cannot give it within `tolerance`.

    They can when they hold at least one Yes and one No spelling and the spellings they miss, each at most as
    likely as the least likely token listed, could move M by at most `tolerance` (missing mass / listed mass).
    """
    yes_set, no_set = set(yes_ids), set(no_ids)
    yes = np.array([lp for token, lp in top.items() if token in yes_set], dtype=np.float64)
    no = np.array([lp for token, lp in top.items() if token in no_set], dtype=np.float64)
    if yes.size == 0 or no.size == 0:
        return None
    peak = max(yes.max(), no.max())
    p_yes, p_no = np.exp(yes - peak).sum(), np.exp(no - peak).sum()  # scaled by exp(-peak), which cancels
    missing = len(yes_set) + len(no_set) - yes.size - no.size
    floor = math.exp(min(top.values()) - peak)
    if missing * floor > tolerance * (p_yes + p_no):
        return None
    return float(p_yes / (p_yes + p_no))


class TRTLLMVisionLanguageModel:
    """The MLLM protocol (safejudge/backends/base.py) on a `tensorrt_llm.LLM` with a Qwen2(.5)-VL checkpoint.

    `llm` needs only `generate(inputs, sampling_params, use_tqdm=..., disaggregated_params=...)` returning one
    `RequestOutput` per input in order; `processor` is the checkpoint's Hugging Face processor (chat template and
    tokenizer). With `encoder` (a `MultimodalEncoder`) and `handles` (TensorHandles) the route is encode_once,
    else per_question. `logprob_params` None reads logits only.
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
        warm_prefix: bool = False,
        logprob_params: Any = None,
        encoder: Any = None,
        handles: TensorHandles | None = None,
        logprob_tolerance: float = LOGPROB_TOLERANCE,
    ):
        if (encoder is None) != (handles is None):
            raise ValueError("encode_once needs both the encoder and tensor handles")
        self.llm = llm
        self.processor = processor
        self.model_id = model_id
        self.fingerprint = fingerprint
        self.score_params = score_params
        self.logprob_params = logprob_params
        self.reason_params = reason_params
        self.max_image_pixels = max_image_pixels
        self.warm_prefix = warm_prefix
        self.encoder = encoder
        self.handles = handles
        self.logprob_tolerance = logprob_tolerance
        self.yes_ids, self.no_ids = yes_no_token_ids(processor.tokenizer.get_vocab())
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.counters = TRTLLMCounters()

    @property
    def route(self) -> Route:
        return "per_question" if self.encoder is None else "encode_once"

    @classmethod
    def load(cls, settings: TRTLLMSettings, model_id: str | None = None) -> TRTLLMVisionLanguageModel:
        """Start the engine on the GPU (minutes for a 7B model: weights load, CUDA graphs are captured)."""
        model_type = None
        if Path(settings.model).expanduser().is_dir():
            report = inspect_checkpoint(settings.model)
            if not report.ok:
                raise ValueError(f"checkpoint {settings.model} cannot be served: " + "; ".join(report.problems))
            model_type = report.model_type
        capabilities = probe_capabilities()
        # Imported here: tensorrt_llm initialises CUDA and MPI on import, which CPU machines must never do.
        import tensorrt_llm
        from tensorrt_llm import LLM, SamplingParams
        from tensorrt_llm.llmapi import KvCacheConfig
        from transformers import AutoConfig, AutoProcessor

        if tensorrt_llm.__version__ != TRTLLM_VERSION:
            warnings.warn(
                f"tensorrt_llm {tensorrt_llm.__version__} is not the targeted {TRTLLM_VERSION} "
                f"({TRITON_CONTAINER}); run the GPU tests of tests/test_trtllm.py before serving",
                stacklevel=2,
            )
        model_type = model_type or AutoConfig.from_pretrained(settings.model).model_type
        decision = choose_route(settings, model_type, capabilities)
        for note in decision.notes:
            logger.info("trtllm %s (%s, tensorrt_llm %s): %s", settings.model, model_type, capabilities.version, note)
        encode_once = decision.route == "encode_once"
        # The encoder first: the LLM sizes its KV cache from the GPU memory left free.
        encoder = _multimodal_encoder_class()(**settings.encoder_arguments()) if encode_once else None
        llm = LLM(**settings.llm_arguments(), kv_cache_config=KvCacheConfig(**settings.kv_cache_arguments()))
        return cls(
            llm,
            AutoProcessor.from_pretrained(settings.model),
            model_id=model_id or settings.model,
            fingerprint=hf_fingerprint(settings.model),  # after LLM(): a hub checkpoint is in the cache by now
            score_params=SamplingParams(**SCORE_SAMPLING),
            reason_params=SamplingParams(**reason_sampling(settings.max_new_tokens)),
            max_image_pixels=settings.max_image_pixels,
            warm_prefix=settings.effective_warm_prefix,
            logprob_params=SamplingParams(**LOGPROB_SAMPLING) if decision.yes_no_from == "logprobs" else None,
            encoder=encoder,
            handles=SharedTensorHandles() if encode_once else None,
        )

    @classmethod
    def from_target(cls, target: str, model_id: str | None = None) -> TRTLLMVisionLanguageModel:
        """The backend for a `trtllm:<model dir or hub id>[?option=value&...]` model spec (see TRTLLMSettings)."""
        return cls.load(TRTLLMSettings.from_target(target), model_id=model_id)

    def shutdown(self) -> None:
        """Stop the engine's executor processes (and the encoder's) and free the GPU."""
        self.llm.shutdown()
        if self.encoder is not None:
            self.encoder.shutdown()

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
        """An LLM API prompt: text with the image placeholder, the image itself as multi_modal_data (on the
        encode_once route too, as upstream's test sends it; the engine then takes the handles instead)."""
        if image is None:
            return {"prompt": prompt}
        return {"prompt": prompt, "multi_modal_data": {"image": [image]}}

    def _token_ids(self, prompt: str) -> list[int]:
        return list(self.processor.tokenizer(prompt, add_special_tokens=False).input_ids)

    # -- encode_once bookkeeping -----------------------------------------------------------------------

    def _encode(self, groups: Sequence[Sequence[dict[str, Any]]], images: Sequence[Image.Image | None]) -> Encoding:
        """Run the vision encoder once per distinct image (by content hash), all in one encoder call."""
        first: dict[tuple[int, ...], dict[str, Any]] = {}
        for group, image in zip(groups, images, strict=True):
            if image is not None and group:
                first.setdefault(tuple(image_hash_key(image)), group[0])
        encoding = Encoding()
        if not first:
            return encoding
        outputs = list(self.encoder.generate(list(first.values())))
        self.counters.encoder_calls += 1
        self.counters.vision_runs += len(first)
        if len(outputs) != len(first):
            raise RuntimeError(f"the encoder returned {len(outputs)} outputs for {len(first)} images")
        for key, request, output in zip(first, first.values(), outputs, strict=True):
            params = output.disaggregated_params
            if params is None or not params.multimodal_embedding_handles or params.mrope_position_ids_handle is None:
                raise RuntimeError(
                    "MultimodalEncoder returned no embedding or mrope handles: this TensorRT-LLM cannot serve "
                    "route=encode_once for this model; use route=per_question"
                )
            prompt_ids = self._token_ids(request["prompt"])
            positions, like = self.handles.load(params.mrope_position_ids_handle)
            image_tokens = positions.shape[-1] - len(prompt_ids) + 1
            recorded = _dump_size(params.multimodal_embedding_handles[0])
            if image_tokens < 1 or (recorded is not None and recorded != image_tokens):
                raise RuntimeError(
                    f"the encoder's mrope positions ({positions.shape[-1]}) do not fit its prompt ({len(prompt_ids)} "
                    f"tokens) and its embedding ({recorded} image tokens)"
                )
            encoding.images[key] = EncodedImage(list(key), params, prompt_ids, positions, like, image_tokens)
        return encoding

    def _question_params(self, encoded: EncodedImage, prompt: str, keep: list[Any]) -> Any:
        """The DisaggregatedParams of one question about an encoded image: a copy of the encoder's (every field
        it set, the embedding handles and the mrope deltas included) with the image's content hash and mrope
        positions for this prompt's own length."""
        ids = self._token_ids(prompt)
        prefix = expanded_prefix_length(encoded.prompt_ids, ids, self.image_token_id, encoded.image_tokens)
        positions = extend_positions(encoded.positions, prefix, len(ids) + encoded.image_tokens - 1)
        handle, tensor = self.handles.dump(positions, encoded.positions_like)
        keep.append(tensor)
        return dataclasses.replace(
            encoded.params,
            request_type="context_and_generation",
            multimodal_hashes=[list(encoded.hash_key)],
            mrope_position_ids_handle=handle,
        )

    def _params_for(self, groups: Sequence[Sequence[dict[str, Any]]], images: Sequence[Image.Image | None],
                    encoding: Encoding | None) -> list[list[Any]]:
        """The DisaggregatedParams of every request (None for those without an image, and on per_question)."""
        if encoding is None:
            return [[None] * len(group) for group in groups]
        params = []
        for group, image in zip(groups, images, strict=True):
            if image is None or not group:
                params.append([None] * len(group))
                continue
            encoded = encoding.images[tuple(image_hash_key(image))]  # hashed once per image, not per question
            params.append([self._question_params(encoded, r["prompt"], encoding.keep) for r in group])
        return params

    # -- engine calls ----------------------------------------------------------------------------------

    def _generate(self, groups: list[list[dict[str, Any]]], params: Any, images: Sequence[Image.Image | None],
                  encoded: Encoding | None = None) -> list[list[Any]]:
        """Run groups of requests (one group per image) in one engine call, or two with warm_prefix.

        With warm_prefix (KV reuse on), the first request of every group with an image runs in the first call;
        the rest run in the second, when those prefixes are in the KV cache. Outputs come back grouped and in
        order. On encode_once, `encoded` holds each image's handles (see `_encode`).
        """
        handles = self._params_for(groups, images, encoded)
        warm = [self.warm_prefix and image is not None and len(g) > 1 for g, image in zip(groups, images, strict=True)]
        heads = [(g[:1], h[:1]) for g, h, w in zip(groups, handles, warm, strict=True) if w]
        rest = [(g[1:], h[1:]) if w else (g, h) for g, h, w in zip(groups, handles, warm, strict=True)]
        head_outputs = iter(self._run([r for g, _ in heads for r in g], params, [d for _, h in heads for d in h]))
        rest_outputs = iter(self._run([r for g, _ in rest for r in g], params, [d for _, h in rest for d in h]))
        grouped = []
        for w, (remaining, _) in zip(warm, rest, strict=True):
            head = [next(head_outputs)] if w else []
            grouped.append(head + [next(rest_outputs) for _ in remaining])
        return grouped

    def _run(self, requests: list[dict[str, Any]], params: Any, disaggregated: list[Any]) -> list[Any]:
        if not requests:
            return []
        self.counters.engine_calls += 1
        self.counters.requests += len(requests)
        self.counters.history.append(len(requests))
        if self.encoder is None:  # every request with an image runs the vision tower again
            self.counters.vision_runs += sum("multi_modal_data" in r for r in requests)
        extra = {"disaggregated_params": disaggregated} if any(d is not None for d in disaggregated) else {}
        outputs = list(self.llm.generate(requests, params, use_tqdm=False, **extra))
        if len(outputs) != len(requests):
            raise RuntimeError(f"the engine returned {len(outputs)} outputs for {len(requests)} requests")
        return outputs

    def _scored(self, groups: list[list[dict[str, Any]]], images: Sequence[Image.Image | None],
                encoded: Encoding | None) -> list[np.ndarray]:
        """M per request: from the top-k logprobs where they suffice, the rest rerun with full logits (one call)."""
        if self.logprob_params is None:
            outputs = self._generate(groups, self.score_params, images, encoded)
            return [self._from_logits(group) for group in outputs]
        outputs = self._generate(groups, self.logprob_params, images, encoded)
        scores: list[list[float | None]] = [
            [None if (top := first_token_logprobs(o)) is None
             else yes_probability_from_top(top, self.yes_ids, self.no_ids, self.logprob_tolerance) for o in group]
            for group in outputs
        ]
        redo = [[r for r, s in zip(g, row, strict=True) if s is None] for g, row in zip(groups, scores, strict=True)]
        if any(redo):
            self.counters.logits_fallbacks += sum(map(len, redo))
            kept = [[i for i, s in enumerate(row) if s is None] for row in scores]
            rows = iter(self._from_logits(
                [o for group in self._generate(redo, self.score_params, images, encoded) for o in group]
            ))
            for row, indices in zip(scores, kept, strict=True):
                for i in indices:
                    row[i] = float(next(rows))
        return [np.asarray(row, dtype=np.float64) for row in scores]

    def _from_logits(self, outputs: Sequence[Any]) -> np.ndarray:
        if not outputs:
            return np.zeros(0, dtype=np.float64)
        return yes_probability(np.stack([first_token_logits(o) for o in outputs]), self.yes_ids, self.no_ids)

    def _prepare(self, groups: list[list[dict[str, Any]]], images: Sequence[Image.Image | None]):
        return self._encode(groups, images) if self.encoder is not None else None

    def score(self, image: Image.Image | None, questions: Sequence[str]) -> np.ndarray:
        """M = P(Yes)/(P(Yes)+P(No)) per precondition statement, all questions of the image together."""
        return self.score_batch([(image, questions)])[0]

    def score_batch(self, items: Sequence[tuple[Image.Image | None, Sequence[str]]]) -> list[np.ndarray]:
        """`score` for several images (or none) at once, e.g. a whole Triton dynamic batch: every question of
        every item goes to the engine in one call (two with warm_prefix), the vision encoder runs once per
        distinct image on encode_once, and each item gets its own scores in order."""
        images = [None if image is None else fit_pixel_budget(image, self.max_image_pixels) for image, _ in items]
        groups = [
            [self._request(self.yes_no_prompt(image is not None, q), image) for q in questions]
            for image, (_, questions) in zip(images, items, strict=True)
        ]
        return self._scored(groups, images, self._prepare(groups, images))

    def reason(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        """Two greedy turns per statement, batched: think step by step, then summarise as JSON."""
        image = fit_pixel_budget(image, self.max_image_pixels)
        turns = [reasoning_turns(statement) for statement in questions]
        first = [self._request(self._render(True, turn[:1]), image) for turn in turns]
        encoded = self._prepare([first], [image])  # both turns share the image's one encoding
        (outputs,) = self._generate([first], self.reason_params, [image], encoded)
        thoughts = [o.outputs[0].text.strip() for o in outputs]
        second = [
            self._request(self._render(True, turn, [thought]), image)
            for turn, thought in zip(turns, thoughts, strict=True)
        ]
        (outputs,) = self._generate([second], self.reason_params, [image], encoded)
        return [o.outputs[0].text.strip() for o in outputs]
