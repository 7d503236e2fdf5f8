"""Feature-aware and context-aware towers of every family (no Ray): cold items scored from their features, id
dropout, context in the user representation, the catalogue cache, ID-only models untouched."""

from __future__ import annotations

import pytest
import torch

from ncf_ray import engine
from ncf_ray.batch import Batch, FeatureTable
from ncf_ray.errors import UserError
from ncf_ray.model import build_model, naive_score_items, user_batch

N_USERS, N_ITEMS, HIST = 11, 17, 5
FAMILIES = ("gmf", "mf", "mlp", "neumf", "seq")
# Global feature ids of the item table: column "category" owns [1, 5) (1 = unseen), "decade" [5, 9),
# "tags" (a bag of 2 slots) [9, 15). 0 is padding.
ITEM_IDS = 15
CATEGORY, DECADE, TAGS = 1, 5, 9


def item_table(n_items: int = N_ITEMS, seed: int = 0, dense: bool = True) -> FeatureTable:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([
        CATEGORY + 1 + torch.randint(0, 3, (n_items,), generator=g),
        DECADE + 1 + torch.randint(0, 3, (n_items,), generator=g),
        TAGS + 1 + torch.randint(0, 5, (n_items,), generator=g),
        torch.where(torch.rand(n_items, generator=g) < 0.5, 0, TAGS + 1 + torch.randint(0, 5, (n_items,), generator=g)),
    ], 1)
    return FeatureTable(ids, ITEM_IDS, torch.rand((n_items, 3), generator=g) if dense else None)


def user_table(n_users: int = N_USERS, seed: int = 1) -> FeatureTable:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([1 + 1 + torch.randint(0, 2, (n_users,), generator=g),
                       4 + 1 + torch.randint(0, 3, (n_users,), generator=g)], 1)
    return FeatureTable(ids, 8, None)


def model(name: str, seed: int = 0, **side):
    torch.manual_seed(seed)
    extra = {"history_len": HIST, "blocks": 1, "heads": 1, "use_user_id": True} if name == "seq" else {}
    m = build_model(name, N_USERS, N_ITEMS, factors=8, layers=(16, 8), dropout=0.0, **extra, **side)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # spread the weights so equality checks mean something
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


def history(users: torch.Tensor, avoid: tuple[int, ...] = ()) -> torch.Tensor:
    """[B, HIST] histories (item_idx + 1) that never contain the items in `avoid`."""
    allowed = torch.tensor([i for i in range(N_ITEMS) if i not in avoid])
    g = torch.Generator().manual_seed(5)
    return allowed[torch.randint(0, len(allowed), (len(users), HIST), generator=g)] + 1


def scores(m, users: torch.Tensor, items: torch.Tensor | None = None, context=None, avoid=()) -> torch.Tensor:
    hist = history(users, avoid) if m.history_len else None
    with torch.no_grad():
        return m.score_items(user_batch(users, hist, context), items)


def id_embeddings(m) -> list[torch.nn.Parameter]:
    """Every id-indexed parameter of a model: user/item id embeddings and MF's id biases."""
    names = ("user_emb.weight", "item_emb.weight", "user_bias.weight", "item_bias.weight")
    return [p for n, p in m.named_parameters() if n.endswith(names) and ".features." not in n]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_cold_item_is_scored_from_its_features(name):
    cold, other = 3, 9
    users = torch.arange(N_USERS)
    table = item_table()
    recat = item_table()
    recat.ids[cold, 0] = CATEGORY + 1 + (recat.ids[cold, 0] - CATEGORY) % 3  # another real category
    m, m_recat = model(name, item_features=table), model(name, item_features=recat)
    for mod in (m, m_recat):  # the cold item's id embedding was never trained: it holds no signal
        with torch.no_grad():
            for p in id_embeddings(mod):
                if p.shape[0] in (N_ITEMS, N_ITEMS + 1):
                    p[cold + (p.shape[0] - N_ITEMS)] = 0.0
    base = scores(m, users, avoid=(cold, other))
    assert torch.isfinite(base[:, cold]).all()
    # Its category changes its score; nothing else about the model changed.
    assert not torch.allclose(base[:, cold], scores(m_recat, users, avoid=(cold, other))[:, cold], atol=1e-4)
    # Another item's id embedding is none of its business.
    with torch.no_grad():
        for p in id_embeddings(m):
            if p.shape[0] in (N_ITEMS, N_ITEMS + 1):
                p[other + (p.shape[0] - N_ITEMS)] += 1.0
    after = scores(m, users, avoid=(cold, other))
    torch.testing.assert_close(after[:, cold], base[:, cold], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, other], base[:, other])


@pytest.mark.parametrize("name", FAMILIES)
def test_id_dropout_one_makes_training_scores_independent_of_id_embeddings(name):
    side = {"item_features": item_table(), "user_features": user_table(), "id_dropout": 1.0}
    a, b = model(name, **side), model(name, **side)
    with torch.no_grad():
        for p in id_embeddings(b):
            p.normal_(0, 1.0)
    users = torch.randint(0, N_USERS, (6,))
    items = torch.randint(0, N_ITEMS, (6, 4))
    hist = history(users) if a.history_len else None
    batch = Batch(user=users, item=items, history=hist)
    with torch.no_grad():
        torch.testing.assert_close(a.train()(batch), b.train()(batch), rtol=0, atol=1e-5)
        # In eval the ids count again (they are what a warm entity is scored with).
        assert not torch.allclose(a.eval()(batch), b.eval()(batch), atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_context_changes_the_user_representation(name):
    m = model(name, n_context_ids=10)
    users = torch.arange(4)
    hist = history(users) if m.history_len else None
    ctx_a = torch.tensor([[1, 5]] * 4)
    ctx_b = torch.tensor([[2, 5]] * 4)
    with torch.no_grad():
        rep = {k: m.user_repr(Batch(user=users, item=users[:, None], history=hist, context=c))
               for k, c in (("a", ctx_a), ("b", ctx_b), ("none", None), ("zeros", torch.zeros_like(ctx_a)))}
    assert not torch.allclose(rep["a"], rep["b"])
    torch.testing.assert_close(rep["none"], rep["zeros"], rtol=0, atol=0)  # None = every column unknown
    # Context of a pair batch flows into its logits the same way.
    items = torch.randint(0, N_ITEMS, (4, 3))
    with torch.no_grad():
        la = m(Batch(user=users, item=items, history=hist, context=ctx_a))
        lb = m(Batch(user=users, item=items, history=hist, context=ctx_b))
    assert not torch.allclose(la, lb)


@pytest.mark.parametrize("name", FAMILIES)
def test_catalogue_cache_and_score_all_equal_forward_for_featured_models(name):
    m = model(name, item_features=item_table(), user_features=user_table(), id_dropout=0.3, n_context_ids=6)
    users = torch.arange(N_USERS)
    with torch.no_grad():
        cached = m.item_repr(None)
        assert m.item_repr(None) is cached  # served from the cache
        torch.testing.assert_close(cached, m.item_repr(torch.arange(N_ITEMS)), rtol=0, atol=0)
        hist = history(users) if m.history_len else None
        torch.testing.assert_close(m.score_items(user_batch(users, hist)), naive_score_items(m, users, history=hist),
                                   rtol=1e-5, atol=1e-5)
        # A feature-embedding update invalidates the cache like an id-embedding update does.
        feats = next(p for n, p in m.named_parameters() if "item_emb.features.emb." in n)
        feats.add_(0.5)
        torch.testing.assert_close(m.item_repr(None), m.item_repr(torch.arange(N_ITEMS)), rtol=0, atol=0)
        assert not torch.allclose(m.item_repr(None), cached)


@pytest.mark.parametrize("name", FAMILIES)
def test_tables_are_not_weights_and_id_only_state_is_unchanged(name):
    plain = model(name).state_dict()
    defaults = model(name, item_features=None, user_features=None, n_context_ids=0, id_dropout=0.0,
                     tasks=("click",), task_mixture="shared", experts=4).state_dict()
    assert list(plain) == list(defaults)
    for k in plain:
        torch.testing.assert_close(plain[k], defaults[k], rtol=0, atol=0)
    featured = model(name, item_features=item_table(), user_features=user_table(), n_context_ids=6)
    keys = set(featured.state_dict())
    assert set(plain) <= keys  # the id model's parameters keep their names
    assert keys == set(dict(featured.named_parameters()))  # weights only: the tables travel in features/


def test_feature_tables_must_match_the_model():
    with pytest.raises(UserError, match="16 rows but the model has 17"):
        build_model("gmf", N_USERS, N_ITEMS, factors=4, item_features=item_table(N_ITEMS - 1))
    with pytest.raises(UserError, match="user feature table has 10 rows"):
        build_model("seq", N_USERS, N_ITEMS, factors=4, history_len=3, user_features=user_table(N_USERS - 1))
    with pytest.raises(UserError, match="id_dropout=1.5"):
        build_model("mf", N_USERS, N_ITEMS, factors=4, item_features=item_table(), id_dropout=1.5)
    with pytest.raises(ValueError, match=r"n_ids=3"):
        FeatureTable(torch.tensor([[1, 3]]), 3)


def test_feature_table_from_numpy_and_to():
    import numpy as np

    t = FeatureTable.from_numpy(np.array([[1, 0], [2, 3]], dtype=np.int32), np.ones((2, 2), np.float32), 4)
    assert t.ids.dtype == torch.int64 and t.dense.dtype == torch.float32 and (t.n_rows, t.slots, t.dense_dim) == (2, 2, 2)
    assert t.to("cpu").ids.tolist() == [[1, 0], [2, 3]]


def test_pooling_is_a_masked_mean_of_the_real_slots():
    table = FeatureTable(torch.tensor([[1, 0, 0], [1, 2, 0], [0, 0, 0]]), 3, None)
    from ncf_ray.model import FeaturePool

    pool = FeaturePool(table, 4)
    with torch.no_grad():
        w = pool.emb.weight
        got = pool(torch.tensor([0, 1, 2, -1]))
    torch.testing.assert_close(got[0], w[1])
    torch.testing.assert_close(got[1], (w[1] + w[2]) / 2)
    assert got[2].abs().sum() == 0 and got[3].abs().sum() == 0  # no features / unknown row: zeros
    # Many lookups pool the whole table once (a sparse matmul) and gather: same values, same gradients as
    # pooling per lookup.
    many = torch.randint(0, 3, (50,), generator=torch.Generator().manual_seed(0))
    g = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    (pool(many) * g).sum().backward()
    grad_all, pool.emb.weight.grad = pool.emb.weight.grad.clone(), None
    per_lookup = torch.stack([pool(i[None])[0] for i in many])
    (per_lookup * g).sum().backward()
    torch.testing.assert_close(pool(many), per_lookup)
    torch.testing.assert_close(grad_all, pool.emb.weight.grad)


def _cold_start_problem(n_users: int = 40, n_items: int = 40, seed: int = 0):
    """Two taste groups that follow an item category: even users like the even items (category id 2), odd
    users the odd ones (category id 3). Items 0..3 are cold (never in the log). Returns positives and the item table."""
    g = torch.Generator().manual_seed(seed)
    category = torch.arange(n_items) % 2  # 0 -> category id 2, 1 -> category id 3
    ids = (2 + category)[:, None]
    users = torch.arange(n_users).repeat_interleave(8)
    warm = torch.arange(4, n_items)
    by_group = torch.stack([warm[warm % 2 == 0], warm[warm % 2 == 1]])  # [2, warm items of that category]
    pick = torch.randint(0, by_group.shape[1], (users.numel(),), generator=g)
    items = by_group[users % 2, pick]
    keys = torch.unique(users * n_items + items)
    return keys // n_items, keys % n_items, FeatureTable(ids, 4, None), category


def test_training_with_id_dropout_ranks_cold_items_by_their_features():
    users, items, table, category = _cold_start_problem()
    n_users, n_items = 40, 40
    torch.manual_seed(0)
    m = build_model("gmf", n_users, n_items, factors=8, item_features=table, id_dropout=0.5)
    engine.fit_plain(m, users, items, n_items, 15, negatives=4, batch_size=256, lr=2e-2,
                     generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s = m.eval().score_items(user_batch(torch.arange(n_users)), torch.arange(4))  # the cold items only
    likes_odd = s[:, category[:4] == 1].mean(1) > s[:, category[:4] == 0].mean(1)
    assert bool((likes_odd == (torch.arange(n_users) % 2 == 1)).float().mean() >= 0.9)


def test_featured_models_copy_reload_and_keep_dense_buffers():
    import copy
    import pickle

    side = {"item_features": item_table(), "user_features": user_table(), "n_context_ids": 6}
    m = model("neumf", **side)
    users = torch.arange(N_USERS)
    want = scores(m, users)  # builds the pooling matrices' cache
    # DDP broadcasts every buffer, and cannot broadcast sparse tensors: the derived matrices are no buffers.
    assert all(b.layout == torch.strided for b in m.buffers())
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        torch.testing.assert_close(scores(clone, users), want, rtol=0, atol=0)
    # The weights alone, loaded into a model built from the same tables, give the same scores.
    fresh = model("neumf", seed=7, **side)
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(scores(fresh, users), want, rtol=1e-6, atol=1e-6)


def test_side_args_name_what_the_model_was_built_with():
    m = model("mlp", item_features=item_table(), n_context_ids=6, id_dropout=0.25, tasks=("click", "purchase"),
              task_mixture="mmoe", experts=2)
    assert m.side_args() == {"n_context_ids": 6, "id_dropout": 0.25, "tasks": ["click", "purchase"],
                             "task_mixture": "mmoe", "experts": 2}
    again = build_model("mlp", N_USERS, N_ITEMS, factors=8, layers=(16, 8), item_features=item_table(),
                        **m.side_args())
    assert set(again.state_dict()) == set(m.state_dict())
    assert model("gmf").side_args()["tasks"] == ["click"]


def test_neumf_pretraining_copies_the_feature_pools():
    side = {"item_features": item_table(), "user_features": user_table()}
    gmf, mlp = model("gmf", seed=1, **side), model("mlp", seed=2, **side)
    torch.manual_seed(0)
    neumf = build_model("neumf", N_USERS, N_ITEMS, factors=8, layers=(16, 8), **side)
    neumf.load_pretrained(gmf, mlp, alpha=0.5).eval()
    users = torch.arange(N_USERS)
    with torch.no_grad():
        want = 0.5 * scores(gmf, users) + 0.5 * scores(mlp, users)
        torch.testing.assert_close(scores(neumf, users), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="other side inputs"):
        neumf.load_pretrained(model("gmf"), mlp)
