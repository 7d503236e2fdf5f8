"""The embedded `synthetic-shop` source: a seeded e-commerce log with a view → cart → purchase funnel, an item
catalogue (category, brand, price, title), user profiles, device and time-of-day context, and new items released
only in the last days (cold in train, present in test).

Run by `ncf-ray prepare synthetic-shop --out DIR`; `write_shop` writes the same data as log.csv, items.csv and
users.csv for the file path (`ncf-ray prepare DIR/log.csv --event-col event --item-features DIR/items.csv ...`).

How the shop is made (vectorised numpy, no per-event Python; one seed → the same tables):
- catalogue: `categories` categories of varying size; `brands` brands, each selling in 1–3 categories; every item
  has a category, a brand, a price (lognormal around its category's level, times its brand's premium) and a
  Zipf-like popularity. A title is built from the brand, an adjective and a noun of the category, so a text
  column exists whose words carry the category and brand;
- users: age band, gender and region each shift the user's category tastes (plus individual noise); the age band
  also sets a spending budget (relative to a category's usual price) and device habits; brand tastes are
  individual noise plus a liking of premium brands that grows with the budget;
- sessions: each user joins on some day and visits in sessions spread over the rest of the window, at hours drawn
  from a daily curve (evening peak). The session's device depends on the user and on the hour (evening → mobile,
  weekday office hours → desktop). Evening, mobile and weekend each shift category preferences;
- drift: every session has a focus category; with probability `session_sticky` it keeps the previous session's
  focus, and within the session a view comes from the focus with probability `session_focus`, so recent behaviour
  predicts the next item. A view's item: category, then brand by the user's brand taste × that brand's item mass in
  the category, then an item by popularity;
- funnel: each view becomes a cart with mean rate VIEW_TO_CART and each cart a purchase with mean rate
  CART_TO_PURCHASE (calibrated in expectation, up to rare clipping at 1). Carting depends mildly, buying strongly, on
  the item's price against the user's budget, and buying also on the category (groceries convert, jewellery is
  browsed), so "likely to buy" differs from "likely to click". Cart and purchase rows are separate events of the
  same item, seconds to minutes after the view;
- new arrivals: `cold_fraction` of the items are released only in the last `cold_days` days and are never viewed
  before release. A user whose final session comes after a release ends it, with probability `new_arrival_rate`,
  with one more view (after all their other events) of a new item chosen by their category/brand tastes and the
  session focus, which runs through the funnel like any view. So new items are only ever a user's latest events:
  held out by leave-one-out, cold in train, predictable from their features;
- every user's first session starts with three views in three different categories (their strongest tastes, drawn
  without replacement), so each user has at least 3 distinct items (leave-one-out needs 3).

Timestamps are int seconds from SHOP_T0 (a Monday, 00:00 UTC), so hour of day and weekday read in UTC are the ones
the generator used. Stages draw from independent child seeds of SeedSequence(seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ncf_ray.atomic import replacing
from ncf_ray.data.schema import ITEM_COL, TIME_COL, USER_COL
from ncf_ray.errors import UserError

SHOP_T0 = 1_767_571_200  # 2026-01-05T00:00:00Z, a Monday: weekday = day index % 7 with Monday = 0
DAY = 86_400
HOUR = 3_600

# Raw-log column names of the shop beyond the schema's user/item/timestamp.
EVENT_NAME_COL = "event"
DEVICE_COL = "device"

EVENTS = ("view", "cart", "purchase")  # funnel order, weakest first (contract: meta["events"])
# How prepare should read the side tables and the log's extra columns (what `ncf-ray prepare synthetic-shop`
# passes as --item-features/--user-features/--text-cols/--context-cols): price is numeric (bucketised), title text.
ITEM_FEATURE_COLS = ("category", "brand", "price", "title")
TEXT_COLS = ("title",)
USER_FEATURE_COLS = ("age_band", "gender", "region")
CONTEXT_COLS = (DEVICE_COL,)
DEVICES = ("mobile", "desktop", "app")
AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55+")
AGE_SHARES = (0.18, 0.30, 0.24, 0.16, 0.12)
GENDERS = ("f", "m")
REGIONS = ("north", "south", "east", "west", "central", "coast", "mountain", "islands")

# Funnel targets (mean rates over all views / all carts; the generator calibrates to them in expectation).
VIEW_TO_CART = 0.12
CART_TO_PURCHASE = 0.40

SESSION_MEAN_VIEWS = 6.0  # views per session on average
VIEW_GAP_S = 75.0  # mean seconds between two views of a session
CART_DELAY_S = (10, 240)  # a cart follows its view by this many seconds (uniform)
PURCHASE_DELAY_S = (30, 900)  # a purchase follows its cart by this many seconds (uniform)
JOIN_SHARE = 0.7  # users join uniformly over the first 70% of the window

# Relative traffic by UTC hour 0..23: a night trough, a lunch bump, an evening peak.
HOUR_WEIGHTS = np.array([0.6, 0.4, 0.25, 0.2, 0.2, 0.3, 0.6, 1.0, 1.4, 1.6, 1.7, 1.8,
                         2.1, 2.0, 1.7, 1.6, 1.6, 1.8, 2.3, 2.8, 3.2, 3.1, 2.4, 1.3])
EVENING = (18, 23)  # hours [18, 23] count as evening
OFFICE = (9, 17)  # weekday hours [9, 17] favour the desktop

# Strengths of the effects (logit units).
ATTR_EFFECT = 0.9  # spread of the age/gender shifts of category tastes
REGION_EFFECT = 0.5
TASTE_NOISE = 1.0  # individual category taste spread
BRAND_NOISE = 1.0  # individual brand taste spread
CONTEXT_EFFECT = 0.9  # spread of the evening/mobile/weekend category shifts
CART_PRICE_SLOPE = 0.8  # carting: mild price effect
CART_BRAND_SLOPE = 0.4  # ... plus liking of the brand
BUY_PRICE_SLOPE = 4.0  # buying: strong price-vs-budget effect
ITEM_PRICE_NOISE = 0.45  # spread of an item's price around its category level × brand premium (log)
CONVERSION_SPREAD = 1.5  # categories differ in how often a cart is bought (groceries vs. jewellery)
NEW_FOCUS_BONUS = 1.5  # a new arrival in the session's focus category is this much likelier

# Words for titles: category name and nouns; adjectives; brand syllables.
CATEGORY_VOCAB = (
    ("shoes", "sneakers boots sandals"), ("phones", "phone smartphone handset"),
    ("laptops", "laptop notebook ultrabook"), ("audio", "headphones earbuds speaker"),
    ("kitchen", "blender kettle toaster"), ("furniture", "chair desk shelf"),
    ("beauty", "serum lipstick moisturizer"), ("toys", "puzzle blocks doll"),
    ("books", "novel cookbook atlas"), ("sports", "racket dumbbell yoga_mat"),
    ("garden", "hose planter shears"), ("pets", "leash kibble pet_bed"),
    ("jewelry", "ring necklace bracelet"), ("watches", "watch smartwatch chronograph"),
    ("bags", "backpack handbag suitcase"), ("gaming", "console controller gamepad"),
    ("baby", "stroller onesie bottle"), ("tools", "drill wrench toolkit"),
    ("outerwear", "jacket parka raincoat"), ("grocery", "coffee tea chocolate"),
)
ADJECTIVES = ("classic", "pro", "ultra", "mini", "smart", "eco", "deluxe", "essential", "light", "max",
              "vintage", "sport", "soft", "compact", "premium", "basic", "urban", "travel", "daily", "plus")
SYLLABLES = ("ka", "lo", "mi", "ra", "ven", "tor", "zi", "bel", "nox", "qua", "sol", "dri", "fen", "gal", "hum",
             "ix", "jor", "kel", "lum", "mar", "nim", "or", "pex", "rin", "sta", "tul", "vor", "wex", "yan", "zor")


@dataclass(frozen=True)
class ShopSpec:
    """Shape of the synthetic shop. Defaults are ML-1M-sized: 6,040 users, 3,700 items, ~1M events (views +
    carts + purchases; the total is approximate)."""

    seed: int = 0
    users: int = 6040
    items: int = 3700
    interactions: int = 1_000_000
    days: int = 60
    cold_fraction: float = 0.05
    cold_days: int = 3
    categories: int = 20
    brands: int = 150
    new_arrival_rate: float = 0.25  # P(a user's final session ends on a new item | one is out by then)
    session_focus: float = 0.7  # P(a view comes from the session's focus category)
    session_sticky: float = 0.5  # P(a session keeps the previous session's focus)
    min_views: int = 5  # views per user at least (the first session has >= 3)

    def __post_init__(self) -> None:
        if self.users <= 0 or self.interactions <= 0:
            raise UserError(f"synthetic-shop needs users > 0 and interactions > 0 "
                            f"(got users={self.users}, interactions={self.interactions})")
        if self.categories < 3 or self.brands < self.categories:
            raise UserError(f"synthetic-shop needs brands >= categories >= 3 "
                            f"(got categories={self.categories}, brands={self.brands})")
        if self.items < 3 * self.categories:
            raise UserError(f"synthetic-shop items={self.items} must be at least 3 per category "
                            f"(categories={self.categories})")
        if not 0.0 <= self.cold_fraction < 0.5:
            raise UserError(f"synthetic-shop cold_fraction={self.cold_fraction} must be in [0, 0.5)")
        if self.cold_days < 1 or self.days < self.cold_days + 1:
            raise UserError(f"synthetic-shop needs 1 <= cold_days < days (got cold_days={self.cold_days}, "
                            f"days={self.days})")
        if self.min_views < 3:
            raise UserError(f"synthetic-shop min_views={self.min_views} must be >= 3 (leave-one-out needs 3)")
        for name in ("new_arrival_rate", "session_focus", "session_sticky"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"synthetic-shop {name}={getattr(self, name)} must be in [0, 1]")

    @property
    def end(self) -> int:
        """First second after the window."""
        return SHOP_T0 + self.days * DAY

    @property
    def cold_start(self) -> int:
        """First second of the last `cold_days` days: no new item is released before it."""
        return SHOP_T0 + (self.days - self.cold_days) * DAY


@dataclass(frozen=True)
class ShopData:
    """The generated shop. `log`: user_id, item_id, timestamp (int64), event (view|cart|purchase), device; sorted
    by user, then time. `items`: item_id, category, brand, price, title. `users`: user_id, age_band, gender,
    region. Ids are 1-based ints. `cold_items`/`release`: ids of the new items and their release second (kept
    out of the items table: they describe the generator, not features a shop would have)."""

    log: pa.Table
    items: pa.Table
    users: pa.Table
    cold_items: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    release: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))


# ---------------------------------------------------------------------------------------------------- helpers
def _gumbel_argmax(rng: np.random.Generator, logits: np.ndarray, chunk: int = 1 << 17) -> np.ndarray:
    """One categorical draw per row of `logits` ([n, k], -inf = impossible), by the Gumbel-max trick, in chunks
    so that the noise never takes more than chunk*k floats."""
    out = np.empty(logits.shape[0], np.int64)
    for lo in range(0, logits.shape[0], chunk):
        block = logits[lo:lo + chunk]
        out[lo:lo + chunk] = np.argmax(block + rng.gumbel(size=block.shape), axis=1)
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _group_start(sorted_keys: np.ndarray, n: int) -> np.ndarray:
    """Index of the first row of each key 0..n-1 in a sorted key array (n+1 entries, CSR-style)."""
    return np.searchsorted(sorted_keys, np.arange(n + 1), side="left")


# -------------------------------------------------------------------------------------------------- catalogue
@dataclass(frozen=True)
class _Catalogue:
    category: np.ndarray  # [I] int
    brand: np.ndarray  # [I] int
    price: np.ndarray  # [I] float
    log_rel_price: np.ndarray  # [I] log(price / category level)
    log_pop: np.ndarray  # [I]
    cold: np.ndarray  # [I] bool
    release: np.ndarray  # [I] int seconds (SHOP_T0 for the catalogue on sale from the start)
    premium: np.ndarray  # [B] brand price premium (log)
    cat_base: np.ndarray  # [C] overall category appeal (log)
    conversion: np.ndarray  # [C] purchase logit shift of the category
    brand_names: list[str]
    titles: list[str]


def _category_names(n: int) -> list[str]:
    return [CATEGORY_VOCAB[c % len(CATEGORY_VOCAB)][0] + ("" if c < len(CATEGORY_VOCAB) else f"_{c // 20}")
            for c in range(n)]


def _brand_names(rng: np.random.Generator, n: int) -> list[str]:
    """Pronounceable unique brand names from 2–3 syllables."""
    k = rng.integers(2, 4, size=n)
    syl = rng.integers(0, len(SYLLABLES), size=(n, 3))
    names: list[str] = []
    seen: set[str] = set()
    for b in range(n):
        name = "".join(SYLLABLES[s] for s in syl[b, :k[b]]).capitalize()
        if name in seen:
            name = f"{name}{b}"
        seen.add(name)
        names.append(name)
    return names


def _catalogue(rng: np.random.Generator, spec: ShopSpec) -> _Catalogue:
    C, B, n_items = spec.categories, spec.brands, spec.items
    cat_base = rng.normal(0.0, 0.5, size=C)
    # Category sizes follow their appeal, at least 3 items each; item ids in random order of category.
    floor = 3
    sizes = floor + rng.multinomial(n_items - floor * C, np.exp(cat_base) / np.exp(cat_base).sum())
    category = rng.permutation(np.repeat(np.arange(C), sizes))

    # Brands: a home category (all categories covered since B >= C), then a second/third with prob 0.5/0.2.
    sells = np.zeros((B, C), bool)
    home = rng.permutation(np.arange(B) % C)
    sells[np.arange(B), home] = True
    for p in (0.5, 0.2):
        extra = rng.random(B) < p
        sells[np.flatnonzero(extra), rng.integers(0, C, size=int(extra.sum()))] = True
    brand_size = rng.lognormal(0.0, 0.8, size=B)
    brand_logits = np.where(sells.T[category], np.log(brand_size)[None, :], -np.inf)  # [I, B]
    brand = _gumbel_argmax(rng, brand_logits)

    cat_level = rng.uniform(math.log(8.0), math.log(400.0), size=C)
    premium = rng.normal(0.0, 0.35, size=B)
    log_price = cat_level[category] + premium[brand] + rng.normal(0.0, ITEM_PRICE_NOISE, size=n_items)
    price = np.maximum(1.0, np.round(np.exp(log_price))) - 0.01  # shop prices: 19.99
    log_rel_price = np.log(price) - cat_level[category]

    rank = rng.permutation(n_items)
    log_pop = -0.8 * np.log(rank + 1.0)

    # New items: never the most popular item of a category, so every category keeps something on sale from day 0.
    top_of_cat = np.full(C, -1)
    order = np.argsort(log_pop)  # ascending: the last write per category is its most popular item
    top_of_cat[category[order]] = order
    candidates = np.setdiff1d(np.arange(n_items), top_of_cat)
    n_cold = min(int(round(spec.cold_fraction * n_items)), candidates.size)
    cold = np.zeros(n_items, bool)
    cold[rng.choice(candidates, size=n_cold, replace=False)] = True
    # Released in the last cold_days, early enough (half a day before the end) that some sessions follow.
    release = np.full(n_items, SHOP_T0, np.int64)
    span = spec.cold_days * DAY - DAY // 2
    release[cold] = spec.cold_start + rng.integers(0, span, size=n_cold)

    brand_names = _brand_names(rng, B)
    nouns = [CATEGORY_VOCAB[c % len(CATEGORY_VOCAB)][1].split() for c in range(C)]
    adj = rng.integers(0, len(ADJECTIVES), size=n_items)
    noun = rng.integers(0, 3, size=n_items)
    titles = [f"{brand_names[b]} {ADJECTIVES[a]} {nouns[c][k].replace('_', ' ')}"
              for b, a, c, k in zip(brand.tolist(), adj.tolist(), category.tolist(), noun.tolist(), strict=True)]
    conversion = rng.normal(0.0, CONVERSION_SPREAD, size=C)
    return _Catalogue(category, brand, price, log_rel_price, log_pop, cold, release, premium, cat_base, conversion,
                      brand_names, titles)


# ---------------------------------------------------------------------------------------------------- users
@dataclass(frozen=True)
class _Users:
    age: np.ndarray  # [U] index into AGE_BANDS
    gender: np.ndarray  # [U]
    region: np.ndarray  # [U]
    taste: np.ndarray  # [U, C] category logits
    brand_aff: np.ndarray  # [U, B] brand logits
    log_budget: np.ndarray  # [U] spending level relative to a category's usual price (log)
    device_pref: np.ndarray  # [U, 3] device logits


def _users(rng: np.random.Generator, spec: ShopSpec, cat: _Catalogue) -> _Users:
    U, C, B = spec.users, spec.categories, spec.brands
    age = rng.choice(len(AGE_BANDS), size=U, p=np.array(AGE_SHARES))
    gender = rng.integers(0, len(GENDERS), size=U)
    region = rng.integers(0, len(REGIONS), size=U)
    # Age moves each category's appeal along a trend from the youngest band to the oldest (gaming down, garden
    # up, ...), plus a little band-specific noise; gender and region shift each category independently.
    age_pos = np.linspace(-1.0, 1.0, len(AGE_BANDS))
    age_eff = np.outer(age_pos, rng.normal(0.0, ATTR_EFFECT, size=C)) + rng.normal(0.0, 0.3, size=(len(AGE_BANDS), C))
    gender_eff = rng.normal(0.0, ATTR_EFFECT, size=(len(GENDERS), C))
    region_eff = rng.normal(0.0, REGION_EFFECT, size=(len(REGIONS), C))
    taste = (cat.cat_base[None, :] + age_eff[age] + gender_eff[gender] + region_eff[region]
             + rng.normal(0.0, TASTE_NOISE, size=(U, C)))
    # Budget rises with age to mid-life; region adds a little.
    age_budget = np.array([-0.35, 0.0, 0.2, 0.3, 0.15])
    log_budget = age_budget[age] + rng.normal(0.0, 0.1, size=len(REGIONS))[region] + rng.normal(0.0, 0.4, size=U)
    brand_aff = rng.normal(0.0, BRAND_NOISE, size=(U, B)) + 2.0 * log_budget[:, None] * cat.premium[None, :]
    # Young users lean to mobile/app, older to desktop.
    age_device = np.array([[0.8, -0.6, 0.6], [0.5, -0.2, 0.4], [0.1, 0.2, 0.1], [-0.3, 0.6, -0.2],
                           [-0.6, 0.9, -0.5]])
    device_pref = age_device[age] + rng.normal(0.0, 0.7, size=(U, len(DEVICES)))
    return _Users(age, gender, region, taste, brand_aff, log_budget, device_pref)


# ------------------------------------------------------------------------------------------------- sessions
@dataclass(frozen=True)
class _Sessions:
    user: np.ndarray  # [S] sorted by user, then start
    start: np.ndarray  # [S] int seconds
    length: np.ndarray  # [S] views
    view_offset: np.ndarray  # [sum(length)] seconds from its session's start to each view, session by session
    device: np.ndarray  # [S] index into DEVICES
    ctx_shift: np.ndarray  # [S, C] category logit shift from hour/device/weekday
    focus: np.ndarray  # [S] focus category


def _sessions(rng: np.random.Generator, spec: ShopSpec, users: _Users) -> _Sessions:
    U, C = spec.users, spec.categories
    # Views to reach ~interactions events once carts and purchases are added.
    views_total = spec.interactions / (1.0 + VIEW_TO_CART * (1.0 + CART_TO_PURCHASE))
    share = rng.lognormal(0.0, 1.0, size=U)
    extra = max(0.0, views_total - spec.min_views * U)
    views = spec.min_views + np.floor(share / share.sum() * extra).astype(np.int64)
    n_sess = np.maximum(1, np.round(views / SESSION_MEAN_VIEWS).astype(np.int64))

    user = np.repeat(np.arange(U), n_sess)
    join = np.floor(rng.random(U) * JOIN_SHARE * spec.days).astype(np.int64)
    day = join[user] + np.floor(rng.random(user.size) * (spec.days - join[user])).astype(np.int64)
    hour = rng.choice(24, size=user.size, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
    start = SHOP_T0 + day * DAY + hour * HOUR + rng.integers(0, HOUR, size=user.size)
    order = np.lexsort((start, user))
    user, start = user[order], start[order]

    # Split each user's views over their sessions by exponential weights, at least one view each.
    sess_start = _group_start(user, U)
    w = rng.exponential(1.0, size=user.size)
    w_sum = np.add.reduceat(w, sess_start[:-1])
    # Randomised rounding keeps the total close to the wanted views.
    length = 1 + np.floor(w / w_sum[user] * (views[user] - n_sess[user]) + rng.random(user.size)).astype(np.int64)
    first = sess_start[:-1]
    length[first] = np.maximum(length[first], 3)

    # Views follow each other by exponential gaps; a session lasts until its last view's purchase could come, and
    # the next session of the user starts no earlier (so sessions never interleave).
    v_first = np.concatenate([[0], np.cumsum(length)[:-1]])
    n_views = int(length.sum())
    in_session = np.arange(n_views) - np.repeat(v_first, length)
    gaps = np.where(in_session > 0, rng.exponential(VIEW_GAP_S, size=n_views).astype(np.int64) + 5, 0)
    cum = np.cumsum(gaps)
    view_offset = cum - np.repeat(cum[v_first], length)
    duration = view_offset[v_first + length - 1] + CART_DELAY_S[1] + PURCHASE_DELAY_S[1]
    start = _without_overlap(user, start, duration)

    day = (start - SHOP_T0) // DAY
    hour = (start - SHOP_T0) % DAY // HOUR
    weekday = day % 7
    evening = (hour >= EVENING[0]) & (hour <= EVENING[1])
    office = (weekday < 5) & (hour >= OFFICE[0]) & (hour <= OFFICE[1])
    dev_logits = users.device_pref[user].copy()
    dev_logits[:, DEVICES.index("mobile")] += 0.7 * evening
    dev_logits[:, DEVICES.index("desktop")] += 0.7 * office
    device = _gumbel_argmax(rng, dev_logits)

    eve_shift, mob_shift, wkd_shift = rng.normal(0.0, CONTEXT_EFFECT, size=(3, C))
    ctx_shift = (evening[:, None] * eve_shift[None, :] + (device == 0)[:, None] * mob_shift[None, :]
                 + (weekday >= 5)[:, None] * (0.5 * wkd_shift)[None, :])

    # Sticky focus: a session keeps the previous one's focus with prob session_sticky (a user's first session
    # always draws afresh). `source` = the latest session at or before this one that drew afresh.
    fresh = _gumbel_argmax(rng, users.taste[user] + ctx_shift)
    keep = rng.random(user.size) < spec.session_sticky
    keep[first] = False
    source = np.maximum.accumulate(np.where(keep, 0, np.arange(user.size)))
    return _Sessions(user, start, length, view_offset, device, ctx_shift, fresh[source])


def _without_overlap(user: np.ndarray, start: np.ndarray, duration: np.ndarray) -> np.ndarray:
    """Session starts (sorted by user, then start) moved later where needed so that each session of a user starts
    after the previous one ends: start'[s] = max(start[s], start'[s-1] + duration[s-1]). Unrolled, that is
    D[s] + max over the user's j <= s of (start[j] - D[j]) with D the exclusive cumsum of durations: one
    maximum.accumulate, kept inside each user by adding user * 2**40 (far more than any time difference)."""
    shift = user.astype(np.int64) << 40
    before = np.concatenate([[0], np.cumsum(duration)[:-1]])
    return np.maximum.accumulate(start - before + shift) - shift + before


# ---------------------------------------------------------------------------------------------------- views
def _pick_items(rng: np.random.Generator, spec: ShopSpec, cat: _Catalogue, users: _Users,
                user: np.ndarray, category: np.ndarray) -> np.ndarray:
    """An item on sale from day 0 for each (user, category): brand by the user's brand taste × the brand's
    popularity mass in that category, then an item of that (category, brand) by popularity."""
    C, B = spec.categories, spec.brands
    warm = ~cat.cold
    pop = np.exp(cat.log_pop) * warm
    mass = np.zeros((C, B))
    np.add.at(mass, (cat.category, cat.brand), pop)
    # Padded brand lists per category keep the brand draw at [n, max brands in a category].
    cat_brands = [np.flatnonzero(mass[c] > 0) for c in range(C)]
    width = max(b.size for b in cat_brands)
    padded = np.zeros((C, width), np.int64)
    valid = np.zeros((C, width), bool)
    for c, b in enumerate(cat_brands):
        padded[c, :b.size], valid[c, :b.size] = b, True
    log_mass = np.where(valid, np.log(np.where(valid, mass[np.arange(C)[:, None], padded], 1.0)), -np.inf)

    brand = np.empty(user.size, np.int64)
    chunk = 1 << 17
    for lo in range(0, user.size, chunk):
        u, c = user[lo:lo + chunk], category[lo:lo + chunk]
        cand = padded[c]
        logits = users.brand_aff[u[:, None], cand] + log_mass[c]
        brand[lo:lo + chunk] = cand[np.arange(u.size), _gumbel_argmax(rng, logits)]

    # Within-(category, brand) popularity CDF shifted by the pair's key: one searchsorted finds all items.
    key = cat.category * B + cat.brand
    items_sorted = np.flatnonzero(warm)[np.argsort(key[warm], kind="stable")]
    k_sorted, p_sorted = key[items_sorted], pop[items_sorted]
    cum = np.cumsum(p_sorted)
    starts = np.searchsorted(k_sorted, k_sorted, side="left")
    before = np.where(starts > 0, cum[np.maximum(starts - 1, 0)], 0.0)
    ends = np.searchsorted(k_sorted, k_sorted, side="right")
    within = (cum - before) / (cum[ends - 1] - before)
    cdf = k_sorted + within
    target = category * B + brand + np.maximum(rng.random(user.size), 1e-12)
    pos = np.minimum(np.searchsorted(cdf, target, side="left"), items_sorted.size - 1)
    return items_sorted[pos]


def _views(rng: np.random.Generator, spec: ShopSpec, cat: _Catalogue, users: _Users,
           sess: _Sessions) -> tuple[np.ndarray, ...]:
    """(session, user, ts, item) of every view, in session order."""
    n = int(sess.length.sum())
    v_sess = np.repeat(np.arange(sess.user.size), sess.length)
    v_user = sess.user[v_sess]
    offsets = np.concatenate([[0], np.cumsum(sess.length)[:-1]])
    ts = sess.start[v_sess] + sess.view_offset

    off_focus = rng.random(n) >= spec.session_focus
    category = sess.focus[v_sess].copy()
    idx = np.flatnonzero(off_focus)
    category[idx] = _gumbel_argmax(rng, users.taste[v_user[idx]] + sess.ctx_shift[v_sess[idx]])
    # First three views of a user's first session: their three strongest tastes, drawn without replacement, so
    # each user has >= 3 distinct items.
    first_sess = _group_start(sess.user, spec.users)[:-1]
    top3 = np.argsort(-(users.taste + rng.gumbel(size=users.taste.shape)), axis=1)[:, :3]
    for k in range(3):
        category[offsets[first_sess] + k] = top3[:, k]
    return v_sess, v_user, ts, _pick_items(rng, spec, cat, users, v_user, category)


def _new_arrivals(rng: np.random.Generator, spec: ShopSpec, cat: _Catalogue, users: _Users, sess: _Sessions,
                  last_ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """With prob new_arrival_rate per user, one more view at the end of their final session, after every other
    event of theirs (`last_ts` [U]), of a new item already released then, chosen by the user's tastes and the
    session's focus. Returns (session, ts, item) of these views."""
    cold_ids = np.flatnonzero(cat.cold)
    none = np.empty(0, np.int64)
    if cold_ids.size == 0:
        return none, none, none
    last_sess = _group_start(sess.user, spec.users)[1:] - 1
    ts = last_ts + rng.exponential(VIEW_GAP_S, size=spec.users).astype(np.int64) + 5
    eligible = (ts >= cat.release[cold_ids].min()) & (rng.random(spec.users) < spec.new_arrival_rate)
    s, ts = last_sess[eligible], ts[eligible]
    u = sess.user[s]
    c_cold = cat.category[cold_ids]
    logits = (users.taste[u][:, c_cold] + sess.ctx_shift[s][:, c_cold]
              + users.brand_aff[u][:, cat.brand[cold_ids]]
              + NEW_FOCUS_BONUS * (c_cold[None, :] == sess.focus[s][:, None]) + cat.log_pop[cold_ids][None, :])
    logits = np.where(cat.release[cold_ids][None, :] <= ts[:, None], logits, -np.inf)
    return s, ts, cold_ids[_gumbel_argmax(rng, logits)]


# --------------------------------------------------------------------------------------------------- funnel
@dataclass(frozen=True)
class _Funnel:
    carts: np.ndarray  # indices of the views that become carts
    cart_ts: np.ndarray
    buys: np.ndarray  # indices into `carts` of the carts that become purchases
    buy_ts: np.ndarray
    scale: tuple[float, float]  # calibration factors of the cart and purchase propensities


def _funnel(rng: np.random.Generator, cat: _Catalogue, users: _Users, user: np.ndarray, item: np.ndarray,
            ts: np.ndarray, scale: tuple[float, float] | None = None) -> _Funnel:
    """Which views become carts and which carts purchases, with their times. Propensities are calibrated so the
    mean rates are VIEW_TO_CART and CART_TO_PURCHASE over these views, unless `scale` (from an earlier call)
    is given."""
    fit = users.log_budget[user] - cat.log_rel_price[item]  # > 0: affordable for this user
    brand_like = users.brand_aff[user, cat.brand[item]]
    raw_cart = _sigmoid(CART_PRICE_SLOPE * fit + CART_BRAND_SLOPE * brand_like)
    s_cart = scale[0] if scale else VIEW_TO_CART / max(raw_cart.mean(), 1e-12)
    carts = np.flatnonzero(rng.random(user.size) < np.minimum(1.0, s_cart * raw_cart))
    cart_ts = ts[carts] + rng.integers(*CART_DELAY_S, size=carts.size)
    raw_buy = _sigmoid(BUY_PRICE_SLOPE * fit[carts] + cat.conversion[cat.category[item[carts]]])
    s_buy = scale[1] if scale else CART_TO_PURCHASE / max(raw_buy.mean(), 1e-12) if raw_buy.size else 1.0
    buys = np.flatnonzero(rng.random(carts.size) < np.minimum(1.0, s_buy * raw_buy))
    buy_ts = cart_ts[buys] + rng.integers(*PURCHASE_DELAY_S, size=buys.size)
    return _Funnel(carts, cart_ts, buys, buy_ts, (float(s_cart), float(s_buy)))


def _events(f: _Funnel, n_views: int, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(view index, event code, ts) of all rows: the views, then their carts, then purchases."""
    view_of = np.concatenate([np.arange(n_views), f.carts, f.carts[f.buys]])
    event = np.concatenate([np.zeros(n_views, np.int8), np.ones(f.carts.size, np.int8),
                            np.full(f.buys.size, 2, np.int8)])
    return view_of, event, np.concatenate([ts, f.cart_ts, f.buy_ts])


# ----------------------------------------------------------------------------------------------------- main
def _strings(codes: np.ndarray, names: list[str] | tuple[str, ...]) -> pa.Array:
    """A string column from small-int codes without a Python string per row."""
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(list(names))).cast(pa.string())


def generate_shop(spec: ShopSpec) -> ShopData:
    """The whole shop for `spec` (same spec → identical tables)."""
    r_cat, r_users, r_sess, r_views, r_new, r_funnel = (
        np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(6))
    cat = _catalogue(r_cat, spec)
    users = _users(r_users, spec, cat)
    sess = _sessions(r_sess, spec, users)
    v_sess, v_user, v_ts, v_item = _views(r_views, spec, cat, users, sess)
    warm = _funnel(r_funnel, cat, users, v_user, v_item, v_ts)
    view_of, event, ts = _events(warm, v_user.size, v_ts)
    last_ts = np.full(spec.users, SHOP_T0, np.int64)
    np.maximum.at(last_ts, v_user[view_of], ts)
    # New arrivals come last, after everything else the user did; same funnel, same calibration.
    n_sess, n_ts, n_item = _new_arrivals(r_new, spec, cat, users, sess, last_ts)
    n_user = sess.user[n_sess]
    new = _funnel(r_funnel, cat, users, n_user, n_item, n_ts, scale=warm.scale)
    n_view_of, n_event, n_row_ts = _events(new, n_user.size, n_ts)

    v_sess, v_user, v_item = (np.concatenate([a, b]) for a, b in ((v_sess, n_sess), (v_user, n_user),
                                                                   (v_item, n_item)))
    view_of = np.concatenate([view_of, n_view_of + v_ts.size])
    event, ts = np.concatenate([event, n_event]), np.concatenate([ts, n_row_ts])
    order = np.lexsort((event, ts, v_user[view_of]))
    view_of, event, ts = view_of[order], event[order], ts[order]
    log = pa.table({
        USER_COL: pa.array(v_user[view_of] + 1, pa.int64()),
        ITEM_COL: pa.array(v_item[view_of] + 1, pa.int64()),
        TIME_COL: pa.array(ts, pa.int64()),
        EVENT_NAME_COL: _strings(event, EVENTS),
        DEVICE_COL: _strings(sess.device[v_sess[view_of]], DEVICES),
    })
    items = pa.table({
        ITEM_COL: pa.array(np.arange(1, spec.items + 1), pa.int64()),
        "category": _strings(cat.category, _category_names(spec.categories)),
        "brand": _strings(cat.brand, cat.brand_names),
        "price": pa.array(np.round(cat.price, 2), pa.float64()),
        "title": pa.array(cat.titles, pa.string()),
    })
    users_t = pa.table({
        USER_COL: pa.array(np.arange(1, spec.users + 1), pa.int64()),
        "age_band": _strings(users.age, AGE_BANDS),
        "gender": _strings(users.gender, GENDERS),
        "region": _strings(users.region, REGIONS),
    })
    cold_ids = np.flatnonzero(cat.cold)
    return ShopData(log, items, users_t, cold_ids + 1, cat.release[cold_ids])


def write_shop(data: ShopData, directory: str | Path) -> dict[str, Path]:
    """Write log.csv, items.csv and users.csv into `directory` (each atomically); returns their paths."""
    directory = Path(directory)
    paths = {}
    for name, table in (("log", data.log), ("items", data.items), ("users", data.users)):
        path = directory / f"{name}.csv"
        with replacing(path) as tmp:
            # No quotes (pyarrow would quote every string): plain files any CSV reader takes. No generated value
            # holds a comma, quote or newline; one that did would raise here, a bug of this module.
            pacsv.write_csv(table, tmp, pacsv.WriteOptions(quoting_style="none", quoting_header="none"))
        paths[name] = path
    return paths


def shop_spec(users: int | None = None, items: int | None = None, interactions: int | None = None,
              seed: int = 0) -> ShopSpec:
    """A ShopSpec from CLI sizes (`ncf-ray prepare synthetic-shop --users --items --interactions --seed`); None
    keeps the ML-1M-sized default."""
    sizes = {"users": users, "items": items, "interactions": interactions}
    return ShopSpec(seed=seed, **{k: v for k, v in sizes.items() if v is not None})
