"""`ncf-ray update` / promote / rollback / forget and jobs/continual.py on local Ray with tiny generated logs.

The parent is a small GMF trained here without Ray on a log where user u likes items near u * 7 (mod 30); each
update trains one or two epochs on Ray Train. One local Ray (2 CPUs) for the module.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
N_USERS, N_ITEMS = 40, 30
DATA_CONFIG = {"user_col": "user_id", "item_col": "item_id", "time_col": "timestamp", "rating_col": None,
               "min_rating": None, "sep": None, "max_bad_fraction": 0.01}


def _liked(users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (users * 7 + rng.integers(0, 6, len(users))) % N_ITEMS


def _write_log(path: Path, users, items, times) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user_id": pa.array([str(u) for u in users], pa.string()),
                             "item_id": pa.array([str(i) for i in items], pa.string()),
                             "timestamp": pa.array(np.asarray(times, np.int64))}), path)
    return path


def _parent(out: Path) -> Path:
    """A trained GMF artifact with the recorded data_config and training config (no Ray)."""
    import pandas as pd
    import torch

    from ncf_ray import engine
    from ncf_ray.artifact import save_artifact
    from ncf_ray.batch import Histories
    from ncf_ray.config import build_train_config, to_dict
    from ncf_ray.metrics import build_csr
    from ncf_ray.model import model_from_config

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    users = np.repeat(np.arange(N_USERS), 6)
    items = _liked(users, rng)
    keep = np.unique(users * N_ITEMS + items, return_index=True)[1]
    users, items = users[keep], items[keep]
    cfg = build_train_config(None, model="gmf", factors=8, batch_size=256, lr=0.02, negatives=4, epochs=40,
                             workers=1)
    model = model_from_config(cfg.model, N_USERS, N_ITEMS)
    engine.fit_plain(model, torch.as_tensor(users), torch.as_tensor(items), N_ITEMS, 40, negatives=4,
                     batch_size=256, lr=0.02, base_batch_size=256, generator=torch.Generator().manual_seed(0))
    indptr, indices = build_csr(users, items, N_USERS)
    counts = np.bincount(items, minlength=N_ITEMS)
    vu = pd.DataFrame({"user_idx": np.arange(N_USERS, dtype=np.int32), "user_id": [str(u) for u in range(N_USERS)],
                       "count": np.diff(indptr)})
    vi = pd.DataFrame({"item_idx": np.arange(N_ITEMS, dtype=np.int32), "item_id": [str(i) for i in range(N_ITEMS)],
                       "count": counts})
    hist = Histories.from_arrays(users, items, np.arange(len(users)), N_USERS)
    save_artifact(out, model.eval(), cfg.model, N_USERS, N_ITEMS, vu, vi, indptr, indices, counts + 0.0,
                  {"config": to_dict(cfg)}, {"source": "test", "eval_negatives": 20, "data_config": DATA_CONFIG},
                  histories=hist)
    return out


def _old_user_log(path: Path, seed: int, t0: int, random_train: bool = False) -> Path:
    """Three more rows for each of the first 30 old users; the last (the holdout) always follows their taste,
    the first two do too unless `random_train`."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(30), 3)
    items = _liked(users, rng)
    if random_train:
        first = np.tile([True, True, False], 30)
        items[first] = rng.integers(0, N_ITEMS, int(first.sum()))
    return _write_log(path, users, items, t0 + np.tile([0, 1, 2], 30) + np.arange(90) * 10)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    return _parent(tmp_path_factory.mktemp("parent") / "model")


def _scores(art, users, items):
    import torch

    from ncf_ray.batch import Batch

    with torch.no_grad():
        b = Batch(user=torch.as_tensor(users)[:, None].expand(-1, len(items))[:, 0],
                  item=torch.as_tensor(items)[None, :].expand(len(users), -1))
        return torch.sigmoid(art.model(b)).numpy()


# ------------------------------------------------------------------------------------------------ update
@pytest.fixture(scope="module")
def update(ray_local, parent, tmp_path_factory):
    """The parent with user 5 forgotten, and its update on a log of new users (and rows of user 5)."""
    from ncf_ray.privacy import forget_users
    from ncf_ray.update import run_update

    tmp_path = tmp_path_factory.mktemp("update")
    forgot = tmp_path / "forgot"
    forget_users(parent, ["5"], forgot)
    # New users 100..109, each with 3 rows over old items and new items n0..n4; plus rows of forgotten user 5.
    rng = np.random.default_rng(3)
    users = [str(u) for u in np.repeat(np.arange(100, 110), 3)] + ["5", "5"]
    items = [f"n{k}" if k < 5 else str(k) for k in rng.integers(0, 12, 30)] + ["1", "2"]
    log = tmp_path / "new.parquet"
    pq.write_table(pa.table({"user_id": users, "item_id": items, "timestamp": np.arange(32, dtype=np.int64)}), log)
    res = run_update(forgot, str(log), tmp_path / "child", epochs=1, log=lambda *_: None)
    return forgot, tmp_path / "child", res, users, items


def test_update_grows_the_vocab_keeps_old_scores_and_skips_forgotten_users(update):
    from ncf_ray.artifact import load_artifact

    forgot, child, res, users, items = update
    p, c = load_artifact(forgot), load_artifact(child)
    assert list(c.user_ids[:N_USERS]) == list(p.user_ids) and list(c.item_ids[:N_ITEMS]) == list(p.item_ids)
    assert c.n_users == N_USERS + 10 and sorted(c.user_ids[N_USERS:]) == [str(u) for u in range(100, 110)]
    assert set(c.item_ids[N_ITEMS:]) <= {f"n{k}" for k in range(5)} and c.n_items > N_ITEMS
    assert "5" not in c.user_index and res["lineage"]["data_window"]["forgotten_rows"] == 2
    lineage = json.loads((child / "manifest.json").read_text())["lineage"]
    assert lineage["parent_version"] == p.model_version and lineage["data_window"]["new_users"] == 10
    # Old users had no new data: their scores on old items barely move.
    old_users, old_items = np.arange(N_USERS), np.arange(N_ITEMS)
    diff = np.abs(_scores(c, old_users, old_items) - _scores(p, old_users, old_items))
    assert diff.mean() < 0.05, diff.mean()
    # Seen sets and histories advanced: a new user's every row (holdout included) is there, in time order.
    u = c.user_index["100"]
    mine = [c.item_index[i] for uu, i in zip(users, items) if uu == "100"]
    assert sorted(c.seen_indices[c.seen_indptr[u]:c.seen_indptr[u + 1]]) == sorted(set(mine))
    assert c.histories.items[c.histories.indptr[u]:c.histories.indptr[u + 1]].tolist() == mine
    assert res["holdout"]["users"] == 10 and res["holdout"]["parent"]["hr@10"] == 0.0  # parent lacks them


def _cli(*args: str) -> tuple[int, list[str]]:
    import contextlib
    import io

    from ncf_ray import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(list(args))
    return rc, err.getvalue().strip().splitlines()


def test_bad_new_logs_exit_2_with_one_line_and_write_nothing(ray_local, parent, tmp_path):
    bad_cols = tmp_path / "cols.csv"
    bad_cols.write_text("user,item_id,timestamp\n1,2,3\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    cases = {str(bad_cols): "missing required column 'user_id'", str(empty): "empty input",
             str(tmp_path / "nope.csv"): "path not found"}
    for log, expect in cases.items():
        out = tmp_path / "out"
        rc, err = _cli("update", str(parent), log, "--out", str(out))
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dirs left


# ------------------------------------------------------------------------------------------------ continual job
def test_continual_job_killed_between_update_and_promote_resumes_without_reapplying(ray_local, parent, tmp_path):
    from ncf_ray.artifact import load_artifact
    from ncf_ray.continual import KILL_AFTER_UPDATE_ENV, process
    from ncf_ray.standing import StandingTrainer

    watch = tmp_path / "logs"
    _old_user_log(watch / "date=2024-01-01" / "part.parquet", seed=1, t0=10_000)
    _old_user_log(watch / "date=2024-01-02" / "part.parquet", seed=2, t0=20_000)
    state = tmp_path / "state" / "state.json"
    cmd = [sys.executable, str(ROOT / "jobs" / "continual.py"), "--model-dir", str(parent), "--watch", str(watch),
           "--state", str(state), "--epochs", "1", "--once"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(cmd, env={**env, KILL_AFTER_UPDATE_ENV: "1"}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    first = json.loads(state.read_text())
    assert [s["step"] for s in first["steps"]] == ["update"]
    assert first["partitions"]["date=2024-01-01"]["status"] == "updated"

    # The re-run (in this process, on the same Ray: what a re-submitted job does, minus the interpreter start), on
    # a standing worker group that a later pass reuses.
    runner = StandingTrainer()
    process(watch, state, str(parent), update_args={"epochs": 1}, log=lambda *_: None, runner=runner)
    final = json.loads(state.read_text())
    steps = [(s["partition"], s["step"]) for s in final["steps"]]
    assert steps.count(("date=2024-01-01", "update")) == 1 and ("date=2024-01-01", "reuse") in steps
    assert steps.count(("date=2024-01-02", "update")) == 1
    assert all(final["partitions"][p]["status"] in ("promoted", "rejected") for p in final["partitions"])
    models = sorted(p.name for p in (state.parent / "models").iterdir() if not p.name.startswith("."))
    assert models == ["date=2024-01-01", "date=2024-01-02"]
    second = load_artifact(state.parent / "models" / "date=2024-01-02")
    expected_parent = load_artifact(final["partitions"]["date=2024-01-01"]["artifact"]).model_version \
        if final["partitions"]["date=2024-01-01"]["status"] == "promoted" else load_artifact(parent).model_version
    assert second.lineage["parent_version"] == expected_parent
    # A third pass finds nothing to do and changes nothing.
    assert process(watch, state, str(parent))["steps"] == final["steps"]
    # A new partition trains on the same workers: the group started once for both updates.
    _old_user_log(watch / "date=2024-01-03" / "part.parquet", seed=3, t0=30_000)
    try:
        done = process(watch, state, str(parent), update_args={"epochs": 1}, log=lambda *_: None, runner=runner)
    finally:
        runner.close()
    assert runner.starts == 1
    assert done["partitions"]["date=2024-01-03"]["status"] in ("promoted", "rejected")
    third = load_artifact(state.parent / "models" / "date=2024-01-03")
    assert third.lineage["parent_version"] == load_artifact(final["promoted"]).model_version


# ------------------------------------------------------------------------------------------------ promote
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_guarded_promotion_under_load_and_rollback(ray_local, parent, update, tmp_path):
    from ray import serve

    from ncf_ray.artifact import load_artifact
    from ncf_ray.config import build_serve_config
    from ncf_ray.errors import UserError
    from ncf_ray.serve import APP_NAME, bind_app, promote, rollback
    from ncf_ray.update import run_update

    served_first, good_dir = update[0], update[1]  # the good update's parent is the forgetful artifact
    bad = run_update(parent, str(_old_user_log(tmp_path / "bad.parquet", 5, 10_000, random_train=True)),
                     tmp_path / "bad", epochs=3, lr=0.2, log=lambda *_: None)
    hold = bad["holdout"]
    assert hold["child"]["hr@10"] < hold["parent"]["hr@10"] - 0.01, hold  # the regression is real

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(bind_app(build_serve_config(model_dir=str(served_first))), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    versions = {name: load_artifact(p).model_version for name, p in
                (("parent", served_first), ("good", good_dir), ("bad", tmp_path / "bad"))}
    try:
        with pytest.raises(UserError, match="not promoted"):
            promote(str(tmp_path / "bad"))
        assert httpx.get(url + "/model").json()["model_version"] == versions["parent"]

        failures, seen, stop = [], [], threading.Event()

        def client() -> None:
            with httpx.Client(timeout=10) as c:
                while not stop.is_set():
                    try:
                        r = c.post(url + "/recommend", json={"user_id": "3", "k": 5})
                        (seen.append(r.json()["model_version"]) if r.status_code == 200
                         else failures.append(f"{r.status_code} {r.text[:200]}"))
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))

        t = threading.Thread(target=client)
        t.start()
        try:
            time.sleep(0.3)
            res = promote(str(good_dir))
            assert res["model_version"] == versions["good"] and res["guard_ok"]
            time.sleep(0.3)
            back = rollback()
            assert back["model_version"] == versions["parent"]
            time.sleep(0.3)
        finally:
            stop.set()
            t.join()
        assert not failures, failures[:5]
        assert versions["good"] in seen and seen[0] == seen[-1] == versions["parent"]
    finally:
        serve.shutdown()
