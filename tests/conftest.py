"""Shared fixtures. Unit tests never start Ray; integration modules share one local Ray per module."""

from __future__ import annotations

import os

import pytest

# Keep Ray quiet and small in tests; the dashboard and usage stats are not needed here.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# What ensure_ray gives a local Ray (ncf_ray/runtime.py): the tests' own ray.init gets it too.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray runtime with 2 CPUs for the whole test module."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def free_port() -> int:
    """A TCP port free on loopback now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_on_loopback():
    """Local Ray (2 CPUs) with Serve on a free loopback port behind HAProxy, as `ncf-ray serve` runs it; yields
    the base URL. The environment Ray's processes inherit is set here: HAProxy and Serve's throughput mode on
    (as `ncf_ray.serve.start_ray` sets them), and a 1 s deregistration
    window (30 s by default) so app deletion and shutdown stay quick. Restored afterwards."""
    import ray
    from ray import serve

    from ncf_ray.serve import HA_PROXY_ENV, THROUGHPUT_ENV

    env = {HA_PROXY_ENV: "1", THROUGHPUT_ENV: "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
