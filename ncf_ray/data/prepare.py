"""`ncf-ray prepare SOURCE --out DIR`: raw interaction log -> validated, split, sharded dataset dir.

Pipeline: Ray Data reads, maps columns and validates every row in parallel (sources.py); the driver then runs the
global steps as vectorised numpy over int arrays (20M rows is ~0.5 GB): count bad rows, deduplicate (user, item)
keeping the latest, drop users below --min-user-interactions, map raw ids to contiguous indices (ints sorted
numerically, strings lexicographically), split leave-one-out by time, draw fixed eval negatives, and write the
dataset dir of the contract (ARCHITECTURE.md) into a temp dir next to `out`, renamed into place at the end.

Shop logs (issue 14; all optional, without them the dataset is exactly the ID-only one):
- events (`--event-col`, `--events` in funnel order): dedup keeps the strongest event per (user, item) — or per
  (user, item, `--dedup-window`) — at its latest time, or every row (`--keep-all-events`); train/valid/test carry
  column `event` (index into meta["events"]); meta counts each type and names the purchase event;
- context: hour of day and day of week (UTC) from the timestamps, plus `--context-cols` as categorical (vocab from
  train rows, anything else 0 = unknown), written as `ctx_<name>` global ids with their spec in meta["context"];
- side tables (`--item-features`, `--user-features`, or those synthetic-shop / MovieLens bring): read before the
  log, encoded against the built vocab by data/features.py into `features/`; items of the item table without
  interactions join the item vocab as cold items (users of the user table do not).
The shop-log steps live in data/shoplog.py.

The pure steps (`encode_ids`, `dedup_latest`, `split_rows`, `sample_eval_negatives`, `collect_batches`, and
shoplog's) take numpy/Arrow arrays and never touch Ray, so unit tests run them directly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ncf_ray.config import DataConfig
from ncf_ray.data import schema as S
from ncf_ray.data.shoplog import (
    DOW,
    HOUR,
    dedup_events,
    dedup_rule,
    encode_context,
    encode_side_tables,
    event_meta,
    features_meta,
    read_side_tables,
    shop_summary,
    table_ids,
)
from ncf_ray.errors import UserError

PROTOCOL_LOO = "leave-one-out-by-time"
PROTOCOL_NCF = "ncf-paper"
# meta.json "data_config": the DataConfig fields that say how a log of this source is read and filtered (what
# `ncf-ray update` needs to read the next log alike); split and sharding fields are this dataset's own business.
READ_FIELDS = ("user_col", "item_col", "time_col", "rating_col", "min_rating", "sep", "max_bad_fraction",
               "event_col", "events", "purchase_event", "dedup_window", "keep_all_events", "context_cols",
               "time_context")
# meta.json "valid_from": how the valid row of each user was chosen.
VALID_LATEST_TRAIN = "latest train interaction per user (by time)"
VALID_LAST_LINE = "last train line per user in file order (the files have no timestamps)"


# ============================================================================================ pure steps
def encode_ids(raw: np.ndarray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Raw ids -> (codes int64, vocab of str) with vocab[codes] == raw. Integer ids sort numerically, string ids
    lexicographically (by code point), so the mapping depends only on the set of ids."""
    if isinstance(raw, np.ndarray) and raw.dtype.kind in "iu":
        uniq, codes = np.unique(raw, return_inverse=True)
        return codes.astype(np.int64).reshape(-1), uniq.astype(str)
    arr = raw if isinstance(raw, (pa.Array, pa.ChunkedArray)) else pa.array(raw, pa.string())
    uniq = pc.unique(arr)
    uniq = uniq.take(pc.sort_indices(uniq))
    codes = pc.index_in(arr, value_set=uniq)
    return np.asarray(codes.to_numpy(zero_copy_only=False), dtype=np.int64), np.asarray(
        uniq.to_numpy(zero_copy_only=False), dtype=str)


def dedup_latest(users: np.ndarray, items: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Indices of the rows to keep: one per (user, item), the latest; returned sorted by (user, item)."""
    order = np.lexsort((times, items, users))
    u, i = users[order], items[order]
    last = np.ones(order.size, bool)
    last[:-1] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    return order[last]


@dataclass
class Split:
    """Leave-one-out split over contiguous user indices 0..n_users-1 (each with >= 3 interactions)."""

    train_users: np.ndarray
    train_items: np.ndarray
    train_times: np.ndarray
    valid_items: np.ndarray  # [n_users], indexed by user
    valid_times: np.ndarray
    test_items: np.ndarray
    test_times: np.ndarray
    # Shop logs only (None otherwise): event index per row, and context ids [rows, K] (contract.md 1-2).
    train_events: np.ndarray | None = None
    valid_events: np.ndarray | None = None
    test_events: np.ndarray | None = None
    train_context: np.ndarray | None = None
    valid_context: np.ndarray | None = None
    test_context: np.ndarray | None = None


def split_rows(users: np.ndarray, items: np.ndarray, times: np.ndarray, n_users: int,
               events: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leave-one-out as row indices: (train rows in (user, time, item) order, valid row per user, test row per
    user). Test = each user's latest interaction, valid = the latest remaining one. Ties in time break by item
    index (the larger counts as later), then by event (the stronger counts as later), so it is deterministic."""
    keys = (items, times, users) if events is None else (events, items, times, users)
    order = np.lexsort(keys)
    counts = np.bincount(users, minlength=n_users)
    if counts.size != n_users or (counts < 2).any():
        short = int(np.flatnonzero(counts < 2)[0])
        raise ValueError(f"user index {short} has {counts[short]} interactions; leave-one-out needs >= 2")
    last = np.cumsum(counts) - 1
    held = np.zeros(order.size, bool)
    held[last] = True
    held[last - 1] = True
    return order[~held], order[last - 1], order[last]


def split_leave_one_out(users: np.ndarray, items: np.ndarray, times: np.ndarray, n_users: int) -> Split:
    """`split_rows` gathered into a Split. Train keeps (user, time, item) order."""
    tr, va, te = split_rows(users, items, times, n_users)
    return Split(users[tr], items[tr], times[tr], items[va], times[va], items[te], times[te])


def _is_member(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, bool)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return sorted_keys[pos] == keys


def _row_duplicates(block: np.ndarray) -> np.ndarray:
    """Mask of entries that repeat an earlier (in sorted order) value of the same row."""
    order = np.argsort(block, axis=1, kind="stable")
    s = np.take_along_axis(block, order, axis=1)
    dup_sorted = np.zeros(block.shape, bool)
    dup_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
    dup = np.zeros(block.shape, bool)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    return dup


def sample_eval_negatives(pos_keys: np.ndarray, n_users: int, n_items: int, n_neg: int,
                          rng: np.random.Generator, max_rounds: int = 64) -> np.ndarray:
    """[n_users, n_neg] int64 items that are never a positive of that user. `pos_keys` = sorted unique
    user * n_items + item of every positive (train, valid, test). Negatives in a row are distinct when the user
    has at least n_neg non-positive items, else drawn with repeats. Rejection sampling, vectorised; the few rows
    still rejected after `max_rounds` (users who have seen nearly everything) draw from their explicit complement."""
    pos_count = np.bincount(pos_keys // n_items, minlength=n_users) if pos_keys.size else np.zeros(n_users, int)
    cand = n_items - pos_count
    if (cand < 1).any():
        u = int(np.flatnonzero(cand < 1)[0])
        raise UserError(f"user index {u} interacted with all {n_items} items: no negatives to sample")
    distinct = cand >= n_neg
    out = rng.integers(0, n_items, size=(n_users, n_neg), dtype=np.int64)
    rows = np.arange(n_users)
    for _ in range(max_rounds):
        block = out[rows]
        reject = _is_member(pos_keys, rows[:, None] * np.int64(n_items) + block)
        reject |= _row_duplicates(block) & distinct[rows, None]
        bad_rows = reject.any(axis=1)
        if not bad_rows.any():
            return out
        block[reject] = rng.integers(0, n_items, size=int(reject.sum()), dtype=np.int64)
        out[rows] = block
        rows = rows[bad_rows]
    # Fallback for the last stubborn rows only: enumerate each user's non-positive items.
    for u in rows:
        seen = pos_keys[np.searchsorted(pos_keys, u * n_items):np.searchsorted(pos_keys, (u + 1) * n_items)]
        free = np.setdiff1d(np.arange(n_items), seen - u * n_items)
        out[u] = rng.choice(free, size=n_neg, replace=not distinct[u])
    return out


# ============================================================================================ collecting
@dataclass
class RawLog:
    """What the driver collects from the normalised Ray Dataset: good rows, plus counts of the others."""

    users: Any  # np.int64 array, or pyarrow string array
    items: Any
    times: np.ndarray
    rows: int = 0
    bad: int = 0
    below_min: int = 0
    example: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    events: np.ndarray | None = None  # int8 funnel index per row, when the log has an event column
    context: dict[str, pa.Array] = field(default_factory=dict)  # raw text per context column (name -> values)


def _ids_to_array(chunks: list[pa.Array]) -> Any:
    """Concatenate one id column's chunks, ids kept exactly as given: int64 numpy when every chunk is int64 or
    every id is a canonical integer written as text ('12', '-3'), else one string array (int chunks written
    back as text, which is lossless), so '0012' and '12' stay two different ids."""
    from ncf_ray.data.sources import canonical_ints

    if all(pa.types.is_integer(c.type) for c in chunks):
        return np.concatenate([c.to_numpy() for c in chunks]) if chunks else np.empty(0, np.int64)
    text = pa.chunked_array([pc.cast(c, pa.string()) for c in chunks], pa.string()).combine_chunks()
    if canonical_ints(text).all():
        return np.asarray(pc.cast(text, pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
    return text


# Ray Data logs a failed task's traceback at ERROR before raising it; collect() re-raises it (a bug keeps its
# traceback in the exception) or turns it into one line (a user's file), so the log record is only noise.
_RAY_DATA_ERROR_LOGGERS = ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions")


@contextmanager
def _task_errors_as_user_errors() -> Iterator[None]:
    """Run a Ray Data execution; a UserError raised in one of its tasks comes out as that one-line UserError."""
    from ncf_ray.data.sources import user_error_from

    loggers = [logging.getLogger(name) for name in _RAY_DATA_ERROR_LOGGERS]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    except Exception as exc:
        err = user_error_from(exc)
        if err is None:
            raise
        raise err from None
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def collect(ds: Any) -> RawLog:
    """Drain a normalised dataset (streaming, block by block) into arrays of its good rows."""
    with _task_errors_as_user_errors():
        return collect_batches(ds.iter_batches(batch_format="pyarrow", batch_size=None))


def collect_batches(batches: Iterable[pa.Table]) -> RawLog:
    """Normalised batches (sources.normalise_batch's layout) -> arrays of their good rows, bad ones counted."""
    from ncf_ray.data.sources import BAD, BELOW_MIN, ERR_COL, OK, STATUS_COL

    users, items, times, events = [], [], [], []
    context: dict[str, list[pa.Array]] = {}
    log = RawLog(None, None, np.empty(0, np.int64))
    for batch in batches:
        status = batch.column(STATUS_COL).to_numpy()
        log.rows += status.size
        n_bad = int((status == BAD).sum())
        if n_bad:
            log.bad += n_bad
            if log.example is None:
                errs = batch.column(ERR_COL).drop_null()
                log.example = errs[0].as_py() if len(errs) else None
        log.below_min += int((status == BELOW_MIN).sum())
        if n_bad or (status != OK).any():
            batch = batch.filter(pa.array(status == OK))
        users.append(batch.column(S.USER_COL).combine_chunks())
        items.append(batch.column(S.ITEM_COL).combine_chunks())
        times.append(batch.column(S.TIME_COL).to_numpy())
        if S.EVENT_COL in batch.column_names:
            events.append(batch.column(S.EVENT_COL).to_numpy())
        for name in batch.column_names:
            if name.startswith(S.CONTEXT_PREFIX):
                context.setdefault(name[len(S.CONTEXT_PREFIX):], []).append(batch.column(name).combine_chunks())
    log.users, log.items = _ids_to_array(users), _ids_to_array(items)
    log.times = np.concatenate(times) if times else np.empty(0, np.int64)
    log.events = np.concatenate(events).astype(np.int8) if events else None
    log.context = {k: pa.chunked_array(v, pa.string()).combine_chunks() for k, v in context.items()}
    return log


def _check_bad(log: RawLog, cfg: DataConfig, source: str) -> None:
    if log.rows == 0:
        raise UserError(f"empty input: {source} has no rows")
    if log.bad and log.bad / log.rows > cfg.max_bad_fraction:
        raise UserError(
            f"{log.bad} of {log.rows} rows ({log.bad / log.rows:.1%}) are malformed, more than "
            f"--max-bad-fraction {cfg.max_bad_fraction}; e.g. {log.example}")
    if len(log.times) == 0:
        why = f"{log.bad} bad, {log.below_min} below --min-rating {cfg.min_rating}"
        raise UserError(f"everything filtered out: none of the {log.rows} rows of {source} is usable ({why})")


# ============================================================================================ building
@dataclass
class Built:
    """Everything the writer needs, in index space."""

    split: Split
    valid_neg: np.ndarray
    test_neg: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray
    dropped: dict[str, int]
    protocol: str
    n_interactions: int
    valid_from: str = "latest remaining interaction per user (by time)"
    timestamps: bool = True  # False: the source had none; times are line numbers in file order
    shop: dict[str, Any] = field(default_factory=dict)  # meta.json fields of events/context (absent: ID-only)


def encode_item_ids(log_items: Any, table_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Item codes of the log rows and the vocab of the sorted union of the log's and a side table's ids, plus
    how many of the table's ids the log lacks (cold items). The union keeps `encode_ids`' rule: ints sort
    numerically when every id of both is an integer, else everything is text."""
    if table_ids is None or table_ids.size == 0:
        codes, vocab = encode_ids(log_items)
        return codes, vocab, 0
    from ncf_ray.data.sources import canonical_ints

    table_text = pa.array(np.asarray(table_ids, dtype=str).tolist(), pa.string())
    if isinstance(log_items, np.ndarray) and bool(canonical_ints(table_text).all()):
        both: Any = np.concatenate([log_items, np.asarray(pc.cast(table_text, pa.int64()))])
    else:
        log_text = (pa.array(log_items.astype(str).tolist(), pa.string()) if isinstance(log_items, np.ndarray)
                    else log_items)
        both = pa.concat_arrays([log_text, table_text])
    codes, vocab = encode_ids(both)
    n = len(log_items)
    cold = np.setdiff1d(codes[n:], codes[:n]).size
    return codes[:n], vocab, int(cold)


def build_loo(log: RawLog, cfg: DataConfig, item_table_ids: np.ndarray | None = None) -> Built:
    """Dedup, sparse-user filter, contiguous indices, leave-one-out split, eval negatives; events and context
    travel with their rows. `item_table_ids` (an item side table's raw ids) join the item vocab: items with no
    interactions stay as cold items (train count 0)."""
    ucode, uvocab = encode_ids(log.users)
    if item_table_ids is not None:
        item_table_ids = np.unique(np.asarray(item_table_ids, dtype=str))
        item_table_ids = item_table_ids[item_table_ids != ""]  # a row without an id names no item
    icode, ivocab, table_only = encode_item_ids(log.items, item_table_ids)
    if item_table_ids is not None and item_table_ids.size and table_only == item_table_ids.size:
        # Every table item would join as a cold item: a wrong id column, not a catalogue of new products.
        raise UserError(f"item table: none of its {item_table_ids.size} ids is an item id of the log (e.g. "
                        f"{str(item_table_ids[0])!r}; the log has e.g. {str(ivocab[icode[0]])!r}); check "
                        f"--feature-id-col")
    ctx_codes = {name: encode_ids(values) for name, values in log.context.items()}
    if log.events is None and cfg.dedup_window is None and not cfg.keep_all_events:
        keep = dedup_latest(ucode, icode, log.times)  # the ID-only rule, as before shop logs
    else:
        keep = dedup_events(ucode, icode, log.times, log.events, cfg.dedup_window, cfg.keep_all_events)
    duplicates = ucode.size - keep.size
    u, i, t = ucode[keep], icode[keep], log.times[keep]
    ev = log.events[keep] if log.events is not None else None
    ctx_codes = {name: (codes[keep], vocab) for name, (codes, vocab) in ctx_codes.items()}
    del ucode, icode, keep

    counts = np.bincount(u, minlength=uvocab.size)
    user_ok = counts >= cfg.min_user_interactions
    sparse = int((~user_ok & (counts > 0)).sum())
    rows_ok = user_ok[u]
    if not rows_ok.any():
        raise UserError(f"everything filtered out: no user has >= {cfg.min_user_interactions} distinct "
                        f"interactions (--min-user-interactions); most has {int(counts.max())}")
    u, i, t = u[rows_ok], i[rows_ok], t[rows_ok]
    ev = ev[rows_ok] if ev is not None else None
    ctx_codes = {name: (codes[rows_ok], vocab) for name, (codes, vocab) in ctx_codes.items()}
    # Contiguous indices that keep the sorted raw-id order; a side table's items stay (cold: no interactions).
    user_new = np.cumsum(user_ok) - 1
    item_ok = np.zeros(ivocab.size, bool)
    item_ok[i] = True
    if item_table_ids is not None and item_table_ids.size:
        item_ok[_table_codes(ivocab, item_table_ids)] = True
    item_new = np.cumsum(item_ok) - 1
    u, i = user_new[u], item_new[i]
    n_users, n_items = int(user_ok.sum()), int(item_ok.sum())

    # Sorted by (user, item): dedup's order survives the remap; unique, since a pair may repeat (window/keep-all).
    pos_keys = np.unique(u * np.int64(n_items) + i)
    tr, va, te = split_rows(u, i, t, n_users, ev)
    split = Split(u[tr], i[tr], t[tr], i[va], t[va], i[te], t[te])
    shop: dict[str, Any] = {}
    if ev is not None:
        split.train_events, split.valid_events, split.test_events = ev[tr], ev[va], ev[te]
        shop.update(event_meta(cfg, ev, split))
    times = t if cfg.with_time_context else None
    if times is not None or ctx_codes:
        ctx, spec = encode_context(times, ctx_codes, tr)
        split.train_context, split.valid_context, split.test_context = ctx[tr], ctx[va], ctx[te]
        shop["context"] = spec
    if ev is not None or ctx_codes or cfg.dedup_window or cfg.keep_all_events:
        shop["dedup"] = dedup_rule(cfg, ev is not None)
    if item_table_ids is not None:
        shop["items_without_interactions"] = table_only
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1]))
    valid_neg = sample_eval_negatives(pos_keys, n_users, n_items, cfg.eval_negatives, rng)
    test_neg = sample_eval_negatives(pos_keys, n_users, n_items, cfg.eval_negatives, rng)
    return Built(split, valid_neg, test_neg, uvocab[user_ok], ivocab[item_ok],
                 {"bad_rows": log.bad, "duplicates": int(duplicates), "below_min_rating": log.below_min,
                  "sparse_users": sparse}, PROTOCOL_LOO, int(u.size), shop=shop)


def _table_codes(vocab: np.ndarray, table_ids: np.ndarray) -> np.ndarray:
    """Positions in a sorted id vocab (the union built by encode_item_ids) of a side table's raw ids."""
    text = np.asarray(vocab).astype(str)
    order = np.argsort(text)
    return order[np.searchsorted(text[order], np.asarray(table_ids, dtype=str))]


def build_ncf(train: RawLog, test: RawLog, negatives: pa.Table, cfg: DataConfig, timestamps: bool = True) -> Built:
    """The NCF paper's files as given: its ids are already 0-based indices, its test items and negatives are kept;
    valid is carved from train and valid negatives are sampled.

    Valid is each user's latest train interaction; for files without timestamps (`timestamps=False`: times are
    then the rows' line numbers) that is the user's last train line in file order. A user with fewer than two
    train rows would have no train row left once valid is carved: such users are dropped from the dataset (their
    test row and negatives too) and counted in dropped['users_without_train']; the rest are re-indexed
    contiguously in their original order, and users.parquet maps each index back to the file's user id."""
    arrays = [train.users, train.items, test.users, test.items]
    if not all(isinstance(a, np.ndarray) for a in arrays):
        raise UserError("ncf: user and item ids must be integers (0-based indices)")
    neg_users = negatives.column(S.USER_COL).to_numpy()
    neg_items = negatives.column(S.ITEM_COL).to_numpy()
    neg_lists = negatives.column("negatives").combine_chunks()
    widths = pc.list_value_length(neg_lists).to_numpy()
    if widths.size == 0 or (widths != widths[0]).any():
        raise UserError(f"ncf: test.negative lines must all hold the same number of negatives "
                        f"(found {sorted(set(widths.tolist()))[:5]})")
    n_users = int(max(train.users.max(), test.users.max())) + 1
    n_items = int(max(train.items.max(), test.items.max(), neg_items.max(), pc.max(neg_lists.flatten()).as_py())) + 1
    for name, users in (("test.rating", test.users), ("test.negative", neg_users)):
        if users.size != n_users or not np.array_equal(np.sort(users), np.arange(n_users)):
            raise UserError(f"ncf: {name} must hold exactly one row per user 0..{n_users - 1} (has {users.size} "
                            f"rows)")
    t_order = np.argsort(test.users)
    n_order = np.argsort(neg_users)
    if not np.array_equal(neg_items[n_order], test.items[t_order]):
        u = int(np.flatnonzero(neg_items[n_order] != test.items[t_order])[0])
        raise UserError(f"ncf: test.negative pair for user {u} does not match test.rating")

    keep = dedup_latest(train.users, train.items, train.times)
    u, i, t = train.users[keep], train.items[keep], train.times[keep]
    user_ok = np.bincount(u, minlength=n_users) >= 2
    if not user_ok.any():
        raise UserError("ncf: no user has >= 2 train interactions; carving valid needs one left for train")
    rows_ok = user_ok[u]
    user_new = np.cumsum(user_ok) - 1
    u, i, t = user_new[u[rows_ok]], i[rows_ok], t[rows_ok]
    n_kept = int(user_ok.sum())
    test_items = test.items[t_order][user_ok]
    # Without timestamps the test row is simply "after train" for every user.
    test_times = test.times[t_order][user_ok] if timestamps else np.full(n_kept, int(t.max()) + 1, np.int64)
    # split_leave_one_out on train alone: its "test" is the latest train row = our valid; its "valid" goes back.
    inner = split_leave_one_out(u, i, t, n_kept)
    train_u = np.concatenate([inner.train_users, np.arange(n_kept)])
    train_i = np.concatenate([inner.train_items, inner.valid_items])
    train_t = np.concatenate([inner.train_times, inner.valid_times])
    order = np.lexsort((train_i, train_t, train_u))
    split = Split(train_u[order], train_i[order], train_t[order], inner.test_items, inner.test_times,
                  test_items, test_times)

    pos_keys = np.unique(np.concatenate([u * np.int64(n_items) + i,
                                         np.arange(n_kept) * np.int64(n_items) + split.test_items]))
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1]))
    width = int(widths[0])
    valid_neg = sample_eval_negatives(pos_keys, n_kept, n_items, width, rng)
    test_neg = np.asarray(neg_lists.flatten().to_numpy(), dtype=np.int64).reshape(-1, width)[n_order][user_ok]
    valid_from = VALID_LATEST_TRAIN if timestamps else VALID_LAST_LINE
    return Built(split, valid_neg, test_neg, np.flatnonzero(user_ok).astype(str), np.arange(n_items).astype(str),
                 {"bad_rows": train.bad + test.bad, "duplicates": int(train.users.size - keep.size),
                  "below_min_rating": 0, "sparse_users": 0, "users_without_train": int(n_users - n_kept)},
                 PROTOCOL_NCF, int(u.size + n_kept), valid_from=valid_from, timestamps=timestamps)


# ============================================================================================ writing
def _i32(a: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(a, dtype=np.int32))


def _neg_table(neg: np.ndarray) -> pa.Table:
    n, k = neg.shape
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    lists = pa.ListArray.from_arrays(offsets, _i32(neg.reshape(-1)))
    return pa.table({S.USER_IDX: _i32(np.arange(n)), S.NEGATIVES_COL: lists})


def _shop_cols(events: np.ndarray | None, context: np.ndarray | None, names: list[str],
               rows: slice = slice(None)) -> dict[str, pa.Array]:
    """The optional `event` (int8) and `ctx_<name>` (int32) columns of a split, for `rows` of it."""
    cols: dict[str, pa.Array] = {}
    if events is not None:
        cols[S.EVENT_COL] = pa.array(np.asarray(events[rows], dtype=np.int8))
    if context is not None:
        for k, name in enumerate(names):
            cols[S.CONTEXT_PREFIX + name] = _i32(context[rows, k])
    return cols


def write_dataset(b: Built, d: Path, shards: int) -> None:
    """The dataset dir of the contract, into `d` (a temp dir; the caller renames it)."""
    s = b.split
    n_users, n_items = b.user_ids.size, b.item_ids.size
    ctx_names = [c["name"] for c in b.shop.get("context", {}).get("columns", [])]
    (d / S.TRAIN_DIR).mkdir()
    bounds = np.linspace(0, s.train_users.size, max(1, shards) + 1).astype(np.int64)
    for k in range(max(1, shards)):
        lo, hi = bounds[k], bounds[k + 1]
        pq.write_table(pa.table({S.USER_IDX: _i32(s.train_users[lo:hi]), S.ITEM_IDX: _i32(s.train_items[lo:hi]),
                                 S.TIME_COL: pa.array(s.train_times[lo:hi], pa.int64()),
                                 **_shop_cols(s.train_events, s.train_context, ctx_names, slice(lo, hi))}),
                       d / S.TRAIN_DIR / f"part-{k:05d}.parquet")
    users = _i32(np.arange(n_users))
    for name, items, times, events, context in (
            (S.VALID_FILE, s.valid_items, s.valid_times, s.valid_events, s.valid_context),
            (S.TEST_FILE, s.test_items, s.test_times, s.test_events, s.test_context)):
        pq.write_table(pa.table({S.USER_IDX: users, S.ITEM_IDX: _i32(items), S.TIME_COL: pa.array(times, pa.int64()),
                                 **_shop_cols(events, context, ctx_names)}), d / name)
    pq.write_table(_neg_table(b.valid_neg), d / S.VALID_NEG_FILE)
    pq.write_table(_neg_table(b.test_neg), d / S.TEST_NEG_FILE)
    for name, idx_col, id_col, ids, count in (
        (S.USERS_FILE, S.USER_IDX, S.USER_COL, b.user_ids, np.bincount(s.train_users, minlength=n_users)),
        (S.ITEMS_FILE, S.ITEM_IDX, S.ITEM_COL, b.item_ids, np.bincount(s.train_items, minlength=n_items)),
    ):
        pq.write_table(pa.table({idx_col: _i32(np.arange(ids.size)), id_col: pa.array(ids.tolist(), pa.string()),
                                 S.COUNT_COL: pa.array(count, pa.int64())}), d / name)


# ============================================================================================ the stage
def _check_cfg(cfg: DataConfig) -> None:
    if cfg.min_user_interactions < 3:
        raise UserError(f"--min-user-interactions={cfg.min_user_interactions} must be >= 3 "
                        f"(one train, one valid, one test interaction)")
    if cfg.eval_negatives < 1:
        raise UserError(f"--eval-negatives={cfg.eval_negatives} must be >= 1")
    if cfg.shards < 1:
        raise UserError(f"--shards={cfg.shards} must be >= 1")
    if not 0.0 <= cfg.max_bad_fraction <= 1.0:
        raise UserError(f"--max-bad-fraction={cfg.max_bad_fraction} must be in [0, 1]")
    if cfg.source.startswith("ncf:"):
        shop = [flag for flag, given in (("--event-col", cfg.event_col), ("--context-cols", cfg.context_cols),
                                         ("--time-context", cfg.time_context),
                                         ("--item-features", cfg.item_features),
                                         ("--user-features", cfg.user_features)) if given]
        if shop:
            raise UserError(f"{shop[0]} does not apply to ncf: sources (the paper's files are kept as given)")
    named = cfg.source == "synthetic" or cfg.source.startswith("movielens")
    if named and (cfg.event_col or cfg.context_cols):
        flag = "--event-col" if cfg.event_col else "--context-cols"
        raise UserError(f"{flag} does not apply to source {cfg.source!r}: its log has no such columns "
                        f"(synthetic-shop and files do)")
    clash = {HOUR, DOW} & set(cfg.context_cols) if cfg.with_time_context else set()
    if clash:
        raise UserError(f"--context-cols {sorted(clash)[0]!r} clashes with the time context's own column of that "
                        f"name; rename it in the log or pass --no-time-context")


def local_out(out: str | os.PathLike) -> Path:
    """The dataset dir to write, as an absolute local path. Dataset dirs are local by contract (train, evaluate
    and export read them with local file APIs, and the temp-dir-and-rename swap needs a local rename), so a URI
    other than file:// is refused here, before anything is read or created: `--out s3://b/x` used to create a
    directory named 's3:' in the working directory."""
    text = os.fspath(out)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise UserError(f"--out {text}: a dataset dir must be a local path (train and evaluate read it from "
                        f"the local filesystem); on a cluster give a path on storage every node mounts")
    return Path(text).expanduser().absolute()


def prepare(cfg: DataConfig, out: str | os.PathLike, *, overwrite: bool = False, local_from: str | None = None,
            synthetic: Any = None) -> dict[str, Any]:
    """Run the whole stage; returns the summary (meta.json fields + out, density, rows_read, rows_per_s,
    timings). `synthetic` is a SyntheticSpec for source 'synthetic' (a shop.ShopSpec for 'synthetic-shop');
    `local_from` the MovieLens --from path. synthetic-shop needs no other flags: its event column, funnel,
    device context and side tables come with it (sources.shop_defaults)."""
    from ncf_ray.data.sources import SHOP_SOURCE, NcfSource, open_source, shop_defaults

    t0 = time.perf_counter()
    if cfg.source == SHOP_SOURCE:
        cfg = shop_defaults(cfg)
    _check_cfg(cfg)
    out = local_out(out)
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    timings: dict[str, float] = {}
    try:
        scratch = tmp / "_scratch"
        scratch.mkdir()
        src = open_source(cfg, local_from=local_from, synthetic=synthetic, workdir=scratch)
        if isinstance(src, NcfSource):
            train, test = collect(src.train), collect(src.test)
            _check_bad(train, cfg, src.name + ".train.rating")
            _check_bad(test, cfg, src.name + ".test.rating")
            negatives = _collect_table(src.negatives)
            rows = train.rows + test.rows
            timings["read"] = time.perf_counter() - t0
            built = build_ncf(train, test, negatives, cfg, timestamps=src.timestamps)
            encoded: dict[str, Any] = {}
        else:
            tables = read_side_tables(cfg, src.side_tables)
            log = collect(src.dataset)
            _check_bad(log, cfg, src.name)
            rows = log.rows
            timings["read"] = time.perf_counter() - t0
            built = build_loo(log, cfg, table_ids(tables, "items") if src.cold_items else None)
            del log
            encoded = encode_side_tables(tables, built)
        timings["build"] = time.perf_counter() - t0 - timings["read"]
        shutil.rmtree(scratch)
        write_dataset(built, tmp, cfg.shards)
        if encoded:
            from ncf_ray.data.features import write_features

            write_features(tmp, encoded.get("items"), encoded.get("users"))
        built.shop.update(features_meta(encoded, built))
        seconds = time.perf_counter() - t0
        meta = _meta(cfg, built, src.name, seconds)
        (tmp / S.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _swap_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    timings["write"] = time.perf_counter() - t0 - timings["read"] - timings["build"]
    n_users, n_items = meta["n_users"], meta["n_items"]
    return {**meta, "out": str(out), "density": meta["n_interactions"] / max(1, n_users * n_items),
            "rows_read": rows, "rows_per_s": rows / max(seconds, 1e-9),
            "timings": {k: round(v, 3) for k, v in timings.items()}}


def _collect_table(ds: Any) -> pa.Table:
    with _task_errors_as_user_errors():
        tables = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    if not tables:
        raise UserError("ncf: test.negative is empty")
    return pa.concat_tables(tables)


def _meta(cfg: DataConfig, b: Built, source: str, seconds: float) -> dict[str, Any]:
    return {
        "schema_version": S.SCHEMA_VERSION,
        "source": source,
        "seed": cfg.seed,
        "n_users": int(b.user_ids.size),
        "n_items": int(b.item_ids.size),
        "n_interactions": b.n_interactions,
        "n_train": int(b.split.train_users.size),
        "n_valid": int(b.split.valid_items.size),
        "n_test": int(b.split.test_items.size),
        "eval_negatives": int(b.test_neg.shape[1]),
        "protocol": b.protocol,
        "valid_from": b.valid_from,
        "timestamps": b.timestamps,
        "dropped": b.dropped,
        **b.shop,
        # How the log was read and filtered, so `ncf-ray update` reads later logs of this source the same way.
        "data_config": {k: getattr(cfg, k) for k in READ_FIELDS},
        "seconds": round(seconds, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _swap_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temp dir onto `out`; an old `out` (overwrite) is moved aside first, then deleted."""
    old = None
    if out.exists():
        if not overwrite:
            raise UserError(f"output {out} already exists; pass --overwrite to replace it")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def format_summary(summary: dict[str, Any]) -> str:
    """The table `ncf-ray prepare` prints."""
    d = summary["dropped"]
    rows = [
        ("source", summary["source"]),
        ("protocol", summary["protocol"]),
        ("users", f"{summary['n_users']:,}"),
        ("items", f"{summary['n_items']:,}"),
        ("interactions", f"{summary['n_interactions']:,}"),
        ("density", f"{summary['density']:.4%}"),
        ("train / valid / test", f"{summary['n_train']:,} / {summary['n_valid']:,} / {summary['n_test']:,}"),
        ("eval negatives", str(summary["eval_negatives"])),
        ("valid", summary.get("valid_from", "")),
        ("dropped", f"bad {d['bad_rows']:,}, duplicates {d['duplicates']:,}, below min rating "
                    f"{d['below_min_rating']:,}, sparse users {d['sparse_users']:,}"
                    + (f", users without train {d['users_without_train']:,}" if "users_without_train" in d else "")),
        *shop_summary(summary),
        ("rows read", f"{summary['rows_read']:,} ({summary['rows_per_s']:,.0f} rows/s)"),
        ("seconds", f"{summary['seconds']:.1f}"),
        ("out", summary["out"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
