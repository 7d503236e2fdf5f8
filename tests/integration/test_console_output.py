"""What `ncf-ray prepare` and `ncf-ray train` print by default, run as a user runs them (a subprocess with its own
local Ray): the command's own lines once, Ray's output only in the log file whose path is printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ncf_ray.console import EPOCH_HEADER

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
NOISE = ("TrainingReport", "(RayTrainWorker", "Deprecat", "(TrainController", "Progress bars disabled",
         "INFO worker.py", "Started a local Ray")


def _cli(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "ncf_ray.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    return text


def _log_path(text: str) -> Path:
    paths = re.findall(r"^log: (\S+)", text, flags=re.M)
    assert len(paths) == 1, text
    return Path(paths[0])


def _assert_clean(text: str) -> None:
    for noise in NOISE:
        assert noise not in text, (noise, text)
    repeated = {line: n for line, n in Counter(x for x in text.splitlines() if x.strip()).items() if n > 1}
    assert not repeated, repeated


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("console") / "ds"
    text = _cli("prepare", "synthetic", "--out", str(out), "--users", "120", "--items", "60",
                "--interactions", "2400", "--seed", "5", "--eval-negatives", "20", "--json")
    return out, text


def test_prepare_json_summary_matches_the_dataset_it_wrote(dataset):
    import json

    import pyarrow.parquet as pq

    from ncf_ray.data import schema as S

    out, text = dataset
    summary = json.loads(text.strip().splitlines()[-1])
    assert "users" in text and summary["n_users"] == 120
    meta = json.loads((out / S.META_FILE).read_text())
    assert meta["n_train"] + meta["n_valid"] + meta["n_test"] == meta["n_interactions"]
    users = pq.read_table(out / S.USERS_FILE)
    assert users.schema.field(S.USER_COL).type == "string" and users.num_rows == 120
    assert len(pq.read_table(out / S.VALID_NEG_FILE)[S.NEGATIVES_COL].to_pylist()[0]) == 20


def test_prepare_prints_its_summary_and_the_log_path(dataset):
    out, text = dataset
    _assert_clean(text)
    log = _log_path(text)
    assert log.parent == out.parent / f"{out.name}.logs" and log.is_file() and log.stat().st_size > 0
    assert "interactions" in text and len(text.splitlines()) <= 21  # the summary, the log path, --json's line


def test_train_prints_one_row_per_epoch_and_ray_goes_to_the_log(dataset, tmp_path):
    out, _ = dataset
    epochs = 2
    text = _cli("train", str(out), "--out", str(tmp_path / "run"), "--model", "neumf", "--epochs", str(epochs),
                "--batch-size", "512",
                "--factors", "8", "--layers", "16,8", "--patience", "5")
    _assert_clean(text)
    lines = text.splitlines()
    assert lines.count(EPOCH_HEADER) == 1, text
    rows = [line for line in lines if re.fullmatch(r"\s*\d+\s+\d+\.\d{4}\s+\d\.\d{4}\s+\d\.\d{4}\s+[\d,]+\s+\d+\.\d", line)]
    assert [int(r.split()[0]) for r in rows] == list(range(1, epochs + 1)), text
    log = _log_path(text)
    assert log.parent == tmp_path / "run" / "logs" and log.is_file()
    logged = log.read_text()
    assert "TrainController" in logged or "RayTrainWorker" in logged  # Ray's output is kept, in the file
    assert len(lines) <= 20, text
