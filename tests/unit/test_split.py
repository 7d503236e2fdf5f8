"""Pure data-stage logic, no Ray: vocab, dedup, leave-one-out split, eval negatives, row normalisation, the NCF
loader's build step, and the synthetic generator's determinism."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from ncf_ray.config import DataConfig
from ncf_ray.data.prepare import (
    RawLog,
    _ids_to_array,
    build_loo,
    build_ncf,
    dedup_latest,
    encode_ids,
    sample_eval_negatives,
    split_leave_one_out,
)
from ncf_ray.data.sources import (
    BAD,
    BELOW_MIN,
    OK,
    ColumnSpec,
    _parse_negative_lines,
    normalise_batch,
    split_fields,
)
from ncf_ray.data.synthetic import SyntheticSpec, generate_block, iter_synthetic
from ncf_ray.errors import UserError

SMALL = SyntheticSpec(users=300, items=120, interactions=8000, seed=7)


@pytest.fixture(scope="module")
def small_log() -> RawLog:
    t = pa.concat_tables(iter_synthetic(SMALL))
    return RawLog(t["user_id"].to_numpy(), t["item_id"].to_numpy(), t["timestamp"].to_numpy(), rows=t.num_rows)


@pytest.fixture(scope="module")
def built(small_log):
    return build_loo(small_log, DataConfig(eval_negatives=20, seed=3))


def test_one_valid_and_test_row_per_user_and_test_is_latest(built, small_log):
    s = built.split
    n_users = built.user_ids.size
    assert s.valid_items.shape == s.test_items.shape == (n_users,)
    assert np.bincount(s.train_users, minlength=n_users).min() >= 1
    # Test is each user's latest interaction; valid is not later than test; train not later than valid.
    last_train = np.full(n_users, np.iinfo(np.int64).min)
    np.maximum.at(last_train, s.train_users, s.train_times)
    assert (s.test_times >= s.valid_times).all() and (s.valid_times >= last_train).all()
    raw_user = built.user_ids.astype(np.int64)
    latest = {}
    for u, t in zip(small_log.users.tolist(), small_log.times.tolist()):
        latest[u] = max(latest.get(u, t), t)
    assert all(latest[raw_user[u]] == s.test_times[u] for u in range(n_users))


def test_no_held_out_pair_in_train_and_indices_in_range(built):
    s = built.split
    n_items = built.item_ids.size
    train_keys = set((s.train_users * n_items + s.train_items).tolist())
    users = np.arange(built.user_ids.size)
    assert not train_keys & set((users * n_items + s.valid_items).tolist())
    assert not train_keys & set((users * n_items + s.test_items).tolist())
    for arr in (s.train_items, s.valid_items, s.test_items, built.valid_neg, built.test_neg):
        assert arr.min() >= 0 and arr.max() < n_items
    assert s.train_users.max() < built.user_ids.size


def test_eval_negatives_are_never_positives(built):
    s = built.split
    n_items = built.item_ids.size
    pos = set((s.train_users * n_items + s.train_items).tolist())
    users = np.arange(built.user_ids.size)
    pos |= set((users * n_items + s.valid_items).tolist()) | set((users * n_items + s.test_items).tolist())
    for neg in (built.valid_neg, built.test_neg):
        assert neg.shape == (users.size, 20)
        assert not pos & set((users[:, None] * n_items + neg).ravel().tolist())


def test_vocab_round_trip(built, small_log):
    s = built.split
    raw_pairs = set(zip(small_log.users.tolist(), small_log.items.tolist()))
    users = built.user_ids.astype(np.int64)
    items = built.item_ids.astype(np.int64)
    assert set(zip(users[s.train_users].tolist(), items[s.train_items].tolist())) <= raw_pairs
    assert (np.diff(users) > 0).all() and (np.diff(items) > 0).all()  # sorted numerically


def test_encode_ids_orders_ints_numerically_and_strings_lexicographically():
    codes, vocab = encode_ids(np.array([10, 2, 33, 2]))
    assert vocab.tolist() == ["2", "10", "33"] and codes.tolist() == [1, 0, 2, 0]
    codes, vocab = encode_ids(pa.array(["b", "a10", "a9", "b"]))
    assert vocab.tolist() == ["a10", "a9", "b"] and vocab[codes].tolist() == ["b", "a10", "a9", "b"]


def test_dedup_keeps_latest():
    users = np.array([0, 0, 0, 1])
    items = np.array([5, 5, 6, 5])
    times = np.array([3, 9, 1, 2])
    keep = dedup_latest(users, items, times)
    assert sorted(zip(users[keep], items[keep], times[keep])) == [(0, 5, 9), (0, 6, 1), (1, 5, 2)]


def test_split_ties_break_by_item():
    s = split_leave_one_out(np.zeros(3, np.int64), np.array([4, 2, 9]), np.array([5, 5, 5]), 1)
    assert s.test_items.tolist() == [9] and s.valid_items.tolist() == [4] and s.train_items.tolist() == [2]


def test_sparse_users_dropped(small_log):
    log = RawLog(np.array([1, 1, 1, 2, 2, 3, 3, 3]), np.array([1, 2, 3, 1, 2, 4, 5, 1]), np.arange(8), rows=8)
    b = build_loo(log, DataConfig(eval_negatives=1))
    assert b.user_ids.tolist() == ["1", "3"] and b.dropped["sparse_users"] == 1
    assert b.item_ids.tolist() == ["1", "2", "3", "4", "5"]
    with pytest.raises(UserError, match="everything filtered out"):
        build_loo(log, DataConfig(min_user_interactions=4, eval_negatives=1))


def test_eval_negatives_distinct_and_with_repeats_when_few_items():
    rng = np.random.default_rng(0)
    n_items = 10
    pos = np.array([0 * n_items + 1, 1 * n_items + 0, 1 * n_items + 1, 1 * n_items + 2])
    neg = sample_eval_negatives(pos, 2, n_items, 5, rng)
    assert len(set(neg[0].tolist())) == 5 and 1 not in neg[0]
    neg = sample_eval_negatives(pos, 2, n_items, 9, rng)  # user 1 has only 7 free items: repeats allowed
    assert not {0, 1, 2} & set(neg[1].tolist()) and len(set(neg[0].tolist())) == 9
    with pytest.raises(UserError, match="all 3 items"):
        sample_eval_negatives(np.array([0, 1, 2]), 1, 3, 2, rng)


def test_normalise_counts_bad_rows_and_parses_iso_times():
    lines = ["u1::10::100", "u2::11::2021-01-01T00:00:00Z", "u3::12::yesterday", "u4::::5", "broken line",
             "u5::13::2021-01-02 00:00:00"]
    table, malformed = split_fields(pa.array(lines), "::", ("user_id", "item_id", "timestamp"))
    assert malformed == ["broken line"]
    out = normalise_batch(table, ColumnSpec(), malformed)
    assert out.num_rows == 6
    assert out["_status"].to_pylist() == [OK, OK, BAD, BAD, OK, BAD]  # malformed lines come last
    assert out["timestamp"].to_pylist()[:2] == [100, 1609459200]
    assert out["timestamp"].to_pylist()[4] == 1609545600
    assert out["_err"].to_pylist()[2] == "timestamp='yesterday'"
    assert out["_err"].to_pylist()[5] == "line='broken line'"


def test_normalise_min_rating_and_missing_column():
    t = pa.table({"u": [1, 2], "i": [3, 4], "t": [5, 6], "r": [1.0, 4.5]})
    spec = ColumnSpec("u", "i", "t", rating_col="r", min_rating=4.0)
    out = normalise_batch(t, spec)
    assert out["_status"].to_pylist() == [BELOW_MIN, OK] and out["user_id"].type == pa.int64()
    with pytest.raises(UserError, match="missing required column 'who'; columns found: u, i, t, r"):
        normalise_batch(t, ColumnSpec("who", "i", "t"))


def _ncf_fixture():
    """3 users, 6 items; the test.negative file lists 4 negatives each (paper layout, shorter)."""
    train = ["0\t0\t5\t10", "0\t1\t4\t20", "1\t2\t3\t10", "1\t3\t5\t30", "1\t0\t1\t40", "2\t4\t2\t1",
             "2\t5\t2\t2"]
    test = ["0\t2\t5\t99", "1\t5\t4\t99", "2\t1\t3\t99"]
    negs = ["(0,2)\t3\t4\t5\t3", "(1,5)\t1\t4\t1\t4", "(2,1)\t0\t2\t3\t0"]
    return train, test, negs


def test_ncf_build_keeps_paper_test_items_and_negatives():
    train, test, negs = _ncf_fixture()
    spec = ColumnSpec(rating_col="rating")

    def log(lines):
        t = normalise_batch(split_fields(pa.array(lines), "\t", ("user_id", "item_id", "rating", "timestamp"))[0],
                            spec)
        return RawLog(_ids_to_array([t["user_id"]]), _ids_to_array([t["item_id"]]), t["timestamp"].to_numpy(),
                      rows=len(lines))

    neg_table = _parse_negative_lines(pa.table({"text": negs}))
    b = build_ncf(log(train), log(test), neg_table, DataConfig(seed=1))
    assert b.protocol == "ncf-paper"
    assert b.split.test_items.tolist() == [2, 5, 1]
    assert b.test_neg.tolist() == [[3, 4, 5, 3], [1, 4, 1, 4], [0, 2, 3, 0]]  # unchanged, repeats and all
    assert b.split.valid_items.tolist() == [1, 0, 5]  # latest train row per user
    assert b.split.train_items.tolist() == [0, 2, 3, 4]
    assert b.valid_neg.shape == (3, 4)
    for u, row in enumerate(b.valid_neg):
        positives = {0: {0, 1, 2}, 1: {0, 2, 3, 5}, 2: {1, 4, 5}}[u]
        assert not positives & set(row.tolist())


def test_synthetic_is_deterministic_and_seed_sensitive():
    a = pa.concat_tables(iter_synthetic(SMALL))
    b = pa.concat_tables(iter_synthetic(SMALL))
    assert a.equals(b)
    c = generate_block(SyntheticSpec(users=300, items=120, interactions=8000, seed=8), 0)
    assert not c.equals(generate_block(SMALL, 0))


def test_synthetic_shape():
    t = pa.concat_tables(iter_synthetic(SMALL))
    users, items = t["user_id"].to_numpy(), t["item_id"].to_numpy()
    keys = users * 1000 + items
    assert np.unique(keys).size == keys.size  # distinct pairs
    assert np.bincount(users)[1:].min() >= 5
    assert users.min() == 1 and users.max() == SMALL.users and items.max() <= SMALL.items
    assert 0.7 * SMALL.interactions < t.num_rows <= SMALL.interactions
    # Power-law popularity: the top 10% of items hold far more than 10% of interactions.
    counts = np.sort(np.bincount(items))[::-1]
    assert counts[: SMALL.items // 10].sum() > 0.2 * counts.sum()


def test_data_modules_do_not_import_ray():
    code = ("import sys, ncf_ray.data.prepare, ncf_ray.data.sources, ncf_ray.data.synthetic, "
            "ncf_ray.data.sampler; assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
