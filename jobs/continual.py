"""Ray job: apply log partitions `date=YYYY-MM-DD/` in order through update -> guard -> promote, resumable.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/continual.py --model-dir /mnt/shared/ncf/run/model --watch /mnt/shared/ncf/logs \
        --state /mnt/shared/ncf/continual/state.json --serve-address auto [--once]

Every step goes to the JSON state log (rewritten atomically); a re-submitted job resumes from it and never applies
a partition twice (see ncf_ray/continual.py). --serve-address swaps promoted models into the running Serve app.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when ncf_ray is not installed

from ncf_ray.pipeline import run_job  # noqa: E402


def parse(argv: list[str]) -> argparse.Namespace:
    from ncf_ray.cli import _Parser
    from ncf_ray.serve import DEFAULT_TOLERANCE
    from ncf_ray.update import DEFAULT_EPOCHS, DEFAULT_REPLAY

    p = _Parser(prog="jobs/continual.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="the model to start from (until a partition is promoted)")
    p.add_argument("--watch", required=True, help="dir holding date=YYYY-MM-DD/ partitions of new logs")
    p.add_argument("--state", required=True, help="the JSON state log (created on the first run)")
    p.add_argument("--models", default=None, help="where updated artifacts go (default: STATE's dir/models)")
    p.add_argument("--serve-address", default=None, help="Ray address of the Serve app to promote into")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--replay", type=float, default=DEFAULT_REPLAY)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--once", action="store_true", help="process the partitions there now, then exit")
    p.add_argument("--poll-s", type=float, default=60.0)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    from ncf_ray.continual import process, watch_forever

    args = parse(argv)
    kwargs = dict(watch=args.watch, state_path=args.state, model_dir=args.model_dir, models=args.models,
                  serve_address=args.serve_address, tolerance=args.tolerance,
                  update_args={"epochs": args.epochs, "replay": args.replay, "lr": args.lr,
                               "workers": args.workers, "batch_size": args.batch_size})
    if args.once:
        state = process(**kwargs)
        print(f"promoted model: {state['promoted']}")
        return 0
    watch_forever(args.poll_s, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
