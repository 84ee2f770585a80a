#!/usr/bin/env bash
# The one GPU check of safejudge (docs/gpu.md, "Checking a GPU machine").
#
# Made for one H100/H200 with PyTorch and transformers but no TensorRT-LLM, no network and no model weights,
# in under 8 minutes:
#   1. environment, imports and the TensorRT-LLM capability probe (probe.json);
#   2. every `gpu`-marked test (`pytest -m gpu`): those that need TensorRT-LLM skip without it, and run
#      too where it is installed (the NGC container; set SAFEJUDGE_TRTLLM_MODEL to a checkpoint directory);
#   3. `safejudge bench` on random-weight models of real sizes (tiny:qwen2-vl-2b-shape; with --with-7b also
#      tiny:qwen2-vl-7b-shape, about 33 GB of float32 weights built on the machine first). The tiny models
#      need transformers 5: where an older one is installed (the TensorRT-LLM container pins 4.56) the bench
#      is skipped and the summary says so; --no-bench skips it anyway.
# Results go to the directory given with --out (default: $OUT when set, else ./gpu-check-out): summary.md,
# env.txt, probe.json, pytest-gpu.xml, bench RESULTS.md and plots, gpu-check.log.
#
# --dry-run checks on any CPU machine, in seconds, what can be checked without a GPU: bash syntax, the
# Python imports, that pytest collects the gpu tests, that the bench command lines parse. CI runs it
# (tests/test_gpu_check.py).
#
# The bench's models run on CUDA ('tiny:qwen2-vl-2b-shape?device=cuda', in bfloat16); BENCH_DEVICE_OPTION=
# (empty) runs them on the machine's CPU instead.
#
# Usage: scripts/gpu-check.sh [--dry-run] [--out DIR] [--with-7b] [--served] [--no-bench]
# Environment: PYTHON (default python3), PYTEST_TIMEOUT (300 s), BENCH_TIMEOUT (360 s),
#              SAFEJUDGE_TRTLLM_MODEL (for the TensorRT-LLM GPU tests), BENCH_DEVICE_OPTION (?device=cuda).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
DRY_RUN=0
WITH_7B=0
SERVED=0
BENCH=1
OUT_DIR=${OUT:-$ROOT/gpu-check-out}
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --with-7b) WITH_7B=1 ;;
        --served) SERVED=1 ;;
        --no-bench) BENCH=0 ;;
        --out) shift; OUT_DIR=${1:?--out needs a directory} ;;
        --out=*) OUT_DIR=${1#--out=} ;;
        -h|--help) sed -n '2,/^set -uo/{/^#/p}' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT:$ROOT/client${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT_DIR/gpu-check.log"
SUMMARY="$OUT_DIR/summary.md"
: >"$LOG"
FAILED=0
{
    echo "# safejudge GPU check"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), dry run: $DRY_RUN"
    echo
    echo "| step | result | seconds |"
    echo "|---|---|---|"
} >"$SUMMARY"

# step NAME COMMAND...: runs it, logs its output, records pass/fail and time; never stops the script.
step() {
    local name=$1 start rc
    shift
    start=$(date +%s)
    echo "== $name: $*" | tee -a "$LOG"
    "$@" >>"$LOG" 2>&1
    rc=$?
    local took=$(( $(date +%s) - start ))
    if [ $rc -eq 0 ]; then
        echo "| $name | ok | $took |" >>"$SUMMARY"
        echo "   ok ($took s)"
    else
        [ $rc -eq 124 ] && name="$name (timed out)"
        echo "| $name | FAILED (exit $rc) | $took |" >>"$SUMMARY"
        echo "   FAILED (exit $rc, $took s); see $LOG" >&2
        FAILED=1
    fi
    return 0
}

GPU_TEST_FILES=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')

# The bench's model spec: on CUDA unless BENCH_DEVICE_OPTION is set (empty: the CPU).
BENCH_DEVICE_OPTION=${BENCH_DEVICE_OPTION-?device=cuda}
bench_spec() {
    echo "tiny:$1$BENCH_DEVICE_OPTION"
}

bench_args() {  # bench_args SPEC: the bench command line, small enough for the time budget
    echo bench --mllm "$1" --dtype bfloat16 --constitution-rules 5 --images 2 --sequential-images 1 --concurrency 1 \
        --requests 2 --rules 5 --sizes 448 "$([ $SERVED -eq 1 ] && echo --served || echo --no-served)" \
        --results "$OUT_DIR/RESULTS.md"
}

parse_bench() {  # the command line parses and its model spec is accepted, without running anything
    "$PYTHON" - "$@" <<'EOF'
import sys

import typer.main

from safejudge.backends.registry import ModelSpec
from safejudge.cli import app

command = typer.main.get_command(app)
context = command.make_context("safejudge", list(sys.argv[1:]), resilient_parsing=False)
name, bench, rest = command.resolve_command(context, list(sys.argv[1:]))
parsed = bench.make_context(name, rest, parent=context)
mllm = parsed.params["mllm"]
ModelSpec(mllm=mllm, relevance=None)
if mllm.startswith("tiny:"):  # the registry checks the name only when it loads: check it here
    from safejudge.backends.tiny import TINY_BUILDERS

    name = mllm.removeprefix("tiny:").partition("?")[0]
    assert name in TINY_BUILDERS, f"no tiny model {name!r}; there are {sorted(TINY_BUILDERS)}"
print("parsed:", {k: v for k, v in parsed.params.items() if k in ("mllm", "images", "served", "results")})
EOF
}

environment() {
    "$PYTHON" - <<'EOF'
import importlib.util
import platform
import sys

print("python", sys.version.split()[0], platform.machine())
for name in ("torch", "transformers", "tensorrt_llm", "pytest", "tritonclient", "pytriton"):
    print(name, "present" if importlib.util.find_spec(name) else "MISSING")
import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for index in range(torch.cuda.device_count()):
    print("device", index, torch.cuda.get_device_name(index))
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    return 0
}

imports() {
    "$PYTHON" -c "import safejudge.backends.trtllm, safejudge.backends.registry, safejudge.backends.tiny, safejudge.bench, safejudge.cli"
}

probe() {
    "$PYTHON" - "$OUT_DIR/probe.json" <<'EOF'
import dataclasses
import json
import sys

from safejudge.backends.trtllm import probe_capabilities

caps = probe_capabilities()
report = {**dataclasses.asdict(caps), "encode_once": caps.encode_once, "logprobs": caps.logprobs}
report = {k: sorted(v) if isinstance(v, frozenset) else v for k, v in report.items()}
open(sys.argv[1], "w").write(json.dumps(report, indent=2))
print(json.dumps(report))
EOF
}

collect_gpu_tests() {  # pytest finds the gpu tests (at least one per file that has the marker)
    local listing
    listing=$("$PYTHON" -m pytest --collect-only -q -m gpu -p no:cacheprovider $GPU_TEST_FILES 2>&1) || {
        echo "$listing"; return 1; }
    echo "$listing"
    echo "$listing" | grep -q "::test_gpu"
}

skip() {  # skip NAME WHY: recorded, not a failure
    echo "| $1 | skipped: $2 | 0 |" >>"$SUMMARY"
    echo "== $1: skipped ($2)" | tee -a "$LOG"
}

transformers_5() {
    "$PYTHON" -c "import sys, transformers; sys.exit(int(transformers.__version__.split('.')[0]) < 5)" 2>/dev/null
}

needs_cuda() {
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
}

run_gpu_tests() {  # skips are listed with their reasons (-ra): a skipped test has not been checked
    timeout "${PYTEST_TIMEOUT:-300}" "$PYTHON" -m pytest -m gpu -ra -p no:cacheprovider \
        --junitxml="$OUT_DIR/pytest-gpu.xml" $GPU_TEST_FILES 2>&1 | tee "$OUT_DIR/pytest-gpu.txt"
    return "${PIPESTATUS[0]}"
}

run_bench() {  # run_bench SPEC
    # shellcheck disable=SC2046
    timeout "${BENCH_TIMEOUT:-360}" "$PYTHON" -m safejudge.cli $(bench_args "$1")
}

echo "gpu-check: results in $OUT_DIR"
step "bash syntax" bash -n "$0"
step "environment" environment
step "imports" imports
step "TensorRT-LLM probe" probe
step "collect gpu tests" collect_gpu_tests
SPEC_2B=$(bench_spec qwen2-vl-2b-shape)
SPEC_7B=$(bench_spec qwen2-vl-7b-shape)
# shellcheck disable=SC2046
step "bench command line ($SPEC_2B)" parse_bench $(bench_args "$SPEC_2B")
# shellcheck disable=SC2046
step "bench command line ($SPEC_7B)" parse_bench $(bench_args "$SPEC_7B")

if [ $DRY_RUN -eq 0 ]; then
    step "CUDA visible" needs_cuda
    step "pytest -m gpu" run_gpu_tests
    echo "| (pytest says) | $(grep -E '(passed|failed|skipped|error)' "$OUT_DIR/pytest-gpu.txt" | tail -1 | tr -d '=|') | |" \
        >>"$SUMMARY"
    if [ $BENCH -eq 0 ]; then
        skip "bench" "--no-bench"
    elif ! transformers_5; then
        skip "bench" "the tiny models need transformers 5"
    else
        step "bench $SPEC_2B" run_bench "$SPEC_2B"
        if [ $WITH_7B -eq 1 ]; then
            step "bench $SPEC_7B" run_bench "$SPEC_7B"
        fi
    fi
fi

if [ -z "$BENCH_DEVICE_OPTION" ]; then
    echo >>"$SUMMARY"
    echo "note: BENCH_DEVICE_OPTION was empty: the bench ran its models on the CPU." >>"$SUMMARY"
fi
echo
cat "$SUMMARY"
exit $FAILED
