"""Ray job: data-parallel training -> RUN_DIR/model (artifact) and RUN_DIR/metrics.json.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train.py /mnt/shared/ncf/dataset --out /mnt/shared/ncf/run --storage s3://BUCKET/ncf/run \
        --workers 2 --gpu --spread --max-failures 3

Flags are `ncf-ray train`'s (--storage DIR_OR_URI: checkpoints, a dir every node sees or a pyarrow URI such as
s3://; default RUN_DIR. Each run gets a fresh Ray Train name, recorded in RUN_DIR/run.json, so a second run on the
same storage never continues the first unless --resume), plus:
  --spread              one worker per node (SPREAD placement): losing a node loses one worker, and the group
                        restarts from the last checkpoint when resources return (with --max-failures > 0).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when ncf_ray is not installed

from ncf_ray import cli  # noqa: E402
from ncf_ray.pipeline import run_job  # noqa: E402


def main(argv: list[str]) -> int:
    from ncf_ray.train import format_summary, run_training

    job = argparse.ArgumentParser(add_help=False)
    job.add_argument("--spread", action="store_true")
    extra, rest = job.parse_known_args(argv)
    args = cli.build_parser().parse_args(["train", *rest])  # exits 2 with one line on a bad flag
    cfg = cli.train_config_from_args(args)
    metrics = run_training(args.dataset_dir, args.out, cfg, resume=args.resume, storage_path=args.storage,
                           placement_strategy="SPREAD" if extra.spread else "PACK", refit=args.refit,
                           baselines=not args.no_baselines)
    print(format_summary(metrics, cfg.eval_k))
    print(f"model artifact: {Path(args.out).resolve() / 'model'}; checkpoints: {args.storage or Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
