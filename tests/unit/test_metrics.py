"""HR@K / NDCG@K values worked out by hand, both protocols, and the popularity baseline (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ncf_ray.metrics import (
    build_csr,
    csr_rows,
    evaluate_full,
    evaluate_popularity_full,
    evaluate_popularity_sampled,
    evaluate_sampled,
    finalize,
    hit_ndcg_from_ranks,
    rank_full,
    rank_sampled,
    seen_mask,
)
from ncf_ray.model import RecModel


class TableScorer(RecModel):
    """A model whose logit for (u, i) is table[u, i], on the model-input contract (U = the user's row of the
    table, I = the item's one-hot column): metrics can be checked against hand-made scores."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.float(), requires_grad=False)
        self.n_users, self.n_items = table.shape

    def user_repr(self, batch):
        return self.table[batch.user]

    def _item_repr(self, items):
        return torch.nn.functional.one_hot(items, self.n_items).float()

    def _head(self, users, items):
        return (users * items).sum(-1)


def test_hand_values_rank_to_hit_and_ndcg():
    hits, ndcgs = hit_ndcg_from_ranks(torch.tensor([0, 1, 9, 10, 50]), k=10)
    assert hits.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert ndcgs[0].item() == pytest.approx(1.0)
    assert ndcgs[1].item() == pytest.approx(1.0 / math.log2(3))
    assert ndcgs[2].item() == pytest.approx(1.0 / math.log2(11))
    assert ndcgs[3].item() == 0.0 and ndcgs[4].item() == 0.0


def test_rank_sampled_counts_ties_against_positive():
    pos = torch.tensor([5.0, 1.0, 2.0])
    neg = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [3.0, 2.0, 0.0]])
    assert rank_sampled(pos, neg).tolist() == [0, 3, 2]


def test_constant_scorer_gets_no_credit():
    ranks = rank_sampled(torch.zeros(20), torch.zeros(20, 9))
    assert ranks.tolist() == [9] * 20  # every tie counts against the positive
    hits, ndcgs = hit_ndcg_from_ranks(ranks, k=5)
    assert hits.sum() == 0 and ndcgs.sum() == 0


def _sampled_setup(n_users=12, n_items=30, n_neg=9, seed=0):
    rng = np.random.default_rng(seed)
    users = np.arange(n_users)
    cand = np.stack([rng.choice(n_items, n_neg + 1, replace=False) for _ in users])
    return users, cand[:, 0], cand[:, 1:]


def test_perfect_and_reversed_scorer_sampled():
    users, pos, neg = _sampled_setup()
    perfect = torch.zeros(len(users), 30)
    perfect[users, pos] = 1.0  # the positive beats every negative
    assert evaluate_sampled(TableScorer(perfect), users, pos, neg, k=3) == {"hr": 1.0, "ndcg": 1.0, "n": 12}
    reversed_ = torch.ones(len(users), 30)
    reversed_[users, pos] = 0.0  # every negative beats the positive: rank 9 >= k
    assert evaluate_sampled(TableScorer(reversed_), users, pos, neg, k=3) == {"hr": 0.0, "ndcg": 0.0, "n": 12}


def test_sampled_hand_example_and_sums():
    # user 0: positive ranked 0; user 1: ranked 1 (one negative above); user 2: ranked 2 (miss at k=2).
    table = torch.tensor([[9.0, 1.0, 2.0, 0.0], [5.0, 6.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    users = np.array([0, 1, 2])
    pos = np.array([0, 0, 1])
    neg = np.array([[1, 2], [1, 2], [2, 3]])
    sums = evaluate_sampled(TableScorer(table), users, pos, neg, k=2, batch_size=2, reduce=False)
    assert sums["n"] == 3 and sums["hit_sum"] == 2.0
    assert sums["ndcg_sum"] == pytest.approx(1.0 + 1.0 / math.log2(3))
    merged = finalize({key: 2 * v for key, v in sums.items()})  # two shards' sums added, as after an all-reduce
    assert merged["hr"] == pytest.approx(2 / 3) and merged["n"] == 6


def test_rank_full_excludes_seen_but_never_target():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    targets = torch.tensor([2, 0])
    assert rank_full(scores, targets).tolist() == [2, 3]
    exclude = torch.tensor([[True, False, True, False], [False, True, True, True]])  # targets marked too
    assert rank_full(scores, targets, exclude).tolist() == [1, 0]


def test_csr_helpers():
    indptr, indices = build_csr([2, 0, 0, 2, 2, 0], [4, 1, 3, 0, 4, 1], n_users=4)
    assert indptr.tolist() == [0, 2, 2, 4, 4] and indices.tolist() == [1, 3, 0, 4]
    rows, cols = csr_rows(torch.tensor([2, 1, 0]), torch.as_tensor(indptr), torch.as_tensor(indices))
    assert rows.tolist() == [0, 0, 2, 2] and cols.tolist() == [0, 4, 1, 3]
    mask = seen_mask(torch.tensor([0, 3]), torch.as_tensor(indptr), torch.as_tensor(indices), 5)
    assert mask.tolist() == [[False, True, False, True, False], [False] * 5]


def test_evaluate_full_excludes_seen_items():
    # User 0 has seen items 0 and 1, which score above the target 2: excluded, the target becomes rank 0.
    table = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.0], [0.0, 0.1, 0.2, 0.3, 0.9]])
    seen = build_csr([0, 0, 1], [0, 1, 4], n_users=2)
    users, targets = np.array([0, 1]), np.array([2, 4])
    got = evaluate_full(TableScorer(table), users, targets, seen, k=1)
    assert got == {"hr": 1.0, "ndcg": 1.0, "n": 2}  # user 1's seen item 4 is its target: never excluded
    unmasked = evaluate_full(TableScorer(table), users, targets, None, k=1)
    assert unmasked["hr"] == 0.5
    sums = evaluate_full(TableScorer(table), users, targets, seen, k=3, batch_size=1, reduce=False)
    assert sums == {"hit_sum": 2.0, "ndcg_sum": 2.0, "n": 2}


def test_popularity_baseline():
    counts = np.array([50, 40, 30, 20, 10, 0])
    pos = np.array([0, 3, 5])  # most popular, middle, never seen
    neg = np.array([[1, 2, 3], [0, 1, 4], [0, 1, 2]])
    got = evaluate_popularity_sampled(counts, pos, neg, k=2)
    # ranks: 0, 2, 3 -> one hit at k=2
    assert got["hr"] == pytest.approx(1 / 3) and got["ndcg"] == pytest.approx(1 / 3)
    seen = build_csr([1, 1], [0, 1], n_users=3)
    full = evaluate_popularity_full(counts, [0, 1, 2], [1, 3, 4], seen, k=2, reduce=False)
    # user 0: item 0 above -> rank 1 (ndcg 1/log2 3); user 1: 0,1 excluded, 2 above -> rank 1; user 2: rank 4.
    assert full["hit_sum"] == 2.0 and full["ndcg_sum"] == pytest.approx(2 / math.log2(3))


def test_ranks_consistent_with_model_between_protocols():
    # With every item as a candidate, sampled and full ranking agree.
    torch.manual_seed(0)
    table = torch.randn(8, 15)
    users = np.arange(8)
    pos = np.arange(8)
    neg = np.stack([np.setdiff1d(np.arange(15), [p]) for p in pos])
    model = TableScorer(table)
    assert evaluate_sampled(model, users, pos, neg, k=5) == evaluate_full(model, users, pos, None, k=5)
