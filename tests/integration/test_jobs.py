"""`ray job submit` end to end: a real local head (token auth on) runs jobs/pipeline.py --quick.

The head is `ray start --head --block` in a private temp dir on loopback with free ports, started with the
project's venv first on PATH (so the job's `python` imports ncf_ray) and RAY_AUTH_MODE=token + a fresh
RAY_AUTH_TOKEN (the client presents the same token; ~/.ray is not touched). The real `ray job submit` CLI uploads
the repository as the working dir (runtime_env `excludes` keep .venv and friends out) and waits; the test then
checks SUCCEEDED, the exported artifact and a live Serve query. The head is stopped in the fixture's finalizer
(SIGTERM to `ray start --block`, which stops the processes it started), whatever happens.

This module does not use the shared `ray_local` fixture, and never calls ray.init in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _kill_leftovers(marker: str) -> None:
    """SIGKILL processes whose command line names this head's private temp dir (only ours can)."""
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (pid_dir / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(pid_dir.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


@pytest.fixture(scope="module")
def head():
    """A token-auth local head on loopback. Yields (env for the Ray CLI, dashboard address)."""
    tmp = tempfile.mkdtemp(prefix="ncfj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dash, gcs = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    # RAY_TMPDIR/ray is the head's temp dir, so Ray's own helpers (e.g. Train's PlacementGroupCleaner) find
    # this head by its address file there, not another Ray running on the machine.
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex,
               RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=tmp)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--num-cpus=2", f"--temp-dir={tmp}/ray", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={_free_port()}",
           f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats"]
    log = open(Path(tmp) / "head.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not _port_open(dash):
            assert proc.poll() is None, (Path(tmp) / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "head's dashboard did not come up in 120 s"
            time.sleep(0.5)
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                # A graceful stop waits out Serve's drain (~30 s); what is left is killed below, by marker.
                proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        _kill_leftovers(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def test_runtime_env_file_is_documented_and_excludes_the_venv():
    spec = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert ".venv/" in spec["excludes"] and ".git/" in spec["excludes"]
    assert "pip" in spec and spec["pip"]["packages"]


def test_job_submit_runs_the_pipeline(head, tmp_path):
    env, address = head
    out, serve_port = tmp_path / "results", _free_port()
    # The repository is the working dir; excludes as in jobs/runtime_env.yaml, without its pip list (the head's
    # python already has the project, and there is no network here).
    spec = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    runtime_env = {"excludes": spec["excludes"], "env_vars": spec.get("env_vars", {})}
    sid = f"ncf-pipeline-{uuid.uuid4().hex[:8]}"
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", sid,
              "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
              "python", "jobs/pipeline.py", "--quick", "--out", str(out), "--port", str(serve_port)]
    run = subprocess.run(submit, env=env, cwd=ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, sid], env=env,
                            capture_output=True, text=True, timeout=60)
    # `ray job status` ends with "Job '<id>' succeeded" (its log lines go to stderr in some versions).
    state = (status.stdout + status.stderr).lower()
    assert run.returncode == 0 and f"job '{sid}' succeeded" in state, \
        f"{state[-1000:]}\n--- job log tail:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}"

    # The job's own report and summary.
    assert "HR@10" in run.stdout and "popularity" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["query"]["items"] and summary["query"]["cold_start"] is False
    # The quick preset sweeps mf and seq (one results.csv each), fits EASE, and picks the best by valid.
    assert (out / "sweep" / "mf" / "results.csv").exists() and (out / "sweep" / "seq" / "results.csv").exists()
    assert summary["sweep"]["best_family"] in ("mf", "seq", "ease") and (out / "sweep" / "best").is_dir()

    # The exported artifact loads and verifies (manifest checksums).
    from ncf_ray.artifact import load_artifact

    art = load_artifact(str(out / "train" / "model"))
    assert art.model_version == summary["model_version"]

    # Serve outlives the job: query it from here.
    user = str(art.user_ids[1])
    req = urllib.request.Request(f"http://127.0.0.1:{serve_port}/recommend",
                                 data=json.dumps({"user_id": user, "k": 5}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        answer = json.loads(resp.read())
    assert answer["model_version"] == art.model_version
    assert len(answer["items"]) == 5 and not answer["cold_start"]


def test_job_failure_exits_nonzero_with_one_line(head, tmp_path):
    """A bad dataset path: the job FAILS and its last log line says why, without a traceback."""
    env, address = head
    run = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps({"excludes": [".venv/", ".git/"]}), "--",
         "python", "jobs/train.py", str(tmp_path / "missing"), "--out", str(tmp_path / "run")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    text = run.stdout + run.stderr
    assert "error:" in text and "missing" in text
    assert "Traceback" not in text
