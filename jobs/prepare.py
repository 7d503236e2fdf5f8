"""Ray job: raw interaction log -> dataset dir (Ray Data). Flags are `ncf-ray prepare`'s.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/prepare.py synthetic --out /mnt/shared/ncf/dataset [--users N --items N --interactions N]

On a multi-node cluster --out must be a dir every node sees (the training workers read it): the shared mount from
cluster.yaml, not a node-local path.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when ncf_ray is not installed

from ncf_ray import cli  # noqa: E402
from ncf_ray.pipeline import run_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_job(lambda argv: cli.main(["prepare", *argv])))
