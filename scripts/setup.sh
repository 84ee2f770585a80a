#!/usr/bin/env bash
# Creates .venv and installs safejudge with everything the server, the builds and the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[dev]"
# perf_analyzer (`safejudge perf-analyzer`, tests/test_perf_analyzer.py): the 2.51 program and libcudart are
# unpacked into $VENV/share/safejudge/perf_analyzer, Debian's libb64-0d installed with apt-get when missing
# (as root). A re-run with everything in place downloads nothing. Without it only perf-analyzer is missing:
# say why in one line and go on.
if ! perf_problem=$("$VENV/bin/python" -m safejudge.perf install 2>&1 >/dev/null); then
    echo "warning: safejudge perf-analyzer will be unavailable: ${perf_problem#perf_analyzer unavailable: }" >&2
fi
touch "$VENV/.installed"
