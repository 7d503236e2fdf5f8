"""A shop log end to end on real Ray: prepare synthetic-shop (events, context, side tables, new items) -> train a
feature-aware click + purchase MF on Ray Train -> serve it -> /recommend with context and objective over HTTP.

One local Ray (2 CPUs, HAProxy ingress) and one Serve instance for the module; tiny data, two epochs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def shop(tmp_path_factory, serve_on_loopback):
    """(base_url, run dir, dataset dir) of a served multi-task, feature-aware model of a tiny synthetic shop."""
    from ray import serve

    from ncf_ray.config import DataConfig, build_train_config, default_train_config
    from ncf_ray.data.prepare import prepare
    from ncf_ray.data.shop import ShopSpec
    from ncf_ray.serve import APP_NAME, build_app
    from ncf_ray.train import run_training

    root = tmp_path_factory.mktemp("shop")
    data_dir = root / "data"
    prepare(DataConfig(source="synthetic-shop", shards=1), data_dir,
            synthetic=ShopSpec(users=150, items=120, interactions=9_000, seed=3, cold_fraction=0.1))
    cfg = build_train_config(default_train_config("mf"), factors=16, epochs=2, batch_size=2048,
                             tasks="click,purchase", id_dropout=0.3)
    url = serve_on_loopback
    run_training(str(data_dir), str(root / "run"), cfg, baselines=False)
    serve.run(build_app({"model_dir": str(root / "run" / "model")}), name=APP_NAME, route_prefix="/")
    deadline = time.monotonic() + 60
    while httpx.get(url + "/healthz", timeout=5).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    yield url, root / "run", data_dir


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=30)


def test_metrics_report_purchase_users_and_new_items(shop):
    _, run, data_dir = shop
    metrics = json.loads((run / "metrics.json").read_text())
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    test = metrics["test"]
    assert test["purchase"]["head"] == "purchase" and test["purchase"]["n"] > 0
    assert 0.0 <= test["purchase"]["hr@10"] <= 1.0
    assert test["segments"]["catalogue"]["new"]["n"] > 0  # some users' test item is a new product
    assert test["new_items"]["n"] == test["segments"]["catalogue"]["new"]["n"]
    assert metrics["inputs"]["tasks"] == ["click", "purchase"]
    assert [c.split(":")[0] for c in metrics["inputs"]["features"]["items"]] == ["category", "brand", "price", "title"]
    assert metrics["inputs"]["context"] == [c["name"] for c in meta["context"]["columns"]]


def test_model_endpoint_lists_features_context_and_tasks(shop):
    url, _, _ = shop
    info = httpx.get(url + "/model", timeout=10).json()
    assert info["inputs"]["tasks"] == ["click", "purchase"]
    assert "hour" in info["inputs"]["context"] and "device" in info["inputs"]["context"]
    assert info["inputs"]["features"]["users"]


def test_recommend_takes_context_and_objective(shop):
    url, _, data_dir = shop
    import pyarrow.parquet as pq

    user = pq.read_table(Path(data_dir) / "users.parquet").column("user_id")[0].as_py()
    items = [r["item_id"] for r in pq.read_table(Path(data_dir) / "items.parquet").to_pylist()[:20]]
    base = {"user_id": user, "item_ids": items}
    click = _post(url, "/score", {**base, "context": {"hour": 9, "device": "desktop"}}).json()["scores"]
    evening = _post(url, "/score", {**base, "context": {"hour": 21, "device": "mobile"}}).json()["scores"]
    buy = _post(url, "/score", {**base, "context": {"hour": 9, "device": "desktop"},
                                "objective": "purchase"}).json()["scores"]
    assert [s["score"] for s in click] != [s["score"] for s in evening]  # context moves the scores
    assert [s["score"] for s in click] != [s["score"] for s in buy]  # the purchase head is its own
    res = _post(url, "/recommend", {"user_id": user, "k": 5, "context": {"hour": 21, "dow": "sat"},
                                    "objective": "purchase"})
    assert res.status_code == 200 and len(res.json()["items"]) == 5
    batch = _post(url, "/recommend/batch", {"user_ids": [user, "nobody"], "k": 3, "objective": "purchase",
                                            "context": {"device": "app"}})
    assert batch.status_code == 200 and [r["cold_start"] for r in batch.json()] == [False, True]


@pytest.mark.parametrize("body, field", [({"context": {"hour": 30}}, "context.hour"),
                                         ({"context": {"weather": "rain"}}, "context.weather"),
                                         ({"objective": "return"}, "objective")])
def test_bad_context_or_objective_is_4xx_naming_the_field(shop, body, field):
    url, _, data_dir = shop
    import pyarrow.parquet as pq

    user = pq.read_table(Path(data_dir) / "users.parquet").column("user_id")[0].as_py()
    res = _post(url, "/recommend", {"user_id": user, **body})
    assert 400 <= res.status_code < 500
    assert field in res.text


def test_new_items_are_recommendable(shop):
    url, _, data_dir = shop
    import pyarrow.parquet as pq

    items = pq.read_table(Path(data_dir) / "items.parquet").to_pylist()
    new = [r["item_id"] for r in items if r["count"] == 0]
    user = pq.read_table(Path(data_dir) / "users.parquet").column("user_id")[0].as_py()
    assert new
    res = _post(url, "/recommend", {"user_id": user, "k": 3, "candidates": new}).json()
    assert res["items"] and all(it["item_id"] in new for it in res["items"])  # scored from their features
    everything = _post(url, "/recommend", {"user_id": user, "k": len(items), "exclude_seen": False}).json()
    assert set(new) <= {it["item_id"] for it in everything["items"]}
