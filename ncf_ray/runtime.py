"""Joining or starting Ray, once, the same way for every stage (prepare, train, tune, serve, bench).

Under `ray job submit` (RAY_ADDRESS set) this joins the cluster; otherwise it starts a local Ray in a private temp
dir and writes that dir's address file, as `ray start` does. Ray Train's PlacementGroupCleaner (it frees the
workers of a finished or ASHA-stopped trial) finds the cluster through that file: on a machine running another Ray
instance (say `ncf-ray serve` beside `ncf-ray tune`) it otherwise fails with "Found multiple active Ray instances"
or asks the wrong cluster, the trial's CPUs stay reserved and the next trial waits forever. Workers
inherit RAY_TMPDIR, so they read the right file.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s), and each step of
# a run (workers up, a report, the end) waits for the next poll. 0.25 s takes ~5 s off every TorchTrainer run,
# every Tune trial's included (an empty 1-worker fit: 16.3 s -> 11.7 s on the 2-core VM); a missed poll is not a
# failure (Ray marks a worker dead only after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min). Set in the
# environment a local Ray starts with, where a value already there wins; a cluster sets it where `ray start` runs.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = "0.25"


def ensure_ray(log_to_driver: bool = True) -> bool:
    """Join RAY_ADDRESS or start a local Ray, with Ray Data's progress output off. Returns True when this call
    started a local Ray (the caller may shut it down).

    Inside a console session (ncf_ray/console.py) Ray's output goes to the session's log file: workers' and
    actors' forwarded output included (log_to_driver is then on, whatever the argument, and routed to the file),
    and Ray's loggers at INFO. Outside one, `log_to_driver` decides and Ray's loggers print errors only."""
    import ray

    from ncf_ray import console

    # Read by every Ray Data context, trial actors' included (a local Ray's workers inherit this environment).
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)
    routed = console.active() is not None and console.can_route_worker_logs()
    if routed:
        log_to_driver = True
    # Outside a session, ERROR: init-time notices (auth token, etc.) would break the "one line on failure" promise.
    level = logging.INFO if console.active() is not None else logging.ERROR
    console.reroute()
    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=log_to_driver, logging_level=level)
        else:
            tmp = tempfile.mkdtemp(prefix="ncfray", dir="/tmp" if os.path.isdir("/tmp") else None)  # short sockets
            os.environ["RAY_TMPDIR"] = tmp
            atexit.register(shutil.rmtree, tmp, True)  # registered before ray.init: runs after Ray's shutdown
            # The dashboard stays on: the PlacementGroupCleaner asks its state API whether a run is alive, and a
            # sweep hung waiting for a trial's CPUs when it was off.
            ray.init(address="local", log_to_driver=log_to_driver, logging_level=level)
            Path(tmp, "ray", "ray_current_cluster").write_text(ray.get_runtime_context().gcs_address)
            started = True
    import ray.data

    data_log = logging.getLogger("ray.data")
    data_log.setLevel(logging.ERROR)  # silences the "progress bars disabled" notice itself
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # per-block bars drown the epoch table
    ctx.print_on_execution_start = False
    data_log.setLevel(logging.WARNING)
    if routed:
        console.attach_worker_logs()
    console.reroute()  # Ray Data adds console handlers of its own on import
    console.announce_log()
    return started


# ------------------------------------------------------------------------------------------- CPU allotment
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in cores (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us` /
    `cpu.cfs_period_us`), or None when unlimited or unreadable. A container started with `--cpus 2` on a 64-core
    host reports 64 in os.cpu_count() but may run only 2 cores' worth."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        q1, p1 = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if q1.is_file() and p1.is_file():
            quota_us, period_us = int(q1.read_text()), int(p1.read_text())
            return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
    return None


def usable_cpus(affinity: int | None = None, quota: float | None = None, ray_node_cpus: float | None = None) -> int:
    """Cores this process may use: the smallest of its CPU affinity mask, its cgroup quota (rounded down, at
    least 1) and, inside a Ray cluster, the CPU resource Ray gives this node. Arguments left None are read from
    the system (so tests pass them explicitly)."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limits = [affinity]
    quota = quota if quota is not None else cgroup_cpu_limit()
    if quota is not None:
        limits.append(max(1, int(quota)))
    ray_node_cpus = ray_node_cpus if ray_node_cpus is not None else _ray_node_cpus()
    if ray_node_cpus:
        limits.append(max(1, int(ray_node_cpus)))
    return max(1, min(limits))


def _ray_node_cpus() -> float | None:
    """Ray's CPU resource of the node this process runs on, or None outside Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        node = ray.get_runtime_context().get_node_id()
        for n in ray.nodes():
            if n.get("NodeID") == node and n.get("Alive", True):
                return float(n.get("Resources", {}).get("CPU", 0)) or None
    except Exception:  # an answer about threads must never fail a run
        return None
    return None


def assigned_cpus() -> float | None:
    """CPUs Ray reserved for the current task or actor (a Ray Train worker: 1 unless resources_per_worker says
    otherwise), or None outside a Ray worker."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        ctx = ray.get_runtime_context()
        if ctx.worker.mode != ray.WORKER_MODE:  # the driver has no reservation
            return None
        return float(ctx.get_assigned_resources().get("CPU", 0)) or None
    except Exception:
        return None
