"""The client library installed alone beside numpy 2 judges against the served pipeline.

numpy<2 is a need of the Triton 2.51 Python-backend stub on the server, not of a gRPC client: the
set-up (scripts/setup.sh) installs `./client` with `numpy>=2` into its own venv, `<main venv>/client-numpy2`,
and checks it with `pip check`. Nothing is installed here; without that venv these tests skip, saying so.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from safejudge.shipped import PROJECT_ROOT
from safejudge_client import Verdict

pytest_plugins = ["tests.server_fixtures"]

CLIENT_VENV = Path(sys.prefix) / "client-numpy2"  # beside the venv running the tests, as setup.sh puts it
CLIENT_PYTHON = CLIENT_VENV / "bin" / "python"
STAMP = CLIENT_VENV / ".client-stamp"


def client_digest() -> str:
    """What setup.sh writes to .client-stamp once the client is installed and `pip check` is clean:
    `sha256sum client/pyproject.toml client/safejudge_client/*.py | LC_ALL=C sort | sha256sum`."""
    paths = [PROJECT_ROOT / "client" / "pyproject.toml", *(PROJECT_ROOT / "client" / "safejudge_client").glob("*.py")]
    lines = sorted(
        f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(PROJECT_ROOT)}\n" for path in paths
    )
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def venv_problem() -> str | None:
    if not CLIENT_PYTHON.exists():
        return f"no client venv at {CLIENT_VENV}: run scripts/setup.sh (or make setup) to create it"
    if not STAMP.exists() or STAMP.read_text().strip() != client_digest():
        return f"the client venv at {CLIENT_VENV} holds another version of client/: run scripts/setup.sh"
    return None


PROBLEM = venv_problem()
pytestmark = [pytest.mark.integration, pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")]

# Run with the client venv's python in isolated mode (-I: no current directory, no PYTHONPATH), so that only
# what that venv installed is importable.
JUDGE_SCRIPT = """
import json, sys
import numpy
import safejudge_client
from safejudge_client import JudgeClient

assert int(numpy.__version__.split(".")[0]) >= 2, f"numpy {numpy.__version__}"
url, image = sys.argv[1:]
with JudgeClient(url, timeout_s=120) as client:
    verdict = client.judge(image, "os-bench")
assert "safejudge" not in sys.modules, "the client never imports the server package"
print(json.dumps({"numpy": numpy.__version__, "client": safejudge_client.__file__,
                  "verdict": json.loads(verdict.model_dump_json())}))
"""


def run_client_python(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLIENT_PYTHON), *args], cwd=cwd, capture_output=True, text=True, timeout=180, check=False
    )


def test_the_client_venv_is_consistent(tmp_path):
    checked = run_client_python("-m", "pip", "check", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "No broken requirements found." in checked.stdout
    numpy = run_client_python("-I", "-c", "import numpy; print(numpy.__version__)", cwd=tmp_path)
    assert numpy.returncode == 0 and int(numpy.stdout.split(".")[0]) >= 2, numpy.stdout + numpy.stderr


def test_the_client_beside_numpy_2_judges_an_image(triton_server, tmp_path):
    image = Image.new("RGB", (96, 64), (30, 120, 200))
    ImageDraw.Draw(image).ellipse((20, 10, 70, 50), fill=(230, 60, 40))
    path = tmp_path / "scene.png"
    image.save(path)

    ran = run_client_python("-I", "-c", JUDGE_SCRIPT, triton_server.url, str(path), cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    out = json.loads(ran.stdout.strip().splitlines()[-1])
    assert int(out["numpy"].split(".")[0]) >= 2
    assert Path(out["client"]).is_relative_to(CLIENT_VENV), "the installed client, not the checkout's"
    verdict = Verdict.model_validate(out["verdict"])
    assert verdict.constitution == "os-bench" and verdict.frame_count == 1 and verdict.frames_judged == [0]
    assert verdict.request_id and verdict.model_id
