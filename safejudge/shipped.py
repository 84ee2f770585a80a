"""Where the files safejudge ships live: inside the installed package (a wheel) or, in a source checkout,
at the top of the tree (what operators read and edit). pyproject.toml installs both as package data."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE.parent


def shipped(name: str) -> Path:
    installed = PACKAGE / name
    return installed if installed.is_dir() else PROJECT_ROOT / name


MODEL_REPOSITORY = shipped("model_repository")
CONSTITUTIONS = shipped("constitutions")
