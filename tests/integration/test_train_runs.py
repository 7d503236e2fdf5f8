"""`ncf-ray train` run bookkeeping on local Ray (2 CPUs): a run the cluster cannot place is refused with one line
before anything is written; every run gets its own Ray Train name, so two runs on one --storage never share one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ncf_ray.cli import main
from ncf_ray.train import RUN_FILE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_local) -> str:
    out = tmp_path_factory.mktemp("runs") / "ds"
    assert main(["prepare", "synthetic", "--out", str(out), "--users", "120", "--items", "60",
                 "--interactions", "2400", "--seed", "2"]) == 0
    return str(out)


def _train(dataset: str, out: Path, *extra: str) -> int:
    return main(["train", dataset, "--out", str(out), "--model", "neumf", "--batch-size", "512", "--factors", "8",
                 "--layers", "16,8",
                 "--threads", "1", "--json", *extra])


def test_workers_beyond_the_cluster_are_refused_in_one_line(dataset, tmp_path, capsys):
    assert _train(dataset, tmp_path / "big", "--workers", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--workers=3" in err[0] and "has 2" in err[0]
    assert not (tmp_path / "big" / RUN_FILE).exists()  # nothing for a --resume to pick up
    assert _train(dataset, tmp_path / "gpu", "--gpu") == 2
    assert "no GPU" in capsys.readouterr().err


def test_two_runs_on_one_storage_each_train_their_own_config(dataset, tmp_path, capsys):
    storage = tmp_path / "storage"
    assert _train(dataset, tmp_path / "a", "--epochs", "1", "--storage", str(storage)) == 0
    assert _train(dataset, tmp_path / "b", "--epochs", "2", "--storage", str(storage)) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a["config"]["epochs"] == 1 and [h["epoch"] for h in a["history"]] == [1]
    assert b["config"]["epochs"] == 2 and [h["epoch"] for h in b["history"]] == [1, 2]
    names = {json.loads((tmp_path / d / RUN_FILE).read_text())["name"] for d in ("a", "b")}
    assert len(names) == 2 and {p.name for p in storage.iterdir() if p.is_dir()} >= names
    # The same RUN_DIR again without --resume is refused rather than silently continued.
    assert _train(dataset, tmp_path / "a", "--epochs", "1", "--storage", str(storage)) == 2
    assert "--resume" in capsys.readouterr().err
