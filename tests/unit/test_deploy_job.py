"""jobs/deploy.py takes `ncf-ray serve`'s flags through the CLI's own ServeConfig builder (no Ray needed for
--emit-config)."""

import subprocess
import sys
from pathlib import Path

import yaml

from ncf_ray.bench.serve import TINY, make_bench_artifact

ROOT = Path(__file__).resolve().parents[2]


def test_deploy_job_emits_the_config_with_every_serve_flag(tmp_path):
    model = tmp_path / "model"
    make_bench_artifact(str(model), **TINY)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "deploy.py"), str(model), "--emit-config", "--precision", "fp32",
         "--replicas", "2", "--max-batch-size", "32"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    args = yaml.safe_load(proc.stdout)["applications"][0]["args"]
    assert args["precision"] == "fp32" and args["replicas"] == 2 and args["max_batch_size"] == 32
    assert args["model_dir"] == str(model.resolve())
