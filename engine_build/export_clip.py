"""Export a CLIP model's image and text encoders to ONNX for the relevance stage, checked against PyTorch.

    .venv/bin/python engine_build/export_clip.py --model openai/clip-vit-base-patch16 --out models/clip-b16
    .venv/bin/python engine_build/export_clip.py --model /path/to/local/clip --out models/clip

The output directory (image.onnx, text.onnx, tokenizer.json, clip_onnx.json) is what the model spec
`relevance: "onnx:<dir>"` serves with ONNX Runtime alone. The export fails if ONNX Runtime and PyTorch
differ by more than safejudge.backends.clip_onnx.EXPORT_TOLERANCE on sample inputs.
"""

from __future__ import annotations

import argparse
import sys
import time

from safejudge.backends.clip_onnx import export_clip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="hub id or local directory of a transformers CLIPModel")
    parser.add_argument("--out", required=True, help="directory to write the ONNX export into")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        check = export_clip(args.model, args.out, opset=args.opset)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(f"image encoder: max abs diff ONNX Runtime vs PyTorch {check.image_max_abs_diff:.3g}")
    print(f"text encoder:  max abs diff ONNX Runtime vs PyTorch {check.text_max_abs_diff:.3g}")
    print(f"wrote {args.out} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
