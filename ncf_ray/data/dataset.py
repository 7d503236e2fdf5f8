"""Read a prepared dataset dir (the contract in ARCHITECTURE.md) into numpy arrays.

Used by training workers (eval sets, exclusion keys), evaluation and export. Training positives themselves reach
Ray Train workers through Ray Data (`read_train`), sharded per worker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ncf_ray.data import schema as S
from ncf_ray.errors import UserError


@dataclass
class Dataset:
    """A prepared dataset in memory. Arrays are int64; eval arrays are indexed by user_idx."""

    path: str
    meta: dict[str, Any]
    n_users: int
    n_items: int
    train_users: np.ndarray
    train_items: np.ndarray
    valid_items: np.ndarray  # [n_users]
    test_items: np.ndarray  # [n_users]
    valid_neg: np.ndarray  # [n_users, n_neg]
    test_neg: np.ndarray  # [n_users, n_neg]
    item_counts: np.ndarray  # [n_items] train interactions (popularity)
    user_ids: np.ndarray = field(repr=False)  # raw ids (str) by user_idx
    item_ids: np.ndarray = field(repr=False)  # raw ids (str) by item_idx
    train_times: np.ndarray | None = None  # int64 seconds per train row, when the log had timestamps
    # Shop logs (contract.md 1-3), None / {} when the dataset has none. Events: index into meta["events"];
    # context: [rows, K] global context ids in meta["context"]["columns"] order. Train arrays are aligned with
    # train_users/train_items, valid/test ones are indexed by user_idx.
    train_events: np.ndarray | None = None
    valid_events: np.ndarray | None = None
    test_events: np.ndarray | None = None
    train_context: np.ndarray | None = None
    valid_context: np.ndarray | None = None
    test_context: np.ndarray | None = None
    features: dict[str, Any] = field(default_factory=dict)  # "items"/"users" -> features.EncodedFeatures

    @property
    def purchase_from(self) -> int | None:
        """The lowest event index that counts as a purchase (None without events)."""
        events = self.meta.get("events")
        if not events:
            return None
        return list(events).index(self.meta.get("purchase_event", events[-1]))


REQUIRED_FILES = (S.META_FILE, S.TRAIN_DIR, S.VALID_FILE, S.TEST_FILE, S.VALID_NEG_FILE, S.TEST_NEG_FILE,
                  S.USERS_FILE, S.ITEMS_FILE)
META_KEYS = ("n_users", "n_items")


def check_dataset_dir(path: str | Path) -> Path:
    """Refuse, with one line naming what is missing, a path that is not a prepared dataset dir: every file of
    the contract present, train/ holding Parquet files, meta.json readable with the counts."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"dataset dir not found: {p}")
    missing = [name for name in REQUIRED_FILES if not (p / name).exists()]
    if not missing and not any((p / S.TRAIN_DIR).glob("*.parquet")):
        missing = [f"{S.TRAIN_DIR}/*.parquet"]
    if missing:
        raise UserError(f"{p} is not a prepared dataset dir (missing {', '.join(missing)}); run `ncf-ray prepare`")
    _meta(p)
    return p


def _meta(p: Path) -> dict[str, Any]:
    try:
        meta = json.loads((p / S.META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{p / S.META_FILE}: not readable JSON ({exc}); re-run `ncf-ray prepare`") from None
    absent = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if absent:
        raise UserError(f"{p / S.META_FILE} lacks {', '.join(absent)}; re-run `ncf-ray prepare`")
    return meta


def read_meta(path: str | Path) -> dict[str, Any]:
    return _meta(check_dataset_dir(path))


def _read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file (or dir) of the dataset dir; a damaged or foreign file is a UserError naming it."""
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: cannot read this dataset-dir file ({first}); re-run `ncf-ray prepare`") from None


def context_columns(meta: dict[str, Any]) -> list[str]:
    """The dataset-dir column names of the context, in meta order (empty without context)."""
    return [S.CONTEXT_PREFIX + c["name"] for c in meta.get("context", {}).get("columns", [])]


def _shop_arrays(table: pa.Table, meta: dict[str, Any], where: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(events int64 | None, context [rows, K] int64 | None) of one split's table."""
    events = None
    if meta.get("events"):
        if S.EVENT_COL not in table.column_names:
            raise UserError(f"{where} lacks column {S.EVENT_COL!r} that meta.json's events promise; re-run "
                            f"`ncf-ray prepare`")
        events = table.column(S.EVENT_COL).to_numpy().astype(np.int64)
    names = context_columns(meta)
    context = None
    if names:
        missing = [c for c in names if c not in table.column_names]
        if missing:
            raise UserError(f"{where} lacks context column {missing[0]!r}; re-run `ncf-ray prepare`")
        context = np.stack([table.column(c).to_numpy().astype(np.int64) for c in names], axis=1)
    return events, context


def _eval_arrays(p: Path, pos_file: str, neg_file: str, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    pos = _read_table(p / pos_file, columns=[S.USER_IDX, S.ITEM_IDX])
    users = pos.column(S.USER_IDX).to_numpy().astype(np.int64)
    if len(users) != n_users or not np.array_equal(users, np.arange(n_users)):
        raise UserError(f"{p / pos_file} must hold one row per user sorted by {S.USER_IDX}")
    neg = _read_table(p / neg_file, columns=[S.USER_IDX, S.NEGATIVES_COL])
    if not np.array_equal(neg.column(S.USER_IDX).to_numpy(), users):
        raise UserError(f"{p / neg_file} users do not match {pos_file}")
    flat = neg.column(S.NEGATIVES_COL).combine_chunks()
    values = flat.flatten().to_numpy().astype(np.int64)
    return pos.column(S.ITEM_IDX).to_numpy().astype(np.int64), values.reshape(n_users, -1)


def load_dataset(path: str | Path, with_train: bool = True) -> Dataset:
    """Load a dataset dir. `with_train=False` skips the train positives (serving/eval of held-out sets only)."""
    p = check_dataset_dir(path)
    meta = _meta(p)
    n_users, n_items = int(meta["n_users"]), int(meta["n_items"])
    train_times = train_events = train_context = None
    if with_train:
        train = _read_table(p / S.TRAIN_DIR)
        train_users = train.column(S.USER_IDX).to_numpy().astype(np.int64)
        train_items = train.column(S.ITEM_IDX).to_numpy().astype(np.int64)
        if S.TIME_COL in train.column_names:
            train_times = train.column(S.TIME_COL).to_numpy().astype(np.int64)
        train_events, train_context = _shop_arrays(train, meta, p / S.TRAIN_DIR)
    else:
        train_users = train_items = np.zeros(0, dtype=np.int64)
    valid_items, valid_neg = _eval_arrays(p, S.VALID_FILE, S.VALID_NEG_FILE, n_users)
    test_items, test_neg = _eval_arrays(p, S.TEST_FILE, S.TEST_NEG_FILE, n_users)
    valid_events, valid_context = _held_out_shop(p / S.VALID_FILE, meta)
    test_events, test_context = _held_out_shop(p / S.TEST_FILE, meta)
    users = _read_table(p / S.USERS_FILE).sort_by(S.USER_IDX)
    items = _read_table(p / S.ITEMS_FILE).sort_by(S.ITEM_IDX)
    return Dataset(
        path=str(p),
        meta=meta,
        n_users=n_users,
        n_items=n_items,
        train_users=train_users,
        train_items=train_items,
        valid_items=valid_items,
        test_items=test_items,
        valid_neg=valid_neg,
        test_neg=test_neg,
        item_counts=items.column(S.COUNT_COL).to_numpy().astype(np.int64),
        user_ids=np.asarray(users.column(S.USER_COL).to_pylist(), dtype=object),
        item_ids=np.asarray(items.column(S.ITEM_COL).to_pylist(), dtype=object),
        train_times=train_times,
        train_events=train_events,
        valid_events=valid_events,
        test_events=test_events,
        train_context=train_context,
        valid_context=valid_context,
        test_context=test_context,
        features=_features(p),
    )


def _held_out_shop(path: Path, meta: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Events/context of valid.parquet or test.parquet (one row per user, sorted by user_idx: checked before)."""
    cols = ([S.EVENT_COL] if meta.get("events") else []) + context_columns(meta)
    if not cols:
        return None, None
    present = [c for c in cols if c in pq.read_schema(path).names]
    return _shop_arrays(_read_table(path, columns=present), meta, path)


def _features(p: Path) -> dict[str, Any]:
    """The side tables of features/ (contract.md 3), {} when the dataset has none."""
    if not (p / S.FEATURES_DIR).is_dir():
        return {}
    from ncf_ray.data.features import read_features

    return read_features(p)
