"""Prepare a checkpoint for the TensorRT-LLM MLLM backend (safejudge/backends/trtllm.py).

The LLM API's PyTorch backend serves a Hugging Face checkpoint directly, so there is no engine to build:
this script fetches a checkpoint and checks that it can be served, without a GPU.

    python engine_build/build_trtllm.py check /models/Qwen2-VL-7B-Instruct
    python engine_build/build_trtllm.py download Qwen/Qwen2-VL-7B-Instruct /models/Qwen2-VL-7B-Instruct

`check` prints the report as JSON and exits 2 (problems on stderr) if the checkpoint cannot be served.
`download` needs network access to the Hugging Face hub (huggingface_hub comes with transformers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safejudge.backends.trtllm import inspect_checkpoint

# What the backend reads; skips other formats and extras some repositories carry (GGUF, ONNX, pickles).
CHECKPOINT_FILES = ["*.json", "*.jinja", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


def check(directory: Path) -> int:
    report = inspect_checkpoint(directory)
    print(report.model_dump_json(indent=2, exclude={"problems"}))
    for problem in report.problems:
        print(f"error: {directory}: {problem}", file=sys.stderr)
    return 0 if report.ok else 2


def download(hub_id: str, directory: Path) -> int:
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id=hub_id, local_dir=directory, allow_patterns=CHECKPOINT_FILES)
    return check(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="check a checkpoint directory")
    check_parser.add_argument("directory", type=Path)
    download_parser = commands.add_parser("download", help="fetch a checkpoint from the hub, then check it")
    download_parser.add_argument("hub_id")
    download_parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(args.directory)
    return download(args.hub_id, args.directory)


if __name__ == "__main__":
    sys.exit(main())
