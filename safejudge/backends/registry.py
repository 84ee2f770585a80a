"""The one way anything gets models: a ModelSpec names each role as "<scheme>:<argument>".

    mllm       hf:<hub id or local dir> | tiny:qwen2-vl | tiny:idefics3
               | tiny:qwen2-vl-2b-shape | tiny:qwen2-vl-7b-shape (Qwen2-VL-2B/7B dimensions, random weights:
                 for speed only)
               | trtllm:<hub id or local dir>[?option=value&...] (GPU; docs/gpu.md)
    relevance  onnx:<dir made by engine_build/export_clip.py> | tiny:clip | None
    detector   owlv2:<hub id or local dir> | tiny:owlv2 | None

A scheme is one entry in a loader table below; backends are imported only when their scheme is used,
so an ONNX-only stage never imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from safejudge.backends.base import MLLM, Detector, Models, RelevanceEncoder


class ModelSpecError(ValueError):
    """A spec that names no loadable model: unknown scheme, unknown tiny model, missing directory."""


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mllm: str = "tiny:qwen2-vl"
    relevance: str | None = "tiny:clip"
    detector: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int | None = Field(None, ge=1, description="intra-op threads per model; None: the library default")

    @field_validator("mllm", "relevance", "detector")
    @classmethod
    def _known_scheme(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            _split(info.field_name, value, LOADERS[info.field_name])
        return value


def _split(role: str, value: str, loaders: dict) -> tuple[str, str]:
    scheme, separator, argument = value.partition(":")
    if not separator or not argument:
        raise ModelSpecError(f"{role} {value!r} must be '<scheme>:<argument>' with scheme one of {', '.join(loaders)}")
    if scheme not in loaders:
        raise ModelSpecError(f"unknown {role} scheme {scheme!r} in {value!r}; use one of {', '.join(loaders)}")
    return scheme, argument


def _local_or_hub(role: str, argument: str) -> str:
    """A path that looks local must exist; anything else is passed on as a hub id."""
    path = Path(argument).expanduser()
    looks_local = path.is_absolute() or argument.startswith((".", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise ModelSpecError(f"{role} directory {argument!r} does not exist")
    return str(path) if looks_local else argument


DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def _device_option(role: str, argument: str) -> tuple[str, str | None]:
    """`<argument>?device=cuda` -> (argument, "cuda"); None when no device is named (the backend picks CUDA
    when present, else the CPU). No other option is known."""
    argument, separator, query = argument.partition("?")
    if not separator:
        return argument, None
    try:
        options = dict(parse_qsl(query, strict_parsing=True))
    except ValueError as exc:
        raise ModelSpecError(f"{role} options {query!r} must be key=value pairs joined by &: {exc}") from None
    unknown = sorted(set(options) - {"device"})
    if unknown:
        raise ModelSpecError(f"unknown {role} option(s) {', '.join(unknown)} in {argument}?{query}; known: device")
    device = options["device"]
    if not DEVICE.fullmatch(device):
        raise ModelSpecError(f"{role} device {device!r} must be cpu, cuda or cuda:<index>")
    return argument, device


def _tiny(role: str, argument: str, allowed: tuple[str, ...]) -> Path:
    from safejudge.backends.tiny import ensure_tiny_model

    if argument not in allowed:
        raise ModelSpecError(f"no tiny {role} {argument!r}; choose one of {', '.join(allowed)}")
    return ensure_tiny_model(argument)


def _hf_mllm(argument: str, spec: ModelSpec) -> MLLM:
    from safejudge.backends.hf import HFVisionLanguageModel

    argument, device = _device_option("mllm", argument)
    source = _local_or_hub("mllm", argument)
    return HFVisionLanguageModel.from_pretrained(
        source, dtype=spec.dtype, threads=spec.threads, device=device, model_id=f"{spec.mllm}@{spec.dtype}"
    )


# Tiny random models of no real size (tests, pipeline demos): their ops are too small for intra-op threads.
SMALL_TINY_MLLMS = ("qwen2-vl", "idefics3")


def served_threads(spec: ModelSpec, cores: int) -> int:
    """Intra-op threads for one served instance's models: spec.threads, else `cores`, else one for the small
    tiny MLLMs (two threads made their forward ~45 % slower with sleeping OpenMP workers, and no faster
    with spinning ones; benchmarks/RESULTS.md "Served path")."""
    if spec.threads:
        return spec.threads
    scheme, _, argument = spec.mllm.partition(":")
    if scheme == "tiny" and argument.split("?")[0] in SMALL_TINY_MLLMS:
        return 1
    return max(1, cores)


def _tiny_mllm(argument: str, spec: ModelSpec) -> MLLM:
    from safejudge.backends.hf import HFVisionLanguageModel

    from safejudge.backends.tiny import TINY_VERSION

    argument, device = _device_option("mllm", argument)
    source = _tiny("mllm", argument, (*SMALL_TINY_MLLMS, "qwen2-vl-2b-shape", "qwen2-vl-7b-shape"))
    # The fingerprint keys compiled priors by the files; the id adds what they do not say: the dtype (and the
    # device, inside spec.mllm).
    model_id = f"{spec.mllm}-v{TINY_VERSION}@{spec.dtype}"
    return HFVisionLanguageModel.from_pretrained(
        source, dtype=spec.dtype, threads=spec.threads, device=device, model_id=model_id
    )


def _trtllm_mllm(argument: str, spec: ModelSpec) -> MLLM:
    from safejudge.backends.trtllm import TRTLLMVisionLanguageModel

    return TRTLLMVisionLanguageModel.from_target(argument, model_id=spec.mllm)


def _onnx_relevance(argument: str, spec: ModelSpec) -> RelevanceEncoder:
    from safejudge.backends.clip_onnx import OnnxClipEncoder

    directory = Path(argument).expanduser()
    if not directory.is_dir():
        raise ModelSpecError(
            f"relevance directory {argument!r} does not exist; make it with engine_build/export_clip.py"
        )
    return OnnxClipEncoder(directory, threads=spec.threads, model_id=spec.relevance)


def _tiny_relevance(argument: str, spec: ModelSpec) -> RelevanceEncoder:
    from safejudge.backends.clip_onnx import OnnxClipEncoder
    from safejudge.backends.tiny import ensure_tiny_clip_onnx

    if argument != "clip":
        raise ModelSpecError(f"no tiny relevance encoder {argument!r}; choose clip")
    return OnnxClipEncoder(ensure_tiny_clip_onnx(), threads=spec.threads, model_id=spec.relevance)


def _owlv2_detector(argument: str, spec: ModelSpec) -> Detector:
    from safejudge.backends.owlv2 import Owlv2Detector

    source = _local_or_hub("detector", argument)
    return Owlv2Detector.from_pretrained(source, threads=spec.threads, model_id=spec.detector)


def _tiny_detector(argument: str, spec: ModelSpec) -> Detector:
    from safejudge.backends.owlv2 import Owlv2Detector

    source = _tiny("detector", argument, ("owlv2",))
    return Owlv2Detector.from_pretrained(source, threads=spec.threads, model_id=spec.detector)


MLLM_LOADERS: dict[str, Callable[[str, ModelSpec], MLLM]] = {
    "hf": _hf_mllm,
    "tiny": _tiny_mllm,
    "trtllm": _trtllm_mllm,
}
RELEVANCE_LOADERS: dict[str, Callable[[str, ModelSpec], RelevanceEncoder]] = {
    "onnx": _onnx_relevance,
    "tiny": _tiny_relevance,
}
DETECTOR_LOADERS: dict[str, Callable[[str, ModelSpec], Detector]] = {"owlv2": _owlv2_detector, "tiny": _tiny_detector}
LOADERS = {"mllm": MLLM_LOADERS, "relevance": RELEVANCE_LOADERS, "detector": DETECTOR_LOADERS}


def _demo_loader(role: str) -> Callable:
    """`demo:toy` — the project's toy-world models (toy scenes only, never real photos; backends/onnx_demo.py)."""

    def load(argument: str, spec: ModelSpec):
        from safejudge.backends.onnx_demo import demo_loader

        return demo_loader(role, argument, spec.threads)

    return load


for _role, _loaders in LOADERS.items():
    _loaders["demo"] = _demo_loader(_role)


def _load(role: str, value: str, spec: ModelSpec):
    scheme, argument = _split(role, value, LOADERS[role])
    try:
        return LOADERS[role][scheme](argument, spec)
    except ModelSpecError:
        raise
    except (OSError, ValueError) as exc:  # unreachable hub, missing or unrecognised model files
        raise ModelSpecError(f"cannot load {role} {value!r}: {exc}") from exc


def load_mllm(spec: ModelSpec) -> MLLM:
    return _load("mllm", spec.mllm, spec)


def load_relevance(spec: ModelSpec) -> RelevanceEncoder | None:
    return None if spec.relevance is None else _load("relevance", spec.relevance, spec)


def load_detector(spec: ModelSpec) -> Detector | None:
    return None if spec.detector is None else _load("detector", spec.detector, spec)


def load_models(spec: ModelSpec) -> Models:
    """Every model the spec names. Stages that need one role call load_mllm / load_relevance /
    load_detector instead, so they do not load (and hold memory for) the others."""
    return Models(mllm=load_mllm(spec), relevance=load_relevance(spec), detector=load_detector(spec))


AUTO = "auto"
OWLV2_HUB_ID = "google/owlv2-base-patch16-ensemble"


def _cached_on_hub(repo_id: str) -> bool:
    """The hub model is already in the local Hugging Face cache (so using it needs no download)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _companion(role: str, mllm: str) -> tuple[str | None, str]:
    """The relevance encoder or detector that goes with an MLLM when the user named none, and why."""
    scheme, _, argument = mllm.partition(":")
    if scheme == "demo":
        return f"demo:{argument}", f"{role}: demo:{argument} (the toy-world demo models go together)"
    if scheme == "tiny":
        companion = "tiny:clip" if role == "relevance" else "tiny:owlv2"
        return companion, f"{role}: {companion} (random-weight test model, like --mllm {mllm})"
    if role == "relevance":
        return None, (
            "relevance: none, every rule is checked (no CLIP encoder given; export one with "
            "engine_build/export_clip.py and pass --relevance onnx:DIR for the paper's relevance filter)"
        )
    if _cached_on_hub(OWLV2_HUB_ID):
        return f"owlv2:{OWLV2_HUB_ID}", f"detector: owlv2:{OWLV2_HUB_ID} (found in the local Hugging Face cache)"
    return None, (
        f"detector: none, Strategy 2 is off (pass --detector owlv2:{OWLV2_HUB_ID} to download OWLv2, "
        "or owlv2:DIR)"
    )


def coherent_spec(
    mllm: str, relevance: str | None = AUTO, detector: str | None = AUTO, **fields
) -> tuple[ModelSpec, list[str]]:
    """The ModelSpec for an MLLM and its companions, and one line per companion chosen for the user.

    AUTO picks the companion that matches the MLLM (demo with demo, tiny with tiny, a real MLLM with a real
    detector already on disk, else none). The toy-world demo models understand only toy scenes: mixing
    them with real models is refused.
    """
    chosen = {"relevance": relevance, "detector": detector}
    notes = []
    for role, value in chosen.items():
        if value == AUTO:
            chosen[role], note = _companion(role, mllm)
            notes.append(note)
    demo_mllm = mllm.startswith("demo:")
    for role, value in chosen.items():
        if value is not None and value.startswith("demo:") != demo_mllm:
            raise ModelSpecError(
                f"--{role} {value} cannot be combined with --mllm {mllm}: the demo models understand only "
                "toy-world scenes and never mix with real models; use the demo models for all three roles, or "
                f"real ones (or none) for --{role}"
            )
    return ModelSpec(mllm=mllm, relevance=chosen["relevance"], detector=chosen["detector"], **fields), notes
