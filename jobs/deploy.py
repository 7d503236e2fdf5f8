"""Ray job: deploy a model artifact on Ray Serve and check it answers. Flags are `ncf-ray serve`'s, plus --check.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/deploy.py /mnt/shared/ncf/run/model --port 8000 --replicas 2

The Serve application outlives this job (Serve's controller is detached); deploying again swaps the model in place.
With --host 127.0.0.1 (the default) the endpoint is reachable on the head node only: forward it with
`ray attach cluster.yaml -p 8000`, or pass --host 0.0.0.0 behind your own firewall/load balancer.
The job queries POST /recommend for the artifact's first user and fails unless items come back.
The model dir must be readable from every node that may host a replica (the shared mount on a cluster).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when ncf_ray is not installed

from ncf_ray import cli  # noqa: E402
from ncf_ray.pipeline import run_job  # noqa: E402


def main(argv: list[str]) -> int:
    from ncf_ray.artifact import load_artifact
    from ncf_ray.pipeline import smoke_query
    from ncf_ray.serve import emit_config, run_server

    job = argparse.ArgumentParser(add_help=False)
    job.add_argument("--no-check", action="store_true", help="skip the smoke query")
    extra, rest = job.parse_known_args(argv)
    args = cli.build_parser().parse_args(["serve", *rest])
    cfg = cli.serve_config_from_flags(args)
    art = load_artifact(cfg.model_dir)  # verify the manifest before touching Serve
    if args.emit_config:
        print(emit_config(cfg), end="")
        return 0
    url = run_server(cfg, blocking=False, ha_proxy=args.ha_proxy)
    print(f"deployed {art.model_version} ({art.n_users} users x {art.n_items} items) at {url}", flush=True)
    if not extra.no_check:
        answer = smoke_query(url, str(art.user_ids[0]))
        print(f"POST {url}/recommend user {answer['user_id']}: {[i['item_id'] for i in answer['items']]}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
