"""Shop logs in the prepare stage, no Ray: event dedup and counts, the held-out event, hour/dow and categorical
context, normalising event/context columns, and the dataset-dir round trip through load_dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ncf_ray.config import DataConfig
from ncf_ray.data import schema as S
from ncf_ray.data.dataset import load_dataset
from ncf_ray.data.prepare import RawLog, build_loo, write_dataset
from ncf_ray.data.prepare import _meta as meta_of
from ncf_ray.data.shoplog import (
    dedup_events,
    encode_context,
    encode_side_tables,
    hour_dow,
    read_side_tables,
    table_ids,
)
from ncf_ray.data.sources import BAD, OK, ColumnSpec, normalise_batch
from ncf_ray.errors import UserError

EVENTS = ("view", "cart", "purchase")
VIEW, CART, PURCHASE = 0, 1, 2
DAY = 86_400
MONDAY = 4 * DAY  # 1970-01-05T00:00:00Z was a Monday


def _shop_log(n_users: int = 30, n_items: int = 25, per_user: int = 8, seed: int = 0) -> RawLog:
    """Each user views `per_user` distinct items at distinct times; some views are followed by a cart or a
    purchase of the same item later; device cycles over three values."""
    rng = np.random.default_rng(seed)
    users, items, times, events, devices = [], [], [], [], []
    for u in range(n_users):
        picked = rng.choice(n_items, size=per_user, replace=False)
        t0 = int(rng.integers(0, 100 * DAY))
        for k, item in enumerate(picked):
            t = t0 + k * 3600
            users.append(u), items.append(item), times.append(t), events.append(VIEW)
            devices.append(["desktop", "mobile", "tablet"][(u + k) % 3])
            if k % 3 == 1:  # a stronger event on the same item, later
                users.append(u), items.append(item), times.append(t + 60), events.append(CART + (k % 2))
                devices.append("mobile")
    return RawLog(users=np.array(users, np.int64), items=np.array(items, np.int64), times=np.array(times, np.int64),
                  rows=len(users), events=np.array(events, np.int8),
                  context={"device": pa.array(devices, pa.string())})


def _cfg(**kw) -> DataConfig:
    return DataConfig(event_col="event", events=EVENTS, eval_negatives=5, **kw)


# ------------------------------------------------------------------------------------------------ dedup
def test_dedup_keeps_the_strongest_event_and_its_latest_time():
    users = np.array([0, 0, 0, 0, 1, 1])
    items = np.array([5, 5, 5, 5, 5, 5])
    times = np.array([10, 20, 30, 40, 10, 20])
    events = np.array([VIEW, PURCHASE, PURCHASE, CART, CART, VIEW], np.int8)
    keep = dedup_events(users, items, times, events)
    # user 0: two purchases (t=20, 30) beat the later cart (t=40) -> the purchase at 30; user 1: the cart.
    assert keep.tolist() == [2, 4]


def test_dedup_window_keeps_one_row_per_window_and_keep_all_keeps_everything():
    users = np.zeros(4, np.int64)
    items = np.zeros(4, np.int64)
    times = np.array([0, 50, 100, 150])
    events = np.array([CART, VIEW, VIEW, VIEW], np.int8)
    assert dedup_events(users, items, times, events, window=100).tolist() == [0, 3]  # windows [0,100), [100,200)
    assert dedup_events(users, items, times, events, keep_all=True).tolist() == [0, 1, 2, 3]
    # Without events or a window it is the old "latest per pair" rule.
    assert dedup_events(users, items, times, None).tolist() == [3]


def test_event_counts_and_purchase_flag_of_the_held_out_rows():
    log = _shop_log()
    b = build_loo(log, _cfg())
    meta = b.shop
    assert meta["events"] == list(EVENTS) and meta["purchase_event"] == "purchase"
    s = b.split
    all_events = np.concatenate([s.train_events, s.valid_events, s.test_events])
    assert meta["event_counts"] == {n: int((all_events == k).sum()) for k, n in enumerate(EVENTS)}
    assert sum(meta["event_counts"].values()) == b.n_interactions
    # Dedup kept one row per pair, the strongest: every (user, item) of the log appears once, with its max event.
    strongest: dict[tuple[int, int], int] = {}
    for u, i, e in zip(log.users, log.items, log.events):
        strongest[(u, i)] = max(strongest.get((u, i), 0), int(e))
    assert b.n_interactions == len(strongest)
    assert meta["event_counts"]["purchase"] == sum(e == PURCHASE for e in strongest.values())
    # The test row is each user's latest interaction, and its event travels with it.
    for u in range(b.user_ids.size):
        raw_u = int(b.user_ids[u])
        rows = [(t, i) for uu, i, t in zip(log.users, log.items, log.times) if uu == raw_u]
        latest_item = max(rows)[1]
        assert int(b.item_ids[s.test_items[u]]) == latest_item
        assert s.test_events[u] == strongest[(raw_u, latest_item)]
    assert meta["held_out_purchases"]["test"] == int((s.test_events >= PURCHASE).sum())


def test_purchase_event_sets_where_purchases_start():
    b = build_loo(_shop_log(), _cfg(purchase_event="cart"))
    assert b.shop["purchase_event"] == "cart"
    assert b.shop["held_out_purchases"]["test"] == int((b.split.test_events >= CART).sum())
    with pytest.raises(UserError, match="--purchase-event 'buy' is not one of --events"):
        _cfg(purchase_event="buy")


def test_without_events_nothing_changes():
    log = _shop_log()
    plain = RawLog(users=log.users, items=log.items, times=log.times, rows=log.rows)
    b = build_loo(plain, DataConfig(eval_negatives=5))
    assert b.shop == {} and b.split.train_events is None and b.split.train_context is None
    assert "events" not in meta_of(DataConfig(), b, "x", 0.0)


# ------------------------------------------------------------------------------------------------ context
def test_hour_and_day_of_week_in_utc():
    hour, dow = hour_dow(np.array([MONDAY, MONDAY + 13 * 3600 + 59, MONDAY + 6 * DAY + 23 * 3600, 0]))
    assert hour.tolist() == [0, 13, 23, 0]
    assert dow.tolist() == [0, 0, 6, 3]  # Monday, Monday, Sunday, Thursday (1970-01-01)


def test_context_ids_are_global_and_categorical_vocab_comes_from_train():
    times = np.array([MONDAY + 5 * 3600, MONDAY + DAY, MONDAY + 2 * DAY])
    raw_vocab = np.array(["", "mobile", "tv"])
    codes = np.array([1, 0, 2])  # row 2 ('tv') is not a train row
    ids, spec = encode_context(times, {"device": (codes, raw_vocab)}, train_rows=np.array([0, 1]))
    hour, dow, device = spec["columns"]
    assert (hour["offset"], hour["size"], dow["offset"], dow["size"]) == (1, 24, 25, 7)
    assert device["vocab"] == ["mobile"] and device["offset"] == 32 and spec["n_ids"] == 33
    assert ids[:, 0].tolist() == [1 + 5, 1 + 0, 1 + 0]
    assert ids[:, 1].tolist() == [25 + 0, 25 + 1, 25 + 2]
    assert ids[:, 2].tolist() == [32, 0, 0]  # '' and the valid/test-only 'tv' are unknown (0)


def test_built_context_matches_the_rows_it_travels_with():
    b = build_loo(_shop_log(), _cfg(context_cols=("device",)))
    spec = b.shop["context"]
    assert [c["name"] for c in spec["columns"]] == ["hour", "dow", "device"]
    s = b.split
    hour, dow = hour_dow(s.test_times)
    assert np.array_equal(s.test_context[:, 0], 1 + hour) and np.array_equal(s.test_context[:, 1], 25 + dow)
    assert s.train_context.shape == (s.train_users.size, 3)
    assert 0 < s.train_context[:, 2].min() and s.train_context.max() < spec["n_ids"]


def test_time_context_off_keeps_only_categorical_columns():
    b = build_loo(_shop_log(), _cfg(context_cols=("device",), time_context=False))
    assert [c["name"] for c in b.shop["context"]["columns"]] == ["device"]
    assert b.shop["context"]["columns"][0]["offset"] == 1


# ------------------------------------------------------------------------------------------------ normalising
def test_normalise_maps_events_and_counts_unknown_values_as_bad():
    batch = pa.table({"user_id": ["u1", "u2", "u3", "u4"], "item_id": ["a", "b", "c", "d"],
                      "timestamp": ["1", "2", "3", "4"], "type": ["view", " purchase", "click", None],
                      "device": ["mobile", None, "desktop", "tv"]})
    spec = ColumnSpec(event_col="type", events=EVENTS, context_cols=("device",))
    out = normalise_batch(batch, spec)
    assert out.column(S.EVENT_COL).to_pylist()[:2] == [VIEW, PURCHASE]
    assert out.column("_status").to_pylist() == [OK, OK, BAD, BAD]
    assert out.column("_err").to_pylist()[2] == "type='click' (not one of --events view,cart,purchase)"
    assert out.column(S.CONTEXT_PREFIX + "device").to_pylist() == ["mobile", "", "desktop", "tv"]


def test_missing_event_column_is_a_user_error_naming_it():
    batch = pa.table({"user_id": ["u1"], "item_id": ["a"], "timestamp": ["1"]})
    with pytest.raises(UserError, match="missing required column 'event'"):
        normalise_batch(batch, ColumnSpec(event_col="event", events=EVENTS))


# ------------------------------------------------------------------------------------------------ round trip
def test_load_dataset_round_trip_of_events_and_context(tmp_path: Path):
    cfg = _cfg(context_cols=("device",))
    b = build_loo(_shop_log(), cfg)
    d = tmp_path / "ds"
    d.mkdir()
    write_dataset(b, d, shards=3)
    (d / S.META_FILE).write_text(json.dumps(meta_of(cfg, b, "test", 0.0)))
    ds = load_dataset(d)
    s = b.split
    order = np.lexsort((ds.train_items, ds.train_users))  # shards keep order, but compare as sets of rows
    want = np.lexsort((s.train_items, s.train_users))
    assert np.array_equal(ds.train_users[order], s.train_users[want])
    assert np.array_equal(ds.train_events[order], s.train_events[want])
    assert np.array_equal(ds.train_context[order], s.train_context[want])
    assert np.array_equal(ds.test_events, s.test_events) and np.array_equal(ds.valid_context, s.valid_context)
    assert ds.purchase_from == PURCHASE and ds.features == {}
    plain = build_loo(RawLog(users=b.user_ids.astype(np.int64)[s.train_users], items=s.train_items,
                             times=s.train_times, rows=s.train_users.size), DataConfig(eval_negatives=5))
    d2 = tmp_path / "plain"
    d2.mkdir()
    write_dataset(plain, d2, shards=1)
    (d2 / S.META_FILE).write_text(json.dumps(meta_of(DataConfig(), plain, "test", 0.0)))
    ds2 = load_dataset(d2)
    assert ds2.train_events is None and ds2.test_context is None and ds2.purchase_from is None


# ------------------------------------------------------------------------------------------------ side tables
def _item_table(path: Path, ids: list, **cols) -> str:
    import pyarrow.csv as pacsv

    pacsv.write_csv(pa.table({"item_id": ids, **cols}), path)
    return str(path)


def _with_tables(tmp_path: Path, log: RawLog, **cfg_kw):
    cfg = _cfg(**cfg_kw)
    tables = read_side_tables(cfg, {})
    b = build_loo(log, cfg, table_ids(tables, "items"))
    return b, encode_side_tables(tables, b)


def test_items_of_the_item_table_without_interactions_join_the_vocab_as_cold_items(tmp_path: Path):
    log = _shop_log(n_items=25)
    ids = list(range(30))  # 25..29 (and any item the log lacks) never interacted with
    cats = [f"c{k % 4}" for k in ids]
    path = _item_table(tmp_path / "items.csv", ids, category=cats, price=[float(k) for k in ids])
    b, enc = _with_tables(tmp_path, log, item_features=path)
    assert b.item_ids.tolist() == [str(k) for k in range(30)]  # the sorted union, ints numerically
    counts = np.bincount(b.split.train_items, minlength=30)
    assert (counts[25:] == 0).all() and b.shop["items_without_interactions"] == 30 - np.unique(log.items).size
    items = enc["items"]
    assert items.ids.shape[0] == 30
    cat_col = next(c for c in items.spec["columns"] if c["name"] == "category")
    lo = cat_col["slots"][0]
    # A cold item's category is a real value (not the reserved id): the model can score it from it.
    assert items.ids[29, lo] == items.ids[29 - 4, lo] != cat_col["offset"]


def test_cold_item_vocab_depends_only_on_the_id_set(tmp_path: Path):
    log = _shop_log(n_items=25)
    text = RawLog(users=log.users, items=pa.array([f"i{k:02d}" for k in log.items], pa.string()),
                  times=log.times, rows=log.rows, events=log.events)
    shuffled = [f"i{k:02d}" for k in np.random.default_rng(1).permutation(30)]
    a, _ = _with_tables(tmp_path, text, item_features=_item_table(tmp_path / "a.csv", shuffled, c=shuffled))
    b, _ = _with_tables(tmp_path, text, item_features=_item_table(tmp_path / "b.csv", sorted(shuffled),
                                                                    c=sorted(shuffled)))
    assert a.item_ids.tolist() == b.item_ids.tolist() == sorted(shuffled)


def test_users_of_the_user_table_without_interactions_are_not_added(tmp_path: Path):
    import pyarrow.csv as pacsv

    log = _shop_log(n_users=30)
    path = tmp_path / "users.csv"
    pacsv.write_csv(pa.table({"user_id": list(range(35)), "region": [f"r{k % 3}" for k in range(35)]}), path)
    b, enc = _with_tables(tmp_path, log, user_features=str(path))
    assert b.user_ids.size == 30
    users = enc["users"]
    assert users.ids.shape[0] == 30 and users.spec["stats"]["unknown_ids"] == 5


def _bad_tables(tmp_path: Path) -> dict[str, tuple[dict, str]]:
    good = _item_table(tmp_path / "good.csv", list(range(25)), category=["a"] * 25)
    return {
        "missing file": ({"item_features": str(tmp_path / "nope.csv")}, "nope.csv"),
        "missing id column": ({"item_features": good, "feature_id_col": "sku"}, "'sku'"),
        "text column in no table": ({"item_features": good, "text_cols": ("title",)}, "'title'"),
        "unparseable vector column": (
            {"item_features": _item_table(tmp_path / "vec.csv", list(range(25)), emb=["x;y"] * 25),
             "vector_cols": ("emb",)}, "'emb'"),
        "no id of the log": ({"item_features": _item_table(tmp_path / "far.csv", [900 + k for k in range(5)],
                                                           category=["a"] * 5)}, "item_id"),
        "no id joins the vocab": ({"item_features": str(tmp_path / "far.csv")}, "'900'"),
    }


@pytest.mark.parametrize("case", ["missing file", "missing id column", "text column in no table",
                                  "unparseable vector column", "no id of the log", "no id joins the vocab"])
def test_a_bad_side_table_is_one_user_error_line_naming_the_column(tmp_path: Path, case: str):
    cfg_kw, named = _bad_tables(tmp_path)[case]
    if case == "no id of the log":  # ids disjoint from the log's and not joining it: MovieLens' rule
        cfg = _cfg(**cfg_kw)
        tables = read_side_tables(cfg, {})
        with pytest.raises(UserError) as err:
            encode_side_tables(tables, build_loo(_shop_log(), cfg))
    else:
        with pytest.raises(UserError) as err:
            _with_tables(tmp_path, _shop_log(), **cfg_kw)
    assert "\n" not in str(err.value) and named in str(err.value)


# ------------------------------------------------------------------------------------------------ synthetic-shop
def test_synthetic_shop_needs_no_flags_events_device_and_both_side_tables(tmp_path: Path):
    """What `ncf-ray prepare synthetic-shop` does, minus Ray: its defaults, the normalised log, both tables;
    the items released late are cold in train and held out in test."""
    from ncf_ray.data.features import write_features
    from ncf_ray.data.prepare import collect_batches
    from ncf_ray.data.shop import ShopSpec, generate_shop
    from ncf_ray.data.sources import SHOP_SOURCE, shop_columns, shop_defaults, shop_side_tables

    cfg = shop_defaults(DataConfig(source=SHOP_SOURCE, eval_negatives=9))
    assert (cfg.event_col, cfg.context_cols, cfg.with_time_context) == ("event", ("device",), True)
    data = generate_shop(ShopSpec(users=300, items=200, interactions=15_000, seed=3))
    log = collect_batches([normalise_batch(data.log, ColumnSpec(**shop_columns(cfg)))])
    assert log.bad == 0 and log.events is not None and set(log.context) == {"device"}
    tables = read_side_tables(cfg, shop_side_tables(data))
    b = build_loo(log, cfg, table_ids(tables, "items"))
    enc = encode_side_tables(tables, b)
    assert b.item_ids.size == 200  # every catalogue item is in the vocab
    assert {c["kind"] for c in enc["items"].spec["columns"]} >= {"categorical", "bucket", "text"}
    d = tmp_path / "shop"
    d.mkdir()
    write_dataset(b, d, shards=2)
    write_features(d, enc.get("items"), enc.get("users"))
    (d / S.META_FILE).write_text(json.dumps(meta_of(cfg, b, SHOP_SOURCE, 0.0)))
    ds = load_dataset(d)
    assert set(ds.features) == {"items", "users"} and ds.features["items"].ids.shape[0] == ds.n_items
    assert [c["name"] for c in ds.meta["context"]["columns"]] == ["hour", "dow", "device"]
    cold = np.flatnonzero(ds.item_counts == 0)
    assert np.isin(data.cold_items.astype(str), ds.item_ids[cold]).mean() > 0.5
    assert np.isin(ds.test_items, cold).sum() > 0  # some users' held-out event is a new item


def test_shop_flags_on_sources_without_such_columns_are_refused():
    from ncf_ray.data.prepare import _check_cfg

    with pytest.raises(UserError, match="--event-col does not apply to source 'movielens-1m'"):
        _check_cfg(DataConfig(source="movielens-1m", event_col="event"))
    with pytest.raises(UserError, match="--item-features does not apply to ncf: sources"):
        _check_cfg(DataConfig(source="ncf:x", item_features="items.csv"))
    with pytest.raises(UserError, match="--context-cols 'hour' clashes"):
        _check_cfg(DataConfig(source="log.csv", context_cols=("hour",)))


def test_dedup_flags_are_checked():
    with pytest.raises(UserError, match="--dedup-window=0 must be > 0"):
        _cfg(dedup_window=0)
    with pytest.raises(UserError, match="exclude each other"):
        _cfg(dedup_window=60, keep_all_events=True)


def test_summary_prints_event_context_and_feature_lines_only_when_present():
    from ncf_ray.data.prepare import format_summary

    cfg = _cfg(context_cols=("device",))
    b = build_loo(_shop_log(), cfg)
    meta = meta_of(cfg, b, "shop.csv", 1.0)
    extra = {"out": "x", "density": 0.1, "rows_read": 1, "rows_per_s": 1.0}
    text = format_summary({**meta, **extra})
    assert f"view {meta['event_counts']['view']:,}" in text
    assert "context               hour (24), dow (7), device (3)" in text
    plain = build_loo(RawLog(users=b.user_ids.astype(np.int64)[b.split.train_users], items=b.split.train_items,
                             times=b.split.train_times, rows=b.split.train_users.size), DataConfig(eval_negatives=5))
    text = format_summary({**meta_of(DataConfig(), plain, "log.csv", 1.0), **extra})
    assert "events" not in text and "context" not in text and "features" not in text


def test_feature_id_col_names_both_tables_or_each():
    from ncf_ray.data.shoplog import feature_id_col

    assert feature_id_col(None, "items", "sku") == "sku"
    assert feature_id_col("id", "users", "uid") == "id"
    assert [feature_id_col("items=pid", w, "log") for w in ("items", "users")] == ["pid", "log"]
    with pytest.raises(UserError, match="expected NAME or items=NAME,users=NAME"):
        feature_id_col("products=pid", "items", "sku")
