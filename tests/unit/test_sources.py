"""Reading raw files without Ray: `read_file` is the body of prepare's per-file Ray task, so every format and
every damaged file is checked here on tiny files written by the test; plus ids kept as given, the NCF files
without timestamps, dataset-dir checks and the --out URI refusal."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ncf_ray.config import DataConfig
from ncf_ray.data import schema as S
from ncf_ray.data.dataset import check_dataset_dir, load_dataset, read_meta
from ncf_ray.data.prepare import (
    VALID_LAST_LINE,
    RawLog,
    _ids_to_array,
    _meta,
    build_loo,
    build_ncf,
    encode_ids,
    local_out,
    write_dataset,
)
from ncf_ray.data.sources import (
    BAD,
    MOVIELENS,
    OK,
    ColumnSpec,
    FileFormat,
    _parse_negative_lines,
    _ratings_file,
    ncf_layout,
    read_file,
    user_error_from,
)
from ncf_ray.errors import UserError

CSV = FileFormat("delimited", sep=",")


def _read(path: Path, fmt: FileFormat = CSV, spec: ColumnSpec = ColumnSpec()) -> pa.Table:
    tables = list(read_file(str(path), None, fmt, spec))
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def _ok(t: pa.Table, col: str) -> list:
    return t.filter(pa.array(np.asarray(t["_status"]) == OK))[col].to_pylist()


# ------------------------------------------------------------------------------------------- delimited text
def test_csv_quoted_field_holding_the_separator_is_one_field(tmp_path):
    f = tmp_path / "log.csv"
    f.write_text('user_id,item_id,timestamp\n"smith, j",i1,10\nu2,"a ""quoted"" title",11\nu3,i3,12\n')
    t = _read(f)
    assert t["_status"].to_pylist() == [OK, OK, OK]
    assert t["user_id"].to_pylist() == ["smith, j", "u2", "u3"]
    assert t["item_id"].to_pylist()[1] == 'a "quoted" title'


def test_csv_rows_with_wrong_field_count_are_bad_rows_not_a_failure(tmp_path):
    f = tmp_path / "log.csv"
    f.write_text("user_id,item_id,timestamp\nu1,i1,10\nu2,i2\nu3,i3,12,extra\nu4,i4,13\n")
    t = _read(f)
    assert sorted(t["_status"].to_pylist()) == [OK, OK, BAD, BAD]
    assert sorted(e for e in t["_err"].to_pylist() if e) == ["line='u2,i2'", "line='u3,i3,12,extra'"]
    assert _ok(t, "user_id") == ["u1", "u4"]


def test_each_file_is_read_with_its_own_header(tmp_path):
    (tmp_path / "a.csv").write_text("user_id,item_id,timestamp\nu1,i1,10\n")
    (tmp_path / "b.csv").write_text("timestamp,item_id,rating,user_id\n20,i2,5,u2\n")
    a, b = _read(tmp_path / "a.csv"), _read(tmp_path / "b.csv")
    assert (_ok(a, "user_id"), _ok(a, "item_id"), _ok(a, "timestamp")) == (["u1"], ["i1"], [10])
    assert (_ok(b, "user_id"), _ok(b, "item_id"), _ok(b, "timestamp")) == (["u2"], ["i2"], [20])


def test_gzip_tsv_and_missing_column_names_the_file(tmp_path):
    f = tmp_path / "log.tsv.gz"
    f.write_bytes(gzip.compress(b"user_id\titem_id\ttimestamp\nu1\ti1\t10\n"))
    assert _ok(_read(f, FileFormat("delimited", sep="\t", compression="gzip")), "item_id") == ["i1"]
    g = tmp_path / "movies.csv"
    g.write_text("user_id,movie,timestamp\nu1,i1,10\n")
    with pytest.raises(UserError, match=r"missing required column 'item_id' in .*movies\.csv"):
        _read(g)


def test_multi_char_separator_splits_on_the_exact_string(tmp_path):
    f = tmp_path / "ratings.dat"
    # '::' must split only on the pair: a single ':' inside an id is part of the id.
    f.write_text("1::a:b::5::978300760\n2::c::3::978300761\r\nbroken:line\n\n3::d::4::978300762")
    fmt = FileFormat("delimited", sep="::", names=("user_id", "item_id", "rating", "timestamp"))
    t = _read(f, fmt, ColumnSpec(rating_col="rating"))
    assert _ok(t, "item_id") == ["a:b", "c", "d"] and _ok(t, "timestamp") == [978300760, 978300761, 978300762]
    assert t["_err"].drop_null().to_pylist() == ["line='broken:line'"]


def test_multi_char_separator_with_a_header_per_file(tmp_path):
    (tmp_path / "a.dat").write_text("user_id||item_id||timestamp\n1||2||3\n")
    (tmp_path / "b.dat").write_text("item_id||timestamp||user_id\n7||8||9\n")
    fmt = FileFormat("delimited", sep="||")
    b = _read(tmp_path / "b.dat", fmt)
    assert (_ok(b, "user_id"), _ok(b, "item_id"), _ok(b, "timestamp")) == (["9"], ["7"], [8])
    assert _ok(_read(tmp_path / "a.dat", fmt), "user_id") == ["1"]


# ------------------------------------------------------------------------------------------- files that lie
def test_random_bytes_named_parquet_is_one_line_naming_the_file(tmp_path):
    f = tmp_path / "log.parquet"
    f.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(UserError) as info:
        _read(f, FileFormat("parquet"))
    msg = str(info.value)
    assert "\n" not in msg and str(f) in msg and "Parquet" in msg


def test_jsonl_cut_off_mid_line_is_one_line_naming_the_file(tmp_path):
    f = tmp_path / "log.jsonl"
    rows = [json.dumps({"user_id": u, "item_id": u + 1, "timestamp": 10 + u}) for u in range(5)]
    f.write_text("\n".join(rows) + "\n" + rows[0][:17])
    with pytest.raises(UserError) as info:
        _read(f, FileFormat("jsonl"))
    msg = str(info.value)
    assert "\n" not in msg and str(f) in msg and "JSON Lines" in msg


def test_invalid_utf8_in_text_is_a_user_error(tmp_path):
    f = tmp_path / "log.csv"
    f.write_bytes(b"user_id,item_id,timestamp\n\xff\xfe,i1,10\n")
    with pytest.raises(UserError, match="log.csv: cannot read as delimited text"):
        _read(f)


def test_user_error_from_unwraps_a_task_error_and_leaves_bugs_alone():
    class RayTaskErrorLike(UserError):  # what Ray builds: a UserError subclass whose text is the traceback
        def __init__(self, cause):
            super().__init__("Traceback (most recent call last):\n  ...\nncf_ray.errors.UserError: x")
            self.cause = cause

    # Ray Data appends retry advice to the original's message.
    err = user_error_from(RayTaskErrorLike(UserError("f.csv: broken\nFailed to apply UDF transform after 1/1")))
    assert type(err) is UserError and str(err) == "f.csv: broken"
    assert str(user_error_from(RayTaskErrorLike(None))) == "x"  # only the traceback text is left
    assert user_error_from(ValueError("a bug")) is None


# ------------------------------------------------------------------------------------------- ids as given
def test_ids_keep_leading_zeros(tmp_path):
    f = tmp_path / "log.csv"
    f.write_text("user_id,item_id,timestamp\n0012,007,1\n12,7,2\n0012,7,3\n")
    t = _read(f)
    assert t["user_id"].to_pylist() == ["0012", "12", "0012"] and t["item_id"].to_pylist() == ["007", "7", "7"]
    codes, vocab = encode_ids(_ids_to_array([t["user_id"].combine_chunks()]))
    assert sorted(vocab.tolist()) == ["0012", "12"] and codes.tolist()[0] == codes.tolist()[2]


def test_canonical_integer_ids_stay_integers_and_mixed_batches_become_text(tmp_path):
    f = tmp_path / "log.csv"
    f.write_text("user_id,item_id,timestamp\n12,-3,1\n0,5,2\n")
    t = _read(f)
    users = _ids_to_array([t["user_id"].combine_chunks()])
    assert isinstance(users, np.ndarray) and users.tolist() == [12, 0]
    assert _ids_to_array([t["item_id"].combine_chunks()]).tolist() == [-3, 5]
    # One batch of canonical ints, another with '0012': the whole column is text and '12' stays '12'.
    mixed = _ids_to_array([pa.array([12, 5], pa.int64()), pa.array(["0012"])])
    assert mixed.to_pylist() == ["12", "5", "0012"]
    assert _ids_to_array([pa.array([1, 2], pa.int64()), pa.array(["3"])]).tolist() == [1, 2, 3]
    big = "123456789012345678901"  # does not fit int64: kept as text, not overflowed
    g = tmp_path / "big.csv"
    g.write_text(f"user_id,item_id,timestamp\n{big},+4,1\n")
    assert _read(g)["user_id"].to_pylist() == [big] and _read(g)["item_id"].to_pylist() == ["+4"]


# ------------------------------------------------------------------------------------------- ncf without timestamps
def _ncf_no_ts(tmp_path: Path) -> Path:
    prefix = tmp_path / "Amazon"
    # User 2 has one train line only: once valid is carved it has no train row left, so it is dropped.
    train = ["0\t3\t1", "0\t1\t1", "0\t4\t1", "1\t0\t1", "1\t2\t1", "2\t5\t1", "3\t2\t1", "3\t0\t1"]
    Path(f"{prefix}.train.rating").write_text("\n".join(train) + "\n")
    Path(f"{prefix}.test.rating").write_text("0\t2\t1\n1\t5\t1\n2\t0\t1\n3\t4\t1\n")
    Path(f"{prefix}.test.negative").write_text("(0,2)\t0\t5\n(1,5)\t3\t4\n(2,0)\t1\t2\n(3,4)\t1\t3\n")
    return prefix


def test_ncf_layout_detects_files_without_timestamps(tmp_path):
    prefix = _ncf_no_ts(tmp_path)
    assert ncf_layout(None, f"{prefix}.train.rating").line_order_time
    Path(tmp_path / "x.rating").write_text("0\t1\t5\t978\n")
    assert not ncf_layout(None, str(tmp_path / "x.rating")).line_order_time
    Path(tmp_path / "y.rating").write_text("0 1 5\n")
    with pytest.raises(UserError, match="1 field"):
        ncf_layout(None, str(tmp_path / "y.rating"))


def test_ncf_without_timestamps_carves_valid_from_the_last_train_line(tmp_path):
    prefix = _ncf_no_ts(tmp_path)
    spec = ColumnSpec(rating_col="rating")

    def log(name: str) -> RawLog:
        path = f"{prefix}.{name}"
        t = _read(Path(path), ncf_layout(None, path), spec)
        assert t["_status"].to_pylist() == [OK] * t.num_rows
        return RawLog(_ids_to_array([t["user_id"].combine_chunks()]), _ids_to_array([t["item_id"].combine_chunks()]),
                      t["timestamp"].to_numpy(), rows=t.num_rows)

    neg = _parse_negative_lines(pa.table({"text": Path(f"{prefix}.test.negative").read_text().splitlines()}))
    b = build_ncf(log("train.rating"), log("test.rating"), neg, DataConfig(seed=0), timestamps=False)
    # Users 0, 1, 3 kept (re-indexed 0, 1, 2); valid = last train line of each, in file order (not by item).
    assert b.user_ids.tolist() == ["0", "1", "3"] and b.dropped["users_without_train"] == 1
    assert b.split.valid_items.tolist() == [4, 2, 0]
    assert b.split.test_items.tolist() == [2, 5, 4] and b.test_neg.tolist() == [[0, 5], [3, 4], [1, 3]]
    assert sorted(zip(b.split.train_users.tolist(), b.split.train_items.tolist())) == [(0, 1), (0, 3), (1, 0),
                                                                                        (2, 2)]
    assert b.valid_from == VALID_LAST_LINE and not b.timestamps and b.item_ids.size == 6


# ------------------------------------------------------------------------------------------- dataset dir checks
def _dataset_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(20), 6)
    items = np.concatenate([rng.choice(30, 6, replace=False) for _ in range(20)])
    log = RawLog(users, items, np.arange(users.size), rows=users.size)
    cfg = DataConfig(eval_negatives=5)
    built = build_loo(log, cfg)
    d = tmp_path / "ds"
    d.mkdir()
    write_dataset(built, d, 2)
    (d / S.META_FILE).write_text(json.dumps(_meta(cfg, built, "test", 0.0)))
    return d


@pytest.mark.parametrize("name", [S.USERS_FILE, S.ITEMS_FILE, S.VALID_NEG_FILE, S.META_FILE])
def test_dataset_dir_missing_a_file_is_one_line_naming_it(tmp_path, name):
    d = _dataset_dir(tmp_path)
    assert load_dataset(d).n_users == 20
    (d / name).unlink()
    for fn in (check_dataset_dir, load_dataset, read_meta):
        with pytest.raises(UserError, match=f"missing {name}"):
            fn(d)


def test_dataset_dir_with_a_damaged_file_names_it(tmp_path):
    d = _dataset_dir(tmp_path)
    (d / S.ITEMS_FILE).write_bytes(b"not parquet at all")
    with pytest.raises(UserError) as info:
        load_dataset(d)
    assert str(d / S.ITEMS_FILE) in str(info.value) and "\n" not in str(info.value)
    for part in (d / S.TRAIN_DIR).iterdir():
        part.unlink()
    with pytest.raises(UserError, match=r"missing train/\*\.parquet"):
        check_dataset_dir(d)
    (d / S.META_FILE).write_text("{}")
    (d / S.TRAIN_DIR / "part-00000.parquet").write_bytes(b"")
    with pytest.raises(UserError, match="lacks n_users, n_items"):
        read_meta(d)


def test_train_cli_on_a_dir_without_users_parquet_is_one_line(tmp_path, capsys):
    from ncf_ray.cli import main

    d = _dataset_dir(tmp_path)
    (d / S.USERS_FILE).unlink()
    rc = main(["train", str(d), "--out", str(tmp_path / "run"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "missing users.parquet" in err


# ------------------------------------------------------------------------------------------- --out URIs
def test_uri_out_is_refused_before_anything_is_created(tmp_path, monkeypatch, capsys):
    from ncf_ray.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["prepare", "synthetic", "--out", "s3://bucket/x", "--users", "50"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --out s3://bucket/x") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # no ./s3: directory
    assert local_out(f"file://{tmp_path}/ds") == tmp_path / "ds"
    with pytest.raises(UserError, match="gs://b/y"):
        local_out("gs://b/y")


# ------------------------------------------------------------------------------------------- movielens --from
def test_movielens_from_a_partial_folder_or_the_ratings_file_itself(tmp_path):
    ml = MOVIELENS["movielens-1m"]
    d = tmp_path / "ml-1m-half"
    (d / "ml-1m").mkdir(parents=True)
    (d / "ml-1m" / "ratings.dat").write_text("1::10::5::978300760\n2::11::3::978300761\n")
    (d / "ml-1m" / "movies.dat").write_bytes("10::Am\xe9lie (2001)::Comedy\n".encode("latin-1"))
    assert _ratings_file(ml, d, tmp_path) == d / "ml-1m" / "ratings.dat"
    assert _ratings_file(ml, d / "ml-1m" / "ratings.dat", tmp_path) == d / "ml-1m" / "ratings.dat"
    with pytest.raises(UserError, match="not a zip archive"):
        _ratings_file(ml, d / "ml-1m" / "movies.dat", tmp_path)
    (d / "ml-1m" / "ratings.dat").unlink()
    with pytest.raises(UserError, match="no ratings.dat found"):
        _ratings_file(ml, d, tmp_path)


def test_movielens_1m_side_tables_keep_the_papers_item_set(tmp_path):
    """movies.dat / users.dat beside ratings.dat become side tables; movies nobody rated stay out of the vocab
    (LogSource.cold_items is False for MovieLens), and a folder with the ratings only brings no tables."""
    from ncf_ray.data.shoplog import encode_side_tables
    from ncf_ray.data.sources import movielens_tables

    ml = tmp_path / "ml-1m"
    ml.mkdir()
    genres = ["Animation|Comedy", "Action", "Drama", "Comedy", "Drama"]
    (ml / "movies.dat").write_bytes("".join(f"{m}::Movie {m} (199{m})::{g}\n" for m, g in enumerate(genres, 1))
                                    .encode("latin-1"))
    (ml / "users.dat").write_text("".join(f"{u}::{'FM'[u % 2]}::25::{u}::4806{u}\n" for u in range(1, 5)))
    tables = movielens_tables("movielens-1m", ml)
    assert set(tables) == {"items", "users"}
    users = np.repeat(np.arange(1, 5), 3)
    items = np.array([1, 2, 3, 2, 3, 4, 3, 4, 1, 4, 1, 2])  # 3 of movies 1..4 each; movie 5 is never rated
    log = RawLog(users=users, items=items, times=np.arange(users.size), rows=users.size)
    b = build_loo(log, DataConfig(eval_negatives=1), None)
    enc = encode_side_tables(tables, b)
    assert b.item_ids.tolist() == ["1", "2", "3", "4"] and enc["items"].spec["stats"]["unknown_ids"] == 1
    assert enc["users"].ids.shape[0] == 4
    (tmp_path / "ratings-only").mkdir()
    assert movielens_tables("movielens-1m", tmp_path / "ratings-only") == {}
