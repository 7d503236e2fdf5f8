"""Explanations ("because you viewed X"): only the user's own items, ordered by their support, for seq (attention
rollout x centred cosine), a dot model (GMF) and NeuMF (centred cosine)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from ncf_ray.artifact import save_artifact
from ncf_ray.batch import Histories
from ncf_ray.config import ModelConfig
from ncf_ray.explain import MAX_BECAUSE, Explainer, attention_rollout, block_inputs, head_attention
from ncf_ray.metrics import build_csr
from ncf_ray.model import model_from_config
from ncf_ray.recommender import Recommender

N_USERS, N_ITEMS, L = 8, 30, 5

CONFIGS = {
    "gmf": ModelConfig(name="gmf", factors=8),
    "neumf": ModelConfig(name="neumf", factors=8, layers=(16, 8)),
    "seq-dot": ModelConfig(name="seq", factors=8, history_len=L, blocks=2, heads=2, dropout=0.0),
    "seq-neumf": ModelConfig(name="seq", factors=8, layers=(16, 8), history_len=L, blocks=2, heads=2, head="neumf",
                             dropout=0.0),
}


def _log(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pairs = [(u, int(i)) for u in range(N_USERS) for i in rng.choice(N_ITEMS, 3 + u, replace=False)]
    users, items = np.array(pairs).T
    return users, items


def _artifact(out, cfg: ModelConfig) -> Recommender:
    torch.manual_seed(0)
    model = model_from_config(cfg, N_USERS, N_ITEMS)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    users, items = _log()
    vocab_u = pd.DataFrame({"user_idx": np.arange(N_USERS), "user_id": [f"u{u}" for u in range(N_USERS)],
                            "count": 1})
    counts = np.bincount(items, minlength=N_ITEMS)
    vocab_i = pd.DataFrame({"item_idx": np.arange(N_ITEMS), "item_id": [f"i{i}" for i in range(N_ITEMS)],
                            "count": counts})
    hist = Histories.from_arrays(users, items, np.arange(len(users)), N_USERS)
    indptr, indices = build_csr(users, items, N_USERS)
    save_artifact(out, model, cfg, N_USERS, N_ITEMS, vocab_u, vocab_i, indptr, indices,
                  counts.astype(np.float64), {}, {}, histories=hist)
    return Recommender.from_path(out, precision="fp32")


@pytest.fixture(scope="module", params=list(CONFIGS))
def rec(request, tmp_path_factory):
    return _artifact(tmp_path_factory.mktemp("explain") / "model", CONFIGS[request.param])


def _seen(rec: Recommender, u: int) -> set[str]:
    a = rec.artifact
    return {f"i{i}" for i in a.seen_indices[a.seen_indptr[u] : a.seen_indptr[u + 1]]}


def _window(rec: Recommender, u: int) -> set[str]:
    """The items a seq model reads for user u: its stored last L."""
    return {f"i{i - 1}" for i in rec._histories.last(torch.tensor([u]), L)[0].tolist() if i > 0}


def _centred_cosine(rec: Recommender, a: str, b: str) -> float:
    """Reference: cosine of the two items' vectors after subtracting the catalogue mean (numpy, by hand)."""
    with torch.inference_mode():
        cat = rec.model.item_repr(None).float().numpy()
    cat = cat - cat.mean(0)
    x, y = cat[rec.item_index[a]], cat[rec.item_index[b]]
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def test_explanations_name_only_the_users_own_items_best_first(rec):
    results = rec.recommend([f"u{u}" for u in range(N_USERS)], k=6, explain=True)
    some = 0
    for u, res in enumerate(results):
        own = _window(rec, u) if rec.history_len else _seen(rec, u)
        for it in res["items"]:
            because = it["because"]
            assert len(because) <= MAX_BECAUSE
            names = [b["item_id"] for b in because]
            assert set(names) <= own and it["item_id"] not in names, (u, it, own)
            scores = [b["score"] for b in because]
            assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
            some += len(because)
    assert some > 0  # random weights still leave positive support somewhere


def test_non_sequence_scores_are_the_centred_cosine_and_pick_the_best_of_the_seen_set(rec):
    if rec.history_len:
        pytest.skip("seq scores are attention-weighted (next test)")
    res = rec.recommend(["u4"], k=4, explain=True)[0]
    for it in res["items"]:
        support = {h: _centred_cosine(rec, it["item_id"], h) for h in _seen(rec, 4)}
        want = sorted((s for s in support.values() if s > 0), reverse=True)[:MAX_BECAUSE]
        assert [b["score"] for b in it["because"]] == pytest.approx(want, abs=1e-5)
        for b in it["because"]:
            assert support[b["item_id"]] == pytest.approx(b["score"], abs=1e-5)


def test_seq_scores_are_rollout_weight_times_centred_cosine(rec):
    if not rec.history_len:
        pytest.skip("only sequence models have attention")
    u = 6
    history = rec._histories.last(torch.tensor([u]), L)
    weights = attention_rollout(rec.model, torch.tensor([u]), history)[0]
    per_item: dict[str, float] = {}
    for item, w in zip(history[0].tolist(), weights.tolist()):
        if item > 0:
            per_item[f"i{item - 1}"] = per_item.get(f"i{item - 1}", 0.0) + w
    res = rec.recommend([f"u{u}"], k=4, explain=True)[0]
    for it in res["items"]:
        support = {h: w * _centred_cosine(rec, it["item_id"], h) for h, w in per_item.items()}
        want = sorted((s for s in support.values() if s > 0), reverse=True)[:MAX_BECAUSE]
        assert [b["score"] for b in it["because"]] == pytest.approx(want, abs=1e-5)


def test_head_attention_is_what_the_block_computes(rec):
    """Rebuilding a block's output from the recomputed weights gives the block's own output: the weights are
    the ones its fused attention used."""
    if not rec.history_len:
        pytest.skip("only sequence models have attention")
    users = torch.arange(N_USERS)
    history = rec._histories.last(users, L)
    with torch.inference_mode():
        for block, x, allowed in block_inputs(rec.model, users, history):
            b, n, d = x.shape
            p = head_attention(block, x, allowed)  # [B, H, L, L]
            v = block.qkv(block.norm1(x)).view(b, n, 3, block.heads, d // block.heads)[:, :, 2].transpose(1, 2)
            y = x + block.proj((p @ v).transpose(1, 2).reshape(b, n, d))
            y = y + block.ff(block.norm2(y))
            torch.testing.assert_close(y, block(x, allowed), atol=1e-5, rtol=1e-5)


def test_rollout_rows_sum_to_one_and_padding_gets_nothing(rec):
    if not rec.history_len:
        pytest.skip("only sequence models have attention")
    history = torch.tensor([[0, 0, 3, 7, 9], [1, 2, 3, 4, 5]])  # item_idx + 1, right-aligned
    w = attention_rollout(rec.model, torch.tensor([0, 1]), history)
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    assert torch.all(w[0, :2] == 0) and torch.all(w[:, 2:] > 0)


def test_anonymous_shopper_is_explained_from_recent_items_only(rec):
    recent = ["i3", "i11", "i20", "nope"]
    res = rec.recommend([None], k=5, recent_items=[recent], explain=True)[0]
    named = {b["item_id"] for it in res["items"] for b in it["because"]}
    assert named and named <= {"i3", "i11", "i20"}


def test_known_user_with_recent_items_is_explained_from_stored_and_recent(rec):
    u, recent = 2, ["i25", "i26"]
    res = rec.recommend([f"u{u}"], k=8, recent_items=[recent], explain=True)[0]
    if rec.history_len:  # the window the model read: stored items extended by the request's
        hist = rec._history(torch.tensor([u]), [[rec.item_index[r] for r in recent]])
        own = {f"i{i - 1}" for i in hist[0].tolist() if i > 0}
    else:
        own = _seen(rec, u) | set(recent)
    named = {b["item_id"] for it in res["items"] for b in it["because"]}
    assert named and named <= own


def test_explanations_are_off_by_default_and_cost_nothing(tmp_path):
    rec = _artifact(tmp_path / "m", CONFIGS["gmf"])
    res = rec.recommend(["u1"], k=3)[0]
    assert all("because" not in it for it in res["items"]) and rec._explainer is None
    cold = rec.recommend(["stranger"], k=3, explain=True)[0]  # no own items: nothing to explain with
    assert cold["cold_start"] and all(it["because"] == [] for it in cold["items"])


def test_the_nearest_seen_item_explains_a_recommendation(tmp_path):
    """GMF with hand-set item vectors: the seen item pointing the same way as the recommended one comes first,
    one pointing away never appears."""
    rec = _artifact(tmp_path / "m", CONFIGS["gmf"])
    seen = sorted(_seen(rec, 5), key=lambda i: int(i[1:]))
    near, far = rec.item_index[seen[0]], rec.item_index[seen[1]]
    target = rec.item_index[next(f"i{i}" for i in range(N_ITEMS) if f"i{i}" not in seen)]
    with torch.no_grad():
        emb = rec.model.item_emb.weight
        emb[near] = emb[target] + 0.01 * torch.randn(emb.shape[1])
        emb[far] = 2 * emb.mean(0) - emb[target]  # opposite side of the catalogue mean
    explainer = Explainer(rec.model, rec.item_ids)
    past = [rec.item_index[s] for s in seen]
    because = explainer.because([target], past)[0]
    assert because[0]["item_id"] == seen[0] and seen[1] not in {b["item_id"] for b in because}
    cos = F.cosine_similarity(explainer._unit[target], explainer._unit[near], dim=0)
    assert because[0]["score"] == pytest.approx(float(cos), abs=1e-6)


def test_rollout_carries_the_weights_back_through_every_block(rec):
    """Reference by hand (numpy, one user at a time): the final row of prod_b normalise(0.5 * (A_b + I)); with
    two blocks it differs from the last block's weights alone."""
    if not rec.history_len:
        pytest.skip("only sequence models have attention")
    users = torch.arange(N_USERS)
    history = rec._histories.last(users, L)
    with torch.inference_mode():
        mats = [head_attention(block, x, allowed).mean(1).numpy() for block, x, allowed
                in block_inputs(rec.model, users, history)]
    got = attention_rollout(rec.model, users, history).numpy()
    assert len(mats) == 2
    for u in range(N_USERS):
        r = np.eye(L)
        for a in mats:
            step = 0.5 * (a[u] + np.eye(L))
            r = (step / step.sum(1, keepdims=True)) @ r
        want = r[-1] * (history[u].numpy() > 0)
        np.testing.assert_allclose(got[u], want / want.sum(), atol=1e-5)
        last_only = 0.5 * (mats[-1][u][-1] + np.eye(L)[-1])
        assert not np.allclose(got[u], last_only / last_only.sum(), atol=1e-4)


def test_cli_recommend_explain_prints_and_returns_the_reasons(tmp_path, capsys):
    import json

    from ncf_ray.cli import main

    _artifact(tmp_path / "m", CONFIGS["seq-dot"])
    assert main(["recommend", str(tmp_path / "m"), "--user", "u7", "--k", "3", "--explain", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    named = {b["item_id"] for it in out["items"] for b in it["because"]}
    assert named and any(line.strip().startswith("because you viewed") for line in lines)
    assert main(["recommend", str(tmp_path / "m"), "--user", "u7", "--k", "3", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all("because" not in it for it in plain["items"])


def test_chunked_rollout_gives_the_same_explanations(rec, monkeypatch):
    import ncf_ray.explain as explain

    users = [f"u{u}" for u in range(N_USERS)]
    whole = rec.recommend(users, k=4, explain=True)
    monkeypatch.setattr(explain, "EXPLAIN_CHUNK_USERS", 3)  # 8 users in chunks of 3, 3, 2
    chunked = rec.recommend(users, k=4, explain=True)
    for a, b in zip(whole, chunked):
        for x, y in zip(a["items"], b["items"]):
            assert [i["item_id"] for i in x["because"]] == [i["item_id"] for i in y["because"]]
            assert [i["score"] for i in x["because"]] == pytest.approx([i["score"] for i in y["because"]], abs=1e-6)
