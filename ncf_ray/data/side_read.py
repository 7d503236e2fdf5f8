"""Reading a side table file (ncf_ray/data/features.py's reader): any format `ncf-ray prepare` reads, without Ray.

Delimited text is read whole (side tables are catalogues and profiles, not logs), every value as text so ids stay
as written; Parquet and JSON keep their types (lists become bags or vectors). The file name and the number of
skipped rows travel in the table's schema metadata, for the encoder's spec and messages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ncf_ray.data.sources import _list_files, _open, _split_ext, _strip_quotes, split_fields
from ncf_ray.errors import UserError

SOURCE_KEY = b"ncf_ray.source"  # schema metadata read_side_table sets: the file name, for messages and the spec
BAD_ROWS_KEY = b"ncf_ray.bad_rows"  # delimited rows with the wrong field count, skipped by read_side_table


def read_side_table(path: str | Path, id_col: str, what: str, sep: str | None = None) -> pa.Table:
    """A side table from a file, directory or glob of CSV/TSV/TXT/DAT/Parquet/JSON Lines (optionally .gz), local
    or a pyarrow URI. Delimited text is read with a header line naming the columns, every value as text (so ids
    stay as written); .txt/.dat need `sep` or are sniffed from the header ('::', tab, '|', ','). Rows with the
    wrong number of fields are skipped and counted (schema metadata BAD_ROWS_KEY); more of those than good rows
    in a file is a UserError (the separator is wrong). `what` ("items"/"users")
    only names the table in messages. Missing id column, an unreadable or empty file -> UserError naming it."""
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
        if n_bad > table.num_rows:  # a wrong separator or broken quoting, not a few damaged lines
            raise UserError(f"{what} table {f}: {n_bad} of {n_bad + table.num_rows} rows do not have the header's "
                            f"{table.num_columns} fields; is the separator right?")
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
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path, filesystem=fs), 0
    with _open(fs, path, compression) as fh:
        data = fh.read()
    if fmt in ("jsonl", "json"):
        return _read_json(data, fmt), 0
    sep = sep or {"csv": ",", "tsv": "\t"}.get(fmt) or _sniff_sep(data)
    return read_delimited(data.decode("utf-8-sig"), sep)  # -sig: a spreadsheet's BOM is not part of a name


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
