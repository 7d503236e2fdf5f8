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
    train_times = None
    if with_train:
        train = _read_table(p / S.TRAIN_DIR)
        train_users = train.column(S.USER_IDX).to_numpy().astype(np.int64)
        train_items = train.column(S.ITEM_IDX).to_numpy().astype(np.int64)
        if S.TIME_COL in train.column_names:
            train_times = train.column(S.TIME_COL).to_numpy().astype(np.int64)
    else:
        train_users = train_items = np.zeros(0, dtype=np.int64)
    valid_items, valid_neg = _eval_arrays(p, S.VALID_FILE, S.VALID_NEG_FILE, n_users)
    test_items, test_neg = _eval_arrays(p, S.TEST_FILE, S.TEST_NEG_FILE, n_users)
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
    )
