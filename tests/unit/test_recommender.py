"""Recommender: seen items never returned, cold-start popularity fallback, candidate subsets, k clipping."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ncf_ray.artifact import save_artifact
from ncf_ray.batch import Batch
from ncf_ray.config import ModelConfig
from ncf_ray.errors import UserError
from ncf_ray.metrics import build_csr
from ncf_ray.model import model_from_config, user_batch
from ncf_ray.recommender import Recommender

N_USERS, N_ITEMS = 12, 20


# NeuMF also through the bf16 shortlist scorer Serve uses (precision "bf16": the seen-item mask is then applied
# chunk by chunk, and returned scores must still be the model's fp32 logits).
@pytest.fixture(scope="module", params=[("neumf", "fp32"), ("neumf", "bf16"), ("mf", "fp32")],
                ids=["neumf", "neumf-bf16", "mf"])
def rec(request, tmp_path_factory):
    name, precision = request.param
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = ModelConfig(name=name, factors=4, layers=(8, 4))
    model = model_from_config(cfg, N_USERS, N_ITEMS)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    users = pd.DataFrame({"user_idx": np.arange(N_USERS), "user_id": [str(1000 + u) for u in range(N_USERS)]})
    users["count"] = 1
    counts = rng.permutation(N_ITEMS) * 3  # distinct popularity: item order is unambiguous
    items = pd.DataFrame(
        {"item_idx": np.arange(N_ITEMS), "item_id": [f"i{i}" for i in range(N_ITEMS)], "count": counts}
    )
    # User 0 has seen every item but three; user 1 has seen nothing; the rest a few random items.
    pairs = [(0, i) for i in range(N_ITEMS) if i not in (2, 7, 11)]
    pairs += [(u, int(i)) for u in range(2, N_USERS) for i in rng.choice(N_ITEMS, 5, replace=False)]
    u, i = np.array(pairs).T
    indptr, indices = build_csr(u, i, N_USERS)
    out = tmp_path_factory.mktemp("rec") / "model"
    save_artifact(out, model, cfg, N_USERS, N_ITEMS, users, items, indptr, indices, counts, {}, {})
    rec = Recommender.from_path(out, precision=precision)
    assert rec.scorer.precision == precision, rec.scorer.note
    return rec


def _seen(rec, user_idx):
    a = rec.artifact
    return {f"i{i}" for i in a.seen_indices[a.seen_indptr[user_idx] : a.seen_indptr[user_idx + 1]]}


def test_seen_items_never_returned_and_order_matches_model(rec):
    ids = [str(1000 + u) for u in range(N_USERS)]
    results = rec.recommend(ids, k=10)
    for u, res in enumerate(results):
        assert res["user_id"] == ids[u] and res["cold_start"] is False
        got = [it["item_id"] for it in res["items"]]
        assert not set(got) & _seen(rec, u)
        assert len(got) == len(set(got)) == min(10, N_ITEMS - len(_seen(rec, u)))
        scores = [it["score"] for it in res["items"]]
        assert scores == sorted(scores, reverse=True)
        # Each reported score is the model's logit for that pair, and nothing unseen beats the last one.
        with torch.no_grad():
            logits = rec.model.score_items(user_batch(torch.tensor([u])))[0]
        for it in res["items"]:
            assert it["score"] == pytest.approx(logits[rec.item_index[it["item_id"]]].item(), abs=1e-5)
        unseen = [i for i in range(N_ITEMS) if f"i{i}" not in _seen(rec, u)]
        assert max(logits[unseen]).item() == pytest.approx(scores[0], abs=1e-5)
    # User 0 has only 3 unseen items: k clipped.
    assert sorted(it["item_id"] for it in results[0]["items"]) == ["i11", "i2", "i7"]


def test_exclude_seen_false_and_int_ids(rec):
    res = rec.recommend([1000], k=50, exclude_seen=False)[0]  # int id normalised with str()
    assert res["user_id"] == "1000" and res["cold_start"] is False
    assert len(res["items"]) == N_ITEMS  # k clipped to the catalogue


def test_unknown_user_gets_popularity(rec):
    pop = rec.artifact.popularity
    expected = [f"i{i}" for i in np.argsort(-pop, kind="stable")[:4]]
    res = rec.recommend(["nobody", "1003"], k=4)
    assert res[0]["cold_start"] is True and res[1]["cold_start"] is False
    assert [it["item_id"] for it in res[0]["items"]] == expected
    assert res[0]["items"][0]["score"] == pytest.approx(1.0)  # normalised popularity


def test_candidates_subset(rec):
    cands = ["i2", "i3", "i7", "missing", "i3", "i5"]
    res = rec.recommend(["1000", "1001", "ghost"], k=10, candidates=cands)
    for r in res:
        assert r["unknown_items"] == ["missing"]
    # User 0 saw i3 and i5: only i2 and i7 remain.
    assert sorted(it["item_id"] for it in res[0]["items"]) == ["i2", "i7"]
    assert sorted(it["item_id"] for it in res[1]["items"]) == ["i2", "i3", "i5", "i7"]
    pop = {f"i{i}": c for i, c in enumerate(rec.artifact.popularity)}
    cold = [it["item_id"] for it in res[2]["items"]]
    assert cold == sorted(["i2", "i3", "i5", "i7"], key=lambda i: -pop[i])
    assert rec.recommend(["1001"], k=3, candidates=["nope"])[0]["items"] == []
    assert "unknown_items" not in rec.recommend(["1001"], k=3)[0]


def test_score_pairs(rec):
    out = rec.score("1002", ["i1", "zzz", "i4"])
    assert out["cold_start"] is False and out["user_id"] == "1002"
    assert [s["known"] for s in out["scores"]] == [True, False, True]
    assert out["scores"][1]["score"] is None
    with torch.no_grad():
        expected = rec.model(Batch(user=torch.tensor([2, 2]), item=torch.tensor([1, 4])))
    assert out["scores"][0]["score"] == pytest.approx(expected[0].item(), abs=1e-5)
    assert out["scores"][2]["score"] == pytest.approx(expected[1].item(), abs=1e-5)
    cold = rec.score("stranger", ["i1"])
    pop = rec.artifact.popularity
    assert cold["cold_start"] is True and cold["scores"][0]["score"] == pytest.approx(pop[1] / pop.max())


def test_bad_requests(rec):
    with pytest.raises(UserError, match="k=0"):
        rec.recommend(["1000"], k=0)
    with pytest.raises(UserError, match="list of ids"):
        rec.recommend("1000", k=3)
    assert rec.recommend([], k=3) == []
