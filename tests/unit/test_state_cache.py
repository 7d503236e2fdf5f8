"""The serving scorer's cache of known users' states (history models): cached states equal the model's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncf_ray.batch import Histories
from ncf_ray.config import ModelConfig
from ncf_ray.model import model_from_config, user_batch
from ncf_ray.scoring import STATE_CHUNK_USERS, AllItemsScorer

N_USERS, N_ITEMS, L = STATE_CHUNK_USERS + 7, 40, 5  # more users than one fill chunk


@pytest.fixture(scope="module", params=["dot", "neumf"])
def seq(request):
    torch.manual_seed(0)
    cfg = ModelConfig(name="seq", factors=8, layers=(16, 8), history_len=L, blocks=2, heads=2, head=request.param,
                      dropout=0.0)
    model = model_from_config(cfg, N_USERS, N_ITEMS).eval()
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 2 * L, N_USERS)  # some users shorter than L (padding), some longer (window)
    users = np.repeat(np.arange(N_USERS), lengths)
    items = rng.integers(0, N_ITEMS, len(users))
    hist = Histories.from_arrays(users, items, np.arange(len(users)), N_USERS)
    return model, hist


def _uncached(model, hist, users):
    with torch.inference_mode():
        return model.user_repr(user_batch(users, hist.last(users, L)))


def test_cached_states_equal_the_models_for_known_users(seq):
    model, hist = seq
    scorer = AllItemsScorer(model, precision="fp32", histories=hist)
    users = torch.tensor([5, 0, N_USERS - 1, 5, 3])  # repeats and out of order
    torch.testing.assert_close(scorer.cached_states(users), _uncached(model, hist, users))
    scorer.warm_users()  # the rest, in chunks
    every = torch.arange(N_USERS)
    torch.testing.assert_close(scorer.cached_states(every), _uncached(model, hist, every))
    torch.testing.assert_close(scorer.user_repr(every), _uncached(model, hist, every))


def test_rows_with_another_history_run_the_model_and_stored_rows_use_the_cache(seq):
    model, hist = seq
    scorer = AllItemsScorer(model, precision="fp32", histories=hist)
    users = torch.tensor([1, 2, -1, 4])
    other = torch.randint(1, N_ITEMS + 1, (4, L))  # a history no user has stored
    stored = torch.tensor([True, False, False, True])
    got = scorer.user_repr(users, other, stored)
    with torch.inference_mode():
        want_fresh = model.user_repr(user_batch(users[~stored], other[~stored]))
    torch.testing.assert_close(got[~stored], want_fresh)
    torch.testing.assert_close(got[stored], _uncached(model, hist, users[stored]))
    # Without `stored`, an explicit history means the model runs on every row.
    with torch.inference_mode():
        torch.testing.assert_close(scorer.user_repr(users, other), model.user_repr(user_batch(users, other)))


def test_top_k_from_cached_states_equals_the_uncached_scorer(seq):
    model, hist = seq
    cached = AllItemsScorer(model, precision="fp32", histories=hist)
    plain = AllItemsScorer(model, precision="fp32")  # no stored histories: the model runs every time
    users = torch.arange(0, N_USERS, 3)
    v1, i1 = cached.top_k(users, 7)
    v2, i2 = plain.top_k(users, 7, history=hist.last(users, L))
    torch.testing.assert_close(v1, v2)
    assert torch.equal(i1, i2)


def test_a_history_model_without_stored_histories_needs_the_history(seq):
    model, _ = seq
    with pytest.raises(ValueError, match="reads each user's last"):
        AllItemsScorer(model, precision="fp32").user_repr(torch.tensor([0]))
