"""cluster.yaml (and the README's on-prem variant) pass Ray's own cluster-launcher validation.

Uses the code `ray up` runs before touching a cloud: `prepare_config` (merge the provider's defaults, fill
min/max workers) then `validate_config` (ray-schema.json + cross-field checks). Imports only Ray's autoscaler
config helpers: no Ray runtime starts and no network or cloud call is made.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from ncf_ray.runtime import TRAIN_POLL_ENV, TRAIN_POLL_S

ROOT = Path(__file__).resolve().parents[2]


def _validate(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(copy.deepcopy(cfg))
    validate_config(full)
    return full


@pytest.fixture(scope="module")
def cluster_cfg() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_ray_validation(cluster_cfg):
    full = _validate(cluster_cfg)
    assert full["provider"]["type"] == "aws"
    head = full["available_node_types"][full["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # a CPU head
    gpu = full["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= full["max_workers"]  # an autoscaling group


def test_cluster_yaml_installs_the_project_and_keeps_auth_on(cluster_cfg):
    assert any("pip install" in c and "ncf_ray" in c for c in cluster_cfg["setup_commands"])
    assert "/home/ubuntu/ncf_ray" in cluster_cfg["file_mounts"]
    for cmds in (cluster_cfg["head_start_ray_commands"], cluster_cfg["worker_start_ray_commands"]):
        start = next(c for c in cmds if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start
        assert f"{TRAIN_POLL_ENV}={TRAIN_POLL_S}" in start  # the poll a local Ray gets (ncf_ray/runtime.py)
    head_start = next(c for c in cluster_cfg["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head_start


def test_validation_catches_a_broken_config(cluster_cfg):
    """The check has teeth: a typo'd key and min_workers above the global max are refused."""
    import jsonschema

    bad = copy.deepcopy(cluster_cfg)
    bad["available_node_types"]["gpu_worker"]["min_worker"] = 1  # typo
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)
    bad = copy.deepcopy(cluster_cfg)
    bad["available_node_types"]["gpu_worker"]["min_workers"] = bad["max_workers"] + 1
    with pytest.raises(ValueError):
        _validate(bad)


def test_readme_on_prem_variant_passes_ray_validation():
    """The local-provider (on-prem) YAML shown in the README is valid too."""
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "type: local" in b]
    assert blocks, "README.md has no ```yaml block with the local provider"
    full = _validate(yaml.safe_load(blocks[0]))
    assert full["provider"]["type"] == "local"
