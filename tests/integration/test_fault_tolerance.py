"""Multi-node training survives the loss of a worker node (issue 6, item 4).

A 2-node `ray.cluster_utils.Cluster` (1 CPU each) runs a 2-worker TorchTrainer with SPREAD placement, so each node
holds one worker. Mid-training the non-head node is removed and a fresh one added: the worker group restarts from
the last per-epoch checkpoint and finishes. Its final test HR@10 must be within 0.02 of an uninterrupted run with
the same seed (each epoch's negatives are seeded from (seed, rank, epoch), so the restored run draws the same
ones; the tolerance leaves room for floating-point reduction order).

This module starts its own cluster, not the shared `ray_local` fixture: it needs two nodes. RAY_TMPDIR points at a
private dir while it runs, because `Cluster` writes its address to `$RAY_TMPDIR/ray/ray_current_cluster`, and a
plain `ray.init()` elsewhere on this machine would otherwise join this cluster.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

EPOCHS = 6
TOLERANCE = 0.02


class _ReportLog:
    """A Ray Train callback (it runs in the controller actor) appending each reported epoch to a file, so the test
    can see the sequence of epochs across a restart."""

    def __new__(cls, path: str) -> Any:
        from ray.train import UserCallback

        class ReportLog(UserCallback):
            def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
                with open(path, "a") as f:
                    f.write(json.dumps({"epoch": metrics[0]["epoch"], "checkpoint": checkpoint is not None}) + "\n")

            def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
                with open(path, "a") as f:
                    f.write(json.dumps({"exception": sorted(worker_exceptions)}) + "\n")

        return ReportLog()


def _read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU) + one worker node (1 CPU); the driver is connected. Torn down (and RAY_TMPDIR restored)
    afterwards, whatever happens."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    tmp = tempfile.mkdtemp(prefix="ncfft", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", tmp)
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            c.add_node(num_cpus=1)
            c.wait_for_nodes()
            ray.init(address=c.address, log_to_driver=False)
            yield c
        finally:
            ray.shutdown()
            c.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def dataset(cluster, tmp_path_factory) -> str:
    from ncf_ray.config import DataConfig
    from ncf_ray.data.prepare import prepare
    from ncf_ray.data.synthetic import SyntheticSpec

    out = str(tmp_path_factory.mktemp("ft") / "data")
    prepare(DataConfig(source="synthetic", eval_negatives=49, shards=2), out,
            synthetic=SyntheticSpec(users=400, items=300, interactions=20_000, seed=3))
    return out


def _config() -> Any:
    from ncf_ray.config import ModelConfig, TrainConfig

    # Small batches make an epoch last a second or two, long enough to lose a node in the middle of the run.
    return TrainConfig(model=ModelConfig(name="neumf", factors=8, layers=(16, 8)), epochs=EPOCHS, batch_size=256,
                       lr=1e-3, base_batch_size=256, negatives=4, patience=EPOCHS, workers=2, seed=7,
                       threads_per_worker=1, max_failures=3)


def _fit(dataset_dir: str, run_dir: Path, log: Path) -> dict[str, Any]:
    """One SPREAD training run with the report log attached; exports the best model and returns its metrics."""
    from ncf_ray.train import build_trainer, finalize, load_state

    cfg = _config()
    t0 = time.time()
    result = build_trainer(dataset_dir, cfg, str(run_dir), callbacks=[_ReportLog(str(log))],
                           placement_strategy="SPREAD").fit()
    assert result.error is None, result.error
    with result.checkpoint.as_directory() as ckpt:
        state = load_state(ckpt)
    return finalize(dataset_dir, run_dir / "model", run_dir / "metrics.json", cfg, state, time.time() - t0)


def _train_worker_nodes() -> set[str]:
    """Nodes of the live Ray Train worker actors (GCS actor table; needs no dashboard)."""
    import ray

    return {a["Address"]["NodeID"] for a in ray._private.state.actors().values()
            if a["State"] == "ALIVE" and "RayTrainWorker" in a.get("ActorClassName", "")}


def test_training_survives_losing_a_worker_node(cluster, dataset, tmp_path):
    # Uninterrupted reference run, same seed and placement.
    base = _fit(dataset, tmp_path / "base", tmp_path / "base.log")
    assert base["epochs"] == EPOCHS

    # The same run, losing the worker node after its second checkpoint.
    log = tmp_path / "ft.log"
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["metrics"] = _fit(dataset, tmp_path / "ft", log)
        except BaseException as exc:  # surfaced on the main thread below
            box["error"] = exc

    # fit() runs in a thread: Cluster.add_node/remove_node must be called from the main thread.
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while sum(1 for r in _read_log(log) if r.get("checkpoint")) < 2:
        assert thread.is_alive() and time.time() < deadline, f"no 2 checkpoints: {_read_log(log)} {box}"
        time.sleep(0.2)
    # SPREAD: the two workers are on two nodes, so removing the worker node loses one rank mid-run.
    assert len(_train_worker_nodes()) == 2, _train_worker_nodes()
    epochs_before = max(r["epoch"] for r in _read_log(log) if "epoch" in r)
    assert epochs_before < EPOCHS, "training finished before the node could be removed; lengthen the epochs"
    victim = next(iter(cluster.worker_nodes))
    cluster.remove_node(victim)
    time.sleep(3)
    cluster.add_node(num_cpus=1)  # resources return: the group restarts (it waits up to 60 s for them)
    thread.join(timeout=170)
    assert not thread.is_alive(), f"training did not finish after the node came back: {_read_log(log)}"
    if "error" in box:
        raise box["error"]
    ft = box["metrics"]

    records = _read_log(log)
    assert any("exception" in r for r in records), f"no worker failure was seen: {records}"
    epochs = [r["epoch"] for r in records if "epoch" in r]
    # Resumed from a checkpoint, not from scratch: after the loss, epochs continue past the last checkpoint
    # (at most the interrupted epoch is repeated) and never restart at 1.
    assert epochs[0] == 1 and epochs.count(1) == 1, epochs
    assert epochs[-1] == EPOCHS and sorted(set(epochs)) == list(range(1, EPOCHS + 1)), epochs
    assert ft["epochs"] == EPOCHS
    assert abs(ft["test"]["hr@10"] - base["test"]["hr@10"]) <= TOLERANCE, (ft["test"], base["test"])
    assert (tmp_path / "ft" / "model" / "manifest.json").exists()
