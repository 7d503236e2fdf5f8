"""Benchmark `prepare` on the synthetic source: rows/s, seconds and peak memory for 1M and 20M interactions.

    ncf-ray bench prepare [--quick]                 # the table row in bench/RESULTS.md (calls `measure`)
    python -m ncf_ray.bench.prepare [--quick]       # the figures printed; --quick: 1M only

Each size runs in a fresh subprocess (a fresh local Ray), so peak figures do not leak between sizes. Memory:
- driver_maxrss_mib: ru_maxrss of the driver process (RUSAGE_SELF);
- children_maxrss_mib: ru_maxrss over reaped descendants (RUSAGE_CHILDREN: the largest single one);
- tree_rss_peak_mib: peak of the summed RSS of the driver and every Ray process it started (raylet, GCS,
  workers), sampled every 0.25 s; it counts shared pages (the object store) once per process that maps them;
- tree_pss_peak_mib: the same with PSS (shared pages split between the processes mapping them): the honest total.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import threading
import time
from typing import Any

from ncf_ray.bench import row, run_module

SIZES = {
    "1m": {"users": 6040, "items": 3706, "interactions": 1_000_000},
    "20m": {"users": 138_000, "items": 27_000, "interactions": 20_000_000},
}
MIB = 1024 * 1024


class TreeMemory:
    """Samples the summed RSS/PSS of this process and all its descendants in a background thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.rss_peak = 0
        self.pss_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            rss = pss = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                    rss += info.rss
                    pss += getattr(info, "pss", info.rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self.rss_peak = max(self.rss_peak, rss)
            self.pss_peak = max(self.pss_peak, pss)
            self._stop.wait(self.interval)


def run_one(size: str) -> dict[str, Any]:
    """Prepare one synthetic size in this process (called in the per-size subprocess)."""
    import logging

    import ray

    from ncf_ray.config import DataConfig
    from ncf_ray.data.prepare import prepare
    from ncf_ray.data.synthetic import SyntheticSpec

    spec = SyntheticSpec(**SIZES[size])
    with TreeMemory() as mem:
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
            t0 = time.perf_counter()
            summary = prepare(DataConfig(seed=0), os.path.join(tmp, "ds"), synthetic=spec)
            seconds = time.perf_counter() - t0
        ray.shutdown()
    return {
        "size": size,
        "rows": summary["rows_read"],
        "users": summary["n_users"],
        "items": summary["n_items"],
        "seconds": round(seconds, 2),
        "rows_per_s": round(summary["rows_read"] / seconds),
        "timings": summary["timings"],
        "driver_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "children_maxrss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
        "tree_rss_peak_mib": round(mem.rss_peak / MIB),
        "tree_pss_peak_mib": round(mem.pss_peak / MIB),
    }


def bench_prepare(quick: bool) -> dict[str, Any]:
    """{'1m': {...}, '20m': {...}} (20M skipped when quick). Each size in its own subprocess."""
    results: dict[str, Any] = {}
    for size in ["1m"] if quick else ["1m", "20m"]:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)  # always a fresh local Ray: the figures are about this machine
        results[size] = run_module("ncf_ray.bench.prepare", ["--one", size], f"bench prepare {size}", env=env)
    return results


def measure(quick: bool) -> dict[str, Any]:
    """`ncf-ray bench prepare`: rows/s and peak memory (PSS of every process) per size."""
    res = bench_prepare(quick)
    table = []
    for size, r in res.items():
        table.append(row(f"prepare synthetic {size}: rows/s ({r['rows']:,} rows)", r["rows_per_s"], "rows/s"))
        table.append(row(f"prepare synthetic {size}: peak memory, all processes (PSS)", r["tree_pss_peak_mib"],
                         "MiB", goal="< 8192 MiB" if size == "20m" else None))
    return {"rows": table, "sizes": res}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m ncf_ray.bench.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1M only")
    ap.add_argument("--one", choices=sorted(SIZES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    results = bench_prepare(args.quick)
    for r in results.values():
        print(f"{r['size']:>4}: {r['rows']:,} rows in {r['seconds']:.1f} s = {r['rows_per_s']:,} rows/s; "
              f"peak PSS (all processes) {r['tree_pss_peak_mib']:,} MiB, RSS sum {r['tree_rss_peak_mib']:,} MiB, "
              f"driver maxrss {r['driver_maxrss_mib']:,} MiB")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
