"""Side tables of items and users (issue 14): read a table, encode its columns into global feature ids, store them
in the dataset dir's `features/`, read them back, and encode one new entity at serve/update time.

`ncf-ray prepare SOURCE --item-features FILE --user-features FILE` calls, per table: `read_side_table` (any format
prepare reads), `encode_side_table` (against the log's vocab, with bucket edges from train entities only), then
`write_features`. Training, export and serving call `read_features`; serving and `ncf-ray update` call
`encode_row_values` for an entity that is not in the table, and `extend_features` to append the rows of entities
an update adds to the vocab. Pure numpy/pyarrow, no Ray. File reading lives in
side_read.py, value parsing in side_values.py, the MovieLens tables in movielens_features.py.

Layout (ARCHITECTURE / contract §3). Every column owns the global ids [offset, offset + size) of one shared id
space: `offset` is the column's reserved id (value missing, or never seen when the vocab was built), `offset + 1 +
code` a real value; id 0 is global padding (unused slots of bags and texts), so N = 1 + sum(size). One entity is
one row of `ids` int32 [n_entities, S]: a categorical or bucket column fills one slot, a bag or text column a run
of slots (its distinct values in order, then 0s), a vector column none (it fills `dense` float32 [n, V] instead).

Column kinds, decided per column in this order:
  vector       `vector_cols`, or an Arrow list of numbers: fixed length, else UserError naming column and row
  text         `text_cols`: lowercased words (letters, digits, marks of any script) crc32-hashed into buckets
  bag          `bag_cols`, an Arrow list of strings, or text values holding `bag_sep` (genres, tags): own vocab
  categorical  `categorical_cols`, booleans, and text that is not all numbers: own vocab
  bucket       `numeric_cols`, numbers, dates/timestamps (as epoch seconds, also ISO 8601 text), and text that
               is all numbers ("NA"-like words count as missing):
               quantile edges from the values of entities with train interactions only, so a cold item's price
               never moves an edge
Vocabularies (categorical, bag) come from every row of the table whose id is in the log's vocab, not only from
train entities: a cold item's category then has its own id, which is what lets a model score the item from it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ncf_ray.data import schema as S
from ncf_ray.data import side_values as V
from ncf_ray.data.side_read import BAD_ROWS_KEY, SOURCE_KEY, read_delimited, read_side_table
from ncf_ray.errors import UserError

__all__ = ["BAG", "BUCKET", "CATEGORICAL", "KINDS", "TEXT", "VECTOR", "EncodedFeatures", "SideOptions", "describe",
           "encode_row_values", "encode_side_table", "extend_features", "infer_kind", "movielens_side_tables", "read_delimited",
           "read_features", "read_side_table", "side_ids", "write_features"]

CATEGORICAL, BUCKET, BAG, TEXT, VECTOR = "categorical", "bucket", "bag", "text", "vector"
KINDS = (CATEGORICAL, BUCKET, BAG, TEXT, VECTOR)
TABLES = ("items", "users")


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


def side_ids(table: pa.Table, id_col: str) -> np.ndarray:
    """The table's ids as the log's vocab writes them (str): integers canonically ('7' for 7 and 7.0), text
    exactly as given (trimmed). As in the log, text is never rewritten, so '007' in a side table is not 7: the
    log keeps '0012' and '12' apart too (sources._ids). Missing ids are ''."""
    return V.as_text(table.column(id_col).combine_chunks()).fill_null("").to_numpy(zero_copy_only=False).astype(str)


# ============================================================================================ fitting columns
def infer_kind(name: str, arr: pa.Array, options: SideOptions) -> str:
    """A column's kind: forced by the options, else from its Arrow type and values (module docstring)."""
    for kind, cols in options.forced().items():
        if name in cols:
            return kind
    arr = V.plain(arr)
    t = arr.type
    if V.is_list(t):
        return VECTOR if V.is_number(t.value_type) else BAG
    if pa.types.is_boolean(t):
        return CATEGORICAL
    if V.is_number(t) or V.is_time(t):
        return BUCKET
    if pa.types.is_struct(t) or pa.types.is_map(t) or pa.types.is_binary(t):
        raise V.UnsupportedValue(f"unsupported type {t}")
    text = V.as_text(arr).drop_null()
    if len(text) and pc.any(pc.match_substring(text, options.bag_sep)).as_py():
        return BAG
    if len(text):
        _, unparsed = V.as_float(text)
        if not V.missing_words(text).all() and not unparsed.any():
            return BUCKET
        if V.looks_like_time(text):
            return BUCKET
    return CATEGORICAL


def _train_unseen(vocab: list[str], train_values: pa.Array) -> int:
    """How many vocab values no entity with train interactions has: their embeddings get no gradient in training
    (the vocab still holds them, so a cold item's own value is not confused with another's)."""
    return len(vocab) - len(pc.unique(train_values)) if len(train_values) else len(vocab)


def _fit_column(name: str, kind: str, arr: pa.Array, train_rows: np.ndarray, options: SideOptions,
                row_ids: Sequence[str], where: str) -> dict[str, Any]:
    """The column's spec (kind extras, size, width in slots or dims) from its values on the table's known rows.
    A column with no value at all, or none parseable for its kind -> UserError naming it and a sample."""
    sample = V.sample(arr)
    if sample is None:
        raise UserError(f"{where}: column {name!r} is empty (no value on any of its {len(arr)} rows)")
    col: dict[str, Any] = {"name": name, "kind": kind}
    if kind == CATEGORICAL:
        text = V.as_text(arr)
        vocab = sorted(set(text.drop_null().to_pylist()))
        col.update(vocab=vocab, size=1 + len(vocab), width=1,
                   train_unseen=_train_unseen(vocab, text.filter(pa.array(train_rows)).drop_null()))
    elif kind == BUCKET:
        time = V.is_time(V.plain(arr).type) or V.looks_like_time(arr)
        vals, unparsed = V.as_float(arr, time=time)
        if np.isnan(vals).all():
            raise UserError(f"{where}: column {name!r} has no numeric value (e.g. {sample!r})")
        train_vals = vals[train_rows & ~np.isnan(vals)]
        if train_vals.size == 0:
            raise UserError(f"{where}: numeric column {name!r} has no value on any entity with train "
                            f"interactions, so its bucket edges cannot be set from train (e.g. {sample!r})")
        qs = np.quantile(train_vals, np.linspace(0, 1, options.buckets + 1)[1:-1])
        edges = [float(e) for e in np.unique(qs)]
        col.update(edges=edges, size=1 + len(edges) + 1, width=1, unparsed=int(unparsed.sum()))
        if time:
            col["time"] = True  # edges are epoch seconds; a new entity's value may come as an ISO date
    elif kind == BAG:
        rows_all, values = V.bag_flat(arr, options.bag_sep)
        uniq = pc.unique(values)
        rows, _ = V.first_per_row(rows_all, np.asarray(pc.index_in(values, value_set=uniq).to_numpy(), np.int64))
        counts = V.per_row(rows, len(arr))
        vocab = sorted(uniq.to_pylist())
        col.update(vocab=vocab, sep=options.bag_sep, size=1 + len(uniq),
                   width=max(1, min(options.max_bag, int(counts.max()))),
                   truncated=int((counts > options.max_bag).sum()),
                   train_unseen=_train_unseen(vocab, values.filter(pa.array(train_rows[rows_all]))))
    elif kind == TEXT:
        longest = int(V.per_row(V.first_per_row(*V.text_flat(arr, options.hash_buckets))[0], len(arr)).max())
        if longest == 0:
            raise UserError(f"{where}: text column {name!r} has no words (e.g. {sample!r})")
        col.update(hash_buckets=options.hash_buckets, max_tokens=options.max_tokens, size=1 + options.hash_buckets,
                   width=min(options.max_tokens, longest))
    elif kind == VECTOR:
        lengths, _ = V.vectors(arr, name, row_ids, where)
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
        codes = pc.index_in(V.as_text(arr), value_set=pa.array(col["vocab"], pa.string()))
        codes = np.asarray(codes.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
        out[:, 0] = offset + 1 + codes  # -1 (unseen/missing) lands on offset
    elif kind == BUCKET:
        vals, unparsed = V.as_float(arr, time=col.get("time", False))
        if strict and unparsed.any():
            raise UserError(f"feature {col['name']!r} wants a number, got {V.sample(arr)!r}")
        code = np.searchsorted(np.asarray(col["edges"], np.float64), np.nan_to_num(vals), side="right")
        out[:, 0] = np.where(np.isnan(vals), offset, offset + 1 + code)
    elif kind == BAG:
        rows, values = V.bag_flat(arr, col["sep"])
        codes = pc.index_in(values, value_set=pa.array(col["vocab"], pa.string())).fill_null(-1)
        ids = offset + 1 + np.asarray(codes.to_numpy(zero_copy_only=False), np.int64)  # unseen -> offset
        out = V.scatter(*V.first_per_row(rows, ids), n, width, offset)
    elif kind == TEXT:
        rows, hashes = V.text_flat(arr, col["hash_buckets"])
        out = V.scatter(*V.first_per_row(rows, offset + 1 + hashes), n, width, offset)
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
    lengths, values = V.vectors(arr, col["name"], row_ids, where)
    _check_lengths(lengths, col["dim"], col["name"], row_ids, where)
    present = lengths > 0
    out = np.zeros((len(arr), col["dim"]), np.float32)
    out[present] = values.reshape(-1, col["dim"])
    return out, present


def reserved_row(spec: dict[str, Any]) -> np.ndarray:
    """The ids row [S] of an entity with no known value in any column of a TABLE_SPEC (every column's reserved
    id): what an entity without a side-table row gets, and what `ncf-ray forget` leaves of a user's profile."""
    return _reserved_row(spec["columns"], spec["slots"])


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
            cols.append(_fit_column(name, kind, arr, train_rows, options, row_ids, where))
        except V.UnsupportedValue as exc:
            raise UserError(f"{where}: column {name!r}: {exc}") from None
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
            return pa.array([[V.scalar_text(v) for v in value]], pa.list_(pa.string()))
        raise TypeError(f"a list where a single value is expected (a {kind} feature)")
    if isinstance(value, dict):
        raise TypeError(f"an object where a single value is expected (a {kind} feature)")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        value = V.scalar_text(value)
    return pa.array([value])


def encode_row_values(spec: dict[str, Any] | list[dict[str, Any]],
                      raw: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
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


def extend_features(enc: EncodedFeatures, new_ids: np.ndarray, table: pa.Table | None = None,
                    what: str = "items") -> EncodedFeatures:
    """`enc` with one row appended per entry of `new_ids` (raw ids of entities added after it was built: an
    `ncf-ray update` growing the vocab), each encoded from its row of `table` against the frozen spec (the same
    vocab and bucket edges, so every existing id keeps its meaning; unseen values -> reserved ids), or all-reserved
    when `table` is None or has no row for it. Spec columns the table lacks stay reserved; extra columns are
    ignored (a trained model cannot take a new column). Old rows are unchanged. stats gains "appended" and
    "appended_without_row"."""
    spec = json.loads(json.dumps(enc.spec))  # a copy: the caller's spec stays as it was
    new_ids = np.asarray(new_ids).astype(str)
    n, cols = new_ids.size, spec["columns"]
    ids = np.tile(_reserved_row(cols, spec["slots"]), (n, 1))
    dense = np.zeros((n, spec["dense_dim"]), np.float32) if spec["dense_dim"] else None
    found = np.zeros(n, bool)
    if table is not None and n:
        where = f"{what} table {(table.schema.metadata or {}).get(SOURCE_KEY, what.encode()).decode()}"
        if spec["id_col"] not in table.column_names:
            raise UserError(f"{where}: missing id column {spec['id_col']!r}; columns found: "
                            f"{', '.join(table.column_names)}")
        raw = side_ids(table, spec["id_col"])
        uniq, first = np.unique(raw, return_index=True)  # the first row of a repeated id counts
        pos = pc.index_in(pa.array(new_ids, pa.string()), value_set=pa.array(uniq, pa.string()))
        pos = np.asarray(pos.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
        found = pos >= 0
        rows = pa.array(first[pos[found]])
        row_ids = new_ids[found].tolist()
        for col in cols:
            if col["name"] not in table.column_names:
                continue
            arr = table.column(col["name"]).take(rows).combine_chunks()
            try:
                if col["kind"] == VECTOR:
                    lo, hi = col["dims"]
                    dense[found, lo:hi] = _dense_column(col, arr, row_ids, where)[0]
                else:
                    lo, hi = col["slots"]
                    ids[found, lo:hi] = _encode_column(col, arr)
            except V.UnsupportedValue as exc:
                raise UserError(f"{where}: column {col['name']!r}: {exc}") from None
    stats = spec.setdefault("stats", {})
    stats["appended"] = int(stats.get("appended", 0) + n)
    stats["appended_without_row"] = int(stats.get("appended_without_row", 0) + n - int(found.sum()))
    all_dense = None if dense is None else np.concatenate([enc.dense, dense])
    return EncodedFeatures(np.concatenate([enc.ids, ids.astype(np.int32)]), all_dense, spec)


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
        # safetensors writes 0600; give its files the mode a plain file gets here (0666 & ~umask), so a dataset
        # dir or artifact copied somewhere shared stays readable like its Parquet files.
        mode = (tmp / S.FEATURES_JSON).stat().st_mode & 0o777
        for what in tables:
            os.chmod(tmp / S.FEATURE_FILES[what], mode)
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
        if col.get("train_unseen"):
            missing += f", {col['train_unseen']} values only on entities without train interactions"
        lines.append(f"{col['name']}: {kind}, {what}{missing}")
    return lines


def movielens_side_tables(name: str, directory: str | Path) -> tuple[pa.Table | None, pa.Table | None,
                                                                     SideOptions, SideOptions]:
    """(items, users, item options, user options) of a MovieLens release: see ncf_ray/data/movielens_features.py."""
    from ncf_ray.data.movielens_features import movielens_side_tables as read

    return read(name, directory)
