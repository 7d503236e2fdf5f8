"""AllItemsScorer: the bf16 shortlist re-ranked in fp32 returns the exact top-k with fp32 scores (no Ray).

The model is trained here for a few epochs on a small synthetic log, so logits have the spread and near-ties of
a real model; a random model's logits would be too far apart to tell a shortlist from an exact ranking.
"""

from __future__ import annotations

import platform

import pytest
import torch

from ncf_ray.batch import Batch
from ncf_ray.data.synthetic import SyntheticSpec, iter_synthetic
from ncf_ray.engine import fit_plain
from ncf_ray.errors import UserError
from ncf_ray.model import GMF, MLP, NeuMF, user_batch
from ncf_ray.scoring import AllItemsScorer, bf16_is_fast, reuse_large_allocations, shortlist_size

N_USERS, N_ITEMS = 600, 400


@pytest.fixture(scope="module")
def trained():
    """A NeuMF (factors 16, tower 32-16-8) trained 4 epochs on ~24K synthetic interactions, and its positives."""
    torch.manual_seed(0)
    spec = SyntheticSpec(users=N_USERS, items=N_ITEMS, interactions=24_000, topics=8, seed=3)
    table = next(iter_synthetic(spec))
    users = torch.as_tensor(table.column("user_id").to_numpy() - 1)
    items = torch.as_tensor(table.column("item_id").to_numpy() - 1)
    model = NeuMF(N_USERS, N_ITEMS, 16, (32, 16, 8))
    fit_plain(model, users, items, N_ITEMS, 4, negatives=4, batch_size=2048, lr=5e-3, warmup_epochs=0.0,
              generator=torch.Generator().manual_seed(0))
    return model.eval(), users, items


@pytest.fixture(scope="module")
def fast(trained):
    scorer = AllItemsScorer(trained[0], precision="bf16")
    # Forced bf16 does not depend on the hardware (oneDNN emulates it where needed); a silent fp32 fallback here
    # would make every comparison below fp32 against fp32.
    assert scorer.precision == "bf16" and not scorer.exact, scorer.note
    return scorer


def _exclude_positives(users_all, items_all):
    """An `exclude` callback that masks each user's training items (what Recommender does through its CSR).
    The scorer passes row positions; the tests score users 0..N-1, so a row is its user."""
    seen = {}
    for u, i in zip(users_all.tolist(), items_all.tolist()):
        seen.setdefault(u, []).append(i)

    def exclude(users, scores):
        for row, u in enumerate(users.tolist()):
            scores[row, seen.get(u, [])] = float("-inf")

    return exclude


def test_auto_uses_bf16_where_fast_and_bf16_logits_are_close_to_fp32(trained, fast):
    model = trained[0]
    if bf16_is_fast(torch.device("cpu")):
        assert AllItemsScorer(model, precision="auto").precision == "bf16"
    users = torch.arange(N_USERS)
    with torch.inference_mode():
        exact = model.score_items(user_batch(users))
        approx = fast.scores(users)
    assert approx.shape == exact.shape == (N_USERS, N_ITEMS)
    spread = float(exact.std())
    assert spread > 0.5, "the trained model should separate items"
    # bf16 keeps ~3 significant digits: logits move by a small fraction of their spread.
    assert float((approx - exact).abs().max()) < 0.05 * spread


@pytest.mark.parametrize("k", [1, 10, 50])
@pytest.mark.parametrize("exclude_seen", [True, False])
def test_top_k_is_the_exact_top_k_with_fp32_scores(trained, fast, k, exclude_seen):
    model, pos_users, pos_items = trained
    exact = AllItemsScorer(model, precision="fp32")
    exclude = _exclude_positives(pos_users, pos_items) if exclude_seen else None
    users = torch.arange(N_USERS)
    want_scores, want_items = exact.top_k(users, k, exclude)
    got_scores, got_items = fast.top_k(users, k, exclude)
    assert got_items.shape == want_items.shape == (N_USERS, k)
    # Same items (as sets per user: exact ties may order differently), same fp32 scores.
    overlap = sum(len(set(a) & set(b)) for a, b in zip(got_items.tolist(), want_items.tolist()))
    assert overlap == N_USERS * k
    torch.testing.assert_close(got_scores, want_scores, rtol=0, atol=1e-5)
    with torch.inference_mode():
        forward = model(Batch(user=users, item=got_items))
    torch.testing.assert_close(got_scores, forward, rtol=0, atol=1e-5)
    if exclude_seen:
        seen = set(zip(pos_users.tolist(), pos_items.tolist()))
        assert not any((u, i) in seen for u, row in enumerate(got_items.tolist()) for i in row)


def test_exclusions_that_leave_fewer_than_k_items_come_back_as_minus_inf(fast):
    def exclude_all_but_three(users, scores):
        scores[:, 3:] = float("-inf")

    scores, items = fast.top_k(torch.arange(5), 10, exclude_all_but_three)
    assert items.shape == (5, 10)
    assert torch.isfinite(scores[:, :3]).all() and torch.isinf(scores[:, 3:]).all()
    assert set(items[:, :3].reshape(-1).tolist()) <= {0, 1, 2}


def test_mlp_and_single_layer_towers_use_the_kernel_and_stay_exact():
    torch.manual_seed(1)
    for model in (MLP(50, 70, (16, 8)), NeuMF(50, 70, 8, (16, 8)), MLP(50, 70, (16, 8, 4))):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.5)
        model.eval()
        scorer = AllItemsScorer(model, precision="bf16")
        assert scorer.precision == "bf16", scorer.note
        got_scores, got_items = scorer.top_k(torch.arange(50), 5)
        want_scores, _ = AllItemsScorer(model, precision="fp32").top_k(torch.arange(50), 5)
        torch.testing.assert_close(got_scores, want_scores, rtol=0, atol=1e-5)


def test_many_models_in_one_process_all_get_the_compiled_kernel(monkeypatch):
    # Dynamo's recompile limit is per code object; squeeze it so three towers of different depths would exceed
    # it if the scorers shared one (the suite once fell back to fp32 that way after ~8 compiled models).
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    torch.manual_seed(2)
    for layers in ((8, 4), (16, 8, 4), (16, 8, 4, 2)):
        model = NeuMF(30, 40, 4, layers).eval()
        scorer = AllItemsScorer(model, precision="bf16")
        assert scorer.precision == "bf16", (layers, scorer.note)


def test_models_without_a_tower_layer_are_always_exact():
    for model in (GMF(10, 20, 4), MLP(10, 20, (8,))):
        scorer = AllItemsScorer(model.eval(), precision="bf16")
        assert scorer.exact and "no tower layer" in scorer.note


def test_auto_picks_fp32_without_fast_bf16(monkeypatch, trained):
    monkeypatch.setattr("ncf_ray.scoring.bf16_is_fast", lambda device: False)
    scorer = AllItemsScorer(trained[0], precision="auto")
    assert scorer.exact and "no bf16" in scorer.note


def test_a_compiler_failure_falls_back_to_fp32_with_the_reason(monkeypatch, trained):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    scorer = AllItemsScorer(trained[0], precision="bf16")
    assert scorer.exact
    assert "RuntimeError: no C++ compiler found" in scorer.note and "more detail" not in scorer.note
    scores, _ = scorer.top_k(torch.arange(3), 4)
    assert scores.shape == (3, 4)


def test_uncompiled_bf16_kernel_gives_the_same_top_k(trained, fast):
    eager = AllItemsScorer(trained[0], precision="bf16", compile=False)
    assert eager.precision == "bf16"
    users = torch.arange(0, N_USERS, 7)
    torch.testing.assert_close(eager.top_k(users, 10)[0], fast.top_k(users, 10)[0], rtol=0, atol=1e-5)


def test_bad_precision_and_helpers():
    with pytest.raises(UserError, match="precision='fp16'"):
        AllItemsScorer(GMF(3, 4, 2), precision="fp16")
    assert shortlist_size(10, 3706) == 20 and shortlist_size(1, 3706) == 11 and shortlist_size(10, 15) == 15
    if platform.libc_ver()[0] == "glibc":
        assert reuse_large_allocations()  # mallopt accepted both thresholds
