"""The plain-torch training core: schedule, per-epoch samples, one epoch lowers the loss (no Ray)."""

import math

import torch
import torch.nn.functional as F

from ncf_ray import engine
from ncf_ray.data.sampler import NegativeSampler
from ncf_ray.model import build_model


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


def test_epoch_samples_layout_and_negatives_are_not_positives():
    users, items, n_users, n_items = _toy()
    sampler = NegativeSampler(users, items, n_items)
    s = engine.epoch_samples(users, items, sampler, 3, torch.Generator().manual_seed(1))
    assert len(s) == users.numel() * 4
    assert int(s.labels.sum()) == users.numel()
    neg = s.labels == 0
    positive_keys = set((users * n_items + items).tolist())
    assert not positive_keys & set((s.users[neg] * n_items + s.items[neg]).tolist())


def test_one_epoch_lowers_the_loss():
    torch.manual_seed(0)
    users, items, n_users, n_items = _toy()
    sampler = NegativeSampler(users, items, n_items)
    model = build_model("neumf", n_users, n_items, factors=8, layers=(16, 8))
    opt = engine.build_optimizer(model, 1e-2, 0.0, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    fixed = engine.epoch_samples(users, items, sampler, 4, gen)

    def loss_on_fixed() -> float:
        with torch.no_grad():
            return float(F.binary_cross_entropy_with_logits(model(fixed.users, fixed.items), fixed.labels))

    before = loss_on_fixed()
    for _ in range(5):
        engine.train_epoch(model, opt, engine.epoch_samples(users, items, sampler, 4, gen), batch_size=64)
    assert loss_on_fixed() < before * 0.9


def test_train_epoch_wraps_around_for_extra_steps():
    users, items, n_users, n_items = _toy()
    sampler = NegativeSampler(users, items, n_items)
    model = build_model("gmf", n_users, n_items, factors=4, layers=())
    opt = engine.build_optimizer(model, 1e-3, 0.0, torch.device("cpu"))
    s = engine.epoch_samples(users, items, sampler, 1, torch.Generator().manual_seed(0))
    loss = engine.train_epoch(model, opt, s, batch_size=100, steps=engine.steps_for(len(s), 100) + 2)
    assert math.isfinite(loss)


def test_sampled_sums_counts_every_user():
    users, items, n_users, n_items = _toy()
    model = build_model("mf", n_users, n_items, factors=4, layers=())
    u = torch.arange(n_users)
    neg = torch.randint(0, n_items, (n_users, 9))
    sums = engine.sampled_sums(model, u, items[:n_users], neg, k=10)
    assert sums.shape == (3,) and int(sums[2]) == n_users
    assert float(sums[0]) == n_users  # 10 candidates, k=10: every positive is a hit
