"""Ray Serve endpoint over real HTTP on loopback: round trips, bad input, hot swap, replica loss, the bench.

One local Ray (2 CPUs, HAProxy ingress as `ncf-ray serve` uses it) and one Serve instance for the whole module.
The models are tiny NeuMFs trained here for a few steps on a random log (enough to make scores meaningful).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.integration

N_USERS, N_ITEMS = 40, 30


def _train_artifact(out_dir: str, seed: int, steps: int = 40, seq: bool = False) -> str:
    """Train a tiny NeuMF (or, with `seq`, a sequence model over each user's last 6 items) on a random log for a
    few steps and save it as an artifact with the users' histories; returns model_version."""
    import pandas as pd
    import torch

    from ncf_ray import engine
    from ncf_ray.artifact import save_artifact
    from ncf_ray.batch import Batch, Histories
    from ncf_ray.config import ModelConfig
    from ncf_ray.data.sampler import NegativeSampler
    from ncf_ray.metrics import build_csr
    from ncf_ray.model import model_from_config

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    users = np.repeat(np.arange(N_USERS), 6)
    items = (users * 7 + rng.integers(0, 8, len(users))) % N_ITEMS  # each user likes a neighbourhood
    cfg = ModelConfig(name="seq", factors=8, layers=(), history_len=6, blocks=1, dropout=0.0) if seq else \
        ModelConfig(name="neumf", factors=8, layers=(16, 8))
    model = model_from_config(cfg, N_USERS, N_ITEMS)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    u, i = torch.as_tensor(users), torch.as_tensor(items)
    hist = Histories.from_arrays(users, items, np.arange(len(users)), N_USERS)  # file order is time order
    for _ in range(steps):
        if seq:
            ex = engine.sequence_examples(hist, torch.arange(N_USERS), 6, NegativeSampler(u, i, N_ITEMS), 1)
            loss = engine.batch_loss(model, ex.batch(0, len(ex)))
        else:
            neg = torch.randint(0, N_ITEMS, (len(u),))
            logits = model(Batch(user=torch.cat([u, u]), item=torch.cat([i, neg])))
            labels = torch.cat([torch.ones(len(u)), torch.zeros(len(u))])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    indptr, indices = build_csr(users, items, N_USERS)
    counts = np.bincount(items, minlength=N_ITEMS)
    vocab_u = pd.DataFrame({"user_idx": np.arange(N_USERS, dtype=np.int32),
                            "user_id": [f"u{k}" for k in range(N_USERS)], "count": np.diff(indptr)})
    vocab_i = pd.DataFrame({"item_idx": np.arange(N_ITEMS, dtype=np.int32),
                            "item_id": [f"i{k}" for k in range(N_ITEMS)], "count": counts})
    return save_artifact(out_dir, model.eval(), cfg, N_USERS, N_ITEMS, vocab_u, vocab_i, indptr, indices,
                         counts.astype(np.float64), {"loss": float(loss.detach())}, {"source": "test", "seed": seed},
                         histories=hist)


@pytest.fixture(scope="module")
def server(tmp_path_factory, serve_on_loopback):
    """Two trained artifacts and Serve running the first one. Yields (base_url, v1 dir, v2 dir)."""
    from ray import serve

    from ncf_ray.serve import APP_NAME, build_app

    root = tmp_path_factory.mktemp("serve")
    v1, v2, v3 = str(root / "v1"), str(root / "v2"), str(root / "seq")
    _train_artifact(v1, seed=1)
    _train_artifact(v2, seed=2)
    _train_artifact(v3, seed=3, seq=True)
    url = serve_on_loopback
    serve.run(build_app({"model_dir": v1}), name=APP_NAME, route_prefix="/")
    _wait_ok(url)
    yield url, v1, v2, v3


def _wait_ok(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if _post(url, "/recommend", {"user_id": "u0"}).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"{url}/recommend never answered 200")


def _post(url: str, path: str, body: object, **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=10, **kw)


def _artifact(path: str):
    from ncf_ray.artifact import load_artifact

    return load_artifact(path)


def _seen(art, user: str) -> set[str]:
    idx = art.user_index[user]
    return {str(art.item_ids[j]) for j in art.seen_indices[art.seen_indptr[idx]: art.seen_indptr[idx + 1]]}


# ------------------------------------------------------------------------------------------------ round trips
def test_recommend_round_trip_never_returns_seen_items(server):
    url, v1, *_ = server
    art = _artifact(v1)
    for user in ("u0", "u7", "u39"):
        r = _post(url, "/recommend", {"user_id": user, "k": N_ITEMS})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["user_id"] == user and body["cold_start"] is False
        assert body["model_version"] == art.model_version
        got = [it["item_id"] for it in body["items"]]
        assert not set(got) & _seen(art, user)
        assert len(got) == N_ITEMS - len(_seen(art, user))  # every unseen item, each once
        scores = [it["score"] for it in body["items"]]
        assert scores == sorted(scores, reverse=True)
    top3 = _post(url, "/recommend", {"user_id": "u7", "k": 3}).json()["items"]
    assert len(top3) == 3
    # The served scorer ranks a bf16 shortlist but returns fp32 logits: the same numbers /score gives.
    scored = _post(url, "/score", {"user_id": "u7", "item_ids": [i["item_id"] for i in top3]}).json()["scores"]
    assert [i["score"] for i in top3] == pytest.approx([s["score"] for s in scored], abs=1e-5)


def test_concurrent_requests_match_single_answers(server):
    url, *_ = server
    users = [f"u{k}" for k in range(N_USERS)]
    expected = {u: _post(url, "/recommend", {"user_id": u, "k": 5}).json()["items"] for u in users[:8]}
    results: dict[str, list] = {}

    def ask(u: str) -> None:
        results[u] = _post(url, "/recommend", {"user_id": u, "k": 5}).json()["items"]

    threads = [threading.Thread(target=ask, args=(u,)) for u in users[:8] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for u in users[:8]:  # batched together with others, each still gets its own list
        assert [i["item_id"] for i in results[u]] == [i["item_id"] for i in expected[u]]


def test_batch_and_score_round_trip(server):
    url, v1, *_ = server
    art = _artifact(v1)
    r = _post(url, "/recommend/batch", {"user_ids": ["u1", "u2", "stranger", 5], "k": 4})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [o["user_id"] for o in out] == ["u1", "u2", "stranger", 5]
    assert [o["cold_start"] for o in out] == [False, False, True, True]
    single = _post(url, "/recommend", {"user_id": "u2", "k": 4}).json()
    assert [i["item_id"] for i in out[1]["items"]] == [i["item_id"] for i in single["items"]]
    assert [i["score"] for i in out[1]["items"]] == pytest.approx([i["score"] for i in single["items"]], abs=1e-5)
    assert not {i["item_id"] for i in out[0]["items"]} & _seen(art, "u1")

    r = _post(url, "/score", {"user_id": "u1", "item_ids": ["i0", "nope", "i3"]})
    assert r.status_code == 200, r.text
    scores = r.json()["scores"]
    assert [s["known"] for s in scores] == [True, False, True]
    assert scores[1]["score"] is None and isinstance(scores[0]["score"], float)


def test_unknown_user_gets_popular_items_cold_start(server):
    url, v1, *_ = server
    art = _artifact(v1)
    body = _post(url, "/recommend", {"user_id": "never-seen", "k": 3}).json()
    assert body["cold_start"] is True
    top = [str(art.item_ids[j]) for j in np.argsort(-art.popularity, kind="stable")[:3]]
    assert [i["item_id"] for i in body["items"]] == top


def test_health_model_and_docs(server):
    url, v1, *_ = server
    assert httpx.get(url + "/healthz").json()["status"] == "ok"
    meta = httpx.get(url + "/model").json()
    assert meta["model_version"] == _artifact(v1).model_version
    assert meta["n_items"] == N_ITEMS and meta["dataset_meta"]["seed"] == 1 and "loss" in meta["metrics"]
    # No server path in the body: the artifact dir by name only (v1 is an absolute tmp path).
    assert meta["model_dir"] == Path(v1).name and str(Path(v1).parent) not in httpx.get(url + "/model").text
    import torch

    from ncf_ray.scoring import bf16_is_fast

    # Serve's default precision is "auto": the bf16 kernel wherever this CPU has bf16 dot-product units.
    want = "bf16" if bf16_is_fast(torch.device("cpu")) else "fp32"
    assert meta["scoring"]["precision"] == want, meta["scoring"]
    assert httpx.get(url + "/docs").status_code == 200
    assert "/recommend/batch" in httpx.get(url + "/openapi.json").json()["paths"]


# ------------------------------------------------------------------------------------------------ bad input
JSON = {"content-type": "application/json"}
BAD_INPUTS = [
    ("malformed json", "/recommend", b'{"user_id": "u1", ', 400),
    ("not an object", "/recommend", b'[1, 2]', 422),
    ("missing user", "/recommend", b"{}", 422),
    ("float user id", "/recommend", json.dumps({"user_id": 1.5}).encode(), 422),
    ("k as string", "/recommend", json.dumps({"user_id": "u1", "k": "10"}).encode(), 422),
    ("k zero", "/recommend", json.dumps({"user_id": "u1", "k": 0}).encode(), 422),
    ("k too big", "/recommend", json.dumps({"user_id": "u1", "k": 1001}).encode(), 422),
    ("unknown field", "/recommend", json.dumps({"user_id": "u1", "top_k": 3}).encode(), 422),
    ("too many users", "/recommend/batch", json.dumps({"user_ids": list(range(1001))}).encode(), 422),
    ("empty batch", "/recommend/batch", json.dumps({"user_ids": []}).encode(), 422),
    ("too many items", "/score", json.dumps({"user_id": "u1", "item_ids": list(range(1001))}).encode(), 422),
    ("body over 1 MB", "/recommend", b'{"user_id": "' + b"x" * (1 << 20) + b'"}', 413),
]


@pytest.mark.parametrize("name,path,body,status", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_json_4xx_and_server_keeps_serving(server, name, path, body, status):
    url, *_ = server
    r = httpx.post(url + path, content=body, headers=JSON, timeout=10)
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    assert "error" in r.json()
    assert _post(url, "/recommend", {"user_id": "u1"}).status_code == 200


def test_chunked_body_over_limit_is_cut_off(server):
    url, *_ = server

    def chunks():
        yield b'{"user_id": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}'

    r = httpx.post(url + "/recommend", content=chunks(), headers=JSON, timeout=10)
    assert r.status_code == 413
    assert _post(url, "/recommend", {"user_id": "u1"}).status_code == 200


# ------------------------------------------------------------------------------------------------ operations
def test_hot_swap_under_load_drops_nothing(server):
    from ray import serve

    from ncf_ray.serve import APP_NAME, build_app

    url, v1, v2, _ = server
    old, new = _artifact(v1).model_version, _artifact(v2).model_version
    assert old != new
    failures: list[str] = []
    versions: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.post(url + "/recommend", json={"user_id": "u3", "k": 5})
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        versions.append(r.json()["model_version"])
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    replicas_before = _replica_names()
    t = threading.Thread(target=client)
    t.start()
    try:
        time.sleep(0.5)
        serve.run(build_app({"model_dir": v2}), name=APP_NAME, route_prefix="/")  # user_config change only
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not versions or versions[-1] != new):
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        t.join()
    assert not failures, failures[:5]
    assert versions[0] == old and versions[-1] == new
    assert httpx.get(url + "/model").json()["model_version"] == new
    assert _replica_names() == replicas_before  # swapped in place by reconfigure, no replica restarted


def _replica_names() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::ncf#NCFServer"))


def test_killed_replica_is_replaced(server):
    import ray

    url, *_ = server
    names = _replica_names()
    assert names, "no replica actor found"
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 90
    ok = 0
    while time.monotonic() < deadline and ok < 5:  # five good answers in a row from the replacement
        try:
            ok = ok + 1 if _post(url, "/recommend", {"user_id": "u1"}).status_code == 200 else 0
        except httpx.HTTPError:
            ok = 0
        time.sleep(0.2)
    assert ok >= 5, "Serve did not bring the endpoint back after the replica was killed"
    alive = _replica_names()
    assert alive and names[0] not in alive


def test_recent_items_over_http_with_a_sequence_model(server):
    """Swap in a seq model; a known user's list is the same with recent_items=[]; an anonymous shopper with
    recent items gets a personalised list without them; too many recent items is a 400 and serving goes on."""
    from ray import serve

    from ncf_ray.serve import APP_NAME, build_app

    url, _, _, v3 = server
    serve.run(build_app({"model_dir": v3}), name=APP_NAME, route_prefix="/")
    want = _artifact(v3).model_version
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and httpx.get(url + "/model").json()["model_version"] != want:
        time.sleep(0.2)
    assert httpx.get(url + "/model").json()["model"]["name"] == "seq"

    plain = _post(url, "/recommend", {"user_id": "u5", "k": 5}).json()
    empty = _post(url, "/recommend", {"user_id": "u5", "k": 5, "recent_items": []}).json()
    assert [i["item_id"] for i in plain["items"]] == [i["item_id"] for i in empty["items"]]
    assert empty["history"] == "stored" and "history" not in plain

    recent = ["i3", "i4", "i5", "nope"]
    anon = _post(url, "/recommend", {"recent_items": recent, "k": 5})
    assert anon.status_code == 200, anon.text
    body = anon.json()
    assert body["cold_start"] is False and body["history"] == "request" and body["unknown_recent_items"] == 1
    assert len(body["items"]) == 5 and not set(recent) & {i["item_id"] for i in body["items"]}
    popular = _post(url, "/recommend", {"user_id": "stranger", "k": 5}).json()
    assert popular["cold_start"] is True
    assert [i["item_id"] for i in popular["items"]] != [i["item_id"] for i in body["items"]]

    batch = _post(url, "/recommend/batch", {"user_ids": ["u5", None], "recent_items": [[], ["i3", "i4"]], "k": 3})
    assert batch.status_code == 200, batch.text
    rows = batch.json()
    assert [r["history"] for r in rows] == ["stored", "request"] and rows[1]["user_id"] is None

    for bad in ({"recent_items": ["i1"] * 7}, {"user_id": "u1", "recent_items": "i1"}, {"k": 3},
                {"user_ids": ["u1"], "recent_items": [[], []]}):
        path = "/recommend/batch" if "user_ids" in bad else "/recommend"
        r = _post(url, path, bad)
        assert 400 <= r.status_code < 500 and "error" in r.json(), (bad, r.status_code, r.text)
    assert _post(url, "/recommend", {"user_id": "u1"}).status_code == 200


def test_explanations_over_http_name_the_users_own_items(server):
    """explain: true on /recommend and /recommend/batch gives each item a "because" list drawn from the user's
    own items, best first; without it there is none; a non-boolean explain is a 4xx."""
    url, *dirs = server
    version = httpx.get(url + "/model").json()["model_version"]
    art = next(a for a in map(_artifact, dirs) if a.model_version == version)  # whichever model is deployed
    body = _post(url, "/recommend", {"user_id": "u7", "k": 4, "explain": True})
    assert body.status_code == 200, body.text
    items = body.json()["items"]
    named = [b for it in items for b in it["because"]]
    assert named and {b["item_id"] for b in named} <= _seen(art, "u7")
    for it in items:
        scores = [b["score"] for b in it["because"]]
        assert scores == sorted(scores, reverse=True) and len(scores) <= 3
    batch = _post(url, "/recommend/batch", {"user_ids": ["u7", "u8"], "k": 2, "explain": True}).json()
    ids = [[b["item_id"] for b in it["because"]] for it in batch[0]["items"]]
    assert ids == [[b["item_id"] for b in it["because"]] for it in items[:2]]
    assert {b["item_id"] for it in batch[1]["items"] for b in it["because"]} <= _seen(art, "u8")
    assert all("because" not in it for it in _post(url, "/recommend", {"user_id": "u7", "k": 4}).json()["items"])
    assert 400 <= _post(url, "/recommend", {"user_id": "u7", "explain": "yes"}).status_code < 500


# ------------------------------------------------------------------------------------------------ config + bench
def test_build_app_args_and_emitted_config_are_valid(server, tmp_path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from ncf_ray.config import ServeConfig
    from ncf_ray.errors import UserError
    from ncf_ray.serve import deployment_options, emit_config, serve_config_from_args

    _, v1, *_ = server
    cfg = serve_config_from_args({"model_dir": v1, "replicas": "auto", "max_batch_size": "32", "port": "9000"})
    assert cfg.replicas == "auto" and cfg.max_batch_size == 32 and cfg.port == 9000
    opts = deployment_options(cfg)
    assert "autoscaling_config" in opts and "num_replicas" not in opts
    assert opts["user_config"]["model_dir"] == os.path.abspath(v1)
    for bad in ({"model_dir": v1, "replicas": "0"}, {"model_dir": v1, "k": "3"}, {"replicas": "2"},
                {"model_dir": v1, "max_batch_size": "x"}):
        with pytest.raises(UserError):
            serve_config_from_args(bad)
    doc = yaml.safe_load(emit_config(ServeConfig(model_dir=v1, port=8123)))
    schema = ServeDeploySchema.model_validate(doc)
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.port == 8123
    assert schema.applications[0].import_path == "ncf_ray.serve:build_app"
