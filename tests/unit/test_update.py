"""Pure parts of `ncf-ray update` and `ncf-ray forget` (no Ray): the window, vocab growth, the grown model, the
advanced histories, replay, the guard, and forgetting a user end to end on a tiny artifact."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from ncf_ray.batch import Batch, Histories
from ncf_ray.config import ModelConfig
from ncf_ray.errors import UserError
from ncf_ray.model import model_from_config
from ncf_ray.update import (
    append_events,
    build_window,
    entity_tables,
    grown_model,
    guard,
    holdout_negatives,
    replay_sample,
)

FAMILIES = {
    "gmf": ModelConfig(name="gmf", factors=8),
    "mf": ModelConfig(name="mf", factors=8),
    "mlp": ModelConfig(name="mlp", layers=(16, 8)),
    "neumf": ModelConfig(name="neumf", factors=8, layers=(16, 8)),
    "seq": ModelConfig(name="seq", factors=8, layers=(), history_len=4, blocks=1),
}


def _ids(prefix: str, n: int) -> np.ndarray:
    return np.asarray([f"{prefix}{k:03d}" for k in range(n)], dtype=object)


# ------------------------------------------------------------------------------------------------ window
def test_window_keeps_old_indices_appends_new_ones_sorted_and_holds_out_latest():
    users, items = _ids("u", 3), _ids("i", 4)
    raw_u = np.asarray(["u001", "zz", "u001", "aa", "zz"], dtype=object)
    raw_i = np.asarray(["i002", "i003", "new", "i000", "i001"], dtype=object)
    times = np.asarray([10, 5, 20, 7, 6])
    w = build_window(raw_u, raw_i, times, users, items, old_user_rows=np.asarray([2, 2, 2]))
    assert w.n_users == 5 and list(w.new_user_ids) == ["aa", "zz"]  # appended after 0..2, sorted
    assert w.n_items == 5 and list(w.new_item_ids) == ["new"]
    rows = set(zip(w.users.tolist(), w.items.tolist(), w.holdout.tolist()))
    # u001 (idx 1): latest new row (item "new", idx 4) is held out; old index 2 of i002 unchanged.
    assert (1, 2, False) in rows and (1, 4, True) in rows
    # "aa" (idx 3) has one row and nothing else: it is trained on, not held out.
    assert (3, 0, False) in rows
    # "zz" (idx 4) has two new rows: the later (time 6, i001) is held out.
    assert (4, 1, True) in rows and (4, 3, False) in rows
    assert w.stats["new_users"] == 2 and w.stats["new_items"] == 1 and w.stats["holdout_users"] == 2
    assert w.stats["min_timestamp"] == 5 and w.stats["max_timestamp"] == 20


def test_window_dedups_and_drops_forgotten_users():
    from ncf_ray.privacy import forget_hash

    forgotten = {"salt": "s", "users": [forget_hash("s", "u000")]}
    raw_u = np.asarray(["u000", "u001", "u001"], dtype=object)
    raw_i = np.asarray(["i000", "i001", "i001"], dtype=object)
    w = build_window(raw_u, raw_i, np.asarray([1, 2, 3]), _ids("u", 2), _ids("i", 2), np.asarray([1, 1]),
                     forgotten)
    assert w.stats["forgotten_rows"] == 1 and w.stats["duplicates"] == 1
    assert w.users.tolist() == [1] and w.times.tolist() == [3]
    with pytest.raises(UserError, match="forgotten"):
        build_window(raw_u[:1], raw_i[:1], np.asarray([1]), _ids("u", 2), _ids("i", 2), np.asarray([1, 1]),
                     forgotten)


# ------------------------------------------------------------------------------------------------ model growth
def _scores(model, users, items, hist=None):
    b = Batch(user=torch.as_tensor(users), item=torch.as_tensor(items)[None, :].expand(len(users), -1),
              history=None if hist is None else hist.last(torch.as_tensor(users), model.history_len))
    with torch.no_grad():
        return model.eval()(b)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_grown_model_keeps_old_scores_and_starts_new_rows_at_the_mean(name):
    torch.manual_seed(0)
    cfg = FAMILIES[name]
    parent = model_from_config(cfg, 6, 5)
    child = grown_model(parent, cfg, 6, 5, 9, 8)
    assert (child.n_users, child.n_items) == (9, 8)
    hist = Histories(torch.tensor([0, 2, 4, 5, 6, 6, 6]), torch.tensor([0, 1, 2, 3, 4, 0]))
    old = _scores(parent, [0, 1, 2], [0, 1, 4], hist)
    new = _scores(child, [0, 1, 2], [0, 1, 4], hist)
    assert torch.allclose(old, new, atol=1e-6)  # old users x old items: the same model
    tables = entity_tables(child, 9, 8)
    assert {kind for _, kind, _ in tables} >= {"item"}
    for emb, kind, pad in tables:
        old_n = 6 if kind == "user" else 5
        w = emb.weight.detach()
        expect = w[pad:old_n + pad].mean(0)
        assert torch.allclose(w[old_n + pad:], expect.expand(w.shape[0] - old_n - pad, -1), atol=1e-6)


def test_grown_model_refuses_a_mismatched_config():
    parent = model_from_config(FAMILIES["gmf"], 6, 5)
    with pytest.raises(UserError, match="shape"):
        grown_model(parent, ModelConfig(name="gmf", factors=4), 6, 5, 7, 6)


# ------------------------------------------------------------------------------------------------ data
def test_append_events_orders_new_rows_after_old_ones_by_time():
    indptr, items = np.asarray([0, 2, 3]), np.asarray([5, 1, 2])
    ptr, out = append_events(indptr, items, 3, np.asarray([0, 2, 0]), np.asarray([7, 8, 6]), np.asarray([9, 1, 3]))
    assert ptr.tolist() == [0, 4, 5, 6]
    assert out.tolist() == [5, 1, 6, 7, 2, 8]


def test_replay_sample_is_a_share_of_old_pairs():
    indptr, indices = np.asarray([0, 3, 5]), np.asarray([0, 1, 2, 3, 4])
    u, i = replay_sample(indptr, indices, n_new=4, replay=0.5, rng=np.random.default_rng(0))
    assert len(u) == 4
    pairs = {(0, 0), (0, 1), (0, 2), (1, 3), (1, 4)}
    assert set(zip(u.tolist(), i.tolist())) <= pairs and len(set(zip(u.tolist(), i.tolist()))) == 4
    assert len(replay_sample(indptr, indices, 100, 0.9, np.random.default_rng(0))[0]) == 5  # capped
    with pytest.raises(UserError, match="replay"):
        replay_sample(indptr, indices, 4, 1.0, np.random.default_rng(0))


def test_holdout_negatives_avoid_the_users_positives_and_new_items():
    seen_ptr, seen = np.asarray([0, 3, 4]), np.asarray([0, 1, 9, 2])
    neg = holdout_negatives(seen_ptr, seen, np.asarray([0, 1]), n_items=6, n_neg=3, rng=np.random.default_rng(1))
    assert neg.shape == (2, 3) and neg.max() < 6
    assert not set(neg[0]) & {0, 1} and 2 not in neg[1]


def test_guard():
    def m(child, parent, users=10):
        return {"update": {"holdout": {"k": 10, "users": users, "child": {"hr@10": child},
                                       "parent": {"hr@10": parent}}}}

    assert guard(m(0.50, 0.505), 0.01)[0]
    ok, why = guard(m(0.30, 0.50), 0.01)
    assert not ok and "0.3000 < parent 0.5000" in why
    assert not guard(m(float("nan"), 0.5, users=0), 0.01)[0]
    assert guard({}, 0.01)[0]


# ------------------------------------------------------------------------------------------------ forget
def _artifact(tmp_path, cfg=FAMILIES["gmf"], optimizer: bool = False):
    """A tiny trained-looking artifact; `optimizer`: with Adam's state after a few steps on its pairs."""
    from ncf_ray import engine
    from ncf_ray.artifact import save_artifact
    from ncf_ray.metrics import build_csr

    torch.manual_seed(0)
    n_u, n_i = 6, 8
    users = np.repeat(np.arange(n_u), 3)
    items = (users + np.tile(np.arange(3), n_u)) % n_i
    model = model_from_config(cfg, n_u, n_i)
    indptr, indices = build_csr(users, items, n_u)
    hist = Histories.from_arrays(users, items, np.arange(len(users)), n_u)
    vu = pd.DataFrame({"user_idx": np.arange(n_u, dtype=np.int32), "user_id": [f"u{k}" for k in range(n_u)],
                       "count": np.diff(indptr)})
    vi = pd.DataFrame({"item_idx": np.arange(n_i, dtype=np.int32), "item_id": [f"i{k}" for k in range(n_i)],
                       "count": np.bincount(items, minlength=n_i)})
    state = None
    if optimizer:
        opt = engine.build_optimizer(model, 1e-3, 0.0, torch.device("cpu"))
        batch = Batch(user=torch.as_tensor(users), item=torch.as_tensor(items)[:, None])
        for _ in range(3):
            opt.zero_grad()
            model(batch).sum().backward()
            opt.step()
        state = engine.adam_state_by_name(model, opt.state_dict())
    out = tmp_path / "model"
    save_artifact(out, model, cfg, n_u, n_i, vu, vi, indptr, indices, np.bincount(items, minlength=n_i) + 0.0,
                  {}, {"source": "test"}, histories=hist, optimizer_state=state)
    return out


def test_an_update_resumes_the_parents_adam_state_and_keeps_its_own_for_the_next(tmp_path):
    from safetensors.torch import load_file

    from ncf_ray.artifact import OPTIMIZER_FILE, load_artifact, load_optimizer_state
    from ncf_ray.config import build_train_config
    from ncf_ray.privacy import forget_users
    from ncf_ray.update import plain_runner, train_child

    src = _artifact(tmp_path, optimizer=True)
    art = load_artifact(src)
    parent = load_optimizer_state(art)
    assert parent["user_emb.weight.exp_avg_sq"].shape == (6, 8) and float(parent["user_emb.weight.step"]) == 3
    window = build_window(np.asarray(["u1", "u1", "new"], dtype=object), np.asarray(["i5", "fresh", "i1"], dtype=object),
                          np.asarray([1, 2, 3]), art.user_ids, art.item_ids, np.diff(art.seen_indptr))
    cfg = build_train_config(None, model=art.model_cfg, epochs=2, batch_size=32, negatives=2, eval_k=3)
    res = train_child(art, window, cfg, 0.0, tmp_path / "child", log=lambda *_: None, runner=plain_runner)
    assert res["optimizer"] == "resumed from the parent"
    assert all(h["optimizer_params_resumed"] == 4 for h in res["history"])  # both tables, the head weight and bias
    child = load_optimizer_state(load_artifact(tmp_path / "child"))
    assert child["user_emb.weight.exp_avg"].shape == (7, 8) and child["item_emb.weight.exp_avg"].shape == (9, 8)
    assert float(child["user_emb.weight.step"]) > 3  # the step count carried on
    # A parent without the file: Adam starts afresh, as before artifacts kept it.
    bare = _artifact(tmp_path / "bare")
    res = train_child(load_artifact(bare), window, cfg, 0.0, tmp_path / "child2", log=lambda *_: None,
                      runner=plain_runner)
    assert res["optimizer"] == "fresh" and res["history"][0]["optimizer_params_resumed"] == 0
    # Forgetting drops the moments (gradient statistics of every user, the forgotten one's included).
    forget_users(tmp_path / "child", ["u1"], tmp_path / "forgot")
    assert not (tmp_path / "forgot" / OPTIMIZER_FILE).exists() and (tmp_path / "child" / OPTIMIZER_FILE).exists()
    assert load_file(str(tmp_path / "child" / OPTIMIZER_FILE))  # plain safetensors, no pickle


def test_forget_removes_the_users_traces_and_raw_id(tmp_path):
    from ncf_ray.artifact import load_artifact
    from ncf_ray.privacy import forget_users, forgotten_mask
    from ncf_ray.recommender import Recommender

    src = _artifact(tmp_path)
    before = Recommender.from_path(str(src), precision="fp32").recommend(["u2"], 3)[0]
    assert not before["cold_start"]
    out = tmp_path / "forgot"
    res = forget_users(src, ["u2"], out)
    assert res["forgotten_now"] == 1 and "u2" not in json.dumps(res)
    art = load_artifact(out)
    assert "u2" not in set(art.user_ids) and art.n_users == 6  # indices do not move
    assert art.seen_indptr[3] - art.seen_indptr[2] == 0
    assert int(art.histories.indptr[3] - art.histories.indptr[2]) == 0
    emb = art.model.user_emb.weight.detach()
    others = torch.cat([emb[:2], emb[3:]])
    assert torch.allclose(emb[2], others.mean(0), atol=1e-6)
    assert forgotten_mask(np.asarray(["u2", "u3"], dtype=object), art.forgotten).tolist() == [True, False]
    for path in out.rglob("*"):  # no file of the artifact names the raw id
        if path.is_file() and path.suffix in (".json", ".parquet"):
            assert b"u2" not in path.read_bytes().replace(b"u20", b"")
    after = Recommender.from_path(str(out), precision="fp32").recommend(["u2"], 3)[0]
    assert after["cold_start"]
    # Forgetting again counts as done; an id that was never a user is refused and nothing is written.
    assert forget_users(out, ["u2"])["already_forgotten"] == 1
    with pytest.raises(UserError, match="not users"):
        forget_users(out, ["nobody"], tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ whole update
@pytest.mark.parametrize("name", ["seq", "neumf"])
def test_update_without_ray_advances_histories_and_seen_and_scores_the_holdout(tmp_path, name):
    from ncf_ray.artifact import load_artifact
    from ncf_ray.config import build_train_config
    from ncf_ray.update import plain_runner, train_child

    src = _artifact(tmp_path, FAMILIES[name])
    art = load_artifact(src)
    raw_u = np.asarray(["u1", "u1", "u1", "new", "new"], dtype=object)
    raw_i = np.asarray(["i7", "i0", "fresh", "i1", "fresh"], dtype=object)
    window = build_window(raw_u, raw_i, np.asarray([1, 2, 3, 4, 5]), art.user_ids, art.item_ids,
                          np.diff(art.seen_indptr))
    cfg = build_train_config(None, model=art.model_cfg, epochs=2, batch_size=64, negatives=2, eval_k=3)
    res = train_child(art, window, cfg, 0.5, tmp_path / "child", log=lambda *_: None, runner=plain_runner)
    child = load_artifact(tmp_path / "child")
    assert (child.n_users, child.n_items) == (7, 9)
    u1, new, fresh = child.user_index["u1"], child.user_index["new"], child.item_index["fresh"]
    hist = child.histories
    assert hist.items[hist.indptr[u1]:hist.indptr[u1 + 1]].tolist()[-3:] == [7, 0, fresh]  # time order
    assert hist.items[hist.indptr[new]:hist.indptr[new + 1]].tolist() == [1, fresh]
    assert fresh in child.seen_indices[child.seen_indptr[new]:child.seen_indptr[new + 1]]
    assert child.popularity[fresh] == 2 and child.popularity[7] == art.popularity[7] + 1
    hold = res["holdout"]
    assert hold["users"] == 2 and hold["parent"]["scored"] == 0  # both holdout items are new to the parent
    assert len(res["history"]) == 2 and all(np.isfinite(h["loss"]) for h in res["history"])
    assert child.lineage["parent_version"] == art.model_version
    assert child.metrics["config"]["epochs"] == 2  # the next update starts from this config


def _job(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"job_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("job,argv", [
    ("update", ["{missing}", "{tmp}/log.csv", "--out", "{tmp}/child"]),
    ("forget", ["{missing}", "--user", "7"]),
    ("continual", ["--model-dir", "{missing}", "--watch", "{tmp}/nowhere", "--state", "{tmp}/s.json", "--once"]),
])
def test_jobs_refuse_a_missing_artifact_in_one_line_before_ray(tmp_path, capsys, job, argv):
    from ncf_ray.pipeline import run_job

    args = [a.format(missing=tmp_path / "missing", tmp=tmp_path) for a in argv]
    rc = run_job(_job(job).main, args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "child").exists() and not (tmp_path / "s.json").exists()


def test_forget_cli_prints_counts_never_the_id(tmp_path, capsys):
    from ncf_ray import cli

    src = _artifact(tmp_path)
    assert cli.main(["forget", str(src), "--user", "u4"]) == 0
    out = capsys.readouterr().out
    assert "forgot 1 user(s)" in out and "u4" not in out
    assert cli.main(["forget", str(src), "--user", "zz"]) == 2


def test_an_update_leaves_the_rows_of_users_it_has_no_data_about_untouched(tmp_path):
    from ncf_ray.artifact import load_artifact
    from ncf_ray.config import build_train_config, to_dict
    from ncf_ray.update import plain_runner, train_child, update_train_config

    src = _artifact(tmp_path)
    art = load_artifact(src)
    art.metrics = {"config": to_dict(build_train_config(None, model=art.model_cfg, weight_decay=0.1))}
    cfg = update_train_config(art.metrics, art.model_cfg, epochs=3, batch_size=32, negatives=2)
    assert cfg.weight_decay == 0.0  # coupled L2 under a fresh Adam would move every row
    window = build_window(np.asarray(["u1", "u1", "u1"], dtype=object), np.asarray(["i5", "i6", "i7"], dtype=object),
                         np.asarray([1, 2, 3]), art.user_ids, art.item_ids, np.diff(art.seen_indptr))
    train_child(art, window, cfg, 0.0, tmp_path / "child", log=lambda *_: None, runner=plain_runner)
    before, after = art.model.user_emb.weight.detach(), load_artifact(tmp_path / "child").model.user_emb.weight
    others = [0, 2, 3, 4, 5]
    assert torch.equal(before[others], after.detach()[others])
    assert not torch.equal(before[1], after.detach()[1])


def test_update_of_a_feature_model_gives_new_items_their_features(tmp_path):
    # A new product that arrives with a side-table row is scored from its features right after the update.
    import pyarrow as pa

    from ncf_ray.artifact import load_artifact, save_artifact
    from ncf_ray.config import build_train_config
    from ncf_ray.data.features import SideOptions, encode_side_table, write_features
    from ncf_ray.inputs import build_model_for, inputs_from_parts
    from ncf_ray.metrics import build_csr
    from ncf_ray.update import plain_runner, train_child

    torch.manual_seed(0)
    n_u, n_i = 6, 8
    item_ids = np.asarray([f"i{k}" for k in range(n_i)], dtype=object)
    table = pa.table({"item_id": list(item_ids), "category": ["c0", "c1"] * 4})
    enc = encode_side_table(table, SideOptions(id_col="item_id"), item_ids.astype(str), np.ones(n_i, bool), "items")
    write_features(tmp_path / "ds", enc, None)
    users = np.repeat(np.arange(n_u), 3)
    items = (users + np.tile(np.arange(3), n_u)) % n_i
    cfg = ModelConfig(name="mf", factors=8)
    model = build_model_for(cfg, n_u, n_i, inputs_from_parts({}, {"items": enc}))
    indptr, indices = build_csr(users, items, n_u)
    vu = pd.DataFrame({"user_idx": np.arange(n_u, dtype=np.int32), "user_id": [f"u{k}" for k in range(n_u)],
                       "count": np.diff(indptr)})
    vi = pd.DataFrame({"item_idx": np.arange(n_i, dtype=np.int32), "item_id": list(item_ids),
                       "count": np.bincount(items, minlength=n_i)})
    save_artifact(tmp_path / "model", model, cfg, n_u, n_i, vu, vi, indptr, indices,
                  np.bincount(items, minlength=n_i) + 0.0, {}, {"source": "test"},
                  histories=Histories.from_arrays(users, items, np.arange(len(users)), n_u),
                  features_dir=tmp_path / "ds" / "features")
    art = load_artifact(tmp_path / "model")
    window = build_window(np.asarray(["u1", "u1", "u2"], dtype=object), np.asarray(["i7", "fresh", "i0"], dtype=object),
                          np.asarray([1, 2, 3]), art.user_ids, art.item_ids, np.diff(art.seen_indptr))
    tcfg = build_train_config(None, model=cfg, epochs=1, batch_size=64, negatives=2, eval_k=3)
    new_items = pa.table({"item_id": ["fresh"], "category": ["c1"]})
    train_child(art, window, tcfg, 0.5, tmp_path / "child", log=lambda *_: None, runner=plain_runner,
                item_table=new_items)
    child = load_artifact(tmp_path / "child")
    fresh = child.item_index["fresh"]
    feats = child.inputs.item_features.ids
    assert feats.shape[0] == child.n_items == 9
    assert feats[fresh].tolist() == feats[child.item_index["i1"]].tolist()  # category c1, like item i1
    with torch.no_grad():
        reps = child.model.item_repr(torch.tensor([fresh]))
    assert torch.isfinite(reps).all() and float(reps.abs().sum()) > 0  # its features, not an empty row
    from ncf_ray.privacy import forget_users

    forget_users(tmp_path / "child", ["u1"], tmp_path / "forgot")  # a feature model keeps its tables
    assert load_artifact(tmp_path / "forgot").inputs.item_features.ids.shape[0] == 9


# ------------------------------------------------------------------------------------------------ shop logs
def test_context_ids_for_new_rows_follow_the_parents_spec():
    from ncf_ray.data.shoplog import context_ids_for, encode_context

    times = np.asarray([0, 3600 * 5, 86400 + 3600 * 23])
    codes, vocab = np.asarray([0, 1, 0]), np.asarray(["mobile", "web"], dtype=object)
    ids, spec = encode_context(times, {"device": (codes, vocab)}, np.asarray([0, 1, 2]))
    again = context_ids_for(spec, times, {"device": ["mobile", "web", "mobile"]})
    assert again.tolist() == ids.tolist()  # the same rows encode the same way
    fresh = context_ids_for(spec, np.asarray([3600 * 5]), {"device": ["tv"]})  # a device training never saw
    assert fresh[0, 0] == ids[1, 0] and fresh[0, 2] == 0
    assert context_ids_for(spec, times, {})[:, 2].tolist() == [0, 0, 0]  # a log without the column: unknown


def _shop_artifact(tmp_path, name: str):
    """A click + purchase model reading hour/dow/device context, saved with its dataset's event and context spec."""
    from ncf_ray.artifact import save_artifact
    from ncf_ray.data.shoplog import encode_context
    from ncf_ray.inputs import build_model_for, inputs_from_parts
    from ncf_ray.metrics import build_csr

    torch.manual_seed(0)
    n_u, n_i = 6, 8
    users = np.repeat(np.arange(n_u), 3)
    items = (users + np.tile(np.arange(3), n_u)) % n_i
    times = np.arange(len(users)) * 3600
    codes = np.arange(len(users)) % 2
    _, spec = encode_context(times, {"device": (codes, np.asarray(["mobile", "web"], dtype=object))},
                             np.arange(len(users)))
    meta = {"source": "test", "events": ["view", "cart", "purchase"], "purchase_event": "purchase",
            "context": spec, "data_config": {"event_col": "type"}}
    base = FAMILIES[name]
    cfg = ModelConfig(**{**base.__dict__, "tasks": ("click", "purchase")})
    model = build_model_for(cfg, n_u, n_i, inputs_from_parts(meta, {}))
    indptr, indices = build_csr(users, items, n_u)
    vu = pd.DataFrame({"user_idx": np.arange(n_u, dtype=np.int32), "user_id": [f"u{k}" for k in range(n_u)],
                       "count": np.diff(indptr)})
    vi = pd.DataFrame({"item_idx": np.arange(n_i, dtype=np.int32), "item_id": [f"i{k}" for k in range(n_i)],
                       "count": np.bincount(items, minlength=n_i)})
    save_artifact(tmp_path / "model", model, cfg, n_u, n_i, vu, vi, indptr, indices,
                  np.bincount(items, minlength=n_i) + 0.0, {}, meta,
                  histories=Histories.from_arrays(users, items, times, n_u))
    return tmp_path / "model"


@pytest.mark.parametrize("name", ["mf", "seq"])
def test_update_of_a_purchase_and_context_model_reads_events_and_context(tmp_path, name):
    from ncf_ray.artifact import load_artifact
    from ncf_ray.config import build_train_config
    from ncf_ray.data.shoplog import context_ids_for
    from ncf_ray.update import plain_runner, row_side_inputs, train_child

    art = load_artifact(_shop_artifact(tmp_path, name))
    assert art.inputs.purchase_from == 2 and art.inputs.context
    raw_u = np.asarray(["u1", "u1", "u1", "u2", "new", "new"], dtype=object)
    raw_i = np.asarray(["i7", "i7", "fresh", "i0", "i1", "fresh"], dtype=object)
    times = np.asarray([100, 200, 300, 400, 500, 600])
    events = np.asarray([0, 2, 1, 2, 0, 2])  # u1 viewed then bought i7: one row, the purchase
    ctx = context_ids_for(art.inputs.context, times, {"device": ["web", "mobile", "tv", "web", "web", "mobile"]})
    window = build_window(raw_u, raw_i, times, art.user_ids, art.item_ids, np.diff(art.seen_indptr),
                          events=events, context=ctx)
    u1, i7 = art.user_index["u1"], art.item_index["i7"]
    row = np.flatnonzero((window.users == u1) & (window.items == i7))
    assert row.size == 1 and window.events[row[0]] == 2 and window.stats["duplicates"] == 1
    assert window.context[row[0]].tolist() == ctx[1].tolist()  # the kept row's own context
    tr = window.train
    side = row_side_inputs(art, window, tr, 3, None)
    assert side["events"].tolist() == [*window.events[tr].tolist(), 0, 0, 0]  # replayed pairs: weakest event
    assert side["row_context"].shape == (int(tr.sum()) + 3, ctx.shape[1]) and side["purchase_from"] == 2
    cfg = build_train_config(None, model=art.model_cfg, epochs=2, batch_size=64, negatives=2, eval_k=3)
    res = train_child(art, window, cfg, 0.3, tmp_path / "child", log=lambda *_: None, runner=plain_runner)
    assert all(np.isfinite(h["loss"]) for h in res["history"]) and res["holdout"]["users"] == 3
    child = load_artifact(tmp_path / "child")
    assert child.model_cfg.tasks == ("click", "purchase") and child.inputs.context == art.inputs.context
    # Without the event column a purchase model cannot learn purchases from the new log: one line, nothing written.
    plain = build_window(raw_u, raw_i, times, art.user_ids, art.item_ids, np.diff(art.seen_indptr))
    with pytest.raises(UserError, match="event column"):
        train_child(art, plain, cfg, 0.3, tmp_path / "child2", log=lambda *_: None, runner=plain_runner)
    assert not (tmp_path / "child2").exists()
