"""Side tables of items and users (issue 14): read a table, encode its columns into global feature ids, store them
in the dataset dir's `features/`, read them back, and encode one new entity at serve/update time.

`ncf-ray prepare SOURCE --item-features FILE --user-features FILE` calls, per table: `read_side_table` (any format
prepare reads), `encode_side_table` (against the log's vocab, with bucket edges from train entities only), then
`write_features`. Training, export and serving call `read_features`; serving and `ncf-ray update` call
`encode_row_values` for an entity that is not in the table. Pure numpy/pyarrow, no Ray.

Layout (ARCHITECTURE / contract §3). Every column owns the global ids [offset, offset + size) of one shared id
space: `offset` is the column's reserved id (value missing, or never seen when the vocab was built), `offset + 1 +
code` a real value; id 0 is global padding (unused slots of bags and texts), so N = 1 + sum(size). One entity is
one row of `ids` int32 [n_entities, S]: a categorical or bucket column fills one slot, a bag or text column a run
of slots (its distinct values in order, then 0s), a vector column none (it fills `dense` float32 [n, V] instead).

Column kinds, decided per column in this order:
  vector       `vector_cols`, or an Arrow list of numbers: fixed length, else UserError naming column and row
  text         `text_cols`: lowercased words (runs of letters/digits) hashed with zlib.crc32 into hash_buckets
  bag          `bag_cols`, an Arrow list of strings, or text values holding `bag_sep` (genres, tags): own vocab
  categorical  `categorical_cols`, booleans, and text that is not all numbers: own vocab
  bucket       `numeric_cols`, numbers, and text that is all numbers ("NA"-like words count as missing):
               quantile edges from the values of entities with train interactions only, so a cold item's price
               never moves an edge
Vocabularies (categorical, bag) come from every row of the table whose id is in the log's vocab, not only from
train entities: a cold item's category then has its own id, which is what lets a model score the item from it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ncf_ray.data import schema as S
from ncf_ray.errors import UserError

CATEGORICAL, BUCKET, BAG, TEXT, VECTOR = "categorical", "bucket", "bag", "text", "vector"
KINDS = (CATEGORICAL, BUCKET, BAG, TEXT, VECTOR)
TABLES = ("items", "users")
# Text values that mean "no value" in a numeric column (a price of "N/A" is missing, not a category).
MISSING_WORDS = frozenset({"", "na", "n/a", "nan", "null", "none", "?", "-"})
WORD_SPLIT = r"[^\pL\pN\pM]+"  # RE2: words are runs of letters, digits and marks of any script
VECTOR_SPLIT = r"[,;\s|]+"  # RE2: what separates the numbers of a vector written as text
SOURCE_KEY = b"ncf_ray.source"  # schema metadata read_side_table sets: the file name, for messages and the spec
BAD_ROWS_KEY = b"ncf_ray.bad_rows"  # delimited rows with the wrong field count, skipped by read_side_table


@dataclass(frozen=True)
class SideOptions:
    """How to encode one side table. `id_col` names the entity id column; the *_cols tuples force a column's kind
    (otherwise it is inferred, see the module docstring); `drop_cols` are ignored. `buckets` is the number of
    quantile buckets of a numeric column, `max_bag`/`max_tokens` cap the slots of a bag/text column."""

    id_col: str
    text_cols: tuple[str, ...] = ()
    vector_cols: tuple[str, ...] = ()
    bag_sep: str = "|"
    buckets: int = 8
    max_bag: int = 16
    max_tokens: int = 24
    hash_buckets: int = 4096
    categorical_cols: tuple[str, ...] = ()
    numeric_cols: tuple[str, ...] = ()
    bag_cols: tuple[str, ...] = ()
    drop_cols: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("text_cols", "vector_cols", "categorical_cols", "numeric_cols", "bag_cols", "drop_cols"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # lists from flags/YAML become tuples
        for name, low in (("buckets", 2), ("max_bag", 1), ("max_tokens", 1), ("hash_buckets", 1)):
            if getattr(self, name) < low:
                raise UserError(f"{name}={getattr(self, name)} must be >= {low}")
        if not self.bag_sep:
            raise UserError("bag_sep must not be empty")
        seen: dict[str, str] = {}
        for kind, cols in self.forced().items():
            for col in cols:
                if col in seen:
                    raise UserError(f"column {col!r} is given two kinds: {seen[col]} and {kind}")
                if col == self.id_col:
                    raise UserError(f"column {col!r} is the id column; it cannot also be a {kind} column")
                seen[col] = kind

    def forced(self) -> dict[str, tuple[str, ...]]:
        """kind -> the columns whose kind the options fix."""
        return {VECTOR: self.vector_cols, TEXT: self.text_cols, BAG: self.bag_cols,
                CATEGORICAL: self.categorical_cols, BUCKET: self.numeric_cols}


@dataclass(frozen=True, eq=False)
class EncodedFeatures:
    """One encoded side table: `ids` int32 [n_entities, S] (global ids, row = entity index), `dense` float32
    [n_entities, V] or None, and its TABLE_SPEC `spec` (features.json)."""

    ids: np.ndarray
    dense: np.ndarray | None
    spec: dict[str, Any]

    @property
    def n_ids(self) -> int:
        return int(self.spec["n_ids"])


# ============================================================================================ reading
def read_side_table(path: str | Path, id_col: str, what: str, sep: str | None = None) -> pa.Table:
    """A side table from a file, directory or glob of CSV/TSV/TXT/DAT/Parquet/JSON Lines (optionally .gz), local
    or a pyarrow URI. Delimited text is read with a header line naming the columns, every value as text (so ids
    stay as written); .txt/.dat need `sep` or are sniffed from the header ('::', tab, '|', ','). Rows with the
    wrong number of fields are skipped and counted (schema metadata BAD_ROWS_KEY). `what` ("items"/"users")
    only names the table in messages. Missing id column, an unreadable or empty file -> UserError naming it."""
    from ncf_ray.data.sources import _list_files, _split_ext

    source = str(path)
    fs, files = _list_files(source)
    tables, bad = [], 0
    for f in files:
        fmt, compression = _split_ext(f)
        if not fmt:
            raise UserError(f"{what} table {f}: unknown format: expected .csv, .tsv, .txt/.dat, .parquet, .jsonl "
                            f"or .json (optionally .gz)")
        try:
            table, n_bad = _read_one(fs, f, fmt, compression, sep)
        except (pa.ArrowException, OSError, UnicodeDecodeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{what} table {f}: cannot read as {fmt}: {first}") from None
        if id_col not in table.column_names:
            raise UserError(f"{what} table {f}: missing id column {id_col!r}; columns found: "
                            f"{', '.join(table.column_names) or '(none)'}")
        tables.append(table)
        bad += n_bad
    names = tables[0].column_names
    for f, t in zip(files, tables):
        if sorted(t.column_names) != sorted(names):
            raise UserError(f"{what} table {f}: columns {', '.join(t.column_names)} differ from {files[0]}'s "
                            f"{', '.join(names)}")
    table = pa.concat_tables([t.select(names) for t in tables], promote_options="permissive")
    if table.num_rows == 0:
        raise UserError(f"{what} table {source}: no rows")
    name = os.path.basename(files[0]) if len(files) == 1 else source
    return table.replace_schema_metadata({SOURCE_KEY: name.encode(), BAD_ROWS_KEY: str(bad).encode()})


def _read_one(fs: Any, path: str, fmt: str, compression: str | None, sep: str | None) -> tuple[pa.Table, int]:
    """(table, rows skipped) of one file."""
    from ncf_ray.data.sources import _open

    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path, filesystem=fs), 0
    with _open(fs, path, compression) as fh:
        data = fh.read()
    if fmt in ("jsonl", "json"):
        return _read_json(data, fmt), 0
    sep = sep or {"csv": ",", "tsv": "\t"}.get(fmt) or _sniff_sep(data)
    return read_delimited(data.decode("utf-8"), sep)


def _read_json(data: bytes, fmt: str) -> pa.Table:
    import pyarrow.json as pajson

    try:
        return pajson.read_json(pa.BufferReader(data))
    except pa.ArrowInvalid:
        if fmt != "json":
            raise
        rows = json.loads(data)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError("expected objects, one per line, or one array of objects") from None
        return pa.Table.from_pylist(rows)


def _sniff_sep(data: bytes) -> str:
    header = data[:1 << 16].split(b"\n", 1)[0].decode("utf-8", errors="replace")
    for sep in ("::", "\t", "|", ","):
        if sep in header:
            return sep
    raise UserError(f"cannot tell the separator of a .txt/.dat side table from its header {header[:80]!r}; "
                    f"give it as a .csv or .tsv file")


def read_delimited(text: str, sep: str, names: Sequence[str] | None = None) -> tuple[pa.Table, int]:
    """Delimited text -> (table of trimmed, unquoted text columns, rows with the wrong field count). `names`
    None: the first line names the columns. Blank lines are skipped. Used for side tables and for the
    MovieLens files (which have no header)."""
    from ncf_ray.data.sources import _strip_quotes, split_fields

    lines = [ln.rstrip("\r") for ln in text.split("\n")]
    lines = [ln for ln in lines if ln.strip()]
    if names is None:
        if not lines:
            return pa.table({}), 0
        names = [n for n in _strip_quotes(pa.array(_split_header(lines[0], sep))).to_pylist()]
        lines = lines[1:]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate column names in the header: {', '.join(names)}")
    if len(sep) == 1:
        return _read_csv(lines, sep, names)
    table, bad = split_fields(pa.array(lines, pa.string()), sep, names)
    return table, len(bad)


def _split_header(line: str, sep: str) -> list[str]:
    if len(sep) == 1:
        import csv

        return next(csv.reader([line], delimiter=sep))
    return line.split(sep)


def _read_csv(lines: list[str], sep: str, names: Sequence[str]) -> tuple[pa.Table, int]:
    """One-character separator through pyarrow.csv, so quoted fields may hold the separator."""
    import pyarrow.csv as pacsv

    bad: list[str] = []

    def on_invalid(row: Any) -> str:
        bad.append(row.text)
        return "skip"

    if not lines:
        return pa.table({n: pa.array([], pa.string()) for n in names}), 0
    table = pacsv.read_csv(
        pa.BufferReader(("\n".join(lines) + "\n").encode()),
        read_options=pacsv.ReadOptions(column_names=list(names)),
        parse_options=pacsv.ParseOptions(delimiter=sep, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                             strings_can_be_null=False))
    return pa.table({c: pc.utf8_trim_whitespace(table.column(c)) for c in table.column_names}), len(bad)


def side_ids(table: pa.Table, id_col: str) -> np.ndarray:
    """The table's ids as the log's vocab writes them (str): integers canonically ('7' for 7 and 7.0), text
    exactly as given (trimmed). As in the log, text is never rewritten, so '007' in a side table is not 7: the
    log keeps '0012' and '12' apart too (sources._ids). Missing ids are ''."""
    return _as_text(table.column(id_col).combine_chunks()).fill_null("").to_numpy(zero_copy_only=False).astype(str)


# ============================================================================================ value parsing
def _plain(arr: pa.Array) -> pa.Array:
    """Dictionary arrays decoded; chunked arrays combined."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _scalar_text(v: Any) -> str | None:
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


def _as_text(arr: pa.Array) -> pa.Array:
    """A column as vocab text (nulls where missing): see _scalar_text."""
    arr = _plain(arr)
    t = arr.type
    if pa.types.is_integer(t):
        return pc.cast(arr, pa.string())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        text = pc.utf8_trim_whitespace(pc.cast(arr, pa.string()))
        return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    if _is_list(t) or pa.types.is_struct(t) or pa.types.is_map(t):
        raise TypeError(f"a {t} value where a single value is expected")
    return pa.array([_scalar_text(v) for v in arr.to_pylist()], pa.string())


def _missing_words(text: pa.Array) -> np.ndarray:
    """Mask of text values that mean "no value" in a numeric column (null, '', 'NA', 'n/a', ...)."""
    words = pc.is_in(pc.utf8_lower(text), value_set=pa.array(sorted(MISSING_WORDS), pa.string()))
    return np.asarray(pc.fill_null(pc.or_kleene(words, text.is_null()), True).to_numpy(zero_copy_only=False), bool)


def _as_float(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values float64 with NaN where missing or unparseable, mask of values present but not numbers)."""
    import pandas as pd

    arr = _plain(arr)
    if _is_number(arr.type) or pa.types.is_boolean(arr.type):
        vals = pc.cast(arr, pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
        return np.where(np.isfinite(vals), vals, np.nan), np.zeros(len(arr), bool)
    text = _as_text(arr)
    missing = _missing_words(text)
    text = pd.Series(text.to_pylist(), dtype=object)
    vals = np.asarray(pd.to_numeric(text.where(~missing, None), errors="coerce"), dtype=np.float64)
    vals = np.where(np.isfinite(vals), vals, np.nan)
    return vals, ~missing & np.isnan(vals)


def _flat(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(row of each value, the values as text) of a column: an Arrow list's elements, or one value per row."""
    arr = _plain(arr)
    if _is_list(arr.type):
        rows = np.asarray(pc.list_parent_indices(arr).to_numpy(zero_copy_only=False), np.int64)
        return rows, _as_text(pc.list_flatten(arr))
    return np.arange(len(arr), dtype=np.int64), _as_text(arr)


def _split_flat(rows: np.ndarray, text: pa.Array, pattern: str, regex: bool) -> tuple[np.ndarray, pa.Array]:
    """Each text split on `pattern` (literal or RE2 regex): (row of each part, the trimmed non-empty parts)."""
    parts = (pc.split_pattern_regex if regex else pc.split_pattern)(text.fill_null(""), pattern=pattern)
    rows = rows[np.asarray(pc.list_parent_indices(parts).to_numpy(zero_copy_only=False), np.int64)]
    flat = pc.utf8_trim_whitespace(pc.list_flatten(parts))
    keep = np.asarray(pc.not_equal(flat, "").to_numpy(zero_copy_only=False), bool)
    return rows[keep], flat.filter(pa.array(keep))


def _bag_flat(arr: pa.Array, sep: str) -> tuple[np.ndarray, pa.Array]:
    """A bag column as (row, value) pairs in row order: list elements, or text split on `sep`."""
    rows, text = _flat(arr)
    if _is_list(_plain(arr).type):
        keep = np.asarray(text.is_valid().to_numpy(zero_copy_only=False), bool)
        return rows[keep], text.filter(pa.array(keep))
    return _split_flat(rows, text, sep, regex=False)


def _text_flat(arr: pa.Array, hash_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """A text column as (row, hashed word) pairs in row order: lowercased, split on anything but letters, digits
    and marks; each distinct word hashed once with crc32 (stable across processes, unlike hash())."""
    rows, text = _flat(arr)
    rows, words = _split_flat(rows, pc.utf8_lower(text), WORD_SPLIT, regex=True)
    uniq = pc.unique(words)
    hashes = np.asarray([zlib.crc32(w.encode("utf-8")) % hash_buckets for w in uniq.to_pylist()], np.int64)
    where = np.asarray(pc.index_in(words, value_set=uniq).to_numpy(zero_copy_only=False), np.int64)
    return rows, hashes[where] if where.size else np.empty(0, np.int64)


def _first_per_row(rows: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, code) pairs (rows ascending) without repeats within a row, first occurrence kept, order kept."""
    if rows.size == 0:
        return rows, codes
    key = rows * (int(codes.max()) - int(codes.min()) + 1) + (codes - codes.min())
    _, first = np.unique(key, return_index=True)
    keep = np.sort(first)
    return rows[keep], codes[keep]


def _per_row(rows: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(rows, minlength=n) if rows.size else np.zeros(n, np.int64)


def _scatter(rows: np.ndarray, ids: np.ndarray, n: int, width: int, reserved: int) -> np.ndarray:
    """[n, width] ids: each row's ids in order, cut at `width`, then 0 (padding); a row without any: reserved."""
    out = np.zeros((n, width), np.int64)
    out[:, 0] = reserved
    pos = np.arange(rows.size) - np.searchsorted(rows, rows, side="left")  # index within its row
    keep = pos < width
    out[rows[keep], pos[keep]] = ids[keep]
    return out


def _vectors(arr: pa.Array, name: str, row_ids: Sequence[str], where: str) -> tuple[np.ndarray, np.ndarray]:
    """(length of each row's vector, 0 when missing; all the numbers, row after row, float64) of a vector
    column: Arrow lists of numbers, or text like '0.1 0.2' / '[0.1, 0.2, 0.3]' (split on , ; | and spaces).
    A value that is not numbers, or holds NaN/inf -> UserError naming the column and the row's id."""
    arr = _plain(arr)
    if _is_list(arr.type):
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
                        f"{_sample(arr)!r}; expected lists of numbers or text like '0.1 0.2 0.3'")
    lengths = np.asarray(lengths.to_numpy(zero_copy_only=False), np.int64)
    rows = np.repeat(np.arange(len(arr)), lengths)
    try:
        if flat.null_count:
            raise pa.ArrowInvalid("a null element")
        values = np.asarray(pc.cast(flat, pa.float64()).to_numpy(zero_copy_only=False), np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        bad = _first_unparseable(flat)
        raise UserError(f"{where}: column {name!r}, id {row_ids[rows[bad]]!r}: "
                        f"{_short(_plain(arr)[int(rows[bad])].as_py())!r} is not a vector of numbers") from None
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


def _sample(arr: pa.Array) -> Any:
    """The first value of a column that is neither null nor '' (shortened), for messages; None if none."""
    arr = _plain(arr)
    present = arr.is_valid()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        present = pc.and_(present, pc.not_equal(pc.utf8_trim_whitespace(arr), "").fill_null(False))
    where = np.flatnonzero(np.asarray(present.to_numpy(zero_copy_only=False), bool))
    return _short(arr[int(where[0])].as_py()) if where.size else None


def _short(v: Any) -> Any:
    text = v if isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# ============================================================================================ fitting columns
def infer_kind(name: str, arr: pa.Array, options: SideOptions) -> str:
    """A column's kind: forced by the options, else from its Arrow type and values (module docstring)."""
    for kind, cols in options.forced().items():
        if name in cols:
            return kind
    arr = _plain(arr)
    t = arr.type
    if _is_list(t):
        return VECTOR if _is_number(t.value_type) else BAG
    if pa.types.is_boolean(t):
        return CATEGORICAL
    if _is_number(t):
        return BUCKET
    if pa.types.is_struct(t) or pa.types.is_map(t) or pa.types.is_binary(t):
        raise TypeError(f"unsupported type {t}")
    text = _as_text(arr).drop_null()
    if len(text) and pc.any(pc.match_substring(text, options.bag_sep)).as_py():
        return BAG
    if len(text):
        _, unparsed = _as_float(text)
        if not _missing_words(text).all() and not unparsed.any():
            return BUCKET
    return CATEGORICAL


def _fit_column(name: str, kind: str, arr: pa.Array, train_rows: np.ndarray, options: SideOptions,
                row_ids: Sequence[str], where: str) -> dict[str, Any]:
    """The column's spec (kind extras, size, width in slots or dims) from its values on the table's known rows.
    A column with no value at all, or none parseable for its kind -> UserError naming it and a sample."""
    sample = _sample(arr)
    if sample is None:
        raise UserError(f"{where}: column {name!r} is empty (no value on any of its {len(arr)} rows)")
    col: dict[str, Any] = {"name": name, "kind": kind}
    if kind == CATEGORICAL:
        vocab = sorted(set(_as_text(arr).drop_null().to_pylist()))
        col.update(vocab=vocab, size=1 + len(vocab), width=1)
    elif kind == BUCKET:
        vals, unparsed = _as_float(arr)
        if np.isnan(vals).all():
            raise UserError(f"{where}: column {name!r} has no numeric value (e.g. {sample!r})")
        train_vals = vals[train_rows & ~np.isnan(vals)]
        if train_vals.size == 0:
            raise UserError(f"{where}: numeric column {name!r} has no value on any entity with train "
                            f"interactions, so its bucket edges cannot be set from train (e.g. {sample!r})")
        qs = np.quantile(train_vals, np.linspace(0, 1, options.buckets + 1)[1:-1])
        edges = [float(e) for e in np.unique(qs)]
        col.update(edges=edges, size=1 + len(edges) + 1, width=1, unparsed=int(unparsed.sum()))
    elif kind == BAG:
        rows, values = _bag_flat(arr, options.bag_sep)
        uniq = pc.unique(values)
        rows, _ = _first_per_row(rows, np.asarray(pc.index_in(values, value_set=uniq).to_numpy(), np.int64))
        counts = _per_row(rows, len(arr))
        col.update(vocab=sorted(uniq.to_pylist()), sep=options.bag_sep, size=1 + len(uniq),
                   width=max(1, min(options.max_bag, int(counts.max()))),
                   truncated=int((counts > options.max_bag).sum()))
    elif kind == TEXT:
        longest = int(_per_row(_first_per_row(*_text_flat(arr, options.hash_buckets))[0], len(arr)).max())
        if longest == 0:
            raise UserError(f"{where}: text column {name!r} has no words (e.g. {sample!r})")
        col.update(hash_buckets=options.hash_buckets, max_tokens=options.max_tokens, size=1 + options.hash_buckets,
                   width=min(options.max_tokens, longest))
    elif kind == VECTOR:
        lengths, _ = _vectors(arr, name, row_ids, where)
        present = np.flatnonzero(lengths)
        if present.size == 0:
            raise UserError(f"{where}: vector column {name!r} has no vector (e.g. {sample!r})")
        dim = int(lengths[present[0]])
        _check_lengths(lengths, dim, name, row_ids, where, "the first vector's length")
        col.update(dim=dim, size=0, width=dim)
    else:
        raise ValueError(f"unknown column kind {kind!r}")
    return col


def _layout(cols: list[dict[str, Any]]) -> tuple[int, int, int]:
    """Give each column its global id offset and its slots (or dims); returns (n_ids, slots, dense_dim)."""
    offset, slot, dim = 1, 0, 0
    for col in cols:
        width = col.pop("width")
        col["offset"] = offset
        offset += col["size"]
        if col["kind"] == VECTOR:
            col["dims"] = [dim, dim + width]
            dim += width
        else:
            col["slots"] = [slot, slot + width]
            slot += width
    return offset, slot, dim


# ============================================================================================ encoding
def _encode_column(col: dict[str, Any], arr: pa.Array, strict: bool = False) -> np.ndarray:
    """Global ids [n, width] of one non-vector column for the values `arr` (one per entity): unseen or missing
    values get the column's reserved id `offset`; a bag or text row fills its first slots, then 0 (padding).
    `strict` (one entity at serve time): a value present but not a number in a bucket column -> UserError."""
    lo, hi = col["slots"]
    width, offset, n = hi - lo, col["offset"], len(arr)
    out = np.zeros((n, width), np.int64)
    kind = col["kind"]
    if kind == CATEGORICAL:
        codes = pc.index_in(_as_text(arr), value_set=pa.array(col["vocab"], pa.string()))
        codes = np.asarray(codes.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
        out[:, 0] = offset + 1 + codes  # -1 (unseen/missing) lands on offset
    elif kind == BUCKET:
        vals, unparsed = _as_float(arr)
        if strict and unparsed.any():
            raise UserError(f"feature {col['name']!r} wants a number, got {_sample(arr)!r}")
        code = np.searchsorted(np.asarray(col["edges"], np.float64), np.nan_to_num(vals), side="right")
        out[:, 0] = np.where(np.isnan(vals), offset, offset + 1 + code)
    elif kind == BAG:
        rows, values = _bag_flat(arr, col["sep"])
        codes = pc.index_in(values, value_set=pa.array(col["vocab"], pa.string())).fill_null(-1)
        ids = offset + 1 + np.asarray(codes.to_numpy(zero_copy_only=False), np.int64)  # unseen -> offset
        out = _scatter(*_first_per_row(rows, ids), n, width, offset)
    elif kind == TEXT:
        rows, hashes = _text_flat(arr, col["hash_buckets"])
        out = _scatter(*_first_per_row(rows, offset + 1 + hashes), n, width, offset)
    else:
        raise ValueError(f"column {col['name']!r} of kind {kind!r} has no ids")
    return out


def _check_lengths(lengths: np.ndarray, dim: int, name: str, row_ids: Sequence[str], where: str,
                   why: str = "the column's dim") -> None:
    wrong = np.flatnonzero((lengths != 0) & (lengths != dim))
    if wrong.size:
        k = int(wrong[0])
        raise UserError(f"{where}: vector column {name!r}, id {row_ids[k]!r}: length {lengths[k]}, expected {dim} "
                        f"({why})")


def _dense_column(col: dict[str, Any], arr: pa.Array, row_ids: Sequence[str],
                  where: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [n, dim], mask of rows with a vector) of one vector column; a missing vector is zeros, a wrong
    length a UserError naming the column and the row's id."""
    lengths, values = _vectors(arr, col["name"], row_ids, where)
    _check_lengths(lengths, col["dim"], col["name"], row_ids, where)
    present = lengths > 0
    out = np.zeros((len(arr), col["dim"]), np.float32)
    out[present] = values.reshape(-1, col["dim"])
    return out, present


def _reserved_row(cols: list[dict[str, Any]], slots: int) -> np.ndarray:
    """The ids of an entity without a row: each column's reserved id in its first slot, padding after."""
    row = np.zeros(slots, np.int64)
    for col in cols:
        if col["kind"] != VECTOR:
            row[col["slots"][0]] = col["offset"]
    return row


def encode_side_table(table: pa.Table, options: SideOptions, vocab_ids: np.ndarray, train_mask: np.ndarray,
                      what: str, source: str | None = None) -> EncodedFeatures:
    """Encode a side table against the log's vocab: `vocab_ids` are the raw ids by entity index (str, as in
    items.parquet/users.parquet), `train_mask` marks the entities with train interactions (bucket edges come from
    their values only). Rows whose id is not in the vocab are skipped and counted (stats.unknown_ids); of
    repeated ids the first row counts (stats.duplicate_rows); entities without a row get every column's reserved
    id (stats.entities_without_row). Bad tables -> UserError, one line naming the file and column."""
    vocab_ids = np.asarray(vocab_ids).astype(str)
    train_mask = np.asarray(train_mask, bool)
    if train_mask.shape != vocab_ids.shape:
        raise ValueError(f"train_mask has shape {train_mask.shape}, vocab_ids {vocab_ids.shape}")
    meta = table.schema.metadata or {}
    source = source or meta.get(SOURCE_KEY, what.encode()).decode()
    where = f"{what} table {source}"
    id_col = options.id_col
    if id_col not in table.column_names:
        raise UserError(f"{where}: missing id column {id_col!r}; columns found: {', '.join(table.column_names)}")
    for kind, cols in options.forced().items():
        for c in cols:
            if c not in table.column_names:
                raise UserError(f"{where}: {kind} column {c!r} is not in the table; columns found: "
                                f"{', '.join(table.column_names)}")
    names = [c for c in table.column_names if c != id_col and c not in options.drop_cols]
    if not names:
        raise UserError(f"{where}: no feature columns besides the id column {id_col!r}")

    raw = side_ids(table, id_col)
    ent = pc.index_in(pa.array(raw, pa.string()), value_set=pa.array(vocab_ids, pa.string()))
    ent = np.asarray(ent.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
    known = np.flatnonzero(ent >= 0)
    if known.size == 0:
        raise UserError(f"{where}: none of its {len(raw)} ids in column {id_col!r} is a {what[:-1]} id of the log "
                        f"(e.g. {raw[0]!r}; the log has e.g. {vocab_ids[0] if vocab_ids.size else None!r})")
    _, first = np.unique(ent[known], return_index=True)
    rows = known[np.sort(first)]
    entities = ent[rows]
    row_ids = raw[rows].tolist()  # Python str, so messages show '12', not np.str_('12')
    train_rows = train_mask[entities]

    cols = []
    for name in names:
        arr = table.column(name).take(pa.array(rows)).combine_chunks()
        try:
            kind = infer_kind(name, arr, options)
        except TypeError as exc:
            raise UserError(f"{where}: column {name!r}: {exc}") from None
        cols.append(_fit_column(name, kind, arr, train_rows, options, row_ids, where))
    n_ids, slots, dense_dim = _layout(cols)

    n = vocab_ids.size
    ids = np.tile(_reserved_row(cols, slots), (n, 1))
    dense = np.zeros((n, dense_dim), np.float32) if dense_dim else None
    for col in cols:
        arr = table.column(col["name"]).take(pa.array(rows)).combine_chunks()
        if col["kind"] == VECTOR:
            lo, hi = col["dims"]
            dense[entities, lo:hi], present = _dense_column(col, arr, row_ids, where)
        else:
            lo, hi = col["slots"]
            block = _encode_column(col, arr)
            ids[entities, lo:hi] = block
            present = block[:, 0] != col["offset"]
        col["missing"] = int((~present).sum())  # rows whose value is missing (or unseen: none at fit time)
    spec = {
        "n_ids": int(n_ids), "slots": int(slots), "dense_dim": int(dense_dim), "id_col": id_col,
        "source": source, "columns": cols,
        "stats": {"rows": int(table.num_rows), "unknown_ids": int(len(raw) - known.size),
                  "entities_without_row": int(n - rows.size), "duplicate_rows": int(known.size - rows.size),
                  "bad_rows": int(meta.get(BAD_ROWS_KEY, b"0"))},
    }
    if n_ids > np.iinfo(np.int32).max:
        raise UserError(f"{where}: {n_ids} feature ids do not fit int32; lower hash_buckets or drop columns")
    return EncodedFeatures(ids.astype(np.int32), dense, spec)


def _value_array(value: Any, kind: str) -> pa.Array:
    """One raw value (from a request or an update row) as a one-element Arrow array."""
    if isinstance(value, (list, tuple)):
        if kind == VECTOR:
            return pa.array([list(value)], pa.list_(pa.float64()))
        if kind == BAG:
            return pa.array([[_scalar_text(v) for v in value]], pa.list_(pa.string()))
        raise TypeError(f"a list where a single value is expected (a {kind} feature)")
    if isinstance(value, dict):
        raise TypeError(f"an object where a single value is expected (a {kind} feature)")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        value = _scalar_text(value)
    return pa.array([value])


def encode_row_values(spec: dict[str, Any] | list[dict[str, Any]], raw: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """Ids int32 [S] (and dense float32 [V], or None) of one new entity from its raw values {column: value}, as
    encode_side_table would have encoded its row: unseen or absent values -> reserved ids. A column name that is
    not in the spec, a number column given text, or a vector of the wrong length -> UserError naming it.
    `spec` may also be just its "columns" list (contract §3 names it so)."""
    if isinstance(spec, list):
        spec = {"columns": spec, "slots": max((c["slots"][1] for c in spec if "slots" in c), default=0),
                "dense_dim": max((c["dims"][1] for c in spec if "dims" in c), default=0)}
    by_name = {c["name"]: c for c in spec["columns"]}
    unknown = [k for k in raw if k not in by_name and k != spec.get("id_col")]
    if unknown:
        raise UserError(f"unknown feature {unknown[0]!r}; expected one of {', '.join(by_name) or '(none)'}")
    ids = _reserved_row(spec["columns"], spec["slots"])
    dense = np.zeros(spec["dense_dim"], np.float32) if spec["dense_dim"] else None
    for name, col in by_name.items():
        value = raw.get(name)
        try:
            arr = _value_array(value, col["kind"])
        except (TypeError, pa.ArrowException) as exc:
            raise UserError(f"feature {name!r}: {exc}") from None
        if col["kind"] == VECTOR:
            lo, hi = col["dims"]
            dense[lo:hi] = _dense_column(col, arr, [str(raw.get(spec.get("id_col"), "new"))], "features")[0][0]
        else:
            lo, hi = col["slots"]
            ids[lo:hi] = _encode_column(col, arr, strict=True)[0]
    return ids.astype(np.int32), dense


# ============================================================================================ storing
def _check_encoded(enc: EncodedFeatures, where: str, err: type[Exception]) -> None:
    spec, ids = enc.spec, enc.ids
    n_ids = int(spec["n_ids"])
    if ids.ndim != 2 or ids.shape[1] != spec["slots"]:
        raise err(f"{where}: ids have shape {ids.shape}, the spec says {spec['slots']} slots")
    if ids.size and (ids.min() < 0 or ids.max() >= n_ids):
        raise err(f"{where}: ids span [{ids.min()}, {ids.max()}], outside [0, {n_ids})")
    dim = int(spec["dense_dim"])
    if (enc.dense is None) != (dim == 0) or (enc.dense is not None and enc.dense.shape != (ids.shape[0], dim)):
        got = None if enc.dense is None else enc.dense.shape
        raise err(f"{where}: dense has shape {got}, the spec says {ids.shape[0]} x {dim}")


def write_features(directory: str | Path, items: EncodedFeatures | None, users: EncodedFeatures | None) -> None:
    """`directory/features/` = items.safetensors, users.safetensors (tensors `ids`, optional `dense`) and
    features.json {"items": spec, "users": spec}; built beside it and renamed into place. Nothing is written
    when both are None."""
    from safetensors.numpy import save_file

    tables = {k: v for k, v in zip(TABLES, (items, users)) if v is not None}
    if not tables:
        return
    root = Path(directory)
    dest = root / S.FEATURES_DIR
    tmp = root / f".{S.FEATURES_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for what, enc in tables.items():
            _check_encoded(enc, what, ValueError)
            tensors = {"ids": np.ascontiguousarray(enc.ids, np.int32)}
            if enc.dense is not None:
                tensors["dense"] = np.ascontiguousarray(enc.dense, np.float32)
            save_file(tensors, str(tmp / S.FEATURE_FILES[what]))
        (tmp / S.FEATURES_JSON).write_text(json.dumps({k: v.spec for k, v in tables.items()}, indent=2,
                                                      sort_keys=True))
        old = root / f".{S.FEATURES_DIR}.old-{os.getpid()}"
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_features(directory: str | Path) -> dict[str, EncodedFeatures]:
    """{"items": ..., "users": ...} (either may be absent) from `directory/features/` of a dataset dir or an
    artifact; {} when there is no features/ dir. A damaged file or one that disagrees with features.json ->
    UserError naming the file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    root = Path(directory) / S.FEATURES_DIR
    if not root.is_dir():
        return {}
    spec_file = root / S.FEATURES_JSON
    try:
        specs = json.loads(spec_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{spec_file}: cannot read: {exc}") from None
    out = {}
    for what in TABLES:
        if what not in specs:
            continue
        path = root / S.FEATURE_FILES[what]
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise UserError(f"{path}: not a readable safetensors file: {exc}") from None
        if "ids" not in tensors:
            raise UserError(f"{path}: no 'ids' tensor")
        enc = EncodedFeatures(tensors["ids"].astype(np.int32, copy=False), tensors.get("dense"), specs[what])
        _check_encoded(enc, str(path), UserError)
        out[what] = enc
    return out


# ============================================================================================ describing
def describe(spec: dict[str, Any]) -> list[str]:
    """One line per column of a TABLE_SPEC, for `ncf-ray prepare` and `/model`."""
    lines = []
    for col in spec["columns"]:
        kind = col["kind"]
        if kind == CATEGORICAL:
            what = f"{len(col['vocab'])} values"
        elif kind == BUCKET:
            edges = col["edges"]
            span = f", edges {edges[0]:g} .. {edges[-1]:g}" if edges else ""
            what = f"{len(edges) + 1} buckets{span} (train quantiles)"
        elif kind == BAG:
            what = f"{len(col['vocab'])} values, up to {col['slots'][1] - col['slots'][0]} per row"
        elif kind == TEXT:
            what = f"words hashed into {col['hash_buckets']}, up to {col['slots'][1] - col['slots'][0]} per row"
        else:
            what = f"{col['dim']} dims (learned projection)"
        missing = f", missing on {col['missing']} rows" if col.get("missing") else ""
        lines.append(f"{col['name']}: {kind}, {what}{missing}")
    return lines


def movielens_side_tables(name: str, directory: str | Path) -> tuple[pa.Table | None, pa.Table | None,
                                                                     SideOptions, SideOptions]:
    """(items, users, item options, user options) of a MovieLens release: see ncf_ray/data/movielens_features.py."""
    from ncf_ray.data.movielens_features import movielens_side_tables as read

    return read(name, directory)
