"""Resolve `ncf-ray prepare SOURCE` into Ray Datasets of normalised interaction rows.

SOURCE is a file, directory or glob of CSV/TSV/TXT(--sep)/Parquet/JSONL (optionally .gz), local or any pyarrow
filesystem URI (s3://, gs://, file://), or a named source: `synthetic`, `synthetic-shop` (events, device context,
item and user side tables: data/shop.py), `ncf:PATH_PREFIX` (the NCF paper's files), `movielens-100k|1m|20m`
(GroupLens download with checksum into ~/.cache/ncf_ray, or `--from LOCAL_ZIP_OR_DIR`; its movie/user files come
along as side tables unless --no-side-tables).

A log's event column (`--event-col`) becomes `event`, the index of its value in `--events` (a value outside them
is a bad row, named in `_err`); each `--context-cols` column passes through as text in `ctx_<name>`.

Files are read one Ray task per file (`ray.data.from_items(paths).map_batches(read_file)`), streaming, and every
batch goes through `normalise_batch`: columns are mapped to user_id/item_id/timestamp, timestamps become int
seconds (ints or ISO strings), and each row gets a status: 0 ok, 1 bad (with the offending value in `_err`),
2 below --min-rating. Ids are kept exactly as given: integer columns as int64, text as text; the driver
(prepare.collect) makes a text id column int64 only when every id in it is a canonical integer ("12", not "012"
or "+12"), so "0012" and "12" stay two ids.

Delimited text: a one-character separator is parsed by `pyarrow.csv` (quoted fields may hold the separator), each
file with its own header line; a row with the wrong number of fields is a bad row (counted, not fatal). A longer
separator (MovieLens' '::') is not something pyarrow.csv can parse, so those files are split line by line on the
exact separator string (fields may be double-quoted but may not contain the separator).

A file that cannot be read as its extension says (random bytes named .parquet, a JSON Lines file cut off mid-line)
is a UserError naming the file; prepare.collect recovers it from Ray Data's task error.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import json
import os
import re
import shutil
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ncf_ray.config import DataConfig
from ncf_ray.data.schema import CONTEXT_PREFIX, EVENT_COL, ITEM_COL, RATING_COL, TIME_COL, USER_COL
from ncf_ray.errors import UserError

STATUS_COL = "_status"
ERR_COL = "_err"
OK, BAD, BELOW_MIN = 0, 1, 2
TEXT_COL = "text"  # read_text's column
PATH_COL = "path"  # the one column of the per-file dataset that read_files maps over

COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "txt", ".dat": "txt", ".parquet": "parquet", ".pq": "parquet",
           ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
FORMAT_NAMES = {"delimited": "delimited text", "parquet": "Parquet", "jsonl": "JSON Lines", "json": "JSON"}
# An id that survives int64 -> str unchanged: no sign but '-', no leading zeros, no '-0', fits int64.
CANONICAL_INT_RE = r"^(0|-?[1-9][0-9]{0,17})$"
READ_BATCH_ROWS = 1 << 18  # Parquet rows per batch
READ_BLOCK_BYTES = 16 << 20  # CSV / line-split bytes per batch (~0.5M rows of a ratings log)

GROUPLENS = "https://files.grouplens.org/datasets/movielens/"


@dataclass(frozen=True)
class MovieLens:
    """One GroupLens release: the archive, its ratings member, how that file is laid out, and the published MD5."""

    archive: str
    member: str
    sep: str
    header: bool
    md5: str


MOVIELENS = {
    "movielens-100k": MovieLens("ml-100k.zip", "u.data", "\t", False, "0e33842e24a9c977be4e0107933c0723"),
    "movielens-1m": MovieLens("ml-1m.zip", "ratings.dat", "::", False, "c4d9eecfca2ab87c1945afe126590906"),
    "movielens-20m": MovieLens("ml-20m.zip", "ratings.csv", ",", True, "cd245b17a1ae2cc31bb14903e1204af3"),
}
ML_COLUMNS = (USER_COL, ITEM_COL, RATING_COL, TIME_COL)


@dataclass(frozen=True)
class ColumnSpec:
    """What `normalise_batch` needs: which input columns hold what."""

    user_col: str = USER_COL
    item_col: str = ITEM_COL
    time_col: str = TIME_COL
    rating_col: str | None = None
    min_rating: float | None = None
    # Shop logs: the event column and its names in funnel order (a value outside them is a bad row), and the
    # categorical context columns, passed through as text in `ctx_<name>` (the driver builds their vocab).
    event_col: str | None = None
    events: tuple[str, ...] = ()
    context_cols: tuple[str, ...] = ()

    def required(self) -> list[str]:
        return ([self.user_col, self.item_col, self.time_col] + ([self.rating_col] if self.rating_col else [])
                + ([self.event_col] if self.event_col else []) + list(self.context_cols))


@dataclass(frozen=True)
class FileFormat:
    """How `read_file` turns one file into tables of raw columns.

    kind: 'delimited', 'parquet', 'jsonl' or 'json'. For delimited text, `sep` is the field separator and `names`
    the column names; names=None means each file's own first line names its columns. `skip_header` drops a
    first line when names are given (ml-20m). `line_order_time`: the file has no time column, so the time of a
    row is its position among the file's rows (the NCF files published without timestamps)."""

    kind: str
    sep: str | None = None
    names: tuple[str, ...] | None = None
    skip_header: bool = False
    compression: str | None = None
    line_order_time: bool = False


@dataclass
class LogSource:
    """A raw log as a Ray Dataset of normalised batches (user_id, item_id, timestamp, _status, _err).

    `side_tables` are side tables the source brings itself ("items"/"users" -> (pa.Table, features.SideOptions)):
    synthetic-shop's catalogue and profiles, MovieLens' movies/users files. `cold_items`: whether items of the
    item table without interactions join the item vocab (False for MovieLens, whose item set stays the NCF
    paper's, so figures compare with it)."""

    name: str
    dataset: Any
    side_tables: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    cold_items: bool = True


@dataclass
class NcfSource:
    """The NCF paper's three files: train and test as normalised datasets, negatives as (user_id, item_id,
    negatives) rows. `timestamps` is False when the rating files carry none (valid is then the last train line)."""

    name: str
    train: Any
    test: Any
    negatives: Any
    timestamps: bool = True


# --------------------------------------------------------------------------------------------- normalising
def _strip_quotes(arr: pa.Array) -> pa.Array:
    arr = pc.utf8_trim_whitespace(arr)
    return pc.replace_substring_regex(arr, pattern=r'^"(.*)"$', replacement=r"\1")


def _describe(col: str, raw: pa.Array, bad: np.ndarray, why: str = "") -> pa.Array:
    """`col='value'` (then `why`) for bad rows, null elsewhere (only built when something is bad)."""
    text = pc.cast(raw, pa.string()) if not pa.types.is_string(raw.type) else raw
    text = pc.fill_null(text, "<missing>")
    shown = pc.binary_join_element_wise(f"{col}='", text, "'" + why, "")
    return pc.if_else(pa.array(bad), shown, pa.scalar(None, pa.string()))


def _mask(arr: pa.Array) -> np.ndarray:
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=bool)


def canonical_ints(text: pa.Array) -> np.ndarray:
    """Mask of strings that are integers written the way int64 -> str writes them back ('12', '-3', not '012')."""
    return _mask(pc.fill_null(pc.match_substring_regex(text, CANONICAL_INT_RE), False))


def _ids(raw: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Ids of one batch, exactly as given, plus the bad-row mask (null or empty). Integer columns (and floats
    holding whole numbers) become int64; strings stay strings, untouched: whether a whole column of strings is
    really integers is decided once for all its batches by the driver (prepare.collect), since one task's
    batches must share one schema and '0012' in a later batch makes every id of the column text."""
    t = raw.type
    if pa.types.is_integer(t):
        bad = _mask(raw.is_null())
        return pc.cast(pc.fill_null(raw, 0), pa.int64()), bad
    if pa.types.is_floating(t):
        vals = pc.fill_null(raw, np.nan).to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(vals) | (np.floor(vals) != vals)
        return pa.array(np.where(bad, 0, vals).astype(np.int64)), bad
    text = pc.cast(raw, pa.string())
    bad = _mask(pc.fill_null(pc.equal(text, ""), True))
    return pc.fill_null(text, ""), bad


def _to_seconds(values: Any) -> np.ndarray:
    """pandas datetimes (any unit, tz-aware UTC) -> int64 seconds; NaT -> 0 (caller marks those bad)."""
    import pandas as pd

    delta = (values - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    return np.asarray(delta.fillna(0), dtype=np.int64)


def _times(raw: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps as int64 seconds (int or float seconds, Arrow timestamps/dates, ISO-8601 strings) + bad mask."""
    import pandas as pd

    t = raw.type
    if pa.types.is_integer(t):
        return pc.fill_null(raw, 0).to_numpy(zero_copy_only=False).astype(np.int64), _mask(raw.is_null())
    if pa.types.is_floating(t):
        vals = pc.fill_null(raw, np.nan).to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(vals)
        return np.where(bad, 0, np.floor(np.where(bad, 0, vals))).astype(np.int64), bad
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        ts = pd.to_datetime(pd.Series(raw.to_pandas()), utc=True)
        return _to_seconds(ts), np.asarray(ts.isna())
    text = _strip_quotes(pc.cast(raw, pa.string())).to_pandas()
    num = pd.to_numeric(text, errors="coerce")
    out = np.zeros(len(text), np.int64)
    has_num = np.asarray(num.notna()) & np.isfinite(np.asarray(num.fillna(0), dtype=np.float64))
    out[has_num] = np.floor(np.asarray(num[has_num], dtype=np.float64)).astype(np.int64)
    bad = ~has_num
    if bad.any():
        iso = pd.to_datetime(text[bad], utc=True, errors="coerce", format="ISO8601")
        ok = np.asarray(iso.notna())
        idx = np.flatnonzero(bad)
        out[idx[ok]] = _to_seconds(iso[ok])
        bad[idx[ok]] = False
    return out, bad


def _ratings(raw: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    if pa.types.is_integer(raw.type) or pa.types.is_floating(raw.type):
        vals = pc.cast(raw, pa.float64()).to_numpy(zero_copy_only=False)
    else:
        vals = np.asarray(pd.to_numeric(_strip_quotes(pc.cast(raw, pa.string())).to_pandas(), errors="coerce"),
                          dtype=np.float64)
    vals = np.asarray(vals, dtype=np.float64)
    return vals, ~np.isfinite(vals)


def _malformed_rows(lines: Sequence[str], spec: ColumnSpec) -> pa.Table:
    """Rows of the normalised layout for lines that could not be split into fields: status BAD, `line='...'`."""
    n = len(lines)
    return pa.table({
        USER_COL: pa.array([""] * n, pa.string()),
        ITEM_COL: pa.array([""] * n, pa.string()),
        TIME_COL: pa.array(np.zeros(n, np.int64)),
        **_shop_placeholders(spec, n),
        STATUS_COL: pa.array(np.full(n, BAD, np.int8)),
        ERR_COL: pa.array([f"line='{line}'" for line in lines], pa.string()),
    })


def _shop_placeholders(spec: ColumnSpec, n: int) -> dict[str, pa.Array]:
    """Placeholder event/context columns of the normalised layout (event 0, context '' = unknown)."""
    out: dict[str, pa.Array] = {}
    if spec.event_col:
        out[EVENT_COL] = pa.array(np.zeros(n, np.int8))
    for name in spec.context_cols:
        out[CONTEXT_PREFIX + name] = pa.array([""] * n, pa.string())
    return out


def _events(raw: pa.Array, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Event values -> (int8 index into `names`, bad mask). Values are matched as trimmed text, so an event
    column of ints ('1', '2') works with --events 1,2,3; anything not in `names` (or missing) is bad."""
    text = _strip_quotes(pc.cast(raw, pa.string()))
    idx = pc.index_in(text, value_set=pa.array(list(names), pa.string()))
    bad = _mask(idx.is_null())
    return np.asarray(pc.fill_null(idx, 0).to_numpy(zero_copy_only=False), dtype=np.int8), bad


def _context_text(raw: pa.Array) -> pa.Array:
    """A context column as trimmed text; missing -> '' (the unknown context value)."""
    return pc.fill_null(_strip_quotes(pc.cast(raw, pa.string())), "")


def normalise_batch(batch: pa.Table, spec: ColumnSpec, malformed: Sequence[str] = ()) -> pa.Table:
    """Map, parse and validate one batch (runs inside Ray Data tasks). Never drops rows: bad ones are flagged
    so the driver can count them and name an example. `malformed` are lines of the same batch that could not
    be split into fields; they come back as bad rows at the end."""
    required = spec.required()
    missing = [c for c in required if c not in batch.column_names]
    if missing:
        raise UserError(f"missing required column {missing[0]!r}; columns found: {', '.join(batch.column_names)}")
    n = batch.num_rows
    raw = {c: batch.column(c).combine_chunks() for c in required}
    user, bad_u = _ids(raw[spec.user_col])
    item, bad_i = _ids(raw[spec.item_col])
    ts, bad_t = _times(raw[spec.time_col])
    bad = bad_u | bad_i | bad_t
    bad_e = np.zeros(n, bool)
    shop = _shop_placeholders(spec, n)
    if spec.event_col:
        events, bad_e = _events(raw[spec.event_col], spec.events)
        shop[EVENT_COL] = pa.array(events)
        bad |= bad_e
    for name in spec.context_cols:
        shop[CONTEXT_PREFIX + name] = _context_text(raw[name])
    below = np.zeros(n, bool)
    bad_r = np.zeros(n, bool)
    if spec.rating_col:
        rating, bad_r = _ratings(raw[spec.rating_col])
        bad |= bad_r
        if spec.min_rating is not None:
            below = ~bad & (rating < spec.min_rating)
    status = np.where(bad, BAD, np.where(below, BELOW_MIN, OK)).astype(np.int8)
    err = pa.nulls(n, pa.string())
    if bad.any():
        # Name the first offending field of each bad row, most specific first.
        for col, mask in ((spec.time_col, bad_t), (spec.item_col, bad_i), (spec.user_col, bad_u),
                          (spec.rating_col, bad_r)):
            if col and mask.any():
                err = pc.coalesce(err, _describe(col, raw[col], mask))
        if spec.event_col and bad_e.any():
            why = f" (not one of --events {','.join(spec.events)})"
            err = pc.coalesce(err, _describe(spec.event_col, raw[spec.event_col], bad_e, why))
    out = pa.table({
        USER_COL: user,
        ITEM_COL: item,
        TIME_COL: pa.array(ts, pa.int64()),
        **shop,
        STATUS_COL: pa.array(status),
        ERR_COL: err,
    })
    if not malformed:
        return out
    extra = _malformed_rows(malformed, spec)
    if n == 0:
        return extra
    # Keep the ids' type: malformed rows are filtered out by status before anyone reads their ids.
    extra = extra.set_column(0, USER_COL, pa.nulls(len(malformed), user.type)).set_column(
        1, ITEM_COL, pa.nulls(len(malformed), item.type))
    return pa.concat_tables([out, extra])


def _normalised(ds: Any, spec: ColumnSpec) -> Any:
    # batch_size=None: whole blocks, so 20M rows are a few dozen calls, not 20k.
    return ds.map_batches(normalise_batch, batch_size=None, batch_format="pyarrow", fn_kwargs={"spec": spec})


# --------------------------------------------------------------------------------------------- reading one file
def _open(fs: Any, path: str, compression: str | None = None) -> Any:
    import pyarrow.fs as pafs

    return (fs or pafs.LocalFileSystem()).open_input_stream(path, compression=compression)


def _check_file_columns(found: Sequence[str], required: Sequence[str], path: str) -> None:
    for col in required:
        if col not in found:
            raise UserError(
                f"missing required column {col!r} in {path}; columns found: {', '.join(found) or '(none)'}")


def _file_required(spec: ColumnSpec, fmt: FileFormat) -> list[str]:
    """The columns the file itself must have (the time column is made up when the file has none)."""
    return [c for c in spec.required() if not (fmt.line_order_time and c == spec.time_col)]


def split_fields(lines: pa.Array, sep: str, names: Sequence[str]) -> tuple[pa.Table, list[str]]:
    """Lines split on the exact string `sep` into one trimmed, unquoted string column per name; lines with the
    wrong field count are returned apart (as text) instead of failing."""
    fields = pc.split_pattern(lines, pattern=sep)  # a literal pattern, not a regex: '::' or '|' mean themselves
    ok = _mask(pc.equal(pc.list_value_length(fields), len(names)))
    bad_lines = [] if ok.all() else lines.filter(pa.array(~ok)).to_pylist()
    fields = fields.filter(pa.array(ok)) if not ok.all() else fields
    return pa.table({name: _strip_quotes(pc.list_element(fields, i)) for i, name in enumerate(names)}), bad_lines


def _line_chunks(fs: Any, path: str, compression: str | None) -> Iterator[list[str]]:
    """The file's non-empty lines (without '\\r\\n'), a few MB at a time; decoding fails on invalid UTF-8."""
    rest = b""
    with _open(fs, path, compression) as fh:
        while True:
            chunk = fh.read(READ_BLOCK_BYTES)
            if not chunk:
                break
            data = rest + chunk
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            lines = [ln.rstrip("\r") for ln in data[:cut].decode("utf-8").split("\n")]
            yield [ln for ln in lines if ln.strip()]
    tail = rest.decode("utf-8").rstrip("\r")
    if tail.strip():
        yield [tail]


def _split_on_string(fs: Any, path: str, fmt: FileFormat, spec: ColumnSpec) -> Iterator[tuple[pa.Table, list[str]]]:
    """Delimited text with a separator of several characters (MovieLens '::'): split on the exact string."""
    names, first = fmt.names, True
    for lines in _line_chunks(fs, path, fmt.compression):
        if first and lines and (names is None or fmt.skip_header):
            header, lines = lines[0], lines[1:]
            if names is None:
                names = tuple(_strip_quotes(pa.array(header.split(fmt.sep))).to_pylist())
                _check_file_columns(names, _file_required(spec, fmt), path)
        first = False
        if lines:
            yield split_fields(pa.array(lines, pa.string()), fmt.sep, names)


def _header_names(fs: Any, path: str, fmt: FileFormat) -> list[str]:
    """The column names on a CSV file's first line, parsed as CSV (so quoted names work)."""
    import pyarrow.csv as pacsv

    with _open(fs, path, fmt.compression) as fh:
        head = fh.read(1 << 16)
    line = head.split(b"\n", 1)[0]
    table = pacsv.read_csv(io.BytesIO(line + b"\n"), parse_options=pacsv.ParseOptions(delimiter=fmt.sep))
    return [name.strip() for name in table.column_names]


def _csv(fs: Any, path: str, fmt: FileFormat, spec: ColumnSpec) -> Iterator[tuple[pa.Table, list[str]]]:
    """Delimited text with a one-character separator, through pyarrow.csv: quotes honoured, every column read
    as text (ids stay as written), rows with the wrong field count handed back as bad lines."""
    import pyarrow.csv as pacsv

    names = list(fmt.names) if fmt.names is not None else _header_names(fs, path, fmt)
    required = _file_required(spec, fmt)
    _check_file_columns(names, required, path)
    bad: list[str] = []

    def on_invalid(row: Any) -> str:
        bad.append(row.text)
        return "skip"

    skip = 1 if fmt.names is None or fmt.skip_header else 0
    reader = pacsv.open_csv(
        _open(fs, path, fmt.compression),
        read_options=pacsv.ReadOptions(column_names=names, skip_rows=skip, block_size=READ_BLOCK_BYTES),
        parse_options=pacsv.ParseOptions(delimiter=fmt.sep, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(include_columns=required,
                                             column_types={c: pa.string() for c in required},
                                             strings_can_be_null=False))
    for batch in reader:
        table = pa.Table.from_batches([batch])
        # Hand-written CSVs often say "u1, 12": the space is layout, not part of the id.
        table = pa.table({c: pc.utf8_trim_whitespace(table.column(c)) for c in table.column_names})
        yield table, bad[:]
        bad.clear()
    if bad:
        yield pa.table({c: pa.array([], pa.string()) for c in required}), bad[:]


def _parquet(fs: Any, path: str, fmt: FileFormat, spec: ColumnSpec) -> Iterator[tuple[pa.Table, list[str]]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path, filesystem=fs)
    required = _file_required(spec, fmt)
    _check_file_columns(pf.schema_arrow.names, required, path)
    for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=required):
        yield pa.Table.from_batches([batch]), []


def _json(fs: Any, path: str, fmt: FileFormat, spec: ColumnSpec) -> Iterator[tuple[pa.Table, list[str]]]:
    """JSON Lines through pyarrow.json; a .json file may also be one array of objects."""
    import pyarrow.json as pajson

    with _open(fs, path, fmt.compression) as fh:
        data = fh.read()
    try:
        table = pajson.read_json(io.BytesIO(data), read_options=pajson.ReadOptions(block_size=READ_BLOCK_BYTES))
    except pa.ArrowInvalid:
        if fmt.kind != "json":
            raise
        try:
            rows = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read as JSON: {exc}") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise UserError(f"{path}: cannot read as JSON: expected objects, one per line, or one array of "
                            f"objects") from None
        table = pa.Table.from_pylist(rows)
    _check_file_columns(table.column_names, _file_required(spec, fmt), path)
    yield table, []


def _raw_batches(fs: Any, path: str, fmt: FileFormat, spec: ColumnSpec) -> Iterator[tuple[pa.Table, list[str]]]:
    if fmt.kind == "delimited":
        return (_csv if len(fmt.sep or "") == 1 else _split_on_string)(fs, path, fmt, spec)
    return {"parquet": _parquet, "jsonl": _json, "json": _json}[fmt.kind](fs, path, fmt, spec)


def read_file(path: str, fs: Any, fmt: FileFormat, spec: ColumnSpec) -> Iterator[pa.Table]:
    """One file -> normalised tables, streaming. A file that cannot be read as `fmt` says (a read error from
    pyarrow, invalid UTF-8, a cut-off last line) is a UserError naming the file; errors in normalising are
    not translated (they would be bugs of this module, and keep their traceback)."""
    raw = _raw_batches(fs, path, fmt, spec)
    row = 0
    while True:
        try:
            table, malformed = next(raw)
        except StopIteration:
            return
        except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path}: cannot read as {FORMAT_NAMES[fmt.kind]}: {first}") from None
        if fmt.line_order_time:
            table = table.append_column(spec.time_col, pa.array(np.arange(row, row + table.num_rows)))
            row += table.num_rows
        yield normalise_batch(table, spec, malformed)


def _read_paths(batch: pa.Table, fs: Any, fmt: FileFormat, spec: ColumnSpec) -> Iterator[pa.Table]:
    """map_batches body: the batch is a column of paths, each read by this task in full, in file order."""
    for path in batch.column(PATH_COL).to_pylist():
        yield from read_file(path, fs, fmt, spec)


def files_dataset(files: Sequence[str], fs: Any, fmt: FileFormat, spec: ColumnSpec) -> Any:
    """A Ray Dataset of normalised rows: one task per file (each file streams through pyarrow in its task)."""
    import ray.data

    paths = ray.data.from_items([{PATH_COL: p} for p in files], override_num_blocks=max(1, len(files)))
    return paths.map_batches(_read_paths, batch_size=1, batch_format="pyarrow",
                             fn_kwargs={"fs": fs, "fmt": fmt, "spec": spec})


# --------------------------------------------------------------------------------------------- files
def _split_ext(path: str) -> tuple[str, str | None]:
    """(format, compression) from the file name, e.g. 'x.csv.gz' -> ('csv', 'gzip')."""
    name = path.lower()
    compression = None
    for ext, codec in COMPRESSIONS.items():
        if name.endswith(ext):
            compression, name = codec, name[: -len(ext)]
    return FORMATS.get(os.path.splitext(name)[1], ""), compression


def _filesystem(source: str) -> tuple[Any, str]:
    """(pyarrow filesystem or None for local, path inside it)."""
    if "://" not in source:
        return None, os.path.expanduser(source)
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(source)
    except Exception as exc:  # unknown scheme, missing credentials, unreachable endpoint
        raise UserError(f"cannot open {source!r}: {str(exc).splitlines()[0]}") from None


def _list_files(source: str) -> tuple[Any, list[str]]:
    """Expand a file, directory (recursive) or glob into data files, skipping hidden/underscore files."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(source)
    fs_ = fs or pafs.LocalFileSystem()
    has_glob = any(ch in path for ch in "*?[")
    if has_glob and fs is None:
        candidates = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    else:
        base = path.split("*")[0].rsplit("/", 1)[0] if has_glob else path
        try:
            info = fs_.get_file_info(base)
        except Exception as exc:
            raise UserError(f"cannot open {source!r}: {str(exc).splitlines()[0]}") from None
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"path not found: {source}")
        if info.type == pafs.FileType.File and not has_glob:
            return fs, [path]
        infos = fs_.get_file_info(pafs.FileSelector(base, recursive=True))
        candidates = sorted(i.path for i in infos if i.type == pafs.FileType.File)
        if has_glob:
            candidates = [p for p in candidates if fnmatch.fnmatch(p, path)]
    files = [p for p in candidates if not os.path.basename(p).startswith((".", "_"))]
    if not files:
        raise UserError(f"path not found: {source} (no data files there)")
    return fs, files


def _first_line(fs: Any, path: str, compression: str | None) -> str:
    with _open(fs, path, compression) as fh:
        head = fh.read(1 << 16).decode("utf-8", errors="replace")
    return head.split("\n", 1)[0].rstrip("\r")


def _sizes(fs: Any, files: list[str]) -> list[int]:
    import pyarrow.fs as pafs

    return [i.size or 0 for i in (fs or pafs.LocalFileSystem()).get_file_info(files)]


def shop_columns(cfg: DataConfig) -> dict[str, Any]:
    """The ColumnSpec fields for a log's event and context columns (empty without them)."""
    if not cfg.event_col and not cfg.context_cols:
        return {}
    return {"event_col": cfg.event_col, "events": tuple(cfg.events) if cfg.event_col else (),
            "context_cols": tuple(cfg.context_cols)}


def read_files(source: str, cfg: DataConfig) -> LogSource:
    """A file/dir/glob/URI of CSV, TSV, TXT, Parquet or JSONL -> normalised Ray Dataset."""
    fs, files = _list_files(source)
    kinds = {_split_ext(f) for f in files}
    fmts = {k[0] for k in kinds}
    if "" in fmts:
        odd = next(f for f in files if _split_ext(f)[0] == "")
        raise UserError(f"unknown format for {odd!r}: expected .csv, .tsv, .txt/.dat (with --sep), .parquet, "
                        f".jsonl or .json (optionally .gz)")
    if len(fmts) > 1:
        raise UserError(f"mixed formats in {source}: {', '.join(sorted(fmts))}; point SOURCE at one format")
    sizes = _sizes(fs, files)
    files = [f for f, s in zip(files, sizes) if s > 0]
    if not files:
        raise UserError(f"empty input: {source} has no data")
    ext = fmts.pop()
    compressions = {k[1] for k in kinds}
    if len(compressions) > 1:
        raise UserError(f"mixed compression in {source}: {', '.join(sorted(map(str, compressions)))}")
    rating_col = cfg.rating_col or (RATING_COL if cfg.min_rating is not None else None)
    spec = ColumnSpec(cfg.user_col, cfg.item_col, cfg.time_col, rating_col, cfg.min_rating, **shop_columns(cfg))
    if ext in ("csv", "tsv", "txt"):
        sep = cfg.sep or {"csv": ",", "tsv": "\t"}.get(ext)
        if sep is None:
            raise UserError(f"{files[0]}: .txt/.dat files need --sep (e.g. --sep '\\t' or --sep '::')")
        if sep in ("\n", "\r"):
            raise UserError(f"--sep={sep!r} cannot be a line break")
        fmt = FileFormat("delimited", sep=sep)
    else:
        fmt = FileFormat(ext)
    fmt = replace(fmt, compression=compressions.pop())
    return LogSource(name=source, dataset=files_dataset(files, fs, fmt, spec))


# --------------------------------------------------------------------------------------------- ncf paper files
def _parse_negative_lines(batch: pa.Table) -> pa.Table:
    """'(user,item)\\tneg1\\tneg2...' lines -> user_id, item_id, negatives (list<int64>)."""
    lines = pc.utf8_trim_whitespace(batch.column(TEXT_COL).combine_chunks())
    lines = lines.filter(pc.not_equal(lines, ""))
    fields = pc.split_pattern(lines, pattern="\t")
    head = pc.list_element(fields, 0)
    pair = pc.split_pattern(pc.replace_substring_regex(head, pattern=r"[()\s]", replacement=""), pattern=",")
    try:
        user = pc.cast(pc.list_element(pair, 0), pa.int64())
        item = pc.cast(pc.list_element(pair, 1), pa.int64())
        negs = pc.cast(pc.list_slice(fields, 1), pa.list_(pa.int64()))
    except (pa.ArrowInvalid, pa.ArrowTypeError, IndexError) as exc:
        raise UserError(f"test.negative: cannot parse line like {lines[0].as_py()[:80]!r}: {exc}") from None
    return pa.table({USER_COL: user, ITEM_COL: item, "negatives": negs})


NCF_COLUMNS = {4: ML_COLUMNS, 3: (USER_COL, ITEM_COL, RATING_COL)}  # fields per line -> names


def ncf_layout(fs: Any, path: str) -> FileFormat:
    """How an NCF rating file is laid out, from its first line: 'user\\titem\\trating\\ttimestamp' (the paper's
    files) or 'user\\titem\\trating' (DeepCF's Amazon sets, no timestamps: time = line order)."""
    line = _first_line(fs, path, None)
    n = len(line.split("\t"))
    if n not in NCF_COLUMNS:
        raise UserError(f"{path}: expected 'user<TAB>item<TAB>rating[<TAB>timestamp]' lines, the first line has "
                        f"{n} field(s): {line[:80]!r}")
    return FileFormat("delimited", sep="\t", names=NCF_COLUMNS[n], line_order_time=n == 3)


def read_ncf(prefix: str) -> NcfSource:
    """`ncf:PREFIX`: PREFIX.train.rating / .test.rating (user\\titem\\trating[\\ttimestamp], 0-based) and
    PREFIX.test.negative ('(user,item)' then the 99 negatives)."""
    import ray.data

    paths = {k: f"{prefix}.{k}" for k in ("train.rating", "test.rating", "test.negative")}
    fs, _ = _filesystem(prefix)
    for p in paths.values():
        fs_path = _filesystem(p)[1]
        if not _exists(fs, fs_path):
            raise UserError(f"path not found: {p} (ncf:PREFIX needs PREFIX.train.rating, .test.rating, "
                            f".test.negative)")
    spec = ColumnSpec(rating_col=RATING_COL)
    train_path, test_path = (_filesystem(paths[k])[1] for k in ("train.rating", "test.rating"))
    train_fmt = ncf_layout(fs, train_path)
    negatives = ray.data.read_text(_filesystem(paths["test.negative"])[1], filesystem=fs).map_batches(
        _parse_negative_lines, batch_size=None, batch_format="pyarrow")
    return NcfSource(name=f"ncf:{prefix}", train=files_dataset([train_path], fs, train_fmt, spec),
                     test=files_dataset([test_path], fs, ncf_layout(fs, test_path), spec), negatives=negatives,
                     timestamps=not train_fmt.line_order_time)


def _exists(fs: Any, path: str) -> bool:
    if fs is None:
        return os.path.isfile(path)
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type == pafs.FileType.File


# --------------------------------------------------------------------------------------------- movielens
def cache_dir() -> Path:
    """Where downloads go: $NCF_RAY_CACHE or ~/.cache/ncf_ray."""
    return Path(os.environ.get("NCF_RAY_CACHE", "~/.cache/ncf_ray")).expanduser()


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(ml: MovieLens) -> Path:
    """The archive in the cache, downloaded (atomically, checksum verified) when not there yet."""
    base = os.environ.get("NCF_RAY_MOVIELENS_URL", GROUPLENS)
    dest = cache_dir() / ml.archive
    if dest.is_file() and _md5(dest) == ml.md5:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".part-{os.getpid()}")
    url = base.rstrip("/") + "/" + ml.archive
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, tmp.open("wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
    except OSError as exc:  # URLError, timeouts, refused connections: offline or blocked
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not download {url}: {getattr(exc, 'reason', exc)}; offline? pass --from "
                        f"LOCAL_ZIP_OR_DIR (a copy of {ml.archive} or its extracted folder)") from None
    got = _md5(tmp)
    if got != ml.md5:
        tmp.unlink(missing_ok=True)
        raise UserError(f"checksum mismatch for {url}: md5 {got}, expected {ml.md5}")
    os.replace(tmp, dest)
    return dest


def _ratings_file(ml: MovieLens, local: Path, workdir: Path) -> Path:
    """The ratings member of a zip (extracted into workdir), found under a directory, or the ratings file
    itself. A local copy is never checksummed: it may hold only part of the ratings (a subset for a quick
    benchmark), and users.dat / movies.dat are not needed."""
    if local.is_dir():
        found = sorted(local.rglob(ml.member), key=lambda p: (len(p.parts), str(p)))  # the shallowest copy
        if not found:
            raise UserError(f"--from {local}: no {ml.member} found under it")
        return found[0]
    if not local.is_file():
        raise UserError(f"path not found: --from {local}")
    if local.name == ml.member:
        return local
    try:
        with zipfile.ZipFile(local) as zf:
            names = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == ml.member]
            if not names:
                raise UserError(f"--from {local}: the archive has no {ml.member}")
            target = workdir / ml.member
            with zf.open(names[0]) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            return target
    except zipfile.BadZipFile:
        raise UserError(f"--from {local}: not a zip archive (nor a folder holding {ml.member})") from None


def read_movielens(name: str, cfg: DataConfig, local_from: str | None, workdir: Path) -> LogSource:
    """`movielens-*`: every rating is an implicit positive (as in the NCF paper) unless --min-rating is set."""
    ml = MOVIELENS[name]
    local = Path(local_from).expanduser() if local_from else _download(ml)
    ratings = _ratings_file(ml, local, workdir)
    if ratings.stat().st_size == 0:
        raise UserError(f"empty input: {ratings}")
    spec = ColumnSpec(rating_col=RATING_COL, min_rating=cfg.min_rating)
    fmt = FileFormat("delimited", sep=ml.sep, names=ML_COLUMNS, skip_header=ml.header)
    return LogSource(name=name, dataset=files_dataset([str(ratings)], None, fmt, spec),
                     side_tables=movielens_tables(name, local) if cfg.side_tables else {}, cold_items=False)


def movielens_tables(name: str, local: Path) -> dict[str, tuple[Any, Any]]:
    """The release's movie and user files as side tables, those that are there (a --from folder may hold only
    the ratings). Movies without ratings stay out of the item vocab (LogSource.cold_items)."""
    from ncf_ray.data.features import movielens_side_tables

    items, users, item_opts, user_opts = movielens_side_tables(name, local)
    tables = {}
    if items is not None:
        tables["items"] = (items, item_opts)
    if users is not None:
        tables["users"] = (users, user_opts)
    return tables


# --------------------------------------------------------------------------------------------- synthetic shop
SHOP_SOURCE = "synthetic-shop"


def shop_defaults(cfg: DataConfig) -> DataConfig:
    """synthetic-shop's log with no other flags: its event column and funnel, device as context, time context."""
    from ncf_ray.data.shop import CONTEXT_COLS, EVENT_NAME_COL, EVENTS

    return replace(cfg, event_col=cfg.event_col or EVENT_NAME_COL, events=EVENTS,
                   context_cols=cfg.context_cols or CONTEXT_COLS,
                   time_context=True if cfg.time_context is None else cfg.time_context)


def read_shop(cfg: DataConfig, spec: Any = None) -> LogSource:
    """`synthetic-shop`: generate the shop (ShopSpec; default ML-1M-sized, seeded by --seed) in the driver, its
    log as a Ray Dataset of normalised rows, its catalogue and user profiles as side tables (titles as text)."""
    import ray.data

    from ncf_ray.data.shop import ShopSpec, generate_shop

    data = generate_shop(spec or ShopSpec(seed=cfg.seed))
    columns = ColumnSpec(**shop_columns(cfg))
    log = ray.data.from_arrow(data.log)
    return LogSource(name=SHOP_SOURCE, dataset=_normalised(log, columns), side_tables=shop_side_tables(data))


def shop_side_tables(data: Any) -> dict[str, tuple[Any, Any]]:
    """A ShopData's catalogue (category, brand, price, title as text) and user profiles, as side tables."""
    from ncf_ray.data.features import SideOptions
    from ncf_ray.data.shop import TEXT_COLS

    return {"items": (data.items, SideOptions(id_col=ITEM_COL, text_cols=TEXT_COLS)),
            "users": (data.users, SideOptions(id_col=USER_COL))}


# --------------------------------------------------------------------------------------------- entry point
def open_source(cfg: DataConfig, *, local_from: str | None = None, synthetic: Any = None,
                workdir: Path | None = None) -> LogSource | NcfSource:
    """Resolve cfg.source. `synthetic` is a SyntheticSpec (users/items/interactions); `workdir` is a scratch dir
    the caller deletes (MovieLens archives are extracted there)."""
    src = cfg.source
    if src == SHOP_SOURCE:
        return read_shop(cfg, synthetic)
    if src == "synthetic":
        from ncf_ray.data.synthetic import SyntheticSpec, synthetic_dataset

        spec = synthetic or SyntheticSpec(seed=cfg.seed)
        return LogSource(name="synthetic", dataset=_normalised(synthetic_dataset(spec), ColumnSpec()))
    if src.startswith("ncf:"):
        prefix = src[4:]
        if not prefix:
            raise UserError("ncf: needs a path prefix, e.g. ncf:Data/ml-1m")
        return read_ncf(prefix)
    if src.startswith("movielens"):
        if src not in MOVIELENS:
            raise UserError(f"unknown source {src!r}: expected one of {', '.join(MOVIELENS)}")
        return read_movielens(src, cfg, local_from, workdir or Path("."))
    return read_files(src, cfg)


def user_error_from(exc: BaseException) -> UserError | None:
    """The UserError behind an exception from a Ray Data task, or None (a bug: the caller re-raises it).

    Ray re-raises a task's exception as `RayTaskError(UserError)`, which is a UserError whose text is the whole
    remote traceback; the original is its `.cause`, to whose message Ray Data appends lines of retry advice.
    Our messages are one line by contract, so the first line is the message."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(cause, UserError):
            exc = cause
            continue
        if type(exc) is UserError:
            text = str(exc).strip()
            return UserError(text.splitlines()[0]) if "\n" in text else exc
        m = re.search(r"ncf_ray\.errors\.UserError: (.+)", str(exc))
        if m:  # only the remote traceback's text survived (a worker that could not pickle the exception)
            return UserError(m.group(1).strip())
        exc = exc.__cause__ or exc.__context__
    return None
