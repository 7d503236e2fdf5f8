"""Model artifact: save -> load round trip, atomic replace, and refusal of tampered/truncated/unverified files."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from ncf_ray.artifact import (
    MANIFEST_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    load_artifact,
    save_artifact,
    sha256_file,
)
from ncf_ray.config import ModelConfig
from ncf_ray.errors import UserError
from ncf_ray.metrics import build_csr
from ncf_ray.model import model_from_config, user_batch

N_USERS, N_ITEMS = 9, 14


def _save(out, cfg=ModelConfig(name="neumf", factors=4, layers=(8, 4)), seed=0, vocab_as="pandas"):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = model_from_config(cfg, N_USERS, N_ITEMS)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    users = pd.DataFrame(
        {"user_idx": np.arange(N_USERS), "user_id": [f"u{i}" for i in range(N_USERS)], "count": 3}
    )
    items = pd.DataFrame({"item_idx": np.arange(N_ITEMS), "item_id": [str(100 + i) for i in range(N_ITEMS)]})
    items["count"] = rng.integers(0, 20, N_ITEMS)
    if vocab_as == "arrow":
        users, items = pa.Table.from_pandas(users), pa.Table.from_pandas(items)
    indptr, indices = build_csr(rng.integers(0, N_USERS, 30), rng.integers(0, N_ITEMS, 30), N_USERS)
    version = save_artifact(
        out, model, cfg, N_USERS, N_ITEMS, users, items, indptr, indices,
        items["count"].to_numpy() if vocab_as == "pandas" else np.asarray(items["count"]),
        {"test": {"hr@10": 0.5}}, {"source": "unit", "seed": np.int64(seed)},
    )  # fmt: skip
    return model, version


@pytest.mark.parametrize("name", ["gmf", "mlp", "neumf", "mf"])
def test_round_trip_gives_identical_scores(tmp_path, name):
    cfg = ModelConfig(name=name, factors=4, layers=(8, 4), dropout=0.2)
    model, version = _save(tmp_path / "model", cfg)
    art = load_artifact(tmp_path / "model")
    assert not art.model.training
    assert art.model_cfg == cfg and art.n_users == N_USERS and art.n_items == N_ITEMS
    assert version == art.model_version == sha256_file(tmp_path / "model" / WEIGHTS_FILE)[:12]
    users = torch.arange(N_USERS)
    with torch.no_grad():
        torch.testing.assert_close(
            art.model.score_items(user_batch(users)), model.eval().score_items(user_batch(users)), rtol=0, atol=0
        )
    assert art.user_ids[3] == "u3" and art.user_index["u3"] == 3 and art.item_index["105"] == 5
    assert art.popularity.dtype == np.float64 and art.seen_indptr[-1] == len(art.seen_indices)
    assert art.metrics == {"test": {"hr@10": 0.5}} and art.dataset_meta["seed"] == 0
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model"]["name"] == name and config["model_version"] == version


def test_arrow_vocab_and_replace_existing(tmp_path):
    out = tmp_path / "model"
    _, v1 = _save(out, seed=1, vocab_as="arrow")
    _, v2 = _save(out, seed=2)
    assert v1 != v2 and load_artifact(out).model_version == v2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or old dirs left behind


def test_tampered_weights_byte_refused(tmp_path):
    out = tmp_path / "model"
    _save(out)
    data = bytearray((out / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0xFF
    (out / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"weights\.safetensors.*sha256"):
        load_artifact(out)


@pytest.mark.parametrize("victim", [WEIGHTS_FILE, "vocab/items.parquet", "seen_indices.npy"])
def test_truncated_file_refused(tmp_path, victim):
    out = tmp_path / "model"
    _save(out)
    data = (out / victim).read_bytes()
    (out / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=victim.replace(".", r"\.") + ".*truncated"):
        load_artifact(out)


def test_missing_manifest_missing_file_and_extra_file_refused(tmp_path):
    out = tmp_path / "model"
    _save(out)
    (out / "popularity.npy").unlink()
    with pytest.raises(UserError, match=r"missing popularity\.npy"):
        load_artifact(out)
    _save(out)
    (out / "evil.pt").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(UserError, match=r"not in its manifest: evil\.pt"):
        load_artifact(out)
    _save(out)
    (out / MANIFEST_FILE).unlink()
    with pytest.raises(UserError, match="no manifest.json"):
        load_artifact(out)
    with pytest.raises(UserError, match="does not exist"):
        load_artifact(tmp_path / "nowhere")


def test_consistently_rewritten_bad_weights_refused(tmp_path):
    # Someone swaps the weights for a pickle and re-signs the manifest: still never unpickled.
    out = tmp_path / "model"
    _save(out)
    (out / WEIGHTS_FILE).write_bytes(pickle.dumps({"x": torch.zeros(1)}))
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["files"][WEIGHTS_FILE] = sha256_file(out / WEIGHTS_FILE)
    manifest["sizes"][WEIGHTS_FILE] = (out / WEIGHTS_FILE).stat().st_size
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="safetensors"):
        load_artifact(out)


def test_no_pickle_on_load(tmp_path, monkeypatch):
    out = tmp_path / "model"
    _save(out)

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used while loading an artifact")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    load_artifact(out)
    for name in ("seen_indptr.npy", "seen_indices.npy", "popularity.npy"):
        np.load(out / name, allow_pickle=False)  # plain arrays, loadable without pickle


def test_changed_file_message_says_manifest_not_tampered(tmp_path):
    out = tmp_path / "model"
    _save(out)
    (out / METRICS_FILE).write_text(json.dumps({"test": {"hr@10": 0.99}}) + " " * 100)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["sizes"].pop(METRICS_FILE)  # same-size edits are caught by the sha256 alone
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(UserError) as exc:
        load_artifact(out)
    msg = str(exc.value)
    assert "metrics.json does not match its manifest" in msg and "tamper" not in msg


@pytest.mark.parametrize("bad", ["../outside.json", "/etc/hostname", "vocab/../../outside.json", "..",
                                 "C:/x.json", "vocab\\..\\..\\x.json", ""])
def test_manifest_paths_outside_the_artifact_refused(tmp_path, bad):
    out = tmp_path / "model"
    _save(out)
    (tmp_path / "outside.json").write_text("{}")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["files"][bad] = sha256_file(tmp_path / "outside.json")
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="manifest paths must be relative|not a non-empty string") as exc:
        load_artifact(out)
    assert len(str(exc.value).splitlines()) == 1


def test_manifest_relative_subdir_paths_still_load(tmp_path):
    out = tmp_path / "model"
    _save(out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert any("/" in rel for rel in manifest["files"])  # vocab/users.parquet: a nested path is fine
    load_artifact(out)


def test_save_refuses_inconsistent_inputs(tmp_path):
    cfg = ModelConfig(name="gmf", factors=4)
    model = model_from_config(cfg, N_USERS, N_ITEMS)
    users = pd.DataFrame({"user_idx": np.arange(N_USERS), "user_id": list("abcdefghi"), "count": 1})
    items = pd.DataFrame({"item_idx": np.arange(N_ITEMS), "item_id": list("ABCDEFGHIJKLMN"), "count": 1})
    indptr, indices = build_csr([0], [1], N_USERS)
    with pytest.raises(UserError, match="popularity"):
        save_artifact(
            tmp_path / "m", model, cfg, N_USERS, N_ITEMS, users, items, indptr, indices, np.ones(3), {}, {}
        )
    with pytest.raises(UserError, match="item_idx"):
        save_artifact(
            tmp_path / "m",
            model,
            cfg,
            N_USERS,
            N_ITEMS,
            users,
            items[1:],
            indptr,
            indices,
            np.ones(N_ITEMS),
            {},
            {},
        )
    assert not (tmp_path / "m").exists()
