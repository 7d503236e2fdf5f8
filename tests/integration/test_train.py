"""`ncf-ray train` on local Ray: a 2-worker DDP run writes an artifact that loads, evaluates and recommends;
resume continues from the saved epoch; the streaming path matches the fast path; a tampered artifact is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ncf_ray.cli import main

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_local) -> str:
    out = tmp_path_factory.mktemp("train") / "ds"
    rc = main(["prepare", "synthetic", "--out", str(out), "--users", "300", "--items", "150",
               "--interactions", "9000", "--seed", "3"])
    assert rc == 0
    return str(out)


def _train(dataset: str, out: Path, *extra: str) -> dict:
    rc = main(["train", dataset, "--out", str(out), "--model", "neumf", "--batch-size", "1024", "--factors", "16",
               "--layers", "32,16", "--json", *extra])
    assert rc == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def two_worker_run(dataset, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run2w")
    return out, _train(dataset, out, "--workers", "2", "--epochs", "3", "--lr", "0.01")


def test_two_worker_run_writes_metrics_and_artifact(two_worker_run, capsys):
    out, m = two_worker_run
    assert m["epochs"] == 3 and 1 <= m["best_epoch"] <= 3
    # It learned: valid HR above popularity scored on the same split in the same run (an untrained model ranks
    # at random, HR ~0.10 among 100 candidates; popularity here is ~0.37).
    assert m["valid"]["hr@10"] > m["baselines"]["popularity"]["valid"]["hr@10"]
    for split in ("valid", "test"):
        assert 0.0 < m[split]["ndcg@10"] <= m[split]["hr@10"]
    assert {"full_hr@10", "full_ndcg@10", "segments"} <= set(m["test"])
    assert "test" in m["baselines"]["ease"]  # 150 items: EASE fits beside every run
    assert m["config"]["workers"] == 2 and m["samples_per_second"] > 0
    for h in m["history"]:  # the world size Ray Train actually ran with, not the config echoed back
        assert h["samples_per_second"] == pytest.approx(2 * h["samples_per_second_per_worker"])
    assert (out / "model" / "manifest.json").exists()


def test_artifact_evaluates_and_recommends(two_worker_run, dataset, capsys):
    out, m = two_worker_run
    assert main(["evaluate", str(out / "model"), dataset, "--json"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["hr@10"] == pytest.approx(m["test"]["hr@10"])  # same best-by-valid weights, same protocol
    assert main(["evaluate", str(out / "model"), dataset, "--protocol", "full", "--json"]) == 0
    ev_full = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev_full["hr@10"] == pytest.approx(m["test"]["full_hr@10"])

    from ncf_ray.artifact import load_artifact

    art = load_artifact(out / "model")
    user = str(art.user_ids[0])
    assert main(["recommend", str(out / "model"), "--user", user, "--k", "5", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    seen = set(art.seen_indices[art.seen_indptr[0] : art.seen_indptr[1]].tolist())
    assert len(rec["items"]) == 5 and not rec["cold_start"]
    assert not {art.item_index[it["item_id"]] for it in rec["items"]} & seen

    assert main(["recommend", str(out / "model"), "--user", "no-such-user", "--json"]) == 0
    cold = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cold["cold_start"] and len(cold["items"]) == 10


def test_tampered_artifact_is_refused(two_worker_run, dataset, tmp_path, capsys):
    import shutil

    out, _ = two_worker_run
    bad = tmp_path / "model"
    shutil.copytree(out / "model", bad)
    weights = bad / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["evaluate", str(bad), dataset]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights.safetensors" in err[0]


def test_resume_continues_from_the_saved_epoch(dataset, tmp_path, capsys):
    out = tmp_path / "resume"
    first = _train(dataset, out, "--epochs", "1")
    assert first["epochs"] == 1
    assert main(["train", dataset, "--out", str(out), "--model", "neumf", "--epochs", "1"]) == 2  # refuses to clobber a run
    assert "--resume" in capsys.readouterr().err
    second = _train(dataset, out, "--epochs", "3", "--resume")
    assert second["epochs"] == 3
    assert [h["epoch"] for h in second["history"]] == [1, 2, 3]
    assert second["history"][0] == first["history"][0]  # epoch 1 came from the checkpoint, not re-run


def test_stream_path_matches_fast_path_and_refit_exports_weights_trained_on_every_interaction(dataset, tmp_path):
    # A higher rate than the default: 300 users give only ~40 steps an epoch. The fast run also refits (--stream
    # cannot), which changes the exported weights only, not the valid figures compared here.
    fast = _train(dataset, tmp_path / "fast", "--epochs", "3", "--seed", "5", "--lr", "0.01", "--refit")
    stream = _train(dataset, tmp_path / "stream", "--epochs", "3", "--seed", "5", "--lr", "0.01", "--stream")
    pop = fast["popularity"]["valid"]["hr@10"]
    assert fast["valid"]["hr@10"] > pop and stream["valid"]["hr@10"] > pop
    assert abs(fast["valid"]["hr@10"] - stream["valid"]["hr@10"]) < 0.08  # 300 users: one user is 0.0033

    assert fast["exported"]["weights"] == "refit" and fast["exported"]["epochs"] == fast["best_epoch"]
    assert stream["exported"]["weights"] != "refit"
    # metrics.json keeps the valid-selected model's figures and says which weights the artifact holds.
    from ncf_ray.artifact import load_artifact

    art = load_artifact(tmp_path / "fast" / "model")
    assert art.metrics["exported"]["weights"] == "refit" and art.metrics["valid"] == fast["valid"]


@pytest.fixture(scope="module")
def walk_dataset(tmp_path_factory, ray_local) -> str:
    """A log with order in it: each user walks the catalogue from a random start, one item after the other
    (with a random skip now and then), so the next item follows from the last few and popularity is flat."""
    import numpy as np

    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("walk")
    lines = ["user_id,item_id,timestamp"]
    for u in range(240):
        item, t = int(rng.integers(0, 120)), 1_000_000 + u
        for _ in range(int(rng.integers(12, 30))):
            lines.append(f"u{u},i{item},{t}")
            item = (item + (1 if rng.random() < 0.9 else 2)) % 120
            t += 60
    (root / "walk.csv").write_text("\n".join(lines) + "\n")
    out = root / "ds"
    assert main(["prepare", str(root / "walk.csv"), "--out", str(out), "--seed", "1"]) == 0
    return str(out)


def test_two_worker_seq_learns_above_popularity_and_serves_history(walk_dataset, tmp_path):
    """The sequence model trains in the same worker loop (2 workers, user-sharded windows) and learns the walk:
    valid and test HR far above popularity on the same split; the artifact stores each user's history."""
    out = tmp_path / "seq"
    m = _train(walk_dataset, out, "--model", "seq", "--workers", "2", "--epochs", "6", "--history-len", "10",
               "--factors", "16", "--batch-size", "2048", "--lr", "0.005", "--no-baselines")
    pop = m["baselines"]["popularity"]
    assert m["config"]["model"]["name"] == "seq" and m["config"]["model"]["history_len"] == 10
    assert m["valid"]["hr@10"] > pop["valid"]["hr@10"] + 0.3
    assert m["test"]["hr@10"] > pop["test"]["hr@10"] + 0.3

    from ncf_ray.artifact import load_artifact
    from ncf_ray.recommender import Recommender

    art = load_artifact(out / "model")
    assert art.histories is not None and art.model.history_len == 10
    rec = Recommender(art)
    stored = rec.recommend([str(art.user_ids[3])], 10)[0]
    assert not stored["cold_start"] and len(stored["items"]) == 10
    # An anonymous shopper who just viewed i40, i41, i42 is shown what lies ahead in the walk, not popularity
    # (which is flat here: any 3 items would be ahead with probability ~0.1 each).
    anon = rec.recommend([None], 5, recent_items=[["i40", "i41", "i42"]])[0]
    assert anon["history"] == "request" and not anon["cold_start"]
    top = [it["item_id"] for it in anon["items"]]
    ahead = {f"i{i}" for i in range(43, 56)}
    assert not {"i40", "i41", "i42"} & set(top) and set(top[:3]) <= ahead, top


def test_stream_refuses_a_sequence_model_in_one_line(dataset, tmp_path, capsys):
    rc = main(["train", dataset, "--out", str(tmp_path / "seq"), "--model", "seq", "--stream", "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--stream cannot train --model seq" in err and "Traceback" not in err
    assert not (tmp_path / "seq" / "model").exists()


def test_served_lists_exclude_valid_and_test_items(two_worker_run, dataset):
    """The artifact's seen set covers train, valid and test: a full-length list never holds any of them."""
    from ncf_ray.artifact import load_artifact
    from ncf_ray.data.dataset import load_dataset
    from ncf_ray.recommender import Recommender

    out, _ = two_worker_run
    art, data = load_artifact(out / "model"), load_dataset(dataset)
    rec = Recommender(art)
    users = [str(u) for u in data.user_ids[:25]]
    for idx, res in enumerate(rec.recommend(users, data.n_items)):
        got = {art.item_index[it["item_id"]] for it in res["items"]}
        done = set(data.train_items[data.train_users == idx].tolist())
        assert data.valid_items[idx] not in got and data.test_items[idx] not in got and not got & done
        assert len(got) == data.n_items - len(done | {data.valid_items[idx], data.test_items[idx]})


def test_a_diverging_run_stops_in_one_line_and_exports_nothing(dataset, tmp_path, capsys):
    out = tmp_path / "diverged"
    # Adam's steps are ~lr whatever the gradient: at 1e10 the tower's activations overflow to inf within an epoch.
    rc = main(["train", dataset, "--out", str(out), "--model", "neumf", "--lr", "1e10", "--epochs", "2",
               "--batch-size", "1024", "--factors", "16", "--layers", "32,16,8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "training loss became" in err[0] and "epoch 1" in err[0] and "lr" in err[0]
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
