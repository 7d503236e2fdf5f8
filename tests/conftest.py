"""Shared fixtures. Unit tests never start Ray; integration modules share one local Ray per module."""

from __future__ import annotations

import os

import pytest

# Keep Ray quiet and small in tests; the dashboard and usage stats are not needed here.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray runtime with 2 CPUs for the whole test module."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
