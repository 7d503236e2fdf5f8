"""Ray job: prepare -> tune (every family, small sweeps) -> train the best by valid, refit -> deploy on Serve -> query.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pipeline.py --out /mnt/shared/ncf --storage s3://BUCKET/ncf [--preset full] [--gpu]
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pipeline.py --quick --out /tmp/ncf-quick       # tiny synthetic data, minutes on 2 CPUs

Prints valid/test HR@10 and NDCG@10 beside popularity, the sweep table and where the results are, and writes
OUT/summary.json. The Serve app keeps running after the job unless --stop-serve. See ncf_ray/pipeline.py.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when ncf_ray is not installed

from ncf_ray.pipeline import PRESETS, format_report, preset, run_job, run_pipeline  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from ncf_ray.cli import _Parser

    p = _Parser(prog="jobs/pipeline.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="results dir (on a cluster: a dir every node sees)")
    p.add_argument("--storage", default=None, help="training checkpoints: dir or URI (s3://...); default OUT")
    p.add_argument("--preset", choices=tuple(PRESETS), default="demo", help="data and sweep sizes")
    p.add_argument("--quick", action="store_true", help="same as --preset quick: tiny data, no refit, a few minutes")
    p.add_argument("--source", default=None,
                   help="synthetic-shop (the presets' default), synthetic, or a log file/dir/URI with "
                        "user_id,item_id,timestamp")
    p.add_argument("--users", type=int)
    p.add_argument("--items", type=int)
    p.add_argument("--interactions", type=int)
    p.add_argument("--model", default=None, help="a family (mf, neumf, seq, ...) or auto (default): sweep every "
                                                 "family and serve the best by valid")
    p.add_argument("--no-refit", action="store_true", help="serve the valid-selected weights, not a refit on all "
                                                          "interactions")
    p.add_argument("--num-samples", type=int, help="sweep trials")
    p.add_argument("--sweep-epochs", type=int, help="epochs per trial")
    p.add_argument("--epochs", type=int, help="epochs of the final full-length run")
    p.add_argument("--workers", type=int, help="Ray Train workers per run")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--seed", type=int)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--stop-serve", action="store_true", help="shut Serve down after the smoke query")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in OUT")
    return p


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    cfg = preset("quick" if a.quick else a.preset, out=a.out, storage=a.storage, source=a.source, users=a.users,
                 items=a.items, interactions=a.interactions, num_samples=a.num_samples,
                 sweep_epochs=a.sweep_epochs, epochs=a.epochs, workers=a.workers, gpu=a.gpu or None, seed=a.seed,
                 host=a.host, port=a.port, keep_serving=not a.stop_serve, overwrite=a.overwrite or None,
                 model=a.model, refit=False if a.no_refit else None)
    print(format_report(run_pipeline(cfg)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
