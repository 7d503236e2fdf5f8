"""Multi-task (click + purchase) models and their labels (no Ray): labels from events, shared and MMoE heads,
the task argument of head/score_all/score_items, the weighted loss."""

from __future__ import annotations

import pytest
import torch

from ncf_ray import engine
from ncf_ray.batch import Batch, Histories
from ncf_ray.data.sampler import NegativeSampler
from ncf_ray.errors import UserError
from ncf_ray.model import build_model, naive_score_items, user_batch

N_USERS, N_ITEMS = 30, 24
FAMILIES = ("gmf", "mf", "mlp", "neumf", "seq")
VIEW, CART, PURCHASE = 0, 1, 2


def shop_log(n_users: int = N_USERS, n_items: int = N_ITEMS, per_user: int = 8, seed: int = 0):
    """Two taste groups (even users the low half of the catalogue, odd users the high half); a user buys only
    the items whose index is a multiple of 3, and only views or carts the rest. So click and purchase differ."""
    g = torch.Generator().manual_seed(seed)
    users = torch.arange(n_users).repeat_interleave(per_user)
    items = (users % 2) * (n_items // 2) + torch.randint(0, n_items // 2, (users.numel(),), generator=g)
    keys = torch.unique(users * n_items + items)
    users, items = keys // n_items, keys % n_items
    events = torch.where(items % 3 == 0, PURCHASE, torch.randint(0, 2, (users.numel(),), generator=g))
    return users, items, events


def model(name: str, mixture: str = "shared", seed: int = 0, **kw):
    torch.manual_seed(seed)
    extra = {"history_len": 4, "blocks": 1, "dropout": 0.0} if name == "seq" else {}
    return build_model(name, N_USERS, N_ITEMS, factors=8, layers=(16, 8), tasks=("click", "purchase"),
                       task_mixture=mixture, experts=3, **extra, **kw)


def test_pair_labels_follow_the_events():
    users, items, events = shop_log()
    event_of = {(int(u), int(i)): int(e) for u, i, e in zip(users, items, events)}
    sampler = NegativeSampler(users, items, N_ITEMS)
    context = torch.stack([users % 5 + 1, items % 3 + 6], 1)  # any per-positive ids, to check they travel along
    ex = engine.pair_examples(users, items, sampler, 3, torch.Generator().manual_seed(0), events=events,
                              context=context, purchase_from=PURCHASE, tasks=("click", "purchase"))
    assert set(ex.labels) == {"click", "purchase"}
    assert ex.labels["click"][:, 0].eq(1).all() and ex.labels["click"][:, 1:].eq(0).all()
    assert ex.labels["purchase"][:, 1:].eq(0).all()  # a negative is nothing, for every task
    want = [float(event_of[(int(u), int(i))] >= PURCHASE) for u, i in zip(ex.user, ex.item[:, 0])]
    assert ex.labels["purchase"][:, 0].tolist() == want
    assert 0 < sum(want) < len(want)
    # purchase_from counts the funnel from there up: from "cart", carts are purchases too.
    ex_cart = engine.pair_examples(users, items, sampler, 1, events=events, purchase_from=CART,
                                   tasks=("click", "purchase"))
    want = [float(event_of[(int(u), int(i))] >= CART) for u, i in zip(ex_cart.user, ex_cart.item[:, 0])]
    assert ex_cart.labels["purchase"][:, 0].tolist() == want
    # The context row of each example is its positive's, shared by its negatives, and reaches the batch.
    b = ex.batch(0, 10)
    assert b.context.tolist() == [[int(u) % 5 + 1, int(i) % 3 + 6] for u, i in zip(b.user, b.item[:, 0])]
    assert set(b.labels) == {"click", "purchase"}


def test_make_examples_asks_for_events_when_the_model_buys():
    users, items, events = shop_log()
    sampler = NegativeSampler(users, items, N_ITEMS)
    with pytest.raises(UserError, match="purchase task needs events"):
        engine.make_examples(model("gmf"), users, items, None, sampler, 2)
    ex = engine.make_examples(model("gmf"), users, items, None, sampler, 2, events=events, purchase_from=PURCHASE)
    assert set(ex.labels) == {"click", "purchase"}
    single = engine.make_examples(build_model("gmf", N_USERS, N_ITEMS, factors=4), users, items, None, sampler, 2)
    assert list(single.labels) == ["click"]


def test_sequence_labels_and_context_come_from_the_history_positions():
    users, items, events = shop_log()
    times = torch.arange(users.numel())
    context = (items % 4 + 1)[:, None]
    hist = Histories.from_arrays(users.numpy(), items.numpy(), times.numpy(), N_USERS, events=events.numpy(),
                                 context=context.numpy())
    sampler = NegativeSampler(users, items, N_ITEMS)
    ex = engine.make_examples(model("seq"), users, items, hist, sampler, 2, torch.Generator().manual_seed(0),
                              purchase_from=PURCHASE)
    target = ex.item[..., 0]
    real = ex.mask
    # Each target's purchase label is its own event's; its context is its own too.
    assert torch.equal(ex.labels["purchase"][..., 0][real], (target[real] % 3 == 0).float())
    assert torch.equal(ex.context[..., 0][real], target[real] % 4 + 1)
    assert ex.labels["purchase"][..., 1:].eq(0).all() and ex.labels["click"][..., 0][real].eq(1).all()


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mixture", ["shared", "mmoe"])
def test_task_logits_agree_across_entry_points(name, mixture):
    m = model(name, mixture, n_context_ids=5).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    users = torch.arange(7)
    hist = torch.randint(1, N_ITEMS + 1, (7, 4), generator=g) if m.history_len else None
    items = torch.randint(0, N_ITEMS, (7, 5), generator=g)
    batch = Batch(user=users, item=items, history=hist)
    with torch.no_grad():
        per_task = m.forward_tasks(batch)
        assert set(per_task) == {"click", "purchase"}
        torch.testing.assert_close(m(batch), per_task["click"], rtol=0, atol=0)
        assert not torch.allclose(per_task["click"], per_task["purchase"])
        u, i = m.user_repr(batch), m.item_repr(items)
        torch.testing.assert_close(m.head(u[:, None], i, task="purchase"), per_task["purchase"], rtol=1e-6, atol=1e-6)
        for task in ("click", "purchase"):
            full = m.score_items(user_batch(users, hist), task=task)
            every = Batch(user=users.repeat_interleave(N_ITEMS), item=torch.arange(N_ITEMS).repeat(7),
                          history=None if hist is None else hist.repeat_interleave(N_ITEMS, 0))
            torch.testing.assert_close(full, m.forward_tasks(every)[task].view(7, N_ITEMS), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.score_items(user_batch(users, hist)), naive_score_items(m, users, history=hist),
                                   rtol=1e-5, atol=1e-5)
    assert getattr(m, "tower_parts", lambda: None)() is None  # the serving kernel knows only the click head
    with pytest.raises(UserError, match="'add_to_cart'"):
        m.head(u, i[:, 0], task="add_to_cart")


def test_single_task_models_keep_their_head():
    m = build_model("neumf", N_USERS, N_ITEMS, factors=4, layers=(8, 4)).eval()
    assert m.tasks == ("click",) and not m.multitask and m.tower_parts() is not None
    batch = Batch(user=torch.arange(3), item=torch.arange(3))
    with torch.no_grad():
        assert list(m.forward_tasks(batch)) == ["click"]
        torch.testing.assert_close(m.forward_tasks(batch)["click"], m(batch), rtol=0, atol=0)
    assert not [k for k in m.state_dict() if "task_heads" in k]
    with pytest.raises(UserError, match="purchase"):
        m.score_items(user_batch(torch.arange(3)), task="purchase")


def test_bad_task_args():
    with pytest.raises(UserError, match="must start with click"):
        build_model("gmf", N_USERS, N_ITEMS, factors=4, tasks=("purchase",))
    with pytest.raises(UserError, match="must start with click"):
        build_model("gmf", N_USERS, N_ITEMS, factors=4, tasks=("click", "refund"))
    with pytest.raises(UserError, match="task_mixture='moe'"):
        build_model("gmf", N_USERS, N_ITEMS, factors=4, tasks=("click", "purchase"), task_mixture="moe")
    with pytest.raises(UserError, match="experts=0"):
        build_model("gmf", N_USERS, N_ITEMS, factors=4, tasks=("click", "purchase"), experts=0)


def test_task_weights_weigh_the_per_task_losses():
    users, items, events = shop_log()
    sampler = NegativeSampler(users, items, N_ITEMS)
    m = model("neumf").eval()
    ex = engine.make_examples(m, users, items, None, sampler, 2, torch.Generator().manual_seed(0), events=events,
                              purchase_from=PURCHASE)
    batch = ex.batch(0, 40)
    with torch.no_grad():
        logits = m.forward_tasks(batch)
        bce = {t: torch.nn.functional.binary_cross_entropy_with_logits(logits[t], batch.labels[t]) for t in logits}
        torch.testing.assert_close(engine.batch_loss(m, batch), bce["click"] + bce["purchase"])
        torch.testing.assert_close(engine.batch_loss(m, batch, task_weights={"purchase": 0.0}), bce["click"])
        torch.testing.assert_close(engine.batch_loss(m, batch, task_weights={"click": 0.5, "purchase": 2.0}),
                                   0.5 * bce["click"] + 2.0 * bce["purchase"])


@pytest.mark.parametrize("name,mixture", [("neumf", "shared"), ("neumf", "mmoe"), ("mf", "mmoe"), ("mlp", "shared")])
def test_heads_learn_purchase_apart_from_click(name, mixture):
    users, items, events = shop_log(per_user=10)
    m = model(name, mixture)
    rows = engine.fit_plain(m, users, items, N_ITEMS, 25, negatives=4, batch_size=128, lr=2e-2, events=events,
                            purchase_from=PURCHASE, generator=torch.Generator().manual_seed(0))
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    # Among each user's own positives, the purchase head ranks the bought items above the merely viewed ones.
    with torch.no_grad():
        batch = Batch(user=users, item=items)
        logits = m.eval().forward_tasks(batch)
    bought = events == PURCHASE
    gap = logits["purchase"][bought].mean() - logits["purchase"][~bought].mean()
    click_gap = logits["click"][bought].mean() - logits["click"][~bought].mean()
    assert gap > 1.0 and gap > click_gap + 0.5


def test_purchase_is_click_times_conversion():
    # The purchase head's probability is p(click) * p(purchase | click) (ESMM), so never above p(click).
    from ncf_ray.model import funnel_logit

    click = torch.tensor([-3.0, 0.0, 2.5, 8.0])
    conv = torch.tensor([1.0, -2.0, 0.3, 9.0])
    got = torch.sigmoid(funnel_logit(click, conv))
    assert torch.allclose(got, torch.sigmoid(click) * torch.sigmoid(conv), atol=1e-6)
    assert bool((got <= torch.sigmoid(click)).all())
