"""The embedded `synthetic` source: a seeded, MovieLens-shaped implicit-feedback log.

Run by `ncf-ray prepare synthetic --out DIR [--users --items --interactions --seed]`.

How a log is made (all vectorised numpy, one block of users at a time, so 20M rows never sit in one array):
- items belong to one of `topics` latent tastes; each item has a power-law popularity weight (Zipf-like);
- each user likes a few topics. Their taste *drifts*: an early topic mix and a late one that swaps some topics, and
  each interaction draws from the early or late mix with probability given by how far through the user's active
  period it falls. So the latest interactions (valid/test) come mostly from the late mix;
- an interaction picks, with probability `popularity_mix`, an item by global popularity, else a topic from the
  user's mix and an item within that topic by popularity. A model that learns the user's topics (a rank-`topics`
  taste model) clearly beats the popularity ranking, which is what NCF needs to show;
- per-user counts are heavy-tailed (lognormal), at least `min_per_user`; (user, item) pairs are distinct;
- timestamps: each user is active over a random window inside a 3-year span; times are int seconds.

Block b is generated from SeedSequence([seed, b]) and the global tables (item topics, popularity, user counts)
from SeedSequence([seed]), so the log depends only on the spec, never on how Ray schedules the blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ncf_ray.data.schema import ITEM_COL, TIME_COL, USER_COL
from ncf_ray.errors import UserError

T0 = 946_684_800  # 2000-01-01T00:00:00Z: MovieLens-era clock
SPAN = 3 * 365 * 86_400
DAY = 86_400


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of the synthetic log. Defaults match MovieLens-1M (6,040 users, 3,706 items, ~1M interactions)."""

    users: int = 6040
    items: int = 3706
    interactions: int = 1_000_000
    seed: int = 0
    topics: int = 24
    topics_per_user: int = 3
    popularity_mix: float = 0.25
    zipf_alpha: float = 0.9
    min_per_user: int = 5
    rows_per_block: int = 250_000  # ~6 MB per block of int64 columns; sets how many Ray tasks generate the log

    def __post_init__(self) -> None:
        if self.users <= 0 or self.items <= 1 or self.interactions <= 0:
            raise UserError(
                f"synthetic needs users > 0, items > 1, interactions > 0 "
                f"(got users={self.users}, items={self.items}, interactions={self.interactions})"
            )
        if self.interactions > self.users * self.items // 2:
            raise UserError(
                f"synthetic interactions={self.interactions} is more than half of users*items="
                f"{self.users * self.items}: pairs could not stay distinct"
            )

    @property
    def users_per_block(self) -> int:
        return max(64, math.ceil(self.users * self.rows_per_block / self.interactions))

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.users / self.users_per_block)


@dataclass(frozen=True)
class _Globals:
    """Tables shared by every block; cheap to rebuild (O(users + items)) in each Ray task."""

    item_topic_cdf: np.ndarray  # per item (sorted by topic): topic + within-topic popularity CDF, monotone
    item_by_topic: np.ndarray  # item ids sorted by topic, aligned with item_topic_cdf
    pop_cdf: np.ndarray  # global popularity CDF by item id
    user_counts: np.ndarray  # interactions per user
    user_start: np.ndarray  # first active second per user
    user_span: np.ndarray  # active seconds per user


def _globals(spec: SyntheticSpec) -> _Globals:
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed]))
    n_items, n_users = spec.items, spec.users
    # Power-law popularity over a random item order, so item id says nothing about popularity.
    rank = rng.permutation(n_items)
    weight = (rank + 1.0) ** -spec.zipf_alpha
    pop_cdf = np.cumsum(weight)
    pop_cdf /= pop_cdf[-1]

    topic = rng.integers(0, spec.topics, size=n_items)
    item_by_topic = np.argsort(topic, kind="stable")
    t_sorted, w_sorted = topic[item_by_topic], weight[item_by_topic]
    # Within-topic CDF in (0, 1], shifted by the topic number: one searchsorted(topic + u) finds an item of that
    # topic drawn by popularity, for all draws at once.
    cum = np.cumsum(w_sorted)
    starts = np.searchsorted(t_sorted, np.arange(spec.topics), side="left")
    ends = np.searchsorted(t_sorted, np.arange(spec.topics), side="right")
    before = np.where(starts > 0, cum[np.maximum(starts - 1, 0)], 0.0)
    total = np.where(ends > starts, cum[np.maximum(ends - 1, 0)] - before, 1.0)
    within = (cum - before[t_sorted]) / total[t_sorted]
    item_topic_cdf = t_sorted + within

    # Heavy-tailed activity: lognormal shares of what is left after everyone's minimum.
    floor = min(spec.min_per_user, max(1, spec.interactions // n_users))
    cap = max(floor, n_items // 2)
    share = rng.lognormal(0.0, 1.0, size=n_users)
    extra = max(0, spec.interactions - floor * n_users)
    counts = floor + np.floor(share / share.sum() * extra).astype(np.int64)
    counts = np.minimum(counts, cap)

    span = np.clip(rng.lognormal(math.log(120 * DAY), 1.2, size=n_users), DAY, SPAN).astype(np.int64)
    start = T0 + (rng.random(n_users) * (SPAN - span)).astype(np.int64)
    return _Globals(item_topic_cdf, item_by_topic, pop_cdf, counts, start, span)


def _user_tastes(rng: np.random.Generator, want: np.ndarray, spec: SyntheticSpec) -> tuple[np.ndarray, ...]:
    """Early and late topic sets per user ([n, k] each) and the cumulative topic weights ([n, k]).

    Heavy users get more topics (up to 4x topics_per_user), so that their many distinct items stay plausible.
    The late set keeps the first topic and redraws the rest: the drift in tastes."""
    n = want.size
    k = min(4 * spec.topics_per_user, spec.topics)
    early = rng.integers(0, spec.topics, size=(n, k))
    late = early.copy()
    late[:, 1:] = rng.integers(0, spec.topics, size=(n, k - 1))
    items_per_topic = spec.items / spec.topics
    active = np.clip(np.ceil(want * 2.0 / items_per_topic), min(spec.topics_per_user, k), k).astype(np.int64)
    # Dirichlet-like weights through normalised exponentials; slots past `active` get none.
    w = rng.exponential(1.0, size=(n, k)) * (np.arange(k)[None, :] < active[:, None])
    w_cdf = np.cumsum(w, axis=1)
    w_cdf /= w_cdf[:, -1:]
    return early, late, w_cdf


def _draw(rng: np.random.Generator, g: _Globals, spec: SyntheticSpec, local_user: np.ndarray,
          tastes: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One candidate item per entry of `local_user`, with its position in the user's active period."""
    early, late, w_cdf = tastes
    m = local_user.size
    pos = rng.random(m)  # drives both the timestamp and the taste drift
    slot = np.minimum((rng.random(m)[:, None] > w_cdf[local_user]).sum(axis=1), early.shape[1] - 1)
    topic = np.where(rng.random(m) < pos, late[local_user, slot], early[local_user, slot])
    by_topic = g.item_by_topic[
        np.minimum(np.searchsorted(g.item_topic_cdf, topic + rng.random(m), side="left"), g.item_by_topic.size - 1)
    ]
    by_pop = np.minimum(np.searchsorted(g.pop_cdf, rng.random(m), side="left"), spec.items - 1)
    return np.where(rng.random(m) < spec.popularity_mix, by_pop, by_topic), pos


def generate_block(spec: SyntheticSpec, block: int) -> pa.Table:
    """The interactions of users [block * users_per_block, ...) as a table (user_id, item_id, timestamp), int64,
    sorted by user then time. Ids are 1-based like MovieLens."""
    g = _globals(spec)
    lo = block * spec.users_per_block
    hi = min(spec.users, lo + spec.users_per_block)
    n_users = max(0, hi - lo)
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, block]))
    want = g.user_counts[lo:hi]
    tastes = _user_tastes(rng, want, spec)

    users = np.empty(0, np.int64)
    items = np.empty(0, np.int64)
    pos = np.empty(0, np.float64)
    short = want.copy()
    # A few rounds of over-drawing: each keeps the first draw of every (user, item) pair and tops up the users
    # still short of their count. Heavy users may end a little short; that is fine ("mostly" distinct is exact
    # here, counts are approximate).
    for _ in range(6):
        if not short.any():
            break
        draws = np.where(short > 0, short + np.ceil(short * 0.3).astype(np.int64) + 4, 0)
        lu = np.repeat(np.arange(n_users), draws)
        it, p = _draw(rng, g, spec, lu, tastes)
        users, items, pos = np.concatenate([users, lu]), np.concatenate([items, it]), np.concatenate([pos, p])
        key = users * np.int64(spec.items) + items
        _, first = np.unique(key, return_index=True)
        # Back to draw order (random): earlier rounds first, grouped per user by a stable sort on user.
        first.sort()
        first = first[np.argsort(users[first], kind="stable")]
        u_kept = users[first]
        group_start = np.searchsorted(u_kept, np.arange(n_users), side="left")
        rank = np.arange(first.size) - group_start[u_kept]
        keep = first[rank < want[u_kept]]
        users, items, pos = users[keep], items[keep], pos[keep]
        short = want - np.bincount(users, minlength=n_users)

    ts = g.user_start[lo + users] + (pos * g.user_span[lo + users]).astype(np.int64)
    order = np.lexsort((items, ts, users))
    return pa.table({
        USER_COL: pa.array(lo + users[order] + 1, pa.int64()),
        ITEM_COL: pa.array(items[order] + 1, pa.int64()),
        TIME_COL: pa.array(ts[order], pa.int64()),
    })


def iter_synthetic(spec: SyntheticSpec) -> Iterator[pa.Table]:
    """All blocks in order, on this process (tests, small logs). The Ray path is `synthetic_dataset`."""
    for b in range(spec.n_blocks):
        yield generate_block(spec, b)


def _generate_batch(batch: dict[str, np.ndarray], spec: SyntheticSpec) -> pa.Table:
    """map_batches body: each input row is a block number; returns those blocks' interactions."""
    return pa.concat_tables([generate_block(spec, int(b)) for b in batch["id"]])


def synthetic_dataset(spec: SyntheticSpec) -> Any:
    """A Ray Dataset of the log, generated in parallel: one Ray task per block, each seeded by its block number."""
    import ray.data

    n = spec.n_blocks
    return ray.data.range(n, override_num_blocks=n).map_batches(
        _generate_batch, batch_size=1, batch_format="numpy", fn_kwargs={"spec": spec}
    )


def synthetic_spec(source: str, users: int | None = None, items: int | None = None,
                   interactions: int | None = None, seed: int = 0) -> SyntheticSpec | None:
    """The one builder of a SyntheticSpec from flags (`ncf-ray prepare`, the pipeline). None sizes keep the
    ML-1M-shaped defaults. For any other source it returns None, and refuses sizes, which would be ignored."""
    sizes = {"users": users, "items": items, "interactions": interactions}
    if source != "synthetic":
        given = [f"--{k}" for k, v in sizes.items() if v is not None]
        if given:
            raise UserError(f"{'/'.join(given)} only apply to SOURCE=synthetic, not {source!r}")
        return None
    return SyntheticSpec(**{k: v for k, v in sizes.items() if v is not None}, seed=seed)
