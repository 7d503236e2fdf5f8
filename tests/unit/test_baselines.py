"""Popularity and EASE baselines: EASE's closed form checked against the formula on hand-made matrices, the models'
contract (user_repr / item_repr / head), memory refusal, evaluation protocol, and `ncf-ray baselines` on a tiny
generated dataset dir (no Ray: the dataset dir is written with prepare's own build and write steps)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from ncf_ray import baselines as bl
from ncf_ray.batch import Batch, Histories
from ncf_ray.cli import main
from ncf_ray.config import DataConfig
from ncf_ray.data.dataset import load_dataset
from ncf_ray.data.prepare import RawLog, _meta, build_loo, write_dataset
from ncf_ray.data.synthetic import SyntheticSpec, iter_synthetic
from ncf_ray.errors import UserError
from ncf_ray.metrics import (
    build_csr,
    evaluate_full,
    evaluate_popularity_full,
    evaluate_popularity_sampled,
    evaluate_sampled,
)

X54 = np.array([  # 5 users x 4 items
    [1, 1, 0, 0],
    [1, 0, 1, 0],
    [0, 1, 1, 1],
    [1, 1, 1, 0],
    [0, 0, 1, 1],
], dtype=np.float64)


def _csr_of(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, i = np.nonzero(x)
    return build_csr(u, i, x.shape[0])


def _ease_by_formula(x: np.ndarray, lam: float) -> np.ndarray:
    """Steck 2019, written out with numpy: P = (XᵀX + λI)⁻¹, B_ij = −P_ij / P_jj, B_jj = 0."""
    p = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


# ------------------------------------------------------------------------------------------------ closed form
def test_gram_matrix_is_xtx():
    g = bl.gram_matrix(_csr_of(X54), 4, batch_users=2)  # two users per block: the blocks must add up
    assert g.dtype == torch.float64
    assert g.numpy().tolist() == (X54.T @ X54).tolist()


@pytest.mark.parametrize("lam", [0.5, 2.0, 10.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ease_weights_match_the_formula_on_5x4(lam, dtype):
    b = bl.ease_weights(bl.gram_matrix(_csr_of(X54), 4), lam, dtype)
    assert b.dtype == torch.float32 and b.shape == (4, 4)
    np.testing.assert_allclose(b.numpy(), _ease_by_formula(X54, lam), rtol=1e-5, atol=1e-6)
    assert (torch.diagonal(b) == 0).all()


def test_ease_two_items_by_hand():
    # Two items: G + λI = [[a+λ, c], [c, b+λ]], so B_01 = c / (a + λ) and B_10 = c / (b + λ).
    x = np.array([[1, 1], [1, 0], [1, 1], [0, 1], [1, 0]], dtype=np.float64)  # a = 4, b = 3, c = 2
    b = bl.ease_weights(bl.gram_matrix(_csr_of(x), 2), 1.0)
    assert b[0, 1].item() == pytest.approx(2 / 5) and b[1, 0].item() == pytest.approx(2 / 4)
    assert b[0, 0].item() == 0.0 and b[1, 1].item() == 0.0


def test_ease_refuses_non_positive_lambda():
    with pytest.raises(UserError, match="lambda=0"):
        bl.ease_weights(bl.gram_matrix(_csr_of(X54), 4), 0.0)


def test_ease_scores_are_history_times_b():
    csr = _csr_of(X54)
    b = bl.ease_weights(bl.gram_matrix(csr, 4), 2.0)
    got = bl.ease_scores(b, csr, torch.tensor([4, 0, 2]))
    np.testing.assert_allclose(got.numpy(), X54[[4, 0, 2]] @ _ease_by_formula(X54, 2.0), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ memory
def test_catalogue_too_large_is_refused_with_the_figures():
    with pytest.raises(UserError) as err:
        bl.check_ease_fits(200_000, available=8 * 2**30)
    msg = str(err.value)
    assert "\n" not in msg and "200,000 x 200,000" in msg
    assert f"{200_000**2 * bl.EASE_BYTES_PER_CELL / 2**30:.1f} GiB" in msg and "8.0 GiB" in msg
    bl.check_ease_fits(1000, available=bl.ease_memory_bytes(1000))  # exactly enough: accepted


def test_available_memory_is_positive():
    assert bl.available_memory_bytes() > 0


# ------------------------------------------------------------------------------------------------ models
def _history_batch(x: np.ndarray, users: list[int], items: torch.Tensor) -> Batch:
    rows = [np.flatnonzero(x[u]) + 1 for u in users]  # item_idx + 1, 0 = padding
    width = max(len(r) for r in rows) + 1  # one extra padding column
    hist = torch.zeros((len(users), width), dtype=torch.int64)
    for n, r in enumerate(rows):
        hist[n, width - len(r):] = torch.as_tensor(r)  # right-aligned, as Histories.last gives them
    return Batch(user=torch.tensor(users), item=items, history=hist)


def test_ease_model_contract():
    model = bl.EASE(n_users=5, n_items=4, lam=2.0)
    assert model.needs_full_history and model.history_len == 4
    model.fit(*np.nonzero(X54))
    expected = X54 @ _ease_by_formula(X54, 2.0)  # [5 users, 4 items]
    users = [0, 2, 4]
    # Catalogue: U [B, n_items] against every item -> [B, 4].
    batch = _history_batch(X54, users, torch.tensor([1, 0, 3]))
    u = model.user_repr(batch)
    assert u.tolist() == X54[users].tolist()
    catalogue = model.score_all(u, model.item_repr(None))
    np.testing.assert_allclose(catalogue.numpy(), expected[users], rtol=1e-5, atol=1e-6)
    # Pairs: one item per row -> [B].
    np.testing.assert_allclose(model(batch).numpy(), expected[users, [1, 0, 3]], rtol=1e-5, atol=1e-6)
    # Candidates: [B, C] -> [B, C].
    cand = torch.tensor([[0, 1], [2, 3], [3, 0]])
    got = model(_history_batch(X54, users, cand))
    np.testing.assert_allclose(got.numpy(), np.take_along_axis(expected[users], cand.numpy(), 1), rtol=1e-5,
                               atol=1e-6)
    # The weights travel in the state dict (artifact export): a fresh model loads them and scores the same, and
    # its catalogue is the loaded B, not a table cached before loading.
    clone = bl.EASE(5, 4, 2.0)
    before = clone.eval().item_repr(None).clone()
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone(batch), model(batch))
    assert not torch.equal(clone.item_repr(None), before)
    with pytest.raises(ValueError, match="history"):
        model(Batch(user=torch.tensor([0]), item=torch.tensor([1])))


def test_popularity_model_contract():
    counts = np.array([5, 0, 9, 2])
    model = bl.Popularity(n_users=3, n_items=4).fit(counts)
    assert not model.needs_full_history and model.history_len == 0
    batch = Batch(user=torch.tensor([0, 1, 2]), item=torch.tensor([2, 1, 3]))
    assert model(batch).tolist() == [9.0, 0.0, 2.0]
    all_items = model.score_all(model.user_repr(batch), model.item_repr(None))
    assert all_items.tolist() == [[5.0, 0.0, 9.0, 2.0]] * 3
    cand = torch.tensor([[0, 1], [2, 3], [3, 3]])
    assert model(Batch(user=batch.user, item=cand)).tolist() == [[5.0, 0.0], [9.0, 2.0], [2.0, 2.0]]


# ------------------------------------------------------------------------------------------------ datasets
def _write_dataset_dir(d: Path, users: int = 150, items: int = 100, interactions: int = 2500, seed: int = 3) -> Path:
    """A prepared dataset dir from the synthetic generator, through prepare's build and write steps (no Ray)."""
    t = pa.concat_tables(iter_synthetic(SyntheticSpec(users=users, items=items, interactions=interactions,
                                                      seed=seed)))
    log = RawLog(t["user_id"].to_numpy(), t["item_id"].to_numpy(), t["timestamp"].to_numpy(), rows=t.num_rows)
    cfg = DataConfig(eval_negatives=20, seed=seed)
    built = build_loo(log, cfg)
    d.mkdir(parents=True)
    write_dataset(built, d, shards=2)
    (d / "meta.json").write_text(json.dumps(_meta(cfg, built, "synthetic", 0.0)))
    return d


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    return _write_dataset_dir(tmp_path_factory.mktemp("baselines") / "ds")


@pytest.fixture(scope="module")
def metrics(dataset_dir):
    return bl.baseline_metrics(load_dataset(dataset_dir), k=5, lambdas=(1.0, 20.0, 300.0))


def test_popularity_matches_the_existing_evaluators(dataset_dir, metrics):
    data = load_dataset(dataset_dir)
    pop = metrics["popularity"]
    for split, targets, negs in (("valid", data.valid_items, data.valid_neg), ("test", data.test_items, data.test_neg)):
        sampled = evaluate_popularity_sampled(data.item_counts, targets, negs, k=5)
        assert pop[split]["hr@5"] == pytest.approx(sampled["hr"])
        assert pop[split]["ndcg@5"] == pytest.approx(sampled["ndcg"])
    users = np.arange(data.n_users)
    seen = build_csr(np.concatenate([data.train_users, users]), np.concatenate([data.train_items, data.valid_items]),
                     data.n_users)
    full = evaluate_popularity_full(data.item_counts, users, data.test_items, seen, k=5)
    assert pop["test"]["full_hr@5"] == pytest.approx(full["hr"])
    assert pop["test"]["full_ndcg@5"] == pytest.approx(full["ndcg"])


def test_ease_lambda_is_the_best_on_valid_and_segments_add_up(dataset_dir, metrics):
    data = load_dataset(dataset_dir)
    ease = metrics["ease"]
    hrs = [g["valid_hr@5"] for g in ease["grid"]]
    tried = [g["lambda"] for g in ease["grid"]]
    assert tried == [300.0, 20.0, 1.0]  # largest first; three values never stop early (two worse in a row)
    assert ease["lambda"] == tried[int(np.argmax(hrs))]
    assert ease["valid"]["hr@5"] == pytest.approx(max(hrs), abs=1e-6)  # the chosen λ's figures are the grid's
    for name in ("popularity", "ease"):
        for protocol in ("sampled", "full"):
            seg = metrics[name]["test_segments"][protocol]
            assert sum(m["n"] for m in seg["users"].values()) == data.n_users
            assert sum(m["n"] for m in seg["items"].values()) == data.n_users
        for split in ("valid", "test"):
            assert set(metrics[name][split]) == {"hr@5", "ndcg@5", "full_hr@5", "full_ndcg@5"}
            assert all(0.0 <= v <= 1.0 for v in metrics[name][split].values())


def test_models_score_the_same_through_the_model_evaluators(dataset_dir, metrics):
    # The EASE and Popularity models, run by metrics.evaluate_sampled/evaluate_full on the model-input contract
    # (histories from Histories, the train history for valid), give baseline_metrics' figures.
    data = load_dataset(dataset_dir)
    users = np.arange(data.n_users)
    history = Histories.from_arrays(data.train_users, data.train_items, None, data.n_users)
    seen = build_csr(data.train_users, data.train_items, data.n_users)
    ease = bl.EASE(data.n_users, data.n_items, metrics["ease"]["lambda"]).fit(data.train_users, data.train_items)
    pop = bl.Popularity(data.n_users, data.n_items).fit(data.item_counts)
    for name, model in (("ease", ease), ("popularity", pop)):
        sampled = evaluate_sampled(model, users, data.valid_items, data.valid_neg, k=5, histories=history)
        full = evaluate_full(model, users, data.valid_items, seen, k=5, histories=history)
        assert sampled["hr"] == pytest.approx(metrics[name]["valid"]["hr@5"], abs=1e-6), name
        assert sampled["ndcg"] == pytest.approx(metrics[name]["valid"]["ndcg@5"], abs=1e-6), name
        assert full["hr"] == pytest.approx(metrics[name]["valid"]["full_hr@5"], abs=1e-6), name


def test_test_split_treats_the_valid_item_as_known(dataset_dir):
    data = load_dataset(dataset_dir)
    valid_t, test_t = torch.as_tensor(data.valid_items), torch.as_tensor(data.test_items)

    def scores(users):  # the valid item outscores the test item, which outscores everything else
        s = torch.zeros((len(users), data.n_items))
        s[torch.arange(len(users)), valid_t[users]] = 2.0
        s[torch.arange(len(users)), test_t[users]] = 1.0
        return s

    sampled, full = bl.rank_split(scores, data, "test", batch_users=64)
    assert (full == 0).all()  # excluded by test time, the valid item does not push the target down
    assert (sampled == 0).all()  # and the fixed negatives never hold a positive
    # On valid, the same scorer ranks the valid item first too (the test item is not known yet, but scores lower).
    assert (bl.rank_split(scores, data, "valid")[1] == 0).all()


def test_ease_test_history_holds_the_valid_item(dataset_dir):
    data = load_dataset(dataset_dir)
    csr = bl._history_csr(data, "test")
    lengths = np.diff(csr[0])
    assert (lengths == np.bincount(data.train_users, minlength=data.n_users) + 1).all()
    row = csr[1][csr[0][7]: csr[0][8]]
    assert data.valid_items[7] in row and data.test_items[7] not in row


def test_too_large_catalogue_is_skipped_and_bad_grid_refused(dataset_dir):
    data = load_dataset(dataset_dir)
    m = bl.baseline_metrics(data, k=5, memory_bytes=1000)
    assert "GiB" in m["ease"]["skipped"] and "popularity" in m
    assert "skipped" in bl.baseline_metrics(data, k=5, ease=False)["ease"]
    with pytest.raises(UserError, match="lambdas"):
        bl.baseline_metrics(data, k=5, lambdas=(10.0, -1.0))


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_baselines_prints_table_and_json(dataset_dir, capsys):
    assert main(["baselines", str(dataset_dir), "--k", "5", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    m = json.loads(out[-1])
    table = "\n".join(out[:-1])
    assert "popularity HR@5" in table and "EASE HR@5" in table and "test (full)" in table
    assert f"EASE lambda {m['ease']['lambda']:g} picked on valid HR@5" in table
    row = next(line for line in out if line.startswith("test "))
    assert f"{m['popularity']['test']['hr@5']:.4f}" in row and f"{m['ease']['test']['hr@5']:.4f}" in row
    assert math.isfinite(m["ease"]["seconds"])


def test_cli_baselines_no_ease_and_user_errors(dataset_dir, tmp_path, capsys):
    assert main(["baselines", str(dataset_dir), "--no-ease"]) == 0
    out = capsys.readouterr().out
    assert "EASE skipped" in out and "EASE HR" not in out
    assert main(["baselines", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: dataset dir not found") and "\n" not in err
    assert main(["baselines", str(dataset_dir), "--k", "0"]) == 2
    assert "--k=0" in capsys.readouterr().err
    for bad in ("10,abc", "10,-5", ","):
        assert main(["baselines", str(dataset_dir), "--lambdas", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "lambdas" in err and "\n" not in err


def test_cli_baselines_lambda_grid(dataset_dir, capsys):
    assert main(["baselines", str(dataset_dir), "--k", "5", "--lambdas", "3,30", "--json"]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [g["lambda"] for g in m["ease"]["grid"]] == [30.0, 3.0] and m["ease"]["lambda"] in (3.0, 30.0)


def test_lambda_search_stops_after_two_worse_in_a_row(dataset_dir):
    data = load_dataset(dataset_dir)
    gram = bl.gram_matrix(bl._history_csr(data, "valid"), data.n_items)
    full = bl.select_ease_lambda(data, (0.1, 1.0, 10.0, 100.0, 1000.0, 10_000.0), 5, gram, patience=99)[2]
    lam, _, grid, _ = bl.select_ease_lambda(data, (0.1, 1.0, 10.0, 100.0, 1000.0, 10_000.0), 5, gram)
    hrs = [g["valid_hr@5"] for g in full]  # every λ, largest first
    # Replay the rule on the complete curve: where it stops, and that it keeps the best of what it tried.
    best, worse, stop = -1.0, 0, len(hrs)
    for n, hr in enumerate(hrs):
        best, worse = (hr, 0) if hr > best else (best, worse + 1)
        if worse >= 2:
            stop = n + 1
            break
    assert grid == full[:stop]
    assert lam == grid[int(np.argmax([g["valid_hr@5"] for g in grid]))]["lambda"]


@pytest.mark.parametrize("name", ["ease", "pop"])
def test_closed_form_models_train_export_and_serve_like_any_model(dataset_dir, tmp_path, name):
    """`ncf-ray train --model ease|pop`: fitted, evaluated (valid, test, beside the baselines), exported as an
    artifact that loads, and served by the same Recommender, excluding every seen item."""
    from ncf_ray.artifact import load_artifact
    from ncf_ray.config import build_train_config
    from ncf_ray.recommender import Recommender

    cfg = build_train_config(model=name, eval_k=5)
    m = bl.fit_closed_form(str(dataset_dir), str(tmp_path / "run"), cfg)
    data = load_dataset(dataset_dir)
    assert m["model"] == name and 0 < m["test"]["hr@5"] <= 1 and "segments" in m["test"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["model_version"] == m["model_version"]
    if name == "ease":  # the model is the EASE baseline: one fit, lambda picked on valid and stored
        assert m["baselines"]["ease"]["test"] == m["test"] and m["closed_form"]["lambda"] in bl.DEFAULT_LAMBDAS
    else:
        assert m["test"]["hr@5"] == pytest.approx(m["baselines"]["popularity"]["test"]["hr@5"])
    art = load_artifact(tmp_path / "run" / "model")
    if name == "ease":
        assert art.model_cfg.lam == m["closed_form"]["lambda"]
    rec = Recommender(art)
    res = rec.recommend([str(data.user_ids[0])], data.n_items)[0]
    got = [art.item_index[it["item_id"]] for it in res["items"]]
    seen = set(art.seen_indices[art.seen_indptr[0]:art.seen_indptr[1]].tolist())
    assert not res["cold_start"] and got and not set(got) & seen
    assert {int(data.valid_items[0]), int(data.test_items[0])} <= seen
    scores = [it["score"] for it in res["items"]]
    assert scores == sorted(scores, reverse=True)
