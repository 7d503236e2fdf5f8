"""Metrics that cannot be fooled (NaN / inf scores are misses) and per-segment HR/NDCG, worked out by hand (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ncf_ray.metrics import (
    finalize_segments,
    head_items,
    hit_ndcg_from_ranks,
    rank_full,
    rank_sampled,
    segments,
    user_segment_of,
)

NAN, INF = float("nan"), float("inf")


# ------------------------------------------------------------------------------------------------ non-finite
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_logits_score_zero_sampled(bad):
    # A diverged model: every logit is NaN or inf. Today's `neg >= pos` is False against NaN (rank 0, HR 1).
    pos, neg = torch.full((4,), bad), torch.full((4, 5), bad)
    ranks = rank_sampled(pos, neg)
    assert ranks.tolist() == [5, 5, 5, 5]
    hits, ndcgs = hit_ndcg_from_ranks(ranks, k=5)
    assert hits.sum() == 0 and ndcgs.sum() == 0


def test_non_finite_positive_or_nan_negative_sampled_by_hand():
    pos = torch.tensor([NAN, INF, -INF, 1.0, 1.0, 1.0])
    neg = torch.tensor([
        [0.0, 0.0, 0.0],  # NaN positive: miss (rank 3) even though every negative is lower
        [0.0, 0.0, 0.0],  # +inf positive: miss too, inf is not a score
        [0.0, 0.0, 0.0],  # -inf positive: miss
        [NAN, 0.0, 0.0],  # a NaN negative beats the positive: rank 1
        [INF, 0.0, -INF],  # +inf negative beats it, -inf does not: rank 1
        [0.0, 2.0, 1.0],  # finite: one above, one tie (ties count against): rank 2
    ])
    assert rank_sampled(pos, neg).tolist() == [3, 3, 3, 1, 1, 2]
    hits, ndcgs = hit_ndcg_from_ranks(rank_sampled(pos, neg), k=2)
    assert hits.tolist() == [0, 0, 0, 1, 1, 0]
    assert ndcgs[3].item() == pytest.approx(1 / math.log2(3))


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_logits_score_zero_full(bad):
    scores = torch.full((3, 6), bad)
    ranks = rank_full(scores, torch.tensor([0, 2, 5]))
    assert ranks.tolist() == [6, 6, 6]  # worse than any finite rank among 6 items
    hits, ndcgs = hit_ndcg_from_ranks(ranks, k=6)
    assert hits.sum() == 0 and ndcgs.sum() == 0


def test_nan_items_beat_target_full_but_excluded_ones_do_not():
    scores = torch.tensor([[NAN, 0.5, 0.9, NAN], [0.1, NAN, 0.3, 0.2]])
    targets = torch.tensor([2, 2])
    assert rank_full(scores, targets).tolist() == [2, 1]
    exclude = torch.tensor([[True, False, False, False], [False, True, False, False]])
    assert rank_full(scores, targets, exclude).tolist() == [1, 0]
    # A NaN target is a miss whatever is excluded.
    assert rank_full(scores, torch.tensor([0, 1]), exclude).tolist() == [4, 4]


# ------------------------------------------------------------------------------------------------ segments
def test_head_items_smallest_set_holding_the_share():
    # Total 20, 20% = 4: item 0 alone holds 5 >= 4 -> head = {0}.
    assert head_items([5, 4, 3, 2, 2, 2, 1, 1]).tolist() == [True] + [False] * 7
    # Item 0 holds 3 < 4, so the next most popular (item 1, tie broken by index) joins; then 6 >= 4 stops it.
    assert head_items([3, 3, 3, 3, 3, 3, 2]).tolist() == [True, True, False, False, False, False, False]
    # Order in the array does not matter, only counts.
    assert head_items([1, 1, 5, 2, 2, 2, 3, 4]).tolist() == [False, False, True, False, False, False, False, False]
    assert not head_items([0, 0, 0]).any()  # no interactions: no head


def test_user_segment_boundaries():
    assert user_segment_of([0, 1, 5, 6, 20, 21, 100, 101, 5000]).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]


def test_segments_by_hand_and_counts_add_up():
    # Six rows: history lengths put two users in 1-5, one in 6-20, two in 21-100, one in >100.
    ranks = torch.tensor([0, 3, 1, 12, 0, 9])
    history = [1, 5, 6, 21, 100, 101]
    counts = np.array([10, 3, 3, 2, 1, 1])  # total 20: head = {item 0}
    targets = [0, 1, 0, 2, 3, 0]
    seg = segments(ranks, history, targets, counts, k=10)
    u, it = seg["users"], seg["items"]
    assert [u[s]["n"] for s in ("1-5", "6-20", "21-100", ">100")] == [2, 1, 2, 1]
    assert u["1-5"]["hr"] == 1.0 and u["1-5"]["ndcg"] == pytest.approx((1 + 1 / math.log2(5)) / 2)
    assert u["6-20"]["ndcg"] == pytest.approx(1 / math.log2(3))
    assert u["21-100"]["hr"] == 0.5 and u["21-100"]["ndcg"] == pytest.approx(0.5)
    assert u[">100"]["ndcg"] == pytest.approx(1 / math.log2(11))
    # head rows: 0, 2, 5 (target item 0) -> ranks 0, 1, 9; tail rows: ranks 3, 12, 0.
    assert it["head"]["n"] == 3 and it["head"]["hr"] == 1.0
    assert it["tail"]["n"] == 3 and it["tail"]["hr"] == pytest.approx(2 / 3)
    assert sum(m["n"] for m in u.values()) == sum(m["n"] for m in it.values()) == len(ranks)


def test_segments_sums_finalize_like_reduced():
    rng = np.random.default_rng(0)
    n, n_items = 200, 30
    ranks = torch.as_tensor(rng.integers(0, 50, n))
    history = rng.integers(1, 300, n)
    targets = rng.integers(0, n_items, n)
    counts = rng.integers(0, 100, n_items)
    reduced = segments(ranks, history, targets, counts, k=10)
    # Two "workers" holding halves: add their sums, then finalize.
    a = segments(ranks[:90], history[:90], targets[:90], counts, k=10, reduce=False)
    b = segments(ranks[90:], history[90:], targets[90:], counts, k=10, reduce=False)
    added = {s: {lab: {key: a[s][lab][key] + b[s][lab][key] for key in a[s][lab]} for lab in a[s]} for s in a}
    merged = finalize_segments(added)
    for split in reduced:
        assert sum(m["n"] for m in reduced[split].values()) == n
        for label, m in reduced[split].items():
            assert merged[split][label]["n"] == m["n"]
            assert merged[split][label]["hr"] == pytest.approx(m["hr"])
            assert merged[split][label]["ndcg"] == pytest.approx(m["ndcg"])


def test_segments_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="one entry per row"):
        segments(torch.tensor([0, 1]), [1, 2, 3], [0, 0], [1, 1], k=10)
