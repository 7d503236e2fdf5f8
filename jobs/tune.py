"""Ray job: a Ray Tune sweep -> SWEEP_DIR/results.csv and SWEEP_DIR/best (artifact). Flags are `ncf-ray tune`'s.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/tune.py /mnt/shared/ncf/dataset --out /mnt/shared/ncf/sweep --num-samples 16 --gpu

Trial checkpoints go under SWEEP_DIR/trials, so on a multi-node cluster SWEEP_DIR must be on the shared mount.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when ncf_ray is not installed

from ncf_ray import cli  # noqa: E402
from ncf_ray.pipeline import run_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_job(lambda argv: cli.main(["tune", *argv])))
