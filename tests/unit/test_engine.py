"""The plain-torch training core: schedule, examples (pairs and sequence windows), steps, the non-finite guard,
validation sums (no Ray)."""

import math

import pytest
import torch

from ncf_ray import engine
from ncf_ray.batch import Batch, Histories
from ncf_ray.data.sampler import NegativeSampler
from ncf_ray.model import MF, build_model


def _toy(n_users: int = 40, n_items: int = 30, per_user: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    users = torch.arange(n_users).repeat_interleave(per_user)
    # Two taste groups: even users like the low item ids, odd users the high ones.
    offset = (users % 2) * (n_items // 2)
    items = offset + torch.randint(0, n_items // 2, (users.numel(),), generator=g)
    keys = torch.unique(users * n_items + items)
    return keys // n_items, keys % n_items, n_users, n_items


def test_scaled_lr_grows_with_sqrt_of_batch():
    assert engine.scaled_lr(1e-3, 1024, 1024) == 1e-3
    assert math.isclose(engine.scaled_lr(1e-3, 4096, 1024), 2e-3)


def test_lr_multiplier_warms_up_then_decays():
    assert math.isclose(engine.lr_multiplier(0.0, 1.0, 10.0), 0.1)
    assert math.isclose(engine.lr_multiplier(1.0, 1.0, 10.0), 1.0)
    assert engine.lr_multiplier(5.0, 1.0, 10.0) < 1.0
    assert math.isclose(engine.lr_multiplier(10.0, 1.0, 10.0), 0.1)
    lr = engine.schedule(2.0, epoch=1, steps=4, warmup=1.0, total=10.0)
    assert math.isclose(lr(0), 2.0 * engine.lr_multiplier(1.0, 1.0, 10.0))
    assert math.isclose(lr(2), 2.0 * engine.lr_multiplier(1.5, 1.0, 10.0))


def test_pair_examples_layout_and_negatives_are_not_positives():
    users, items, n_users, n_items = _toy()
    sampler = NegativeSampler(users, items, n_items)
    ex = engine.pair_examples(users, items, sampler, 3, torch.Generator().manual_seed(1))
    assert len(ex) == users.numel() and ex.item.shape == (users.numel(), 4) and ex.per_row == 4
    assert list(ex.labels) == ["click"]
    assert torch.equal(ex.labels["click"][:, 0], torch.ones(len(ex))) and ex.labels["click"][:, 1:].sum() == 0
    positive_keys = set((users * n_items + items).tolist())
    assert set((ex.user * n_items + ex.item[:, 0]).tolist()) == positive_keys  # every positive once
    neg_keys = (ex.user[:, None] * n_items + ex.item[:, 1:]).reshape(-1).tolist()
    assert not positive_keys & set(neg_keys)


def _slow_windows(rows: list[list[int]], length: int):
    """Reference: for each user, windows cut from the end; inputs items[e-L:e] right-aligned (+1), targets
    items[e-L+1:e+1], mask where the input is real."""
    out = []
    for u, row in enumerate(rows):
        end = len(row) - 1
        while end > 0:
            inputs = [row[p] + 1 if p >= 0 else 0 for p in range(end - length, end)]
            targets = [row[p + 1] if p >= 0 else None for p in range(end - length, end)]
            out.append((u, inputs, targets))
            end -= length
    return out


def test_sequence_windows_equal_a_slow_reference():
    rows = [[3, 1, 4, 1, 5, 9, 2], [6], [5, 3], [8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2]]
    users = torch.tensor([u for u, r in enumerate(rows) for _ in r])
    items = torch.tensor([i for r in rows for i in r])
    times = torch.arange(len(items))  # file order is time order here
    hist = Histories.from_arrays(users.numpy(), items.numpy(), times.numpy(), len(rows))
    sampler = NegativeSampler(users, items, 12)
    ex = engine.sequence_examples(hist, torch.arange(len(rows)), 3, sampler, 2, torch.Generator().manual_seed(0))
    want = sorted(_slow_windows(rows, 3), key=str)
    got = []
    for w in range(len(ex)):
        u = int(ex.user[w])
        mask = ex.mask[w].tolist()
        targets = [int(t) if m else None for t, m in zip(ex.item[w, :, 0].tolist(), mask)]
        got.append((u, ex.history[w].tolist(), targets))
        assert mask == [h > 0 for h in ex.history[w].tolist()]
        # Negatives are not positives of the window's user.
        assert not set(ex.item[w, :, 1:].reshape(-1).tolist()) & set(rows[u])
    assert sorted(got, key=str) == want
    assert sum(sum(m) for m in ex.mask.tolist()) == sum(len(r) - 1 for r in rows)  # every target once


def test_histories_last_and_append():
    hist = Histories.from_arrays([0, 0, 1, 0], [5, 6, 7, 8], [30, 10, 5, 20], 3)
    assert hist.last(torch.tensor([0, 1, 2]), 2).tolist() == [[9, 6], [0, 8], [0, 0]]  # time order: 6, 8, 5
    grown = hist.append(torch.tensor([0, 2]), torch.tensor([1, 2]))
    assert grown.last(torch.tensor([0, 1, 2]), 4).tolist() == [[7, 9, 6, 2], [0, 0, 0, 8], [0, 0, 0, 3]]


def test_histories_keep_events_and_context_aligned_with_items():
    hist = Histories.from_arrays([0, 0, 1, 0], [5, 6, 7, 8], [30, 10, 5, 20], 3, events=[2, 0, 1, 1],
                                 context=[[1, 2], [3, 4], [5, 6], [7, 8]])
    assert hist.items.tolist() == [6, 8, 5, 7] and hist.events.tolist() == [0, 1, 2, 1]  # moved with their items
    assert hist.context.tolist() == [[3, 4], [7, 8], [1, 2], [5, 6]]
    grown = hist.append(torch.tensor([0, 2]), torch.tensor([1, 2]), events=torch.tensor([2, 1]))
    assert grown.items.tolist() == [6, 8, 5, 1, 7, 2] and grown.events.tolist() == [0, 1, 2, 2, 1, 1]
    assert grown.context.tolist()[3] == [0, 0] and grown.context.tolist()[5] == [0, 0]  # no context given: unknown
    users = torch.tensor([0, 1, 2])
    ends = grown.indptr[users + 1]
    assert grown.gather(grown.events, ends, users, 3).tolist() == [[1, 2, 2], [0, 0, 1], [0, 0, 1]]
    assert grown.gather(grown.context, ends, users, 2).tolist() == [[[1, 2], [0, 0]], [[0, 0], [5, 6]],
                                                                    [[0, 0], [0, 0]]]
    assert Histories.from_arrays([0], [1], None, 1).append(torch.tensor([0]), torch.tensor([2])).events is None


def test_context_reaches_the_sequence_model_per_target():
    users, items, n_users, n_items = _toy(n_users=10, per_user=5)
    context = (items % 3 + 1)[:, None]
    hist = Histories.from_arrays(users.numpy(), items.numpy(), None, n_users, context=context.numpy())
    torch.manual_seed(0)
    model = build_model("seq", n_users, n_items, factors=8, history_len=4, blocks=1, n_context_ids=4)
    rows = engine.fit_plain(model, users, items, n_items, 2, negatives=2, batch_size=64, hist=hist,
                            generator=torch.Generator().manual_seed(0))
    assert all(math.isfinite(r["loss"]) for r in rows)
    ex = engine.make_examples(model, users, items, hist, NegativeSampler(users, items, n_items), 2)
    assert ex.context.shape == (*ex.mask.shape, 1)
    assert torch.equal(ex.context[..., 0][ex.mask], ex.item[..., 0][ex.mask] % 3 + 1)


def test_one_epoch_lowers_the_loss():
    torch.manual_seed(0)
    users, items, n_users, n_items = _toy()
    sampler = NegativeSampler(users, items, n_items)
    model = build_model("neumf", n_users, n_items, factors=8, layers=(16, 8))
    opt = engine.build_optimizer(model, 1e-2, 0.0, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    fixed = engine.pair_examples(users, items, sampler, 4, gen)

    def loss_on_fixed() -> float:
        with torch.no_grad():
            return float(engine.batch_loss(model.eval(), fixed.batch(0, len(fixed))))

    before = loss_on_fixed()
    for _ in range(5):
        engine.train_epoch(model, opt, engine.pair_examples(users, items, sampler, 4, gen), rows=64)
    assert loss_on_fixed() < before * 0.9


def test_train_epoch_wraps_around_for_extra_steps():
    users, items, n_users, n_items = _toy()
    sampler = NegativeSampler(users, items, n_items)
    model = build_model("gmf", n_users, n_items, factors=4)
    opt = engine.build_optimizer(model, 1e-3, 0.0, torch.device("cpu"))
    ex = engine.pair_examples(users, items, sampler, 1, torch.Generator().manual_seed(0))
    batch = ex.batch(len(ex) - 3, 10)  # wraps: the last 3 rows, then the first 7
    assert torch.equal(batch.user, torch.cat([ex.user[-3:], ex.user[:7]]))
    loss = engine.train_epoch(model, opt, ex, rows=50, steps=engine.steps_for(len(ex), 50) + 2)
    assert math.isfinite(loss)


def test_non_finite_loss_stops_with_the_epoch_and_lr():
    users, items, n_users, n_items = _toy()
    sampler = NegativeSampler(users, items, n_items)
    model = build_model("mf", n_users, n_items, factors=4)
    with torch.no_grad():
        model.item_emb.weight[:] = float("nan")
    opt = engine.build_optimizer(model, 1e-3, 0.0, torch.device("cpu"))
    ex = engine.pair_examples(users, items, sampler, 1, torch.Generator().manual_seed(0))
    with pytest.raises(engine.NonFiniteLoss, match=r"at epoch 3 \(lr 0\.5\)"):
        engine.train_epoch(model, opt, ex, rows=64, lr_for_step=lambda _: 0.5, epoch=2)


def _mf_scoring_item_ids(n_users: int, n_items: int, sign: float) -> MF:
    """An MF whose logit is sign * item index: the highest item wins (sign 1) or loses (sign -1)."""
    model = MF(n_users, n_items, 1)
    with torch.no_grad():
        model.user_emb.weight.fill_(1.0)
        model.item_emb.weight[:, 0] = sign * torch.arange(n_items, dtype=torch.float32)
    return model


def test_sampled_sums_rank_the_positive_among_its_candidates():
    n_users, n_items = 5, 20
    users = torch.arange(n_users)
    pos = torch.full((n_users,), 19)  # the highest item id
    neg = torch.arange(9).repeat(n_users, 1)
    best = engine.sampled_sums(_mf_scoring_item_ids(n_users, n_items, 1.0), users, pos, neg, k=1)
    worst = engine.sampled_sums(_mf_scoring_item_ids(n_users, n_items, -1.0), users, pos, neg, k=1)
    assert best.tolist() == [5.0, 5.0, 5.0]  # rank 0 for everyone: hit and NDCG 1
    assert worst.tolist()[:2] == [0.0, 0.0] and worst.tolist()[2] == 5.0
    # k = 10 of 10 candidates: rank 9 is still a hit, with NDCG 1 / log2(11).
    sums = engine.sampled_sums(_mf_scoring_item_ids(n_users, n_items, -1.0), users, pos, neg, k=10)
    assert sums[0] == 5.0 and math.isclose(float(sums[1]), 5 / math.log2(11), rel_tol=1e-6)


def test_fit_plain_learns_the_two_taste_groups():
    torch.manual_seed(0)
    users, items, n_users, n_items = _toy(per_user=8)
    model = build_model("mf", n_users, n_items, factors=8)
    rows = engine.fit_plain(model, users, items, n_items, 20, negatives=4, batch_size=128, lr=2e-2,
                            generator=torch.Generator().manual_seed(0))
    assert len(rows) == 20 and rows[-1]["loss"] < rows[0]["loss"]
    # Even users now prefer the low half of the catalogue, odd users the high half.
    with torch.no_grad():
        scores = model.score_all(model.user_repr(Batch(user=torch.arange(n_users), item=users[:0])),
                                 model.item_repr(None))
    low = scores[:, : n_items // 2].mean(1)
    high = scores[:, n_items // 2 :].mean(1)
    assert bool(((low > high) == (torch.arange(n_users) % 2 == 0)).float().mean() > 0.9)


def test_adam_state_round_trips_by_name_and_grown_rows_start_as_an_average_row():
    """An artifact keeps Adam's moments by parameter name; a grown model (an update's new users and items) gets
    them for its old rows, zero first moments and the old rows' mean second moments for the new ones, and then
    steps its old rows exactly as the original optimizer would have."""
    torch.manual_seed(0)
    small = build_model("gmf", 5, 4, factors=3)
    opt = engine.build_optimizer(small, 0.01, 0.0, torch.device("cpu"))
    batch = Batch(user=torch.tensor([0, 1, 3]), item=torch.tensor([[1, 2], [0, 3], [2, 1]]))
    for _ in range(3):
        opt.zero_grad()
        small(batch).square().sum().backward()
        opt.step()
    named = engine.adam_state_by_name(small, opt.state_dict())
    assert set(named) == {f"{n}.{k}" for n, _ in small.named_parameters() for k in engine.ADAM_KEYS}
    assert engine.adam_state_by_name(small, None) == {}

    big = build_model("gmf", 7, 4, factors=3)  # two new users, same items
    with torch.no_grad():
        for name, p in big.named_parameters():
            p[: dict(small.named_parameters())[name].shape[0]] = dict(small.named_parameters())[name]
    big_opt = engine.build_optimizer(big, 0.01, 0.0, torch.device("cpu"))
    assert engine.load_adam_state(big_opt, big, named) == len(list(big.parameters()))
    state = big_opt.state[big.user_emb.weight]
    torch.testing.assert_close(state["exp_avg"][:5], named["user_emb.weight.exp_avg"])
    assert torch.equal(state["exp_avg"][5:], torch.zeros(2, 3))
    torch.testing.assert_close(state["exp_avg_sq"][5:], named["user_emb.weight.exp_avg_sq"].mean(0).expand(2, 3))
    # One more step on the same batch: the old rows move exactly as under the optimizer that was saved.
    for model, optimizer in ((small, opt), (big, big_opt)):
        optimizer.zero_grad()
        model(batch).square().sum().backward()
        optimizer.step()
    torch.testing.assert_close(big.user_emb.weight[:5], small.user_emb.weight)
    torch.testing.assert_close(big.item_emb.weight, small.item_emb.weight)
    # Saved moments of another shape are not forced on a parameter: it starts fresh.
    other = build_model("gmf", 5, 4, factors=6)
    other_opt = engine.build_optimizer(other, 0.01, 0.0, torch.device("cpu"))
    assert engine.load_adam_state(other_opt, other, named) == 1  # predict.bias (shape [1]) alone matches
