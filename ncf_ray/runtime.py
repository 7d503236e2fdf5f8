"""Joining or starting Ray, once, the same way for every stage (prepare, train, tune, serve, bench).

Under `ray job submit` (RAY_ADDRESS set) this joins the cluster; otherwise it starts a local Ray in a private temp
dir and writes that dir's address file, as `ray start` does. Ray Train's PlacementGroupCleaner (it frees the
workers of a finished or ASHA-stopped trial) finds the cluster through that file: on a machine running another Ray
instance (say `ncf-ray serve` beside `ncf-ray tune`) it otherwise fails with "Found multiple active Ray instances"
or asks the wrong cluster, the trial's CPUs stay reserved and the next trial waits forever (seen here). Workers
inherit RAY_TMPDIR, so they read the right file.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path


def ensure_ray(log_to_driver: bool = True) -> bool:
    """Join RAY_ADDRESS or start a local Ray, with Ray Data's progress output off. Returns True when this call
    started a local Ray (the caller may shut it down)."""
    import ray

    # Read by every Ray Data context, trial actors' included (a local Ray's workers inherit this environment).
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    started = False
    if not ray.is_initialized():
        # ERROR: init-time notices (auth token, etc.) would break the "one line on failure" promise.
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=log_to_driver, logging_level=logging.ERROR)
        else:
            tmp = tempfile.mkdtemp(prefix="ncfray", dir="/tmp" if os.path.isdir("/tmp") else None)  # short sockets
            os.environ["RAY_TMPDIR"] = tmp
            atexit.register(shutil.rmtree, tmp, True)  # registered before ray.init: runs after Ray's shutdown
            # The dashboard stays on: the PlacementGroupCleaner asks its state API whether a run is alive, and a
            # sweep hung waiting for a trial's CPUs when it was off (seen here).
            ray.init(address="local", log_to_driver=log_to_driver, logging_level=logging.ERROR)
            Path(tmp, "ray", "ray_current_cluster").write_text(ray.get_runtime_context().gcs_address)
            started = True
    import ray.data

    data_log = logging.getLogger("ray.data")
    data_log.setLevel(logging.ERROR)  # silences the "progress bars disabled" notice itself
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # per-block bars drown the epoch table
    ctx.print_on_execution_start = False
    data_log.setLevel(logging.WARNING)
    return started
