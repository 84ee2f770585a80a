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
# The client alone beside numpy 2 (tests/test_client_numpy2.py): numpy<2 is the server stub's pin, not the
# client's. Its own venv under $VENV (ignored by git, removed with it); the client is installed again only
# when client/'s pyproject or sources changed (their digest is kept in .client-stamp once `pip check` is clean).
CLIENT_VENV="$VENV/client-numpy2"
client_stamp=$(sha256sum client/pyproject.toml client/safejudge_client/*.py | LC_ALL=C sort | sha256sum | cut -d' ' -f1)
if [ "$(cat "$CLIENT_VENV/.client-stamp" 2>/dev/null)" != "$client_stamp" ]; then
    [ -x "$CLIENT_VENV/bin/python" ] || "$PYTHON" -m venv "$CLIENT_VENV"
    rm -rf client/build  # setuptools' in-tree build directory: a module removed from client/ must not linger
    "$CLIENT_VENV/bin/python" -m pip install -q ./client "numpy>=2"  # a local directory is always reinstalled
    "$CLIENT_VENV/bin/python" -m pip check
    echo "$client_stamp" > "$CLIENT_VENV/.client-stamp"
fi
touch "$VENV/.installed"
