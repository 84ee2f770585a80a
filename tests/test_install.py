"""A real install: the wheel, installed (not editable) into a fresh virtual environment, serves, judges and
demos from a directory that holds nothing of the source tree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from safejudge.constitution import load_constitution
from safejudge.evaluation import TOY_CONSTITUTION, demo_scenes
from safejudge.shipped import PROJECT_ROOT
from safejudge_client import JudgeClient
from tests.serve_process import serve_process

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a fresh venv holding the built wheel; its dependencies come from this environment's
    site-packages through a .pth path line (no network; the editable install's finder is not loaded)."""
    root = tmp_path_factory.mktemp("install")
    # From a copy without build outputs: setuptools' build/ keeps files deleted from the tree since.
    source = root / "source"
    shutil.copytree(PROJECT_ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(root / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (root / "dist").glob("safejudge-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    return venv / "bin"


def run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(bin_dir / "safejudge"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_installed_package_is_not_the_source_tree(installed, tmp_path):
    where = subprocess.run([str(installed / "python"), "-c", "import safejudge, safejudge_client; "
                            "print(safejudge.__file__); print(safejudge_client.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert str(PROJECT_ROOT / "safejudge") not in where and "site-packages" in where, where
    version = run(installed, "--version", cwd=tmp_path)
    assert re.fullmatch(r"safejudge \d+\.\d+\.\d+\S*\n", version.stdout), version


def test_the_installed_package_demos_and_serves_from_any_directory(installed, tmp_path):
    demo = run(installed, "demo", "--scenes", "2", cwd=tmp_path)
    assert demo.returncode == 0 and "verdicts name exactly" in demo.stdout, demo.stderr

    env = {**os.environ, "PATH": f"{installed}{os.pathsep}{os.environ['PATH']}",
           "SAFEJUDGE_CACHE": str(tmp_path / "cache")}
    command = [str(installed / "safejudge"), "serve", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0"]
    with serve_process(command, tmp_path, env) as served:
        scene = demo_scenes(load_constitution(TOY_CONSTITUTION), 1, seed=0)[0].scene
        with JudgeClient(served.url, timeout_s=120) as client:
            assert client.judge(scene.image, "toy-world").constitution == "toy-world"
    assert served.returncode == 0, "".join(served.output)
