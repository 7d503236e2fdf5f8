"""The synthetic shop (ncf_ray/data/shop.py) without Ray: determinism, the funnel rates against the module's
targets, the structure leave-one-out needs (>= 3 distinct items per user, new items only as latest events), and
that the planted effects (profile → tastes, price vs budget → purchases, hour → categories, session drift) are
measurable in the generated tables. One small shop is generated per module."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from ncf_ray.data import schema as S
from ncf_ray.data.prepare import dedup_latest, encode_ids, split_leave_one_out
from ncf_ray.data.shop import (
    CART_DELAY_S,
    CART_TO_PURCHASE,
    CONTEXT_COLS,
    DAY,
    DEVICES,
    EVENTS,
    HOUR,
    ITEM_FEATURE_COLS,
    PURCHASE_DELAY_S,
    SHOP_T0,
    TEXT_COLS,
    USER_FEATURE_COLS,
    VIEW_TO_CART,
    ShopSpec,
    _without_overlap,
    generate_shop,
    shop_spec,
    write_shop,
)
from ncf_ray.data.sources import OK, ColumnSpec, FileFormat, read_file
from ncf_ray.errors import UserError

SMALL = ShopSpec(seed=3, users=500, items=400, interactions=40_000)


@pytest.fixture(scope="module")
def shop():
    return generate_shop(SMALL)


@pytest.fixture(scope="module")
def log(shop) -> pd.DataFrame:
    return shop.log.to_pandas()


def _views(log: pd.DataFrame) -> pd.DataFrame:
    return log[log["event"] == "view"]


def _category_shares(log: pd.DataFrame, items: pd.DataFrame, mask: np.ndarray) -> pd.Series:
    cats = items.set_index(S.ITEM_COL)["category"]
    shares = cats.loc[log.loc[mask, S.ITEM_COL]].value_counts(normalize=True)
    return shares.reindex(sorted(cats.unique()), fill_value=0.0)


def _split_distance(log: pd.DataFrame, items: pd.DataFrame, mask: np.ndarray) -> float:
    """L1 distance between the category shares of the rows in `mask` and the rest."""
    return float((_category_shares(log, items, mask) - _category_shares(log, items, ~mask)).abs().sum())


# -------------------------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_tables_and_another_seed_differs(shop):
    again = generate_shop(SMALL)
    assert again.log.equals(shop.log)
    assert again.items.equals(shop.items)
    assert again.users.equals(shop.users)
    assert np.array_equal(again.cold_items, shop.cold_items)
    other = generate_shop(ShopSpec(seed=4, users=500, items=400, interactions=40_000))
    assert not other.log.equals(shop.log)
    assert not other.items.equals(shop.items)


# --------------------------------------------------------------------------------------------- the tables
def test_tables_have_the_contract_columns_and_sizes(shop, log):
    assert shop.log.column_names == [S.USER_COL, S.ITEM_COL, S.TIME_COL, "event", "device"]
    assert shop.items.column_names == [S.ITEM_COL, *ITEM_FEATURE_COLS]
    assert shop.users.column_names == [S.USER_COL, *USER_FEATURE_COLS]
    assert set(TEXT_COLS) <= set(ITEM_FEATURE_COLS) and set(CONTEXT_COLS) <= set(shop.log.column_names)
    assert shop.items.num_rows == SMALL.items and shop.users.num_rows == SMALL.users
    # ~interactions events in all (views + carts + purchases).
    assert 0.9 * SMALL.interactions <= len(log) <= 1.1 * SMALL.interactions
    assert set(log["event"]) == set(EVENTS)
    assert set(log["device"]) <= set(DEVICES)
    assert log[S.USER_COL].between(1, SMALL.users).all()
    assert log[S.ITEM_COL].between(1, SMALL.items).all()
    # Times inside the window (a session begun on the last evening may run a little past it).
    assert log[S.TIME_COL].min() >= SHOP_T0
    assert log[S.TIME_COL].max() < SMALL.end + DAY
    # Sorted by user, then time.
    assert (np.diff(log[S.USER_COL].to_numpy()) >= 0).all()
    same_user = np.diff(log[S.USER_COL].to_numpy()) == 0
    assert (np.diff(log[S.TIME_COL].to_numpy())[same_user] >= 0).all()


def test_catalogue_brands_stay_in_few_categories_and_titles_name_brand_and_category(shop):
    items = shop.items.to_pandas()
    assert items["category"].nunique() == SMALL.categories
    assert (items.groupby("brand")["category"].nunique() <= 3).all()
    assert (items["price"] > 0).all()
    assert items.apply(lambda r: r["title"].startswith(r["brand"] + " "), axis=1).all()
    # Price levels differ by category (lognormal around a category level).
    medians = items.groupby("category")["price"].median()
    assert medians.max() > 5 * medians.min()


# -------------------------------------------------------------------------------------------------- funnel
def test_funnel_rates_are_within_tolerance_of_the_targets(log):
    n = log["event"].value_counts()
    assert abs(n["cart"] / n["view"] - VIEW_TO_CART) < 0.015
    assert abs(n["purchase"] / n["cart"] - CART_TO_PURCHASE) < 0.04


def test_carts_follow_a_view_and_purchases_a_cart_of_the_same_item_shortly_after(log):
    def previous(kind: str, of: str, delay: tuple[int, int]) -> None:
        later = log[log["event"] == of].reset_index()
        earlier = log[log["event"] == kind]
        pairs = later.merge(earlier, on=[S.USER_COL, S.ITEM_COL], suffixes=("", "_prev"))
        gap = pairs[S.TIME_COL] - pairs[f"{S.TIME_COL}_prev"]
        ok = pairs[(gap >= delay[0]) & (gap < delay[1])]["index"].unique()
        assert ok.size == len(later), f"{len(later) - ok.size} {of} rows without a {kind} {delay} s before"

    previous("view", "cart", CART_DELAY_S)
    previous("cart", "purchase", PURCHASE_DELAY_S)


def test_purchases_depend_on_price_against_budget(shop, log):
    """Among carted items, the pricier half of each category is bought clearly less often."""
    items = shop.items.to_pandas().set_index(S.ITEM_COL)
    rel = items["price"] / items.groupby("category")["price"].transform("median")
    carts = log[log["event"] == "cart"]
    bought = carts.merge(log[log["event"] == "purchase"][[S.USER_COL, S.ITEM_COL]].drop_duplicates(),
                         on=[S.USER_COL, S.ITEM_COL], how="left", indicator=True)["_merge"].eq("both")
    pricey = rel.loc[carts[S.ITEM_COL]].to_numpy() > 1.0
    assert bought[~pricey].mean() > bought[pricey].mean() + 0.10


def test_categories_convert_carts_to_purchases_at_different_rates(shop, log):
    cats = shop.items.to_pandas().set_index(S.ITEM_COL)["category"]
    per_cat = log[log["event"] != "view"].assign(cat=lambda d: cats.loc[d[S.ITEM_COL]].to_numpy())
    counts = per_cat.groupby(["cat", "event"]).size().unstack(fill_value=0)
    counts = counts[counts["cart"] >= 50]  # enough carts for a rate
    rate = counts["purchase"] / counts["cart"]
    assert len(rate) >= 5
    assert rate.max() > 2 * rate.min()


# ------------------------------------------------------------------------------------ leave-one-out structure
def test_every_user_has_at_least_three_distinct_items():
    for spec in (SMALL, ShopSpec(seed=1, users=50, items=60, interactions=100)):
        distinct = generate_shop(spec).log.to_pandas().groupby(S.USER_COL)[S.ITEM_COL].nunique()
        assert len(distinct) == spec.users
        assert distinct.min() >= 3


def test_new_items_have_no_events_before_release_and_are_only_latest_events(shop, log):
    assert len(shop.cold_items) == round(SMALL.cold_fraction * SMALL.items)
    assert (shop.release >= SMALL.cold_start).all() and (shop.release < SMALL.end).all()
    release = pd.Series(shop.release, index=shop.cold_items)
    cold_rows = log[log[S.ITEM_COL].isin(shop.cold_items)]
    assert len(cold_rows) > 0
    assert (cold_rows[S.TIME_COL].to_numpy() >= release.loc[cold_rows[S.ITEM_COL]].to_numpy()).all()
    assert (cold_rows[S.TIME_COL] >= SMALL.cold_start).all()
    # A user's events of a new item come after every other event of theirs.
    first_cold = cold_rows.groupby(S.USER_COL)[S.TIME_COL].min()
    warm_last = log[~log[S.ITEM_COL].isin(shop.cold_items)].groupby(S.USER_COL)[S.TIME_COL].max()
    assert (first_cold > warm_last.loc[first_cold.index]).all()


def test_after_leave_one_out_new_items_are_cold_in_train_and_present_in_test(shop, log):
    ucode, _ = encode_ids(shop.log[S.USER_COL])
    icode, ivocab = encode_ids(shop.log[S.ITEM_COL])
    times = log[S.TIME_COL].to_numpy()
    keep = dedup_latest(ucode, icode, times)
    split = split_leave_one_out(ucode[keep], icode[keep], times[keep], int(ucode.max()) + 1)
    cold_codes = np.flatnonzero(np.isin(ivocab.astype(np.int64), shop.cold_items))
    assert not np.isin(split.train_items, cold_codes).any()
    assert not np.isin(split.valid_items, cold_codes).any()
    in_test = np.isin(split.test_items, cold_codes)
    # Some users' test positive is a new item, most are not.
    assert 0.03 < in_test.mean() < 0.5


# ------------------------------------------------------------------------------------------ planted effects
def _user_distance(shares: pd.DataFrame, mask: np.ndarray) -> float:
    """L1 distance between the mean per-user category shares of the users in `mask` and of the others (each user
    counts once, so a few heavy users do not decide it)."""
    return float((shares[mask].mean() - shares[~mask].mean()).abs().sum())


def test_user_attributes_shift_category_tastes(shop, log):
    """Category shares of women vs men (and under-35s vs over-45s) differ at least twice as much as between random
    halves of the same users, for every one of 10 random splits."""
    views = _views(log)
    cats = shop.items.to_pandas().set_index(S.ITEM_COL)["category"]
    shares = pd.crosstab(views[S.USER_COL], cats.loc[views[S.ITEM_COL]].to_numpy(), normalize="index")
    users = shop.users.to_pandas().set_index(S.USER_COL).loc[shares.index]
    rng = np.random.default_rng(0)

    def noise(sub: pd.DataFrame) -> float:
        return max(_user_distance(sub, rng.random(len(sub)) < 0.5) for _ in range(10))

    assert _user_distance(shares, (users["gender"] == "f").to_numpy()) > 2 * noise(shares)
    young, old = ["18-24", "25-34"], ["45-54", "55+"]
    both = users["age_band"].isin(young + old).to_numpy()
    sub = shares[both]
    assert _user_distance(sub, users["age_band"][both].isin(young).to_numpy()) > 2 * noise(sub)


def test_time_of_day_shifts_category_preferences(shop, log):
    views = _views(log)
    hour = (views[S.TIME_COL].to_numpy() - SHOP_T0) % DAY // HOUR
    evening = hour >= 18
    daytime = (hour >= 8) & (hour < 17)
    rng = np.random.default_rng(1)
    half = rng.random(len(views)) < 0.5
    subset = evening | daytime
    noise = _split_distance(views[subset], shop.items.to_pandas(), half[subset])
    assert _split_distance(views[subset], shop.items.to_pandas(), evening[subset]) > 2 * noise


def test_evening_sessions_lean_to_mobile(log):
    hour = (log[S.TIME_COL].to_numpy() - SHOP_T0) % DAY // HOUR
    mobile = log["device"].to_numpy() == "mobile"
    assert mobile[hour >= 18].mean() > mobile[(hour >= 9) & (hour < 17)].mean() + 0.05


def test_sessions_drift_so_the_previous_view_predicts_the_next_category(shop, log):
    """Consecutive views of a user share a category much more often than two random views of the same user."""
    cats = shop.items.to_pandas().set_index(S.ITEM_COL)["category"]
    views = _views(log)
    user = views[S.USER_COL].to_numpy()
    cat = cats.loc[views[S.ITEM_COL]].to_numpy()
    same_user = user[1:] == user[:-1]
    consecutive = (cat[1:] == cat[:-1])[same_user].mean()
    shuffled = views.assign(cat=cat).groupby(S.USER_COL)["cat"].transform(
        lambda c: c.sample(frac=1.0, random_state=0).to_numpy()).to_numpy()
    baseline = (shuffled[1:] == cat[:-1])[same_user].mean()
    assert consecutive > baseline + 0.15


# ---------------------------------------------------------------------------------------------- files, spec
def test_write_shop_writes_three_csvs_that_read_back_to_the_tables(shop, tmp_path):
    paths = write_shop(shop, tmp_path / "shop")
    assert {p.name for p in paths.values()} == {"log.csv", "items.csv", "users.csv"}
    assert sorted(p.name for p in (tmp_path / "shop").iterdir()) == ["items.csv", "log.csv", "users.csv"]
    for name, table in (("log", shop.log), ("items", shop.items), ("users", shop.users)):
        back = pacsv.read_csv(paths[name])
        assert back.num_rows == table.num_rows
        assert back.column_names == table.column_names
        assert back.column(0).cast(pa.int64()).equals(table.column(0))
    assert pacsv.read_csv(paths["items"])["title"].equals(shop.items["title"])
    assert paths["log"].read_text().splitlines()[0] == "user_id,item_id,timestamp,event,device"


def test_log_csv_reads_cleanly_through_the_prepare_file_reader(tmp_path):
    data = generate_shop(ShopSpec(seed=5, users=60, items=90, interactions=2000))
    path = write_shop(data, tmp_path)["log"]
    tables = list(read_file(str(path), None, FileFormat("delimited", sep=","), ColumnSpec()))
    back = pa.concat_tables(tables)
    assert back.num_rows == data.log.num_rows
    assert set(back["_status"].to_pylist()) == {OK}


@pytest.mark.parametrize("bad", [dict(users=0), dict(interactions=0), dict(brands=5), dict(items=10),
                                 dict(cold_fraction=0.7), dict(cold_days=60), dict(cold_days=0),
                                 dict(min_views=2), dict(session_focus=1.5),
                                 dict(categories=2)])
def test_bad_spec_is_a_user_error_naming_the_value(bad):
    with pytest.raises(UserError) as exc:
        ShopSpec(**bad)
    assert str(next(iter(bad.values()))) in str(exc.value)


def test_no_new_items_when_cold_fraction_is_zero():
    data = generate_shop(ShopSpec(seed=2, users=100, items=100, interactions=3000, cold_fraction=0.0))
    assert data.cold_items.size == 0
    assert data.log.num_rows > 0


def test_shop_spec_builder_keeps_defaults_for_sizes_not_given():
    assert shop_spec() == ShopSpec()
    assert shop_spec(users=10, seed=4) == ShopSpec(users=10, seed=4)
    with pytest.raises(UserError, match="users=0"):
        shop_spec(users=0)


def test_sessions_of_a_user_are_pushed_apart_but_never_into_another_user():
    user = np.array([0, 0, 0, 1, 1])
    start = np.array([0, 5, 100, 3, 4])
    duration = np.array([10, 10, 10, 2, 2])
    assert _without_overlap(user, start, duration).tolist() == [0, 10, 100, 3, 5]
