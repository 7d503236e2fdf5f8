"""Ray job: warm-start a model artifact on a new log -> a new artifact with its lineage. Flags are `ncf-ray update`'s.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/update.py /mnt/shared/ncf/run/model /mnt/shared/ncf/logs/date=2024-05-02 \
        --out /mnt/shared/ncf/models/2024-05-02 --epochs 2 --replay 0.2
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when ncf_ray is not installed

from ncf_ray import cli  # noqa: E402
from ncf_ray.pipeline import run_job  # noqa: E402


def main(argv: list[str]) -> int:
    args = cli.build_parser().parse_args(["update", *argv])  # exits 2 with one line on a bad flag
    return args.func(args)


if __name__ == "__main__":
    sys.exit(run_job(main))
