"""`make demo`: the whole system on the embedded synthetic data (ML-1M-shaped generator, demo-sized).

    python -m ncf_ray.demo [--quick] [--out demo] [--port 8000]

Prepares the synthetic log, sweeps every family on a small grid (`ncf-ray tune --model auto`: mf, neumf, seq on
Ray Tune + ASHA, EASE in closed form), trains the best by valid (Ray Train), refits it on every interaction,
serves it (Ray Serve), queries it over HTTP, prints the results, shuts Serve down and exits 0; --quick uses tiny sizes. Results stay in --out
(default ./demo, replaced on each run); Ray's own output goes to OUT/logs/ (--verbose: here too). The stages are `ncf_ray.pipeline`'s, shared with jobs/pipeline.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ncf_ray import console
from ncf_ray.pipeline import format_report, preset, run_job, run_pipeline


def main(argv: list[str]) -> int:
    from ncf_ray.cli import _Parser

    p = _Parser(prog="python -m ncf_ray.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny data and sweep: a few minutes")
    p.add_argument("--out", default="demo", help="results dir (replaced)")
    p.add_argument("--port", type=int, default=8000, help="Serve HTTP port on 127.0.0.1")
    p.add_argument("--verbose", "-v", action="store_true", help="also print Ray's own output (always in OUT/logs/)")
    a: argparse.Namespace = p.parse_args(argv)
    cfg = preset("quick" if a.quick else "demo", out=a.out, port=a.port, keep_serving=False, overwrite=True)
    data = (f"{cfg.users} users x {cfg.items} items, {cfg.interactions:,} interactions" if cfg.users
            else "the ML-1M-shaped synthetic default")
    print(f"ncf_ray demo: {data}; small sweeps of every family ({cfg.sweep_epochs}-epoch trials) and EASE, then "
          f"the best by valid trained (up to {cfg.epochs} epochs), refitted on all interactions, served and queried "
          f"over HTTP", flush=True)
    with console.session(Path(a.out) / "logs", "demo", verbose=a.verbose):
        summary = run_pipeline(cfg)
        print(format_report(summary), flush=True)
        import ray

        ray.shutdown()  # inside the session: what Ray says while it stops goes to the log too
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
