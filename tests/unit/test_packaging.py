"""Packaging files agree with each other: jobs/runtime_env.yaml installs what pyproject.toml depends on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[2]
# Left to the cluster node on purpose (see the comment in runtime_env.yaml): Ray is the cluster's own, and
# torch is the CPU or CUDA build the node was set up with.
NODE_PROVIDED = {"ray", "torch"}


def _name(req: str) -> str:
    """The normalised distribution name of a requirement string ("ray[train]==2.60.*" -> "ray")."""
    return re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_runtime_env_pip_list_matches_pyproject():
    project = _pyproject()["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["tune"]]
    expected = {_name(r): r.replace(" ", "") for r in wanted if _name(r) not in NODE_PROVIDED}
    listed = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())["pip"]["packages"]
    got = {_name(r): r.replace(" ", "") for r in listed}
    assert got == expected  # same packages, same version ranges


def test_license_is_an_spdx_string():
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0"
    assert any(_name(r) == "tqdm" for r in project["dependencies"])
