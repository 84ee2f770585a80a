"""ONE real safejudge Triton server for the whole test session, on the tiny models and free ports.

Use from a test module with `pytest_plugins = ["tests.server_fixtures"]` (pytest then runs the
session fixture once however many modules ask for it). The server's stages load the tiny models from
the same on-disk cache as `tiny_models` here, so served and in-process results can be compared exactly.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from safejudge.backends.base import Models
from safejudge.backends.registry import coherent_spec, load_models
from safejudge.server import ServeSettings, TritonServer
from safejudge.shipped import PROJECT_ROOT

CONSTITUTIONS = PROJECT_ROOT / "constitutions"
# What `safejudge serve --mllm tiny:qwen2-vl` serves with every other flag at its default (tiny CLIP and
# OWLv2 as companions), on one thread per model.
SERVED_SPEC = coherent_spec("tiny:qwen2-vl", threads=1)[0]
# Loading torch in several stubs on two shared cores takes a while; a hang is caught well before this.
READY_TIMEOUT_S = 300.0


@pytest.fixture(scope="session")
def tiny_models() -> Models:
    """The models the served pipeline runs, loaded in the test process (the reference)."""
    return load_models(SERVED_SPEC)


@pytest.fixture(scope="session")
def served_constitutions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory the server serves: a copy of the shipped constitutions that tests may add files to."""
    directory = tmp_path_factory.mktemp("constitutions")
    for path in CONSTITUTIONS.glob("*.yaml"):
        shutil.copy(path, directory / path.name)
    return directory


@pytest.fixture(scope="session")
def triton_server(
    tmp_path_factory: pytest.TempPathFactory, served_constitutions: Path, tiny_models: Models
) -> Iterator[TritonServer]:
    """The served pipeline (safety_judge) with the shipped constitutions and the default serve settings.

    tiny_models first: on a fresh machine the tiny models are built once here, not by every stub at once.
    A fresh compiled-constitution cache, so the served compile path runs too. Stopped, and its /dev/shm
    regions checked gone, at the end of the session.
    """
    settings = ServeSettings(
        models=SERVED_SPEC,
        constitutions=served_constitutions,
        cache_dir=tmp_path_factory.mktemp("compiled"),
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        ready_timeout=READY_TIMEOUT_S,
    )
    server = settings.server()
    server.start()
    try:
        yield server
    finally:
        server.stop()
    assert server.shm_regions() == [], "the server's /dev/shm regions must be removed after stop"
