"""Parsing side-table values (ncf_ray/data/features.py's helpers, pure pyarrow/numpy): a column as vocab text or
as numbers, bags and texts as flat (row, value) pairs, vectors as lengths + numbers, and the few array steps the
encoder shares (first occurrence per row, scatter into slots). Vectorised: no per-row Python on whole columns.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ncf_ray.errors import UserError

# Text values that mean "no value" in a numeric column (a price of "N/A" is missing, not a category).
MISSING_WORDS = frozenset({"", "na", "n/a", "nan", "null", "none", "?", "-"})
WORD_SPLIT = r"[^\pL\pN\pM]+"  # RE2: words are runs of letters, digits and marks of any script
VECTOR_SPLIT = r"[,;\s|]+"  # RE2: what separates the numbers of a vector written as text


class UnsupportedValue(TypeError):
    """A value of a type its column's kind cannot hold (a list where one value belongs, a struct). The encoder
    turns it into a UserError naming the column; any other TypeError stays a bug with its traceback."""


def plain(arr: pa.Array) -> pa.Array:
    """Dictionary arrays decoded; chunked arrays combined."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


def is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def scalar_text(v: Any) -> str | None:
    """One Python value as the text a vocab stores: whole floats as integers, text trimmed, '' -> None."""
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if not math.isfinite(v):
            return None
        return str(int(v)) if v.is_integer() else repr(v)
    text = str(v).strip()
    return text or None


def as_text(arr: pa.Array) -> pa.Array:
    """A column as vocab text (nulls where missing): see scalar_text."""
    arr = plain(arr)
    t = arr.type
    if pa.types.is_integer(t):
        return pc.cast(arr, pa.string())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        text = pc.utf8_trim_whitespace(pc.cast(arr, pa.string()))
        return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    if is_list(t) or pa.types.is_struct(t) or pa.types.is_map(t):
        raise UnsupportedValue(f"a {t} value where a single value is expected")
    return pa.array([scalar_text(v) for v in arr.to_pylist()], pa.string())


def missing_words(text: pa.Array) -> np.ndarray:
    """Mask of text values that mean "no value" in a numeric column (null, '', 'NA', 'n/a', ...)."""
    words = pc.is_in(pc.utf8_lower(text), value_set=pa.array(sorted(MISSING_WORDS), pa.string()))
    return np.asarray(pc.fill_null(pc.or_kleene(words, text.is_null()), True).to_numpy(zero_copy_only=False), bool)


def is_time(t: pa.DataType) -> bool:
    return pa.types.is_timestamp(t) or pa.types.is_date(t)


def looks_like_time(arr: pa.Array) -> bool:
    """True for text whose every present value is an ISO 8601 date or timestamp ('2024-05-01', '2024-05-01T10:00Z');
    plain numbers are not (they are numbers)."""
    import pandas as pd

    arr = plain(arr)
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        return False
    text = as_text(arr)
    present = text.filter(pa.array(~missing_words(text)))
    if len(present) == 0 or not pc.all(pc.match_substring_regex(present, r"^\d{4}-\d{2}")).as_py():
        return False
    return not pd.to_datetime(pd.Series(present.to_pylist()), utc=True, errors="coerce", format="ISO8601").isna().any()


def as_float(arr: pa.Array, time: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(values float64 with NaN where missing or unparseable, mask of values present but not numbers). Dates and
    timestamps become epoch seconds (UTC); with `time`, so does text (ISO 8601, as a request would send a date)."""
    import pandas as pd

    arr = plain(arr)
    if is_time(arr.type):
        if pa.types.is_date(arr.type):
            arr = pc.cast(arr, pa.timestamp("s"))
        per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[arr.type.unit]
        ticks = pc.cast(arr, pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)  # UTC, whatever the tz
        vals = np.where(np.asarray(arr.is_null().to_numpy(zero_copy_only=False), bool), np.nan, ticks / per_second)
        return vals, np.zeros(len(arr), bool)
    if is_number(arr.type) or pa.types.is_boolean(arr.type):
        vals = pc.cast(arr, pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
        return np.where(np.isfinite(vals), vals, np.nan), np.zeros(len(arr), bool)
    text = as_text(arr)
    missing = missing_words(text)
    series = pd.Series(text.to_pylist(), dtype=object).where(~missing, None)
    if time:
        stamps = pd.to_datetime(series, utc=True, errors="coerce", format="ISO8601")
        vals = np.where(stamps.isna(), np.nan, (stamps - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1))
        vals = vals.astype(np.float64)
    else:
        vals = np.asarray(pd.to_numeric(series, errors="coerce"), dtype=np.float64)
    vals = np.where(np.isfinite(vals), vals, np.nan)
    return vals, ~missing & np.isnan(vals)


def flat_values(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(row of each value, the values as text) of a column: an Arrow list's elements, or one value per row."""
    arr = plain(arr)
    if is_list(arr.type):
        rows = np.asarray(pc.list_parent_indices(arr).to_numpy(zero_copy_only=False), np.int64)
        return rows, as_text(pc.list_flatten(arr))
    return np.arange(len(arr), dtype=np.int64), as_text(arr)


def split_flat(rows: np.ndarray, text: pa.Array, pattern: str, regex: bool) -> tuple[np.ndarray, pa.Array]:
    """Each text split on `pattern` (literal or RE2 regex): (row of each part, the trimmed non-empty parts)."""
    parts = (pc.split_pattern_regex if regex else pc.split_pattern)(text.fill_null(""), pattern=pattern)
    rows = rows[np.asarray(pc.list_parent_indices(parts).to_numpy(zero_copy_only=False), np.int64)]
    flat = pc.utf8_trim_whitespace(pc.list_flatten(parts))
    keep = np.asarray(pc.not_equal(flat, "").to_numpy(zero_copy_only=False), bool)
    return rows[keep], flat.filter(pa.array(keep))


def bag_flat(arr: pa.Array, sep: str) -> tuple[np.ndarray, pa.Array]:
    """A bag column as (row, value) pairs in row order: list elements, or text split on `sep`."""
    rows, text = flat_values(arr)
    if is_list(plain(arr).type):
        keep = np.asarray(text.is_valid().to_numpy(zero_copy_only=False), bool)
        return rows[keep], text.filter(pa.array(keep))
    return split_flat(rows, text, sep, regex=False)


def text_flat(arr: pa.Array, hash_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """A text column as (row, hashed word) pairs in row order: lowercased, split on anything but letters, digits
    and marks; each distinct word hashed once with crc32 (stable across processes, unlike hash())."""
    rows, text = flat_values(arr)
    rows, words = split_flat(rows, pc.utf8_lower(text), WORD_SPLIT, regex=True)
    uniq = pc.unique(words)
    hashes = np.asarray([zlib.crc32(w.encode("utf-8")) % hash_buckets for w in uniq.to_pylist()], np.int64)
    where = np.asarray(pc.index_in(words, value_set=uniq).to_numpy(zero_copy_only=False), np.int64)
    return rows, hashes[where] if where.size else np.empty(0, np.int64)


def first_per_row(rows: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, code) pairs (rows ascending) without repeats within a row, first occurrence kept, order kept."""
    if rows.size == 0:
        return rows, codes
    key = rows * (int(codes.max()) - int(codes.min()) + 1) + (codes - codes.min())
    _, first = np.unique(key, return_index=True)
    keep = np.sort(first)
    return rows[keep], codes[keep]


def per_row(rows: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(rows, minlength=n) if rows.size else np.zeros(n, np.int64)


def scatter(rows: np.ndarray, ids: np.ndarray, n: int, width: int, reserved: int) -> np.ndarray:
    """[n, width] ids: each row's ids in order, cut at `width`, then 0 (padding); a row without any: reserved."""
    out = np.zeros((n, width), np.int64)
    out[:, 0] = reserved
    pos = np.arange(rows.size) - np.searchsorted(rows, rows, side="left")  # index within its row
    keep = pos < width
    out[rows[keep], pos[keep]] = ids[keep]
    return out


def vectors(arr: pa.Array, name: str, row_ids: Sequence[str], where: str) -> tuple[np.ndarray, np.ndarray]:
    """(length of each row's vector, 0 when missing; all the numbers, row after row, float64) of a vector
    column: Arrow lists of numbers, or text like '0.1 0.2' / '[0.1, 0.2, 0.3]' (split on , ; | and spaces).
    A value that is not numbers, or holds NaN/inf -> UserError naming the column and the row's id."""
    arr = plain(arr)
    if is_list(arr.type):
        lengths = pc.list_value_length(arr).fill_null(0)
        flat = pc.list_flatten(arr)
    elif pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_null(arr.type):
        text = pc.utf8_trim_whitespace(pc.cast(arr, pa.string()).fill_null(""))
        text = pc.utf8_trim_whitespace(pc.replace_substring_regex(text, pattern=r"^[\[(]|[\])]$", replacement=""))
        parts = pc.split_pattern_regex(text, pattern=VECTOR_SPLIT)
        lengths = pc.if_else(pc.equal(text, ""), 0, pc.list_value_length(parts))
        flat = pc.list_flatten(parts.filter(pc.not_equal(text, "")))
    else:
        raise UserError(f"{where}: column {name!r} is a vector column but holds {arr.type} values, e.g. "
                        f"{sample(arr)!r}; expected lists of numbers or text like '0.1 0.2 0.3'")
    lengths = np.asarray(lengths.to_numpy(zero_copy_only=False), np.int64)
    rows = np.repeat(np.arange(len(arr)), lengths)
    try:
        if flat.null_count:
            raise pa.ArrowInvalid("a null element")
        values = np.asarray(pc.cast(flat, pa.float64()).to_numpy(zero_copy_only=False), np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        bad = _first_unparseable(flat)
        raise UserError(f"{where}: column {name!r}, id {row_ids[rows[bad]]!r}: "
                        f"{short(plain(arr)[int(rows[bad])].as_py())!r} is not a vector of numbers") from None
    if values.size and not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise UserError(f"{where}: column {name!r}, id {row_ids[rows[bad]]!r}: the vector holds NaN or inf")
    return lengths, values


def _first_unparseable(flat: pa.Array) -> int:
    """Index of the first element of `flat` that is null or not a number (only called to name it)."""
    for k, v in enumerate(flat.to_pylist()):
        try:
            float(v)
        except (TypeError, ValueError):
            return k
    return 0


def sample(arr: pa.Array) -> Any:
    """The first value of a column that is neither null nor '' (shortened), for messages; None if none."""
    arr = plain(arr)
    present = arr.is_valid()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        present = pc.and_(present, pc.not_equal(pc.utf8_trim_whitespace(arr), "").fill_null(False))
    where = np.flatnonzero(np.asarray(present.to_numpy(zero_copy_only=False), bool))
    return short(arr[int(where[0])].as_py()) if where.size else None


def short(v: Any) -> Any:
    text = v if isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
