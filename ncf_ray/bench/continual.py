"""Continual updates vs a full retrain: HR@10 on a final holdout and training seconds.

    python -m ncf_ray.bench.continual [--quick] [--ratings /work/data/ml1m/ratings.dat] [--max-user 1500]
        [--model gmf] [--out bench/results]

The log (ML-1M's ratings.dat, users up to --max-user, every rating a positive; or, with --quick or no ratings
file, a small generated log) loses each user's latest interaction: that is the final holdout, never trained on.
The rest is split by time into a base (the first 90%) and 9 equal increments.
- full retrain: prepare + `ncf-ray train` (family defaults) on base + all increments;
- continual: prepare + train on the base, then `ncf-ray update` with each increment in order (default flags), all
  on one standing Ray Train worker group as jobs/continual.py runs them (ncf_ray/standing.py).
Both end models rank each holdout item among the same 99 negatives (items both models know, none a positive of
the user). Reported: HR@10 / NDCG@10 of each (also apart for the users with rows in the increments and the rest), and the training seconds of the 9 updates vs the full retrain's
(its Ray Train start included), without and with the standing group's one start (timed apart: a continual job
pays it once, whatever the number of partitions). Goal (issue 15): HR@10 within 0.01 at <= 25% of the seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

INCREMENTS = 9


def _ratings(path: Path, max_user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ML-1M's user::item::rating::timestamp lines -> (users, items, times) of users <= max_user."""
    data = np.array([line.split("::") for line in path.read_text().splitlines() if line], dtype=np.int64)
    keep = data[:, 0] <= max_user
    return data[keep, 0], data[keep, 1], data[keep, 3]


def _generated(n_users: int = 300, n_items: int = 200, per_user: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user)
    items = (users * 7 + rng.integers(0, 25, users.size)) % n_items
    times = rng.integers(0, 10_000_000, users.size)
    return users, items, times


def _write(path: Path, users, items, times) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user_id": pa.array(users, pa.int64()), "item_id": pa.array(items, pa.int64()),
                             "timestamp": pa.array(times, pa.int64())}), path)
    return str(path)


def split(users, items, times):
    """(holdout rows, base rows, [increment rows] * 9) as index arrays: holdout = each user's latest row."""
    order = np.lexsort((items, times, users))
    last = np.ones(order.size, bool)
    last[:-1] = users[order][1:] != users[order][:-1]
    holdout = order[last]
    rest = order[~last]
    rest = rest[np.argsort(times[rest], kind="stable")]
    cut = int(0.9 * rest.size)
    return holdout, rest[:cut], np.array_split(rest[cut:], INCREMENTS)


def score(model_dir: str, users, items, seen: dict[int, set[int]], common: np.ndarray, rng, k: int = 10):
    """HR/NDCG@k of each (user, item) among 99 negatives from `common` raw items (a user unknown: a miss)."""
    from ncf_ray.artifact import load_artifact
    from ncf_ray.metrics import evaluate_sampled

    art = load_artifact(model_dir)
    rows, pos, negs, n = [], [], [], len(users)
    for u, i in zip(users, items):
        uid, iid = art.user_index.get(str(u)), art.item_index.get(str(i))
        cands = rng.choice(common, size=min(99 + 20, common.size), replace=False)
        cands = [c for c in cands if c not in seen[u] and c != i][:99]
        if uid is None or iid is None or len(cands) < 99:
            continue
        rows.append(uid)
        pos.append(iid)
        negs.append([art.item_index[str(c)] for c in cands])
    hist = art.histories
    sums = evaluate_sampled(art.model, np.asarray(rows), np.asarray(pos), np.asarray(negs), k=k, reduce=False,
                            histories=hist) if rows else {"hit_sum": 0.0, "ndcg_sum": 0.0}
    return {"hr@10": sums["hit_sum"] / n, "ndcg@10": sums["ndcg_sum"] / n, "scored": len(rows), "n": n}


def measure(quick: bool, ratings: str | None = None, max_user: int = 1500, model: str = "gmf") -> dict[str, Any]:
    from ncf_ray.config import DataConfig, default_train_config
    from ncf_ray.data.prepare import prepare
    from ncf_ray.runtime import ensure_ray
    from ncf_ray.standing import StandingTrainer
    from ncf_ray.train import run_training
    from ncf_ray.update import run_update

    ensure_ray()
    src = Path(ratings) if ratings else None
    if not quick and src is not None and src.is_file():
        users, items, times = _ratings(src, max_user)
        source = f"{src} (users <= {max_user})"
    else:
        users, items, times = _generated()
        source = "generated (300 users x 200 items)"
    holdout, base, incs = split(users, items, times)
    seen: dict[int, set[int]] = {}
    for u, i in zip(users, items):
        seen.setdefault(int(u), set()).add(int(i))
    cfg = default_train_config(model)
    if quick:
        import dataclasses

        cfg = dataclasses.replace(cfg, epochs=3, patience=3)
    out: dict[str, Any] = {"source": source, "model": model, "rows": int(users.size),
                           "holdout_users": int(holdout.size), "base_rows": int(base.size),
                           "increment_rows": [int(x.size) for x in incs]}
    with tempfile.TemporaryDirectory(prefix="ncf-bench-continual-") as tmp:
        root = Path(tmp)
        every = np.concatenate([base, *incs])
        full_log = _write(root / "full.parquet", users[every], items[every], times[every])
        base_log = _write(root / "base.parquet", users[base], items[base], times[base])
        inc_logs = [_write(root / f"inc{j}.parquet", users[x], items[x], times[x]) for j, x in enumerate(incs)]
        prepare(DataConfig(source=full_log, shards=2), root / "full_ds")
        prepare(DataConfig(source=base_log, shards=2), root / "base_ds")
        full = run_training(str(root / "full_ds"), str(root / "full_run"), cfg, baselines=False)
        base_m = run_training(str(root / "base_ds"), str(root / "base_run"), cfg, baselines=False)
        parent = str(root / "base_run" / "model")
        update_seconds, steps = 0.0, []
        runner = StandingTrainer()  # as jobs/continual.py: one worker group for every increment
        group_start = runner.start(cfg.workers, cfg.gpu)  # timed apart: paid once per continual job, not per update
        for j, log in enumerate(inc_logs):
            t0 = time.time()
            res = run_update(parent, log, root / f"upd{j}", log=lambda *_: None, runner=runner)
            update_seconds += res["train_seconds"]
            steps.append({"increment": j + 1, "train_seconds": res["train_seconds"], "wall": time.time() - t0,
                          "epoch_seconds": sum(h["epoch_seconds"] for h in res["history"]),
                          "holdout_child_hr@10": res["holdout"]["child"]["hr@10"],
                          "holdout_parent_hr@10": res["holdout"]["parent"]["hr@10"]})
            parent = str(root / f"upd{j}")
        runner.close()
        out["standing_group"] = {"start_seconds": group_start, "starts": runner.starts}
        from ncf_ray.artifact import load_artifact

        a, b = load_artifact(root / "full_run" / "model"), load_artifact(parent)
        common = np.asarray(sorted(set(map(int, a.item_ids)) & set(map(int, b.item_ids))))
        hu, hi = users[holdout], items[holdout]
        # Where the gap is: users with rows in the increments, and the rest (whose data did not change).
        in_incs = np.isin(hu, users[np.concatenate(incs)])
        groups = {"increment_users": in_incs, "other_users": ~in_incs}

        def scored(model_dir: str) -> dict[str, Any]:
            res = score(model_dir, hu, hi, seen, common, np.random.default_rng(7))
            res["by_group"] = {g: score(model_dir, hu[m], hi[m], seen, common, np.random.default_rng(7))
                               for g, m in groups.items()}
            return res

        out["full_retrain"] = {**scored(str(root / "full_run" / "model")), "train_seconds": full["train_seconds"],
                               "epoch_seconds": sum(h["epoch_seconds"] for h in full["history"])}
        out["continual"] = {**scored(parent),
                            "update_seconds": update_seconds, "base_train_seconds": base_m["train_seconds"],
                            "update_epoch_seconds": sum(s["epoch_seconds"] for s in steps),
                            "optimizer": res["optimizer"], "steps": steps}
        out["hr_gap"] = out["full_retrain"]["hr@10"] - out["continual"]["hr@10"]
        # The 9 updates on the running group vs the full retrain (its own Ray Train start included), then the
        # same with the group's one start added.
        out["seconds_ratio"] = update_seconds / max(full["train_seconds"], 1e-9)
        out["seconds_ratio_with_group_start"] = (update_seconds + group_start) / max(full["train_seconds"], 1e-9)
        # The same ratio without Ray Train's start-up: optimiser-step seconds only (epoch_seconds).
        out["epoch_seconds_ratio"] = out["continual"]["update_epoch_seconds"] / max(
            out["full_retrain"]["epoch_seconds"], 1e-9)
    return out


def main() -> None:
    from ncf_ray.atomic import write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ratings", default="/work/data/ml1m/ratings.dat")
    p.add_argument("--max-user", type=int, default=1500)
    p.add_argument("--model", default="gmf")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args()
    from ncf_ray import console

    with console.session(Path(a.out) / "logs", "bench-continual"):  # Ray's output to a file, not the console
        res = measure(a.quick, a.ratings, a.max_user, a.model)
    write_json(Path(a.out) / "continual.json", res)
    print(json.dumps({k: v for k, v in res.items() if k != "continual"} | {
        "continual": {k: v for k, v in res["continual"].items() if k != "steps"}}, indent=1))


if __name__ == "__main__":
    main()
