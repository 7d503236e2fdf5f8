"""NegativeSampler invariants: never a positive, right shape and range, deterministic with a generator."""

from __future__ import annotations

import pytest
import torch

from ncf_ray.data.sampler import NegativeSampler
from ncf_ray.errors import UserError


def _positives(n_users: int = 50, n_items: int = 40, per_user: int = 25, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    users = torch.arange(n_users).repeat_interleave(per_user)
    items = torch.stack([torch.randperm(n_items, generator=g)[:per_user] for _ in range(n_users)]).flatten()
    return users, items


def test_negatives_are_never_positives_and_in_range():
    users, items = _positives()
    s = NegativeSampler(users, items, n_items=40)
    batch = torch.arange(50).repeat(20)
    neg = s.sample(batch, n=8, generator=torch.Generator().manual_seed(1))
    assert neg.shape == (1000, 8) and neg.dtype == torch.long
    assert int(neg.min()) >= 0 and int(neg.max()) < 40
    assert not s.is_positive(batch[:, None].expand(-1, 8), neg).any()
    # Cross-check the exclusion against a plain set.
    pos = set(zip(users.tolist(), items.tolist()))
    assert not any((u, i) in pos for u, row in zip(batch.tolist(), neg.tolist()) for i in row)


def test_excluded_items_are_never_sampled():
    users, items = _positives(n_users=10, n_items=30, per_user=10)
    held_users, held_items = torch.arange(10), torch.full((10,), 0)
    s = NegativeSampler(users, items, 30, exclude_users=held_users, exclude_items=held_items)
    neg = s.sample(torch.arange(10).repeat(50), 5, generator=torch.Generator().manual_seed(0))
    assert not (neg == 0).any()


def test_one_free_item_is_always_the_draw():
    n_items = 50
    users = torch.zeros(n_items - 1, dtype=torch.long)
    items = torch.tensor([i for i in range(n_items) if i != 17])
    neg = NegativeSampler(users, items, n_items).sample(torch.zeros(4, dtype=torch.long), 3)
    assert (neg == 17).all()


def test_uniform_over_free_items():
    users = torch.zeros(5, dtype=torch.long)
    items = torch.arange(5)
    neg = NegativeSampler(users, items, 10).sample(torch.zeros(20000, dtype=torch.long), 1,
                                                   generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(neg.flatten(), minlength=10).float()
    assert (counts[:5] == 0).all()
    assert torch.allclose(counts[5:] / counts.sum(), torch.full((5,), 0.2), atol=0.02)


def test_seeded_generator_is_deterministic():
    users, items = _positives()
    s = NegativeSampler(users, items, 40)
    a = s.sample(torch.arange(50), 4, generator=torch.Generator().manual_seed(3))
    b = s.sample(torch.arange(50), 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_user_with_every_item_is_refused():
    users = torch.zeros(6, dtype=torch.long)
    with pytest.raises(UserError, match="every one of the 6 items"):
        NegativeSampler(users, torch.arange(6), 6)


def test_is_positive():
    s = NegativeSampler(torch.tensor([0, 0, 1]), torch.tensor([1, 2, 0]), 4)
    got = s.is_positive(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([1, 3, 0, 1, 0]))
    assert got.tolist() == [True, False, True, False, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_follows_input_device():
    users, items = _positives()
    s = NegativeSampler(users.cuda(), items.cuda(), 40)
    neg = s.sample(torch.arange(50, device="cuda"), 4)
    assert neg.is_cuda
    assert not s.is_positive(torch.arange(50, device="cuda")[:, None].expand(-1, 4), neg).any()
