"""`ncf-ray prepare` on local Ray: format parity, every bad input, the NCF and MovieLens loaders, and one real
subprocess run on a bad file (test_console_output.py runs the CLI on synthetic data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ncf_ray.cli import main
from ncf_ray.data import schema as S

pytestmark = pytest.mark.integration

DATASET_FILES = [S.VALID_FILE, S.TEST_FILE, S.VALID_NEG_FILE, S.TEST_NEG_FILE, S.USERS_FILE, S.ITEMS_FILE]


def _log(n_users: int = 40, n_items: int = 30, per_user: int = 8, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for j, i in enumerate(rng.choice(n_items, per_user, replace=False)):
            rows.append((u + 100, int(i) + 1, 1_000_000 + u * 100 + j * 7))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    older = df.iloc[:5].assign(timestamp=df.timestamp.iloc[:5] - 1)  # a few older duplicates
    return pd.concat([df, older], ignore_index=True)


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(["prepare", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _read_dir(d: Path) -> dict[str, object]:
    tables = {name: pq.read_table(d / name) for name in DATASET_FILES}
    tables["train"] = pq.read_table(d / S.TRAIN_DIR)
    return tables


def _leftovers(parent: Path) -> list[str]:
    """What a failed prepare left beside OUT: temp dirs or a partial OUT (the OUT.logs/ log file is meant to stay,
    and the console tests check it)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".out", "out")) and p.name != "out.logs")


@pytest.fixture(scope="module")
def formats(tmp_path_factory, ray_local):
    d = tmp_path_factory.mktemp("formats")
    df = _log()
    df.to_csv(d / "log.csv", index=False)
    df.to_parquet(d / "log.parquet", index=False)
    df.to_json(d / "log.jsonl", orient="records", lines=True)
    return d, df


def test_csv_parquet_jsonl_give_identical_datasets(formats, capsys):
    d, df = formats
    outs = []
    for ext in ("csv", "parquet", "jsonl"):
        out = d / f"ds_{ext}"
        rc, stdout, err = _run([str(d / f"log.{ext}"), "--out", str(out), "--eval-negatives", "5", "--shards",
                                "2", "--json"], capsys)
        assert rc == 0, err
        summary = json.loads(stdout.strip().splitlines()[-1])
        assert summary["n_users"] == 40 and summary["dropped"]["duplicates"] == 5
        outs.append(_read_dir(out))
    for other in outs[1:]:
        for name, table in outs[0].items():
            assert table.equals(other[name]), name
    meta = json.loads((d / "ds_csv" / S.META_FILE).read_text())
    assert meta["protocol"] == "leave-one-out-by-time" and meta["n_valid"] == meta["n_test"] == 40
    assert sorted(os.listdir(d / "ds_csv" / S.TRAIN_DIR)) == ["part-00000.parquet", "part-00001.parquet"]


def _bad_case(d: Path, name: str) -> list[str]:
    """Write one bad input and return its prepare arguments (without --out)."""
    good = _log(n_users=10)
    if name == "missing_column":
        good.rename(columns={"item_id": "movie"}).to_csv(d / "m.csv", index=False)
        return [str(d / "m.csv")]
    if name == "bad_values":
        bad = good.astype(str)
        bad.loc[bad.index[:10], "timestamp"] = "not-a-time"
        bad.to_csv(d / "b.csv", index=False)
        return [str(d / "b.csv")]
    if name == "empty":
        (d / "e.csv").write_text("")
        return [str(d / "e.csv")]
    if name == "header_only":
        (d / "h.csv").write_text("user_id,item_id,timestamp\n")
        return [str(d / "h.csv")]
    if name == "not_found":
        return [str(d / "nope.csv")]
    if name == "unknown_format":
        (d / "x.xlsx").write_text("data")
        return [str(d / "x.xlsx")]
    if name == "all_filtered":
        good.to_csv(d / "f.csv", index=False)
        return [str(d / "f.csv"), "--min-user-interactions", "50"]
    raise AssertionError(name)


BAD = {
    "missing_column": "missing required column 'item_id'",
    "bad_values": "10 of 85 rows (11.8%) are malformed",
    "empty": "empty input",
    "header_only": "empty input",
    "not_found": "path not found",
    "unknown_format": "unknown format",
    "all_filtered": "everything filtered out",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, tmp_path, capsys, ray_local):
    args = _bad_case(tmp_path, case)
    rc, out, err = _run([*args, "--out", str(tmp_path / "out")], capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1, err
    assert BAD[case] in lines[0]
    assert _leftovers(tmp_path) == []


def test_bad_values_example_names_the_offending_value(tmp_path, capsys, ray_local):
    rc, _, err = _run([*_bad_case(tmp_path, "bad_values"), "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "timestamp='not-a-time'" in err and "columns" not in err


def test_few_bad_rows_are_dropped_and_counted(tmp_path, capsys, ray_local):
    args = _bad_case(tmp_path, "bad_values")
    rc, _, err = _run([*args, "--out", str(tmp_path / "out"), "--max-bad-fraction", "0.2"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "out" / S.META_FILE).read_text())["dropped"]["bad_rows"] == 10


def test_existing_out_is_refused_unless_overwrite(formats, tmp_path, capsys):
    d, _ = formats
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc, _, err = _run([str(d / "log.csv"), "--out", str(out)], capsys)
    assert rc == 2 and "already exists" in err and (out / "keep.txt").exists()
    rc, _, err = _run([str(d / "log.csv"), "--out", str(out), "--overwrite", "--eval-negatives", "5"], capsys)
    assert rc == 0, err
    assert not (out / "keep.txt").exists() and (out / S.META_FILE).exists()
    assert _leftovers(tmp_path) == ["out"]


def test_ncf_loader_keeps_paper_test_items_and_negatives(tmp_path, capsys, ray_local):
    rng = np.random.default_rng(0)
    n_users, n_items = 12, 40
    train, test, negs = [], [], []
    for u in range(n_users):
        items = rng.choice(n_items, 7, replace=False)
        for j, i in enumerate(items[:6]):
            train.append(f"{u}\t{i}\t{1 + j % 5}\t{100 + j}")
        test.append(f"{u}\t{items[6]}\t5\t999")
        free = np.setdiff1d(np.arange(n_items), items)
        negs.append(f"({u},{items[6]})\t" + "\t".join(str(x) for x in rng.choice(free, 10, replace=False)))
    prefix = tmp_path / "ml-1m"
    Path(f"{prefix}.train.rating").write_text("\n".join(train) + "\n")
    Path(f"{prefix}.test.rating").write_text("\n".join(test) + "\n")
    Path(f"{prefix}.test.negative").write_text("\n".join(negs) + "\n")
    out = tmp_path / "ds"
    rc, _, err = _run([f"ncf:{prefix}", "--out", str(out)], capsys)
    assert rc == 0, err
    meta = json.loads((out / S.META_FILE).read_text())
    assert meta["protocol"] == "ncf-paper" and meta["n_test"] == n_users and meta["eval_negatives"] == 10
    t = pq.read_table(out / S.TEST_FILE)
    assert t[S.ITEM_IDX].to_pylist() == [int(line.split("\t")[1]) for line in test]
    got = pq.read_table(out / S.TEST_NEG_FILE)[S.NEGATIVES_COL].to_pylist()
    assert got == [[int(x) for x in line.split("\t")[1:]] for line in negs]
    assert pq.read_table(out / S.TRAIN_DIR).num_rows == n_users * 5


def test_movielens_from_local_zip(tmp_path, capsys, ray_local):
    lines = [f"{u}::{i}::{1 + (u + i) % 5}::{978300000 + u * 10 + i}" for u in range(1, 9) for i in range(1, 7)]
    z = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", "\n".join(lines) + "\n")
        zf.writestr("ml-1m/README", "fake, for tests")
    out = tmp_path / "ds"
    rc, _, err = _run(["movielens-1m", "--from", str(z), "--out", str(out), "--eval-negatives", "3",
                       "--min-rating", "2"], capsys)
    assert rc == 0, err
    meta = json.loads((out / S.META_FILE).read_text())
    assert meta["source"] == "movielens-1m" and meta["n_users"] == 8
    assert meta["dropped"]["below_min_rating"] == sum(1 for ln in lines if ln.split("::")[2] == "1")
    assert _leftovers(tmp_path) == []


def test_movielens_download_offline_is_a_clear_error(tmp_path, capsys, ray_local, monkeypatch):
    monkeypatch.setenv("NCF_RAY_MOVIELENS_URL", "http://127.0.0.1:9/")  # nothing listens: fails fast
    monkeypatch.setenv("NCF_RAY_CACHE", str(tmp_path / "cache"))
    rc, _, err = _run(["movielens-100k", "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "could not download" in err and "--from" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- review defects
def test_quoted_csv_and_a_directory_whose_files_have_their_own_headers(tmp_path, capsys, ray_local):
    d = tmp_path / "logs"
    d.mkdir()
    df = _log(n_users=12)
    df = df.assign(item_id=[f"Movie {i}, The" for i in df.item_id])  # quoted, holds the separator
    df.iloc[:40].to_csv(d / "a.csv", index=False)
    df.iloc[40:][["timestamp", "item_id", "user_id"]].to_csv(d / "b.csv", index=False)  # other column order
    out = tmp_path / "ds"
    rc, _, err = _run([str(d), "--out", str(out), "--eval-negatives", "3"], capsys)
    assert rc == 0, err
    meta = json.loads((out / S.META_FILE).read_text())
    assert meta["dropped"]["bad_rows"] == 0 and meta["n_users"] == 12
    items = set(pq.read_table(out / S.ITEMS_FILE)[S.ITEM_COL].to_pylist())
    assert items == set(df.item_id)


def test_ids_with_leading_zeros_are_kept_as_given(tmp_path, capsys, ray_local):
    items = ("01", "1", "001", "2", "3")
    pairs = [(u, items[(k + j) % 5]) for k, u in enumerate(("0012", "12", "007", "7")) for j in range(4)]
    rows = [(u, i, t) for t, (u, i) in enumerate(pairs)]
    f = tmp_path / "log.csv"
    f.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    out = tmp_path / "ds"
    rc, _, err = _run([str(f), "--out", str(out), "--eval-negatives", "1"], capsys)
    assert rc == 0, err
    assert sorted(pq.read_table(out / S.USERS_FILE)[S.USER_COL].to_pylist()) == ["0012", "007", "12", "7"]
    assert sorted(pq.read_table(out / S.ITEMS_FILE)[S.ITEM_COL].to_pylist()) == ["001", "01", "1", "2", "3"]


def _prepare_subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(Path(__file__).parents[2])}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "ncf_ray.cli", "prepare", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=cwd)


def test_random_bytes_named_parquet_is_one_line_exit_2_in_a_real_cli_run(tmp_path):
    f = tmp_path / "log.parquet"
    f.write_bytes(np.random.default_rng(0).bytes(10_000))
    proc = _prepare_subprocess([str(f), "--out", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # Ray Data's start-up notice about progress bars belongs to the console work (runtime.ensure_ray), not here.
    lines = [ln for ln in proc.stderr.splitlines() if "Progress bars disabled" not in ln]
    assert len(lines) == 1 and lines[0].startswith(f"error: {f}: cannot read as Parquet"), proc.stderr[-3000:]
    assert _leftovers(tmp_path) == []


def test_jsonl_cut_off_mid_line_is_one_line_exit_2(tmp_path, capfd, ray_local):
    f = tmp_path / "log.jsonl"
    _log(n_users=10).to_json(f, orient="records", lines=True)
    f.write_text(f.read_text() + '{"user_id": 5, "item_')
    capfd.readouterr()
    rc = main(["prepare", str(f), "--out", str(tmp_path / "out")])
    err = capfd.readouterr().err  # fd-level: Ray Data's own log lines would show up here too
    assert rc == 2 and err.count("\n") == 1, err[-3000:]
    assert err.startswith(f"error: {f}: cannot read as JSON Lines")
    assert _leftovers(tmp_path) == []


def test_ncf_files_without_timestamps_load(tmp_path, capsys, ray_local):
    rng = np.random.default_rng(1)
    n_users, n_items = 10, 30
    train, test, negs = [], [], []
    for u in range(n_users):
        items = rng.choice(n_items, 6, replace=False)
        n_train = 1 if u == 4 else 5  # user 4: a single train line, nothing left for train once valid is carved
        train += [f"{u}\t{i}\t1" for i in items[:n_train]]
        test.append(f"{u}\t{items[5]}\t1")
        free = np.setdiff1d(np.arange(n_items), items)
        negs.append(f"({u},{items[5]})\t" + "\t".join(str(x) for x in rng.choice(free, 8, replace=False)))
    rng.shuffle(train)  # file order is not user order: "last line" must mean last in the file
    last = [int(next(line.split("\t")[1] for line in reversed(train) if line.startswith(f"{u}\t")))
            for u in range(n_users)]
    prefix = tmp_path / "Amazon_Music"
    Path(f"{prefix}.train.rating").write_text("\n".join(train) + "\n")
    Path(f"{prefix}.test.rating").write_text("\n".join(test) + "\n")
    Path(f"{prefix}.test.negative").write_text("\n".join(negs) + "\n")
    out = tmp_path / "ds"
    rc, stdout, err = _run([f"ncf:{prefix}", "--out", str(out)], capsys)
    assert rc == 0, err
    meta = json.loads((out / S.META_FILE).read_text())
    assert meta["timestamps"] is False and "file order" in meta["valid_from"]
    assert meta["dropped"]["users_without_train"] == 1 and meta["n_users"] == n_users - 1
    kept = [u for u in range(n_users) if u != 4]
    assert pq.read_table(out / S.USERS_FILE)[S.USER_COL].to_pylist() == [str(u) for u in kept]
    assert pq.read_table(out / S.VALID_FILE)[S.ITEM_IDX].to_pylist() == [last[u] for u in kept]
    assert pq.read_table(out / S.TEST_FILE)[S.ITEM_IDX].to_pylist() == [int(test[u].split("\t")[1]) for u in kept]
    assert pq.read_table(out / S.TRAIN_DIR).num_rows == 4 * len(kept)
    assert "users without train 1" in stdout


def test_movielens_1m_from_a_folder_with_part_of_the_ratings(tmp_path, capsys, ray_local):
    d = tmp_path / "ml-1m"
    d.mkdir()
    lines = [f"{u}::{i}::{1 + (u * i) % 5}::{978300000 + u * 10 + i}" for u in range(1, 7) for i in range(1, 8)
             if i != u]  # 6 ratings per user, so every user has items left to draw negatives from
    (d / "ratings.dat").write_text("\n".join(lines[:30]) + "\n" + lines[30][:5])  # cut off mid-line, as `head -c`
    (d / "users.dat").write_text("1::F::1::10::48067\n")
    (d / "movies.dat").write_bytes("1::Am\xe9lie (2001)::Comedy\n".encode("latin-1"))
    out = tmp_path / "ds"
    rc, _, err = _run(["movielens-1m", "--from", str(d), "--out", str(out), "--eval-negatives", "2",
                       "--max-bad-fraction", "0.05"], capsys)
    assert rc == 0, err
    meta = json.loads((out / S.META_FILE).read_text())
    # Users 1-5 have all their ratings in the part kept; user 6's first line is cut off: one bad row.
    assert meta["n_users"] == 5 and meta["n_interactions"] == 30 and meta["dropped"]["bad_rows"] == 1


def test_shop_log_with_events_context_and_an_item_table(tmp_path, capsys, ray_local):
    """Events, device context and an item table through the CLI; a wholly unparseable side-table column (found
    only after the log is read) is one line, exit 2, nothing written."""
    from ncf_ray.data.dataset import load_dataset

    df = _log().assign(event=lambda d: np.where(d.index % 5 == 0, "purchase", "view"),
                       device=lambda d: np.where(d.index % 2 == 0, "mobile", "desktop"))
    df.to_csv(tmp_path / "log.csv", index=False)
    ids = list(range(1, 33))  # the log uses items 1..30: 31 and 32 are cold
    items = pd.DataFrame({"item_id": ids, "category": [f"c{k % 3}" for k in ids], "emb": ["x;y"] * len(ids)})
    items.to_csv(tmp_path / "items.csv", index=False)
    base = [str(tmp_path / "log.csv"), "--event-col", "event", "--context-cols", "device",
            "--item-features", str(tmp_path / "items.csv"), "--eval-negatives", "5"]
    rc, _, err = _run([*base, "--vector-cols", "emb", "--out", str(tmp_path / "out")], capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "'emb'" in lines[0], err
    assert _leftovers(tmp_path) == []

    items.drop(columns="emb").to_csv(tmp_path / "items.csv", index=False)
    rc, out, err = _run([*base, "--out", str(tmp_path / "out")], capsys)
    assert rc == 0, err
    assert "events" in out and "context" in out and "items features" in out
    ds = load_dataset(tmp_path / "out")
    assert ds.n_items == 32 and ds.item_counts[-2:].tolist() == [0, 0]
    assert ds.train_events.shape == ds.train_users.shape and ds.train_context.shape == (ds.train_users.size, 3)
    assert ds.features["items"].ids.shape[0] == 32
    assert ds.meta["event_counts"]["purchase"] + ds.meta["event_counts"]["view"] == ds.meta["n_interactions"]
