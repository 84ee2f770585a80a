"""scripts/gpu-check.sh, the one GPU check: its dry run on CPU (CI), the 7B stand-in's size, and a GPU test
that needs only PyTorch and transformers (so the GPU machine without TensorRT-LLM runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from safejudge.backends.tiny import QWEN2_VL_SIZES, ensure_tiny_model, qwen2_vl_config
from safejudge.decision import yes_no_token_ids, yes_probability
from safejudge.prompts import chat_messages, yes_no_question

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu-check.sh"


def _run(*args: str, out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHON": sys.executable, **env},
    )


def test_the_dry_run_passes_on_a_cpu_machine(tmp_path):
    done = _run("--dry-run", out=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr + (tmp_path / "gpu-check.log").read_text()
    summary = (tmp_path / "summary.md").read_text()
    for step in ("bash syntax", "imports", "TensorRT-LLM probe", "collect gpu tests", "bench command line"):
        assert f"| {step}" in summary
    assert "FAILED" not in summary and "pytest -m gpu" not in summary  # nothing ran that needs a GPU
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert set(probe) >= {"version", "multimodal_encoder", "encode_once", "logprobs"}
    assert "tests/test_trtllm.py::test_gpu_encode_once_equals_one_request_at_a_time" in (
        tmp_path / "gpu-check.log"
    ).read_text()


def test_an_unknown_argument_is_refused(tmp_path):
    done = _run("--bogus", out=tmp_path)
    assert done.returncode == 2 and "unknown argument --bogus" in done.stderr


def test_the_7b_stand_in_has_qwen2_vl_7b_dimensions():
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model("qwen2-vl"))
    with torch.device("meta"):  # shapes only: no 33 GB of weights
        model = Qwen2VLForConditionalGeneration(qwen2_vl_config("7b", tokenizer))
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == 8_291_375_616  # Qwen2-VL-7B-Instruct's safetensors hold 8.29B parameters
    text = QWEN2_VL_SIZES["7b"]["text"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_key_value_heads"]) == (3584, 28, 4)


@pytest.mark.gpu
def test_gpu_tiny_qwen2_vl_scores_on_cuda_as_on_cpu():
    """The project's prompts and Yes/No reduction give the same M on CUDA as on the CPU (plain transformers:
    the hf backend has no device option yet)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the tiny models need transformers 5 (the TensorRT-LLM container pins 4.56)")
    from transformers import Qwen2VLForConditionalGeneration

    from safejudge.backends.hf import PROCESSORS

    directory = ensure_tiny_model("qwen2-vl")
    processor = PROCESSORS["qwen2_vl"].from_pretrained(directory)
    model = Qwen2VLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    statements = ["a person is visible", "a knife is held in a hand", "the image is mostly red"]
    prompts = [
        processor.apply_chat_template(chat_messages([yes_no_question(s)], True), tokenize=False,
                                      add_generation_prompt=True)
        for s in statements
    ]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 112, 3), dtype=np.uint8), "RGB")
    inputs = processor(text=prompts, images=[image] * len(prompts), return_tensors="pt", padding=True)
    yes, no = yes_no_token_ids(processor.tokenizer.get_vocab())
    scores = {}
    for device in ("cpu", "cuda"):
        with torch.no_grad():
            logits = model.to(device)(**{k: v.to(device) for k, v in inputs.items()}).logits[:, -1]
        scores[device] = yes_probability(logits.float().cpu().numpy(), yes, no)
    np.testing.assert_allclose(scores["cuda"], scores["cpu"], atol=1e-2)  # TF32 convolutions on CUDA
