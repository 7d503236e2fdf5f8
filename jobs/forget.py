"""Ray job: forget users in a model artifact (embedding rows, history, seen set; hashed in forgotten.json).
Flags are `ncf-ray forget`'s. Raw ids appear only on the command line, never in the job's output.

    ray job submit --working-dir . -- python jobs/forget.py /mnt/shared/ncf/run/model --user 42 --user 77
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when ncf_ray is not installed

from ncf_ray import cli  # noqa: E402
from ncf_ray.pipeline import run_job  # noqa: E402


def main(argv: list[str]) -> int:
    args = cli.build_parser().parse_args(["forget", *argv])  # exits 2 with one line on a bad flag
    return args.func(args)


if __name__ == "__main__":
    sys.exit(run_job(main))
