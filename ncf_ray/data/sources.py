"""Resolve `ncf-ray prepare SOURCE` into Ray Datasets of normalised interaction rows.

SOURCE is a file, directory or glob of CSV/TSV/TXT(--sep)/Parquet/JSONL (optionally .gz), local or any pyarrow
filesystem URI (s3://, gs://, file://), or a named source: `synthetic`, `ncf:PATH_PREFIX` (the NCF paper's files),
`movielens-100k|1m|20m` (GroupLens download with checksum into ~/.cache/ncf_ray, or `--from LOCAL_ZIP_OR_DIR`).

Every row goes through `normalise_batch` in Ray Data's map_batches (in parallel): columns are mapped to
user_id/item_id/timestamp, ids become int64 (or stripped strings), timestamps int seconds (ints or ISO strings),
and each row gets a status: 0 ok, 1 bad (with the offending value in `_err`), 2 below --min-rating.
Delimited text is read with `ray.data.read_text` and split here (not pyarrow's CSV reader) so that malformed lines
are counted as bad rows instead of failing the whole read; fields may be double-quoted but may not contain the
separator.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import re
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ncf_ray.config import DataConfig
from ncf_ray.data.schema import ITEM_COL, RATING_COL, TIME_COL, USER_COL
from ncf_ray.errors import UserError

STATUS_COL = "_status"
ERR_COL = "_err"
OK, BAD, BELOW_MIN = 0, 1, 2
TEXT_COL = "text"  # read_text's column

COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "txt", ".dat": "txt", ".parquet": "parquet", ".pq": "parquet",
           ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
_INT_RE = r"^[+-]?[0-9]+$"

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
    """What `normalise_batch` needs: which input columns hold what, and how to split text lines."""

    user_col: str = USER_COL
    item_col: str = ITEM_COL
    time_col: str = TIME_COL
    rating_col: str | None = None
    min_rating: float | None = None
    sep: str | None = None  # set: input is read_text lines to split on sep into `names`
    names: tuple[str, ...] = ()
    header_line: str | None = None  # the header text to drop (each file of a directory repeats it)


@dataclass
class LogSource:
    """A raw log as a Ray Dataset of normalised batches (user_id, item_id, timestamp, _status, _err)."""

    name: str
    dataset: Any


@dataclass
class NcfSource:
    """The NCF paper's three files: train and test as normalised datasets, negatives as (user_id, item_id,
    negatives) rows."""

    name: str
    train: Any
    test: Any
    negatives: Any


# --------------------------------------------------------------------------------------------- normalising
def _strip_quotes(arr: pa.Array) -> pa.Array:
    arr = pc.utf8_trim_whitespace(arr)
    return pc.replace_substring_regex(arr, pattern=r'^"(.*)"$', replacement=r"\1")


def _describe(col: str, raw: pa.Array, bad: np.ndarray) -> pa.Array:
    """`col='value'` for bad rows, null elsewhere (only built when something is bad)."""
    text = pc.cast(raw, pa.string()) if not pa.types.is_string(raw.type) else raw
    text = pc.fill_null(text, "<missing>")
    shown = pc.binary_join_element_wise(f"{col}='", text, "'", "")
    return pc.if_else(pa.array(bad), shown, pa.scalar(None, pa.string()))


def _ids(raw: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Ids as int64 when every good value is an integer, else as stripped strings; plus the bad-row mask."""
    t = raw.type
    if pa.types.is_integer(t):
        bad = np.asarray(raw.is_null().to_numpy(zero_copy_only=False))
        return pc.cast(pc.fill_null(raw, 0), pa.int64()), bad
    if pa.types.is_floating(t):
        vals = pc.fill_null(raw, np.nan).to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(vals) | (np.floor(vals) != vals)
        return pa.array(np.where(bad, 0, vals).astype(np.int64)), bad
    text = _strip_quotes(pc.cast(raw, pa.string()))
    bad = np.asarray(pc.fill_null(pc.equal(text, ""), True).to_numpy(zero_copy_only=False))
    is_int = np.asarray(pc.fill_null(pc.match_substring_regex(text, _INT_RE), False).to_numpy(zero_copy_only=False))
    if (is_int | bad).all():
        filled = pc.if_else(pa.array(is_int), text, "0")
        return pc.cast(filled, pa.int64()), bad
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
        return pc.fill_null(raw, 0).to_numpy(zero_copy_only=False).astype(np.int64), np.asarray(
            raw.is_null().to_numpy(zero_copy_only=False))
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


def _split_lines(batch: pa.Table, spec: ColumnSpec) -> tuple[pa.Table, np.ndarray, pa.Array | None]:
    """read_text lines -> one string column per name; malformed lines (wrong field count) flagged bad."""
    lines = pc.replace_substring_regex(batch.column(TEXT_COL).combine_chunks(), pattern=r"\r$", replacement="")
    if spec.header_line is not None:
        lines = lines.filter(pc.not_equal(lines, spec.header_line))
    fields = pc.split_pattern(lines, pattern=spec.sep)
    malformed = np.asarray(pc.not_equal(pc.list_value_length(fields), len(spec.names)).to_numpy(
        zero_copy_only=False))
    # Give malformed lines the right shape so list_element never fails; they are dropped as bad anyway.
    pad = pa.array([[""] * len(spec.names)], pa.list_(pa.string()))[0]
    fields = pc.if_else(pa.array(malformed), pad, fields) if malformed.any() else fields
    cols = {name: pc.list_element(fields, i) for i, name in enumerate(spec.names)}
    err = None
    if malformed.any():
        err = pc.if_else(pa.array(malformed), pc.binary_join_element_wise("line='", lines, "'", ""),
                         pa.scalar(None, pa.string()))
    return pa.table(cols), malformed, err


def normalise_batch(batch: pa.Table, spec: ColumnSpec) -> pa.Table:
    """Map, parse and validate one batch (runs inside Ray Data map_batches). Never drops rows: bad ones are
    flagged so the driver can count them and name an example."""
    err = None
    malformed = None
    if spec.sep is not None:
        batch, malformed, err = _split_lines(batch, spec)
    required = [spec.user_col, spec.item_col, spec.time_col] + ([spec.rating_col] if spec.rating_col else [])
    missing = [c for c in required if c not in batch.column_names]
    if missing:
        raise UserError(f"missing required column {missing[0]!r}; columns found: {', '.join(batch.column_names)}")
    n = batch.num_rows
    raw = {c: batch.column(c).combine_chunks() for c in required}
    user, bad_u = _ids(raw[spec.user_col])
    item, bad_i = _ids(raw[spec.item_col])
    ts, bad_t = _times(raw[spec.time_col])
    bad = bad_u | bad_i | bad_t
    below = np.zeros(n, bool)
    bad_r = np.zeros(n, bool)
    if spec.rating_col:
        rating, bad_r = _ratings(raw[spec.rating_col])
        bad |= bad_r
        if spec.min_rating is not None:
            below = ~bad & (rating < spec.min_rating)
    if malformed is not None:
        bad |= malformed
    status = np.where(bad, BAD, np.where(below, BELOW_MIN, OK)).astype(np.int8)
    if bad.any() and err is None:
        err = pa.nulls(n, pa.string())
    if bad.any():
        # Name the first offending field of each bad row, most specific first.
        for col, mask in ((spec.time_col, bad_t), (spec.item_col, bad_i), (spec.user_col, bad_u),
                          (spec.rating_col, bad_r)):
            if col and mask.any():
                err = pc.coalesce(err, _describe(col, raw[col], mask))
    return pa.table({
        USER_COL: user,
        ITEM_COL: item,
        TIME_COL: pa.array(ts, pa.int64()),
        STATUS_COL: pa.array(status),
        ERR_COL: err if err is not None else pa.nulls(n, pa.string()),
    })


def _normalised(ds: Any, spec: ColumnSpec) -> Any:
    # batch_size=None: whole blocks, so 20M rows are a few dozen calls, not 20k.
    return ds.map_batches(normalise_batch, batch_size=None, batch_format="pyarrow", fn_kwargs={"spec": spec})


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
    import pyarrow.fs as pafs

    fs_ = fs or pafs.LocalFileSystem()
    with fs_.open_input_stream(path, compression=compression) as fh:
        head = fh.read(1 << 16).decode("utf-8", errors="replace")
    return head.split("\n", 1)[0].rstrip("\r")


def _sizes(fs: Any, files: list[str]) -> list[int]:
    import pyarrow.fs as pafs

    return [i.size or 0 for i in (fs or pafs.LocalFileSystem()).get_file_info(files)]


def _check_columns(found: list[str], spec: ColumnSpec, source: str) -> None:
    required = [spec.user_col, spec.item_col, spec.time_col] + ([spec.rating_col] if spec.rating_col else [])
    for col in required:
        if col not in found:
            raise UserError(
                f"missing required column {col!r} in {source}; columns found: {', '.join(found) or '(none)'}")


def read_files(source: str, cfg: DataConfig) -> LogSource:
    """A file/dir/glob/URI of CSV, TSV, TXT, Parquet or JSONL -> normalised Ray Dataset."""
    import ray.data

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
    fmt = fmts.pop()
    compression = next(iter(kinds))[1]
    rating_col = cfg.rating_col or (RATING_COL if cfg.min_rating is not None else None)
    spec = ColumnSpec(cfg.user_col, cfg.item_col, cfg.time_col, rating_col, cfg.min_rating)
    open_args = {"compression": compression} if compression else None

    if fmt in ("csv", "tsv", "txt"):
        sep = cfg.sep or {"csv": ",", "tsv": "\t"}.get(fmt)
        if sep is None:
            raise UserError(f"{files[0]}: .txt/.dat files need --sep (e.g. --sep '\\t' or --sep '::')")
        header = _first_line(fs, files[0], compression)
        names = tuple(_strip_quotes(pa.array(header.split(sep))).to_pylist())
        _check_columns(list(names), spec, source)
        spec = ColumnSpec(spec.user_col, spec.item_col, spec.time_col, spec.rating_col, spec.min_rating,
                          sep=sep, names=names, header_line=header)
        ds = ray.data.read_text(files, filesystem=fs, arrow_open_stream_args=open_args)
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        found = pq.read_schema(files[0], filesystem=fs).names
        _check_columns(found, spec, source)
        ds = ray.data.read_parquet(files, filesystem=fs, columns=sorted(set(
            [spec.user_col, spec.item_col, spec.time_col] + ([rating_col] if rating_col else []))))
    else:
        if fmt == "jsonl":
            line = _first_line(fs, files[0], compression)
            try:
                found = list(json.loads(line)) if line.strip() else []
            except (json.JSONDecodeError, TypeError):
                raise UserError(f"{files[0]}: first line is not a JSON object: {line[:80]!r}") from None
            _check_columns(found, spec, source)
        ds = ray.data.read_json(files, filesystem=fs, lines=fmt == "jsonl", arrow_open_stream_args=open_args,
                                file_extensions=None)
    return LogSource(name=source, dataset=_normalised(ds, spec))


# --------------------------------------------------------------------------------------------- ncf paper files
def _parse_negative_lines(batch: pa.Table) -> pa.Table:
    """'(user,item)\\tneg1\\tneg2...' lines -> user_id, item_id, negatives (list<int64>)."""
    lines = pc.utf8_trim_whitespace(batch.column(TEXT_COL).combine_chunks())
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


def read_ncf(prefix: str) -> NcfSource:
    """`ncf:PREFIX`: PREFIX.train.rating / .test.rating (user\\titem\\trating\\ttimestamp, 0-based) and
    PREFIX.test.negative ('(user,item)' then the 99 negatives)."""
    import ray.data

    paths = {k: f"{prefix}.{k}" for k in ("train.rating", "test.rating", "test.negative")}
    fs, _ = _filesystem(prefix)
    for p in paths.values():
        fs_path = _filesystem(p)[1]
        if not _exists(fs, fs_path):
            raise UserError(f"path not found: {p} (ncf:PREFIX needs PREFIX.train.rating, .test.rating, "
                            f".test.negative)")
    spec = ColumnSpec(rating_col=RATING_COL, sep="\t", names=ML_COLUMNS)

    def lines(p: str) -> Any:
        return ray.data.read_text(_filesystem(p)[1], filesystem=fs)

    negatives = lines(paths["test.negative"]).map_batches(_parse_negative_lines, batch_size=None,
                                                          batch_format="pyarrow")
    return NcfSource(name=f"ncf:{prefix}", train=_normalised(lines(paths["train.rating"]), spec),
                     test=_normalised(lines(paths["test.rating"]), spec), negatives=negatives)


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
    """The ratings member of a zip (extracted into workdir) or found under a directory."""
    if local.is_dir():
        found = sorted(local.rglob(ml.member))
        if not found:
            raise UserError(f"--from {local}: no {ml.member} found under it")
        return found[0]
    if not local.is_file():
        raise UserError(f"path not found: --from {local}")
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
        raise UserError(f"--from {local}: not a zip archive") from None


def read_movielens(name: str, cfg: DataConfig, local_from: str | None, workdir: Path) -> LogSource:
    """`movielens-*`: every rating is an implicit positive (as in the NCF paper) unless --min-rating is set."""
    import ray.data

    ml = MOVIELENS[name]
    local = Path(local_from).expanduser() if local_from else _download(ml)
    ratings = _ratings_file(ml, local, workdir)
    if ratings.stat().st_size == 0:
        raise UserError(f"empty input: {ratings}")
    header = _first_line(None, str(ratings), None) if ml.header else None
    spec = ColumnSpec(rating_col=RATING_COL, min_rating=cfg.min_rating, sep=ml.sep, names=ML_COLUMNS,
                      header_line=header)
    return LogSource(name=name, dataset=_normalised(ray.data.read_text(str(ratings)), spec))


# --------------------------------------------------------------------------------------------- entry point
def open_source(cfg: DataConfig, *, local_from: str | None = None, synthetic: Any = None,
                workdir: Path | None = None) -> LogSource | NcfSource:
    """Resolve cfg.source. `synthetic` is a SyntheticSpec (users/items/interactions); `workdir` is a scratch dir
    the caller deletes (MovieLens archives are extracted there)."""
    src = cfg.source
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
    """Ray wraps exceptions raised inside map_batches; recover a UserError (or a pyarrow read error, which is the
    user's file) from the wrapped text so the CLI can print one line."""
    if isinstance(exc, UserError):
        return exc
    text = str(exc)
    m = re.search(r"ncf_ray\.errors\.UserError: (.+)", text)
    if m:
        return UserError(m.group(1).strip())
    m = re.search(r"(?:pyarrow\.lib\.)?(?:ArrowInvalid|ArrowTypeError|JSONDecodeError): (.+)", text)
    if m:
        return UserError(f"cannot read input: {m.group(1).strip()}")
    return None
