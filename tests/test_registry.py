"""The model registry: spec validation, clear errors, and loading each scheme."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from safejudge.backends import registry
from safejudge.backends.clip_onnx import OnnxClipEncoder
from safejudge.backends.hf import HFVisionLanguageModel
from safejudge.backends.owlv2 import Owlv2Detector
from safejudge.backends.registry import ModelSpec, ModelSpecError, load_detector, load_mllm, load_models, load_relevance
from safejudge.backends.tiny import TINY_VERSION, ensure_tiny_clip_onnx, ensure_tiny_model


def test_default_spec_plus_tiny_detector_loads_all_three_roles():
    spec = ModelSpec(detector="tiny:owlv2")
    models = load_models(spec)
    assert isinstance(models.mllm, HFVisionLanguageModel) and models.mllm.model_id == f"tiny:qwen2-vl-v{TINY_VERSION}@float32"
    assert isinstance(models.relevance, OnnxClipEncoder) and models.relevance.model_id == "tiny:clip"
    assert isinstance(models.detector, Owlv2Detector) and models.detector.model_id == "tiny:owlv2"


def test_roles_set_to_none_load_nothing():
    spec = ModelSpec(relevance=None, detector=None)
    assert load_relevance(spec) is None and load_detector(spec) is None


def test_local_directories_load_through_the_real_schemes():
    spec = ModelSpec(
        mllm=f"hf:{ensure_tiny_model('idefics3')}",
        relevance=f"onnx:{ensure_tiny_clip_onnx()}",
        detector=f"owlv2:{ensure_tiny_model('owlv2')}",
        dtype="bfloat16",
    )
    mllm = load_mllm(spec)
    assert mllm.model_id == f"{spec.mllm}@bfloat16" and mllm.model.dtype == torch.bfloat16
    assert load_relevance(spec).model_id == spec.relevance
    assert load_detector(spec).model_id == spec.detector


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mllm", "llava:foo", "unknown mllm scheme 'llava'"),
        ("mllm", "qwen2-vl", "must be '<scheme>:<argument>'"),
        ("mllm", "hf:", "must be '<scheme>:<argument>'"),
        ("relevance", "clip:foo", "unknown relevance scheme 'clip'"),
        ("detector", "yolo:v8", "unknown detector scheme 'yolo'"),
        ("dtype", "float16", "float32"),
        ("threads", 0, "greater than or equal to 1"),
        ("gpu", True, "Extra inputs are not permitted"),
    ],
)
def test_bad_specs_are_refused_with_the_reason(field, value, message):
    with pytest.raises(ValidationError, match=message):
        ModelSpec(**{field: value})


@pytest.mark.parametrize(
    ("loader", "spec", "message"),
    [
        (load_mllm, ModelSpec(mllm="tiny:llava"), "no tiny mllm 'llava'"),
        (load_mllm, ModelSpec(mllm="hf:/nonexistent/safejudge-model"), "mllm directory .* does not exist"),
        (load_mllm, ModelSpec(mllm="hf:./missing-model-dir"), "mllm directory .* does not exist"),
        (load_relevance, ModelSpec(relevance="tiny:siglip"), "no tiny relevance encoder 'siglip'"),
        (load_relevance, ModelSpec(relevance="onnx:/nonexistent/clip"), "export_clip.py"),
        (load_detector, ModelSpec(detector="tiny:owlvit"), "no tiny detector 'owlvit'"),
        (load_detector, ModelSpec(detector="owlv2:/nonexistent/owl"), "detector directory .* does not exist"),
    ],
)
def test_unloadable_specs_fail_with_a_clear_error(loader, spec, message):
    with pytest.raises(ModelSpecError, match=message):
        loader(spec)


def test_a_new_scheme_is_one_table_entry(monkeypatch):
    loaded = []
    monkeypatch.setitem(registry.MLLM_LOADERS, "fake", lambda argument, spec: loaded.append(argument) or "model")
    assert load_mllm(ModelSpec(mllm="fake:weights", relevance=None)) == "model"
    assert loaded == ["weights"]


def test_a_directory_without_model_files_fails_with_a_clear_error(tmp_path):
    with pytest.raises(ModelSpecError, match="cannot load mllm .hf:.*(config.json|model_type)"):
        load_mllm(ModelSpec(mllm=f"hf:{tmp_path}"))
    with pytest.raises(ModelSpecError, match="cannot load relevance 'onnx:.*missing clip_onnx.json"):
        load_relevance(ModelSpec(relevance=f"onnx:{tmp_path}"))


def test_hf_and_tiny_mllms_take_a_device_option():
    model = load_mllm(ModelSpec(mllm="tiny:qwen2-vl?device=cpu", relevance=None, threads=1))
    assert model.device.type == "cpu" and model.model_id.startswith("tiny:qwen2-vl?device=cpu")
    for spec, message in (
        ("tiny:qwen2-vl?device=tpu", "must be cpu, cuda or cuda:<index>"),
        ("tiny:qwen2-vl?dev=cuda", "unknown mllm option"),
        ("tiny:qwen2-vl?device", "key=value"),
    ):
        with pytest.raises(ModelSpecError, match=message):
            load_mllm(ModelSpec(mllm=spec, relevance=None, threads=1))
