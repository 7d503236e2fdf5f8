"""`ncf-ray tune` on local Ray: an invalid space is refused before launch; ASHA stops a trial with a hopeless
learning rate at its first rung while the good one runs on, and grid points run once by default; a 2-point grid
(embedding size) interrupted after its first trial resumes and completes with both rows in results.csv, and
best/ loads and evaluates."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ncf_ray.cli import main

pytestmark = pytest.mark.integration

SPACE = "factors: [8, 16]\ndepth: [1]\nlr: 0.005\nnegatives: 4\n"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tune") / "ds"
    # A subprocess, so this module's own Ray (started by the sweep subprocesses) is the only one alive.
    subprocess.run([sys.executable, "-m", "ncf_ray.cli", "prepare", "synthetic", "--out", str(out), "--users", "200",
                    "--items", "100", "--interactions", "5000", "--seed", "1"], check=True, capture_output=True)
    return str(out)


def test_invalid_space_is_refused_before_any_trial(dataset, tmp_path, capsys):
    bad = tmp_path / "space.yaml"
    bad.write_text("factors: [0, 8]\ndepth: [1]\n")
    sweep = ["tune", dataset, "--out", str(tmp_path / "sweep"), "--model", "neumf", "--space", str(bad)]
    assert main(sweep) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "factors=0" in err[0]
    assert not (tmp_path / "sweep").exists()
    bad.write_text("factors: [8]\nembedding_size: [8]\n")
    assert main(sweep) == 2
    assert "embedding_size" in capsys.readouterr().err
    # The default sweep (--model auto) searches every family's own space: a space file needs a family named.
    bad.write_text("factors: [8]\n")
    assert main(["tune", dataset, "--out", str(tmp_path / "sweep"), "--space", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model FAMILY" in err[0]
    assert not (tmp_path / "sweep").exists()


def test_asha_stops_a_hopeless_trial(dataset, tmp_path):
    # Grid order is list order: a good trial first sets rung 1's bar, the lr=1e-7 trial (barely moves from its
    # random init) falls under it after epoch 1 and is stopped; the good one runs all 3 epochs.
    space = tmp_path / "space.yaml"
    space.write_text("factors: [8]\ndepth: [1]\nlr: [0.05, 1.0e-7]\nnegatives: 4\n")
    out = tmp_path / "sweep"
    run = subprocess.run(
        [sys.executable, "-m", "ncf_ray.cli", "tune", dataset, "--out", str(out), "--model", "neumf",
         "--space", str(space),
         "--search", "grid", "--max-epochs", "3", "--grace-period", "1", "--reduction-factor", "2",
         "--batch-size", "256", "--json"], capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "sweep plan: 2 trial(s) = 2 grid point(s) x 1 sample(s)" in run.stdout  # not 8 per point
    with open(out / "results.csv") as f:
        rows = {float(r["lr"]): r for r in csv.DictReader(f)}
    assert sorted(rows) == [1e-7, 0.05] and all(r["status"] == "TERMINATED" for r in rows.values())
    assert int(rows[1e-7]["epochs"]) == 1  # stopped by ASHA at the first rung
    assert int(rows[0.05]["epochs"]) == 3  # the first trial has no bar to clear
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["best"] != rows[1e-7]["trial_id"]


def _tune_cmd(dataset: str, out: Path, space: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ncf_ray.cli", "tune", dataset, "--out", str(out), "--model", "neumf",
            "--space", str(space),
            "--search", "grid", "--num-samples", "1", "--max-epochs", "1", "--grace-period", "1",
            "--batch-size", "1024", "--json", *extra]


def test_grid_sweep_interrupted_then_resumed(dataset, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_tune_cmd(dataset, out, space), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Interrupt once the first trial has checkpointed its final epoch.
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if list((out / "trials").glob("trial_*/checkpoint_*")):
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the sweep finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc != 0  # an interrupted sweep does not pretend to be done
    assert not (out / "best").exists()

    done = subprocess.run(_tune_cmd(dataset, out, space, "--resume"), env=env, capture_output=True, text=True,
                          timeout=540)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and summary["trials"] == 2
    assert {(r["factors"], r["depth"]) for r in rows} == {("8", "1"), ("16", "1")}
    assert all(r["status"] == "TERMINATED" and float(r["best_valid_hr"]) > 0 for r in rows)
    assert (out / "plot.png").stat().st_size > 0
    assert list((out / "sweep").rglob("events.out.tfevents*"))  # TensorBoard logs

    # The exported best model is the top row by valid HR and evaluates on the dataset.
    best = json.loads((out / "best_metrics.json").read_text())
    assert best["valid"]["hr@10"] == pytest.approx(max(float(r["best_valid_hr"]) for r in rows))
    ev = subprocess.run([sys.executable, "-m", "ncf_ray.cli", "evaluate", str(out / "best"), dataset, "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout.strip().splitlines()[-1])["hr@10"] == pytest.approx(best["test"]["hr@10"])
