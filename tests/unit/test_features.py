"""Side tables without Ray (ncf_ray/data/features.py): every reader format, each column kind's encoding, bucket
edges from train entities only, reserved ids for missing and unseen values, the features/ round trip, one new
entity encoded as its table row would be, every bad table as one line naming the column, and the MovieLens
readers on tiny files written here in the GroupLens layouts (never real MovieLens data)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ncf_ray.data import schema as S
from ncf_ray.data.features import (
    BAG,
    BUCKET,
    CATEGORICAL,
    TEXT,
    VECTOR,
    EncodedFeatures,
    SideOptions,
    describe,
    encode_row_values,
    encode_side_table,
    extend_features,
    movielens_side_tables,
    read_features,
    read_side_table,
    side_ids,
    write_features,
)
from ncf_ray.errors import UserError

ITEMS_CSV = """item_id,category,brand,price,tags,title,emb
1,shoes,acme,10.5,run|trail,Trail Runner X,0.1 0.2 0.3
2,shoes,zeta,20,run,Road Runner,"[1, 2, 3]"
3,shirts,acme,5,,Plain Tee,
4,hats,,40,sun|beach|run,Sun Hat (Beach),4;5;6
5,hats,zeta,NA,sun,,0 0 1
"""
VOCAB = np.array(["1", "2", "3", "4", "5", "6"])  # entity 5 ("6") has no row
TRAIN = np.array([True, True, True, False, True, True])  # "4" is a cold item
OPTS = SideOptions("item_id", text_cols=("title",), vector_cols=("emb",))


def _csv(tmp_path: Path, text: str = ITEMS_CSV, name: str = "items.csv") -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


def _encode(tmp_path: Path, text: str = ITEMS_CSV, opts: SideOptions = OPTS, vocab=VOCAB, train=TRAIN):
    table = read_side_table(_csv(tmp_path, text), opts.id_col, "items")
    return encode_side_table(table, opts, vocab, train, "items")


def _col(enc: EncodedFeatures, name: str) -> dict:
    return next(c for c in enc.spec["columns"] if c["name"] == name)


def _slots(enc: EncodedFeatures, name: str, entity: int) -> list[int]:
    lo, hi = _col(enc, name)["slots"]
    return enc.ids[entity, lo:hi].tolist()


def _one_line_naming(exc: pytest.ExceptionInfo, *names: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    for name in names:
        assert name in msg, msg


# ------------------------------------------------------------------------------------------- layout
def test_kinds_are_inferred_and_every_column_owns_a_disjoint_id_range(tmp_path):
    enc = _encode(tmp_path)
    kinds = {c["name"]: c["kind"] for c in enc.spec["columns"]}
    assert kinds == {"category": CATEGORICAL, "brand": CATEGORICAL, "price": BUCKET, "tags": BAG, "title": TEXT,
                     "emb": VECTOR}
    spans = sorted((c["offset"], c["offset"] + c["size"]) for c in enc.spec["columns"] if c["size"])
    assert spans[0][0] == 1  # 0 is the global padding id
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no overlap
    assert enc.spec["n_ids"] == spans[-1][1] == 1 + sum(c["size"] for c in enc.spec["columns"])
    assert enc.ids.dtype == np.int32 and enc.ids.shape == (VOCAB.size, enc.spec["slots"])
    assert enc.dense.dtype == np.float32 and enc.dense.shape == (VOCAB.size, 3)
    for c in enc.spec["columns"]:  # every id a column writes lies in its own range (or is padding)
        if c["kind"] != VECTOR:
            block = enc.ids[:, c["slots"][0]:c["slots"][1]]
            assert ((block == 0) | ((block >= c["offset"]) & (block < c["offset"] + c["size"]))).all()
            assert (block[:, 0] != 0).all()  # the first slot is never padding


def test_categorical_vocab_covers_cold_items_and_unseen_values_get_the_reserved_id(tmp_path):
    enc = _encode(tmp_path)
    col = _col(enc, "category")
    assert col["vocab"] == ["hats", "shirts", "shoes"]  # "hats" is only on item 4 (cold) and 5
    cold = _slots(enc, "category", 3)[0]
    assert cold == col["offset"] + 1 + col["vocab"].index("hats")
    assert _slots(enc, "brand", 3) == [_col(enc, "brand")["offset"]]  # empty cell -> reserved
    ids, _ = encode_row_values(enc.spec, {"category": "socks"})
    lo, _ = col["slots"]
    assert ids[lo] == col["offset"]
    assert col["train_unseen"] == 0  # "hats" is also on item 5, which has train interactions
    assert _col(enc, "tags")["train_unseen"] == 1  # "beach" is only on the cold item 4


def test_entity_without_a_row_gets_every_reserved_id_and_zero_dense(tmp_path):
    enc = _encode(tmp_path)
    for c in enc.spec["columns"]:
        if c["kind"] == VECTOR:
            assert not enc.dense[5, c["dims"][0]:c["dims"][1]].any()
        else:
            assert _slots(enc, c["name"], 5)[0] == c["offset"]
            assert not any(_slots(enc, c["name"], 5)[1:])  # padding after
    assert enc.spec["stats"]["entities_without_row"] == 1
    ids, dense = encode_row_values(enc.spec, {})
    assert ids.tolist() == enc.ids[5].tolist() and not dense.any()


def test_stats_count_unknown_and_repeated_ids_and_the_first_row_wins(tmp_path):
    text = ITEMS_CSV + "99,shoes,acme,1,run,Ghost,1 1 1\n2,hats,acme,1,sun,Dup,1 1 1\n"
    enc = _encode(tmp_path, text)
    assert enc.spec["stats"]["rows"] == 7
    assert enc.spec["stats"]["unknown_ids"] == 1
    assert enc.spec["stats"]["duplicate_rows"] == 1
    assert _slots(enc, "category", 1)[0] == _col(enc, "category")["offset"] + 1 + _col(enc, "category")[
        "vocab"].index("shoes")


# ------------------------------------------------------------------------------------------- buckets
def _price_edges(tmp_path: Path, prices: dict[str, float], train: np.ndarray) -> list[float]:
    rows = "\n".join(f"{i},{p}" for i, p in prices.items())
    table = read_side_table(_csv(tmp_path, "item_id,price\n" + rows + "\n"), "item_id", "items")
    vocab = np.array(list(prices))
    return _col(encode_side_table(table, SideOptions("item_id", buckets=4), vocab, train, "items"), "price")["edges"]


def test_bucket_edges_come_from_train_entities_only(tmp_path):
    prices = {str(i): float(i) for i in range(1, 21)}
    train = np.array([i <= 15 for i in range(1, 21)])
    edges = _price_edges(tmp_path, prices, train)
    assert edges == pytest.approx(np.quantile(np.arange(1, 16), [0.25, 0.5, 0.75]).tolist())
    cold_moved = dict(prices, **{"18": 1e6, "19": -1e6})  # non-train entities: edges stay
    assert _price_edges(tmp_path, cold_moved, train) == edges
    warm_moved = dict(prices, **{"3": 1e6})  # a train entity: edges move (the test can fail)
    assert _price_edges(tmp_path, warm_moved, train) != edges


def test_bucket_codes_order_values_and_missing_or_unparsed_is_reserved(tmp_path):
    enc = _encode(tmp_path)
    col = _col(enc, "price")
    codes = [_slots(enc, "price", e)[0] for e in range(4)]  # prices 10.5, 20, 5, 40
    assert codes[2] <= codes[0] <= codes[1] <= codes[3] and codes[2] < codes[3]
    assert _slots(enc, "price", 4) == [col["offset"]]  # "NA"
    big, _ = encode_row_values(enc.spec, {"price": 1e9})
    assert big[col["slots"][0]] == col["offset"] + col["size"] - 1  # above every edge: the last bucket
    with pytest.raises(UserError) as exc:
        encode_row_values(enc.spec, {"price": "cheap"})
    _one_line_naming(exc, "price", "cheap")


def test_dates_are_bucketed_as_time_and_a_new_entity_may_send_an_iso_date(tmp_path):
    import datetime as dt

    days = [dt.date(2020, 1, 1) + dt.timedelta(days=30 * k) for k in range(10)]
    pq.write_table(pa.table({"item_id": [str(k) for k in range(10)], "released": days}), tmp_path / "d.parquet")
    table = read_side_table(tmp_path / "d.parquet", "item_id", "items")
    enc = encode_side_table(table, SideOptions("item_id", buckets=4), np.array([str(k) for k in range(10)]),
                            np.ones(10, bool), "items")
    col = _col(enc, "released")
    assert col["kind"] == BUCKET and col["time"]
    late, _ = encode_row_values(enc.spec, {"released": "2030-06-01"})
    early, _ = encode_row_values(enc.spec, {"released": "2019-06-01T12:00:00Z"})
    assert late[0] == _slots(enc, "released", 9)[0] and early[0] == _slots(enc, "released", 0)[0]
    with pytest.raises(UserError) as exc:
        encode_row_values(enc.spec, {"released": "soon"})
    _one_line_naming(exc, "released", "soon")
    stamps = pa.array([dt.datetime(2020, 1, 1, 0, 0, 0, 123000, tzinfo=dt.timezone.utc)] * 2, pa.timestamp("ms", "UTC"))
    ms = encode_side_table(pa.table({"item_id": ["0", "1"], "t": stamps}), SideOptions("item_id"),
                           np.array(["0", "1"]), np.ones(2, bool), "items")  # sub-second values: no lossy cast
    assert _col(ms, "t")["edges"] == [pytest.approx(dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc).timestamp() + 0.123)]
    csv_rows = "".join(f"{k},{d.isoformat()}\n" for k, d in enumerate(days)) + "10,NA\n"
    text = read_side_table(_csv(tmp_path, "item_id,released\n" + csv_rows), "item_id", "items")
    enc2 = encode_side_table(text, SideOptions("item_id", buckets=4), np.array([str(k) for k in range(11)]),
                             np.ones(11, bool), "items")
    got = _col(enc2, "released")  # ISO dates in a CSV bucket exactly as the Parquet dates; "NA" is missing
    assert (got["kind"], got["edges"], got["time"], got["missing"]) == (BUCKET, col["edges"], True, 1)


# ------------------------------------------------------------------------------------------- bags, text, vectors
def test_bag_from_separated_text_and_from_parquet_lists_encode_alike(tmp_path):
    enc = _encode(tmp_path)
    col = _col(enc, "tags")
    assert col["vocab"] == ["beach", "run", "sun", "trail"]
    ids = lambda *vs: [col["offset"] + 1 + col["vocab"].index(v) for v in vs]  # noqa: E731
    assert _slots(enc, "tags", 3) == ids("sun", "beach", "run")
    assert _slots(enc, "tags", 0) == ids("run", "trail") + [0]
    assert _slots(enc, "tags", 2) == [col["offset"], 0, 0]  # empty bag -> reserved, then padding
    pq.write_table(pa.table({"item_id": [1, 2], "tags": [["run", "trail"], []]}), tmp_path / "t.parquet")
    table = read_side_table(tmp_path / "t.parquet", "item_id", "items")
    enc2 = encode_side_table(table, SideOptions("item_id"), np.array(["1", "2"]), np.ones(2, bool), "items")
    assert _col(enc2, "tags")["kind"] == BAG
    assert _slots(enc2, "tags", 0) == [_col(enc2, "tags")["offset"] + 1 + k for k in (0, 1)]
    row, _ = encode_row_values(enc.spec, {"tags": ["trail", "unheard", "run"]})
    lo, hi = col["slots"]
    assert row[lo:hi].tolist() == ids("trail") + [col["offset"]] + ids("run")


def test_bag_is_capped_at_max_bag_slots(tmp_path):
    opts = SideOptions("item_id", text_cols=("title",), vector_cols=("emb",), max_bag=2)
    enc = _encode(tmp_path, opts=opts)
    col = _col(enc, "tags")
    assert col["slots"][1] - col["slots"][0] == 2 and col["truncated"] == 1
    assert len(_slots(enc, "tags", 3)) == 2


def test_text_words_are_lowercased_split_on_punctuation_and_hashed_with_crc32(tmp_path):
    enc = _encode(tmp_path)
    col = _col(enc, "title")
    want = [col["offset"] + 1 + zlib.crc32(w.encode()) % col["hash_buckets"] for w in ("sun", "hat", "beach")]
    assert _slots(enc, "title", 3)[:3] == want
    row, _ = encode_row_values(enc.spec, {"title": "SUN-hat: beach!! sun"})
    assert row[col["slots"][0]:col["slots"][0] + 3].tolist() == want  # repeated words count once


def test_text_hash_does_not_depend_on_the_process_hash_seed(tmp_path):
    enc = _encode(tmp_path)
    code = ("import sys, json; from ncf_ray.data.features import encode_row_values as e; "
            "spec = json.load(open(sys.argv[1])); print(json.dumps(e(spec, {'title': 'Trail Runner X'})[0].tolist()))")
    (tmp_path / "spec.json").write_text(json.dumps(enc.spec))
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "spec.json")], env=env, check=True,
                         capture_output=True, text=True).stdout
    lo, hi = _col(enc, "title")["slots"]
    assert json.loads(out)[lo:hi] == _slots(enc, "title", 0)


def test_text_words_of_any_script_are_whole_words(tmp_path):
    enc = _encode(tmp_path)
    col = _col(enc, "title")
    lo = col["slots"][0]
    one = encode_row_values(enc.spec, {"title": "Señor CAFÉ"})[0][lo:lo + 2].tolist()
    two = encode_row_values(enc.spec, {"title": "café, señor"})[0][lo:lo + 2].tolist()
    want = [col["offset"] + 1 + zlib.crc32(w.encode()) % col["hash_buckets"] for w in ("señor", "café")]
    assert one == want and sorted(two) == sorted(want)


def test_row_values_take_the_columns_list_too(tmp_path):
    enc = _encode(tmp_path)
    raw = {"category": "hats", "tags": "sun", "emb": [1, 2, 3]}
    a, da = encode_row_values(enc.spec, raw)
    b, db = encode_row_values(enc.spec["columns"], raw)
    assert a.tolist() == b.tolist() and da.tolist() == db.tolist()


def test_vectors_from_text_and_lists_fill_dense_and_a_wrong_length_is_named(tmp_path):
    enc = _encode(tmp_path)
    want = [[0.1, 0.2, 0.3], [1, 2, 3], [0, 0, 0], [4, 5, 6], [0, 0, 1]]
    np.testing.assert_allclose(enc.dense[:5], np.asarray(want, np.float32))
    _, dense = encode_row_values(enc.spec, {"emb": [7, 8, 9]})
    assert dense.tolist() == [7, 8, 9]
    with pytest.raises(UserError) as exc:
        encode_row_values(enc.spec, {"emb": [1, 2]})
    _one_line_naming(exc, "emb", "length 2", "expected 3")
    bad = ITEMS_CSV.replace("4;5;6", "4;5")
    with pytest.raises(UserError) as exc:
        _encode(tmp_path, bad)
    _one_line_naming(exc, "emb", "'4'", "items.csv")  # the column and the row's id
    pq.write_table(pa.table({"item_id": ["1", "2"], "v": [[0.5, 1.5], None]}), tmp_path / "v.parquet")
    enc2 = encode_side_table(read_side_table(tmp_path / "v.parquet", "item_id", "items"), SideOptions("item_id"),
                             np.array(["1", "2"]), np.ones(2, bool), "items")
    assert _col(enc2, "v")["kind"] == VECTOR and enc2.dense.tolist() == [[0.5, 1.5], [0, 0]]


# ------------------------------------------------------------------------------------------- round trips
def test_write_read_round_trip_keeps_ids_dense_and_spec(tmp_path):
    enc = _encode(tmp_path)
    users = encode_side_table(pa.table({"user_id": ["a", "b"], "gender": ["f", "m"]}), SideOptions("user_id"),
                              np.array(["a", "b", "c"]), np.ones(3, bool), "users")
    write_features(tmp_path / "ds", enc, users)
    files = sorted(p.name for p in (tmp_path / "ds" / S.FEATURES_DIR).iterdir())
    assert files == sorted([S.FEATURES_JSON, *S.FEATURE_FILES.values()])
    modes = {(p.stat().st_mode & 0o777) for p in (tmp_path / "ds" / S.FEATURES_DIR).iterdir()}
    assert len(modes) == 1  # the safetensors files are as readable as features.json
    back = read_features(tmp_path / "ds")
    assert set(back) == {"items", "users"}
    assert np.array_equal(back["items"].ids, enc.ids) and np.array_equal(back["items"].dense, enc.dense)
    assert back["items"].spec == json.loads(json.dumps(enc.spec))
    assert back["users"].dense is None and np.array_equal(back["users"].ids, users.ids)
    write_features(tmp_path / "ds", None, users)  # rewriting replaces the whole dir
    assert set(read_features(tmp_path / "ds")) == {"users"}
    assert read_features(tmp_path / "nothing") == {}


def test_a_new_entity_encodes_exactly_as_its_table_row(tmp_path):
    enc = _encode(tmp_path)
    spec = json.loads(json.dumps(enc.spec))  # as read back from features.json
    raw = {"item_id": "4", "category": "hats", "brand": None, "price": 40, "tags": "sun|beach|run",
           "title": "Sun Hat (Beach)", "emb": "4;5;6"}
    ids, dense = encode_row_values(spec, raw)
    assert ids.tolist() == enc.ids[3].tolist() and dense.tolist() == enc.dense[3].tolist()


def test_extend_appends_new_entities_against_the_frozen_spec(tmp_path):
    enc = _encode(tmp_path)
    new = pa.table({"item_id": ["7", "8"], "category": ["shoes", "socks"], "price": [1e6, 15.0],
                    "emb": [[1.0, 1.0, 1.0], None], "colour": ["red", "blue"]})  # no tags/title; extra column
    grown = extend_features(enc, np.array(["7", "8", "9"]), new)
    assert grown.ids.shape == (VOCAB.size + 3, enc.spec["slots"])
    assert np.array_equal(grown.ids[:VOCAB.size], enc.ids) and np.array_equal(grown.dense[:VOCAB.size], enc.dense)
    assert [c["edges"] if c["kind"] == BUCKET else c.get("vocab") for c in grown.spec["columns"]] == [
        c["edges"] if c["kind"] == BUCKET else c.get("vocab") for c in enc.spec["columns"]]  # nothing refitted
    for k, raw in enumerate(({"category": "shoes", "price": 1e6, "emb": [1, 1, 1]},
                             {"category": "socks", "price": 15.0}, {})):
        ids, dense = encode_row_values(enc.spec, raw)
        assert grown.ids[VOCAB.size + k].tolist() == ids.tolist()
        assert grown.dense[VOCAB.size + k].tolist() == dense.tolist()
    assert grown.spec["stats"]["appended"] == 3 and grown.spec["stats"]["appended_without_row"] == 1
    assert "appended" not in enc.spec["stats"]  # the original is untouched
    write_features(tmp_path / "ds", grown, None)
    assert np.array_equal(read_features(tmp_path / "ds")["items"].ids, grown.ids)
    reserved = extend_features(enc, np.array(["10"]))
    assert reserved.ids[-1].tolist() == encode_row_values(enc.spec, {})[0].tolist()


def test_damaged_features_dir_is_a_user_error_naming_the_file(tmp_path):
    enc = _encode(tmp_path)
    write_features(tmp_path, enc, None)
    spec = json.loads((tmp_path / S.FEATURES_DIR / S.FEATURES_JSON).read_text())
    spec["items"]["slots"] += 1
    (tmp_path / S.FEATURES_DIR / S.FEATURES_JSON).write_text(json.dumps(spec))
    with pytest.raises(UserError) as exc:
        read_features(tmp_path)
    _one_line_naming(exc, "items.safetensors", "slots")
    (tmp_path / S.FEATURES_DIR / S.FEATURE_FILES["items"]).write_bytes(b"not safetensors")
    with pytest.raises(UserError) as exc:
        read_features(tmp_path)
    _one_line_naming(exc, "items.safetensors")


def test_describe_gives_one_line_per_column(tmp_path):
    enc = _encode(tmp_path)
    lines = describe(enc.spec)
    assert len(lines) == len(enc.spec["columns"])
    for line, col in zip(lines, enc.spec["columns"]):
        assert line.startswith(f"{col['name']}: {col['kind']}") and "\n" not in line


# ------------------------------------------------------------------------------------------- ids and formats
def test_side_ids_are_written_as_the_log_writes_its_ids(tmp_path):
    t = pa.table({"i": pa.array([7, 12], pa.int64()), "f": [7.0, 12.0], "s": [" 007", "12"]})
    assert side_ids(t, "i").tolist() == ["7", "12"]
    assert side_ids(t, "f").tolist() == ["7", "12"]
    assert side_ids(t, "s").tolist() == ["007", "12"]  # text is never rewritten: '007' is not 7, as in the log
    table = pa.table({"item_id": ["007", "12"], "c": ["x", "y"]})
    enc = encode_side_table(table, SideOptions("item_id"), np.array(["7", "12"]), np.ones(2, bool), "items")
    assert enc.spec["stats"]["unknown_ids"] == 1 and enc.spec["stats"]["entities_without_row"] == 1


@pytest.mark.parametrize("name", ["items.csv", "items.tsv", "items.dat", "items.parquet", "items.jsonl",
                                  "items.json", "items.csv.gz"])
def test_every_format_prepare_reads_gives_the_same_encoding(tmp_path, name):
    rows = [{"item_id": "1", "category": "a", "price": "1.5"}, {"item_id": "2", "category": "b", "price": "3"}]
    f = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), f)
    elif name.endswith(".jsonl"):
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".json"):
        f.write_text(json.dumps(rows, indent=1))  # one array of objects
    else:
        sep = {"items.tsv": "\t", "items.dat": "::"}.get(name, ",")
        text = sep.join(rows[0]) + "\n" + "".join(sep.join(r.values()) + "\n" for r in rows)
        f.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    table = read_side_table(f, "item_id", "items")
    enc = encode_side_table(table, SideOptions("item_id"), np.array(["1", "2"]), np.ones(2, bool), "items")
    assert enc.spec["source"] == name
    assert [c["kind"] for c in enc.spec["columns"]] == [CATEGORICAL, BUCKET]
    assert _slots(enc, "category", 1)[0] == _col(enc, "category")["offset"] + 2


def test_a_directory_of_parts_and_a_file_uri_read_as_one_table(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "a.csv").write_text("item_id,c\n1,x\n")
    (tmp_path / "parts" / "b.csv").write_text("c,item_id\ny,2\n")  # same columns, another order
    (tmp_path / "parts" / "_SUCCESS").write_text("")
    table = read_side_table(tmp_path / "parts", "item_id", "items")
    assert sorted(zip(table["item_id"].to_pylist(), table["c"].to_pylist())) == [("1", "x"), ("2", "y")]
    uri = read_side_table(f"file://{tmp_path / 'parts' / 'a.csv'}", "item_id", "items")
    assert uri["c"].to_pylist() == ["x"]
    (tmp_path / "parts" / "c.csv").write_text("item_id,d\n3,z\n")
    with pytest.raises(UserError) as exc:
        read_side_table(tmp_path / "parts", "item_id", "items")
    _one_line_naming(exc, "c.csv", "differ")


def test_a_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path):
    (tmp_path / "bom.csv").write_bytes("item_id,c\n1,x\n".encode("utf-8-sig"))
    assert read_side_table(tmp_path / "bom.csv", "item_id", "items").column_names == ["item_id", "c"]


def test_quoted_csv_fields_and_rows_with_the_wrong_field_count(tmp_path):
    f = _csv(tmp_path, 'item_id,title\n1,"Hello, world"\n2,a,extra\n3,b\n')
    table = read_side_table(f, "item_id", "items")
    assert table["title"].to_pylist() == ["Hello, world", "b"]
    enc = encode_side_table(table, SideOptions("item_id"), np.array(["1", "3"]), np.ones(2, bool), "items")
    assert enc.spec["stats"]["bad_rows"] == 1
    f = _csv(tmp_path, "item_id,title\n1;a\n2;b\n3,c\n", "semi.csv")  # mostly ';'-separated: not a few bad lines
    with pytest.raises(UserError) as exc:
        read_side_table(f, "item_id", "items")
    _one_line_naming(exc, "semi.csv", "2 of 3 rows")


# ------------------------------------------------------------------------------------------- bad tables
@pytest.mark.parametrize("text, opts, names", [
    ("id,category\n1,a\n", SideOptions("item_id"), ["items.csv", "item_id", "id"]),  # missing id column
    ("item_id,price\n1,\n2,\n", SideOptions("item_id"), ["price", "empty"]),  # a column with no value
    ("item_id,price\n1,cheap\n2,dear\n", SideOptions("item_id", numeric_cols=("price",)), ["price", "cheap"]),
    ("item_id,emb\n1,a b c\n", SideOptions("item_id", vector_cols=("emb",)), ["emb", "a b c"]),
    ("item_id,emb\n1,1 nan 2\n", SideOptions("item_id", vector_cols=("emb",)), ["emb", "NaN", "'1'"]),
    ("item_id,title\n1,!!!\n", SideOptions("item_id", text_cols=("title",)), ["title", "!!!"]),
    ("item_id,c\n1,x\n", SideOptions("item_id", text_cols=("title",)), ["title", "not in the table"]),
    ("item_id\n1\n", SideOptions("item_id"), ["no feature columns", "item_id"]),
    ("item_id,c\n98,x\n99,y\n", SideOptions("item_id"), ["item_id", "98"]),  # no id matches the log
])
def test_each_bad_table_is_one_line_naming_the_column(tmp_path, text, opts, names):
    with pytest.raises(UserError) as exc:
        table = read_side_table(_csv(tmp_path, text), opts.id_col, "items")
        encode_side_table(table, opts, np.array(["1", "2"]), np.ones(2, bool), "items")
    _one_line_naming(exc, *names)


def test_numeric_column_without_train_values_cannot_set_edges(tmp_path):
    table = read_side_table(_csv(tmp_path, "item_id,price\n1,\n2,5\n"), "item_id", "items")
    with pytest.raises(UserError) as exc:
        encode_side_table(table, SideOptions("item_id"), np.array(["1", "2"]), np.array([True, False]), "items")
    _one_line_naming(exc, "price", "train")


def test_unreadable_files_and_unknown_features_are_user_errors(tmp_path):
    (tmp_path / "x.parquet").write_bytes(os.urandom(64))
    with pytest.raises(UserError) as exc:
        read_side_table(tmp_path / "x.parquet", "item_id", "items")
    _one_line_naming(exc, "x.parquet")
    with pytest.raises(UserError) as exc:
        read_side_table(tmp_path / "missing.csv", "item_id", "items")
    _one_line_naming(exc, "missing.csv")
    (tmp_path / "items.xlsx").write_bytes(b"PK")
    with pytest.raises(UserError) as exc:
        read_side_table(tmp_path / "items.xlsx", "item_id", "items")
    _one_line_naming(exc, "items.xlsx", "unknown format")
    (tmp_path / "cut.jsonl").write_text('{"item_id": 1, "c": "x"}\n{"item_id": 2, "c"')
    with pytest.raises(UserError) as exc:
        read_side_table(tmp_path / "cut.jsonl", "item_id", "items")
    _one_line_naming(exc, "cut.jsonl")
    (tmp_path / "empty.csv").write_text("item_id,c\n")
    with pytest.raises(UserError) as exc:
        read_side_table(tmp_path / "empty.csv", "item_id", "items")
    _one_line_naming(exc, "no rows")
    listed = pa.table({"item_id": ["1"], "c": [["a", "b"]]})
    with pytest.raises(UserError) as exc:
        encode_side_table(listed, SideOptions("item_id", categorical_cols=("c",)), np.array(["1"]), np.ones(1, bool),
                          "items")
    _one_line_naming(exc, "'c'", "list")
    t = pa.table({"item_id": ["1"], "s": pa.array([{"a": 1}])})
    with pytest.raises(UserError) as exc:
        encode_side_table(t, SideOptions("item_id"), np.array(["1"]), np.ones(1, bool), "items")
    _one_line_naming(exc, "'s'", "struct")
    enc = _encode(tmp_path)
    with pytest.raises(UserError) as exc:
        encode_row_values(enc.spec, {"colour": "red"})
    _one_line_naming(exc, "colour")
    with pytest.raises(UserError) as exc:
        encode_row_values(enc.spec, {"category": ["a", "b"]})
    _one_line_naming(exc, "category")


def test_options_refuse_a_column_given_two_kinds():
    with pytest.raises(UserError) as exc:
        SideOptions("item_id", text_cols=("title",), bag_cols=["title"])
    _one_line_naming(exc, "title")


# ------------------------------------------------------------------------------------------- MovieLens
ML1M_MOVIES = ("1::Toy Story (1995)::Animation|Children's|Comedy\n2::Jumanji (1995)::Adventure\n"
               "3::Señor Café (1999)::Comedy\n")
ML1M_USERS = "1::F::1::10::48067\n2::M::56::16::70072-1234\n"
ML100K_ITEM = ("1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
               "2|GoldenEye (1995)|||http://y|0|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0|0\n")
ML100K_USER = "1|24|M|technician|85711\n2|53|F|other|T8H1N\n"


def test_movielens_1m_movies_and_users(tmp_path):
    (tmp_path / "ml-1m").mkdir()
    (tmp_path / "ml-1m" / "movies.dat").write_bytes(ML1M_MOVIES.encode("latin-1"))
    (tmp_path / "ml-1m" / "users.dat").write_text(ML1M_USERS)
    items, users, iopts, uopts = movielens_side_tables("movielens-1m", tmp_path / "ml-1m")
    assert items["title"].to_pylist() == ["Toy Story", "Jumanji", "Señor Café"]
    assert items["year"].to_pylist() == [1995, 1995, 1999]
    assert users["zip3"].to_pylist() == ["480", "700"]
    enc = encode_side_table(items, iopts, np.array(["1", "2", "3"]), np.ones(3, bool), "items")
    kinds = {c["name"]: c["kind"] for c in enc.spec["columns"]}
    assert kinds == {"title": TEXT, "year": BUCKET, "genres": BAG}
    assert _col(enc, "genres")["vocab"] == ["Adventure", "Animation", "Children's", "Comedy"]
    uenc = encode_side_table(users, uopts, np.array(["1", "2"]), np.ones(2, bool), "users")
    assert {c["kind"] for c in uenc.spec["columns"]} == {CATEGORICAL}
    assert _col(uenc, "age")["vocab"] == ["1", "56"]


def test_movielens_100k_items_and_users_from_a_zip(tmp_path):
    with zipfile.ZipFile(tmp_path / "ml-100k.zip", "w") as zf:
        zf.writestr("ml-100k/u.item", ML100K_ITEM.encode("latin-1"))
        zf.writestr("ml-100k/u.user", ML100K_USER)
    items, users, iopts, uopts = movielens_side_tables("movielens-100k", tmp_path / "ml-100k.zip")
    assert items["genres"].to_pylist() == [["Animation", "Children's", "Comedy"], ["Action", "Adventure",
                                                                                   "Thriller"]]
    assert items["year"].to_pylist() == [1995, 1995]  # the release date, else the title's year
    assert users["occupation"].to_pylist() == ["technician", "other"] and users["zip3"].to_pylist()[1] == "T8H"
    uenc = encode_side_table(users, uopts, np.array(["1", "2"]), np.ones(2, bool), "users")
    assert _col(uenc, "age")["kind"] == BUCKET


def test_movielens_20m_movies_csv(tmp_path):
    (tmp_path / "movies.csv").write_text('movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama\n'
                                         '2,Untitled,(no genres listed)\n')
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    items, users, iopts, _ = movielens_side_tables("movielens-20m", tmp_path / "ratings.csv")
    assert users is None
    assert items["title"].to_pylist() == ["American President, The", "Untitled"]
    assert items["year"].to_pylist() == [1995, None]
    enc = encode_side_table(items, iopts, np.array(["1", "2"]), np.ones(2, bool), "items")
    assert _col(enc, "genres")["vocab"] == ["Comedy", "Drama"]
    assert _slots(enc, "genres", 1)[0] == _col(enc, "genres")["offset"]  # no genre -> reserved
    assert _slots(enc, "year", 1) == [_col(enc, "year")["offset"]]


def test_movielens_absent_files_give_none(tmp_path):
    (tmp_path / "u.data").write_text("1\t1\t5\t0\n")
    items, users, _, _ = movielens_side_tables("movielens-100k", tmp_path / "u.data")
    assert items is None and users is None
    with pytest.raises(UserError):
        movielens_side_tables("movielens-10x", tmp_path)
