"""Recommender with a history-reading model (seq): stored histories, request recent_items, anonymous users."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ncf_ray.artifact import save_artifact
from ncf_ray.batch import Batch, Histories
from ncf_ray.config import ModelConfig
from ncf_ray.errors import UserError
from ncf_ray.metrics import build_csr
from ncf_ray.model import model_from_config
from ncf_ray.recommender import Recommender

N_USERS, N_ITEMS, L = 6, 25, 4


@pytest.fixture(scope="module", params=[("dot", "fp32"), ("neumf", "bf16")], ids=["seq-dot", "seq-neumf-bf16"])
def rec(request, tmp_path_factory):
    head, precision = request.param
    torch.manual_seed(0)
    cfg = ModelConfig(name="seq", factors=8, layers=(16, 8), history_len=L, blocks=1, heads=2, head=head,
                      dropout=0.0)
    model = model_from_config(cfg, N_USERS, N_ITEMS)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    users = pd.DataFrame({"user_idx": np.arange(N_USERS), "user_id": [f"u{u}" for u in range(N_USERS)],
                          "count": 1})
    counts = np.arange(N_ITEMS)[::-1] * 2  # item 0 the most popular
    items = pd.DataFrame({"item_idx": np.arange(N_ITEMS), "item_id": [f"i{i}" for i in range(N_ITEMS)],
                          "count": counts})
    rng = np.random.default_rng(1)
    pairs = [(u, int(i)) for u in range(N_USERS) for i in rng.choice(N_ITEMS, 3 + u, replace=False)]
    u, i = np.array(pairs).T
    hist = Histories.from_arrays(u, i, np.arange(len(u)), N_USERS)
    indptr, indices = build_csr(u, i, N_USERS)
    out = tmp_path_factory.mktemp("rec") / "model"
    save_artifact(out, model, cfg, N_USERS, N_ITEMS, users, items, indptr, indices, counts, {}, {}, histories=hist)
    r = Recommender.from_path(out, precision=precision)
    assert r.scorer.precision == precision, r.scorer.note
    return r


def _ids(res):
    return [it["item_id"] for it in res["items"]]


def test_known_user_ranks_by_the_model_over_its_stored_history(rec):
    res = rec.recommend(["u3"], k=N_ITEMS)[0]
    hist = rec._histories.last(torch.tensor([3]), L)
    with torch.no_grad():
        scores = rec.model(Batch(user=torch.tensor([3]), item=torch.arange(N_ITEMS)[None], history=hist))[0]
    seen = {f"i{i}" for i in rec.artifact.seen_indices[rec.artifact.seen_indptr[3] : rec.artifact.seen_indptr[4]]}
    want = [f"i{i}" for i in torch.argsort(scores, descending=True).tolist() if f"i{i}" not in seen]
    assert _ids(res) == want and not res["cold_start"]
    torch.testing.assert_close(torch.tensor([it["score"] for it in res["items"]]),
                               scores[[int(i[1:]) for i in want]], rtol=0, atol=1e-5)


def test_empty_recent_items_change_nothing_for_a_known_user(rec):
    plain = rec.recommend(["u2"], k=10)[0]
    with_empty = rec.recommend(["u2"], k=10, recent_items=[[]])[0]
    assert _ids(plain) == _ids(with_empty)
    assert with_empty["history"] == "stored" and with_empty["unknown_recent_items"] == 0


def test_recent_items_extend_a_known_users_history_and_are_excluded(rec):
    res = rec.recommend(["u2"], k=N_ITEMS, recent_items=[["i20", "i21", "nope"]])[0]
    assert res["history"] == "stored+request" and res["unknown_recent_items"] == 1
    assert not {"i20", "i21"} & set(_ids(res))
    assert _ids(res) != _ids(rec.recommend(["u2"], k=N_ITEMS)[0])[: len(_ids(res))]


def test_an_unknown_user_with_recent_items_gets_a_personalised_list(rec):
    recent = ["i5", "i9", "i13"]
    res = rec.recommend(["stranger"], k=5, recent_items=[recent])[0]
    anon = rec.recommend([None], k=5, recent_items=[recent])[0]
    popular = rec.recommend(["stranger"], k=5)[0]
    assert not res["cold_start"] and res["history"] == "request"
    assert _ids(res) == _ids(anon)
    assert not set(recent) & set(_ids(res))
    assert popular["cold_start"] and _ids(popular) == ["i0", "i1", "i2", "i3", "i4"]
    assert _ids(res) != _ids(popular)
    # The same items as the model scores them for user -1 with that history.
    hist = torch.tensor([[0, 6, 10, 14]])
    with torch.no_grad():
        scores = rec.model(Batch(user=torch.tensor([-1]), item=torch.arange(N_ITEMS)[None], history=hist))[0]
    scores[[5, 9, 13]] = float("-inf")
    assert _ids(res) == [f"i{i}" for i in torch.topk(scores, 5).indices.tolist()]


def test_no_history_at_all_gets_popularity_without_the_recent_items(rec):
    res = rec.recommend(["stranger"], k=3, recent_items=[["nope"]])[0]
    assert res["cold_start"] and res["history"] == "none" and res["unknown_recent_items"] == 1
    assert _ids(res) == ["i0", "i1", "i2"]


def test_bad_recent_items_are_refused(rec):
    with pytest.raises(UserError, match="at most 4"):
        rec.recommend(["u1"], k=3, recent_items=[["i1"] * 5])
    with pytest.raises(UserError, match="2 lists for 1 users"):
        rec.recommend(["u1"], k=3, recent_items=[[], []])
