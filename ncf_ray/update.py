"""Incremental update of a model artifact from a new log: vocab growth, warm start on Ray Train, a holdout
scored for the child and its parent, and the new artifact with its lineage.

    ncf-ray update MODEL_DIR NEW_LOG --out NEW_MODEL_DIR [--epochs 2] [--replay 0.2] [--lr X] [--workers N]

Steps (`run_update`):
1. read NEW_LOG with the column mapping and filters the parent's dataset was prepared with (dataset_meta.json
   "data_config", event funnel, dedup rule and context columns included; defaults for artifacts from before it
   was recorded); a log whose columns do not match is one line, exit 2, and nothing is written; a context model's
   rows get context ids through the parent's spec (`row_side_inputs`);
2. `build_window`: drop rows of forgotten users (forgotten.json), keep the latest row per (user, item) as prepare
   does (the strongest event, latest among those, when the log has events), map ids through the parent vocab and append unseen users and items at the end (old indices unchanged;
   every user with a row is admitted, however few rows: getting known early is the point of an update);
   each user's latest new row is the holdout when the user has another interaction (old or new) to learn from;
3. `grown_model`: the parent's weights in a model of the new size; new rows from `init_new_rows`;
4. train on Ray Train (`update_loop_per_worker`, the engine's examples and steps) for --epochs over the new rows
   minus the holdout plus a replay sample of old interactions (--replay R: R of the training positives are
   old ones, drawn uniformly from the parent's seen pairs), at a batch small enough for MIN_UPDATE_STEPS steps
   an epoch unless --batch-size is given. Adam resumes the parent's moments (optimizer.safetensors; new rows
   as an average row, engine.load_adam_state), else starts afresh; no warm-up (the weights are not fresh) and no
   weight decay (it would move every row). A fresh Adam moves every row a batch touches by ~lr per step however
   small its gradient, so the rows of items and replayed users the window barely mentions drift; resumed second
   moments scale those steps by what the row's gradients were in training;
5. HR/NDCG@K of the holdout against sampled negatives drawn from the parent's catalogue (so both models rank the
   same candidates), for the child and for the parent (users or items it lacks count as misses);
6. the artifact: seen sets, histories (time order) and popularity advanced by every new row, lineage in the
   manifest, metrics.json "update" block (what the promotion guard reads, ncf_ray/serve.py `promote`).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ncf_ray.batch import Histories
from ncf_ray.config import (
    DataConfig,
    ModelConfig,
    TrainConfig,
    build_train_config,
    default_train_config,
    from_dict,
    to_dict,
)
from ncf_ray.errors import UserError
from ncf_ray.inputs import PURCHASE, ModelInputs, build_model_for, inputs_from_parts

DEFAULT_EPOCHS = 2
DEFAULT_REPLAY = 0.2
# A window is small: at the parent's batch size an epoch could be a step or two. Without --batch-size the batch
# shrinks (not below MIN_UPDATE_BATCH) until an epoch has MIN_UPDATE_STEPS steps; the lr follows the batch
# (engine.scaled_lr), as in any run.
MIN_UPDATE_STEPS = 20
MIN_UPDATE_BATCH = 256


# ============================================================================================ the window
@dataclass
class Window:
    """The new rows in the child's index space, sorted by (user, time, item). `holdout[j]`: row j is its
    user's held-out latest row."""

    users: np.ndarray
    items: np.ndarray
    times: np.ndarray
    holdout: np.ndarray
    n_users: int
    n_items: int
    new_user_ids: np.ndarray  # raw ids of users appended at n_users_old.., in index order
    new_item_ids: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)
    events: np.ndarray | None = None  # int64 funnel index per row, when the log has an event column
    context: np.ndarray | None = None  # int64 [rows, K] context ids (the parent's spec), for a context model

    @property
    def train(self) -> np.ndarray:
        return ~self.holdout


def _append_vocab(old_ids: np.ndarray, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of `raw` (str ids) in `old_ids` extended by the unseen ones, appended in sorted order (as prepare
    orders a vocab, so the result depends only on the set of ids). Returns (codes int64, appended ids)."""
    import pandas as pd

    index = pd.Index(np.asarray(old_ids, dtype=object))
    codes = index.get_indexer(raw).astype(np.int64)
    missing = codes < 0
    new_ids = np.unique(raw[missing]) if missing.any() else np.zeros(0, dtype=object)
    if new_ids.size:
        codes[missing] = len(old_ids) + np.searchsorted(new_ids, raw[missing])
    return codes, np.asarray(new_ids, dtype=object)


def as_str_ids(ids: Any) -> np.ndarray:
    """Raw ids as collected by prepare (int64 numpy, or a pyarrow string array) -> object array of str, the form
    artifact vocabs hold."""
    if isinstance(ids, np.ndarray):
        return ids.astype(str).astype(object)
    return np.asarray(ids.to_pylist(), dtype=object)


def build_window(raw_users: np.ndarray, raw_items: np.ndarray, times: np.ndarray, user_ids: np.ndarray,
                 item_ids: np.ndarray, old_user_rows: np.ndarray, forgotten: dict[str, Any] | None = None,
                 events: np.ndarray | None = None, context: np.ndarray | None = None,
                 dedup_window: int | None = None, keep_all: bool = False) -> Window:
    """The new log (str ids, int seconds) mapped into the child's index space (see the module docstring, step 2).
    `old_user_rows[u]`: the parent's interactions of user u (its seen-set row length). `events` (funnel index
    per row) and `context` ([rows, K] ids) ride along; with events, dedup keeps the strongest event per (user,
    item[, dedup_window]) as prepare does (`keep_all`: every row)."""
    from ncf_ray.data.prepare import dedup_latest
    from ncf_ray.data.shoplog import dedup_events
    from ncf_ray.privacy import forgotten_mask

    raw_users, raw_items = np.asarray(raw_users, dtype=object), np.asarray(raw_items, dtype=object)
    times = np.asarray(times, dtype=np.int64)
    gone = forgotten_mask(raw_users, forgotten)
    stats: dict[str, Any] = {"rows_read": int(raw_users.size), "forgotten_rows": int(gone.sum())}
    raw_users, raw_items, times = raw_users[~gone], raw_items[~gone], times[~gone]
    events = None if events is None else np.asarray(events, dtype=np.int64)[~gone]
    context = None if context is None else np.asarray(context, dtype=np.int64)[~gone]
    if raw_users.size == 0:
        why = " (every row belongs to a forgotten user)" if stats["forgotten_rows"] else ""
        raise UserError(f"the new log has no usable rows{why}; nothing to update")
    users, new_users = _append_vocab(user_ids, raw_users)
    items, new_items = _append_vocab(item_ids, raw_items)
    if events is None and dedup_window is None and not keep_all:
        keep = dedup_latest(users, items, times)
    else:
        keep = dedup_events(users, items, times, events, dedup_window, keep_all)
    stats["duplicates"] = int(users.size - keep.size)
    order = keep[np.lexsort((items[keep], times[keep], users[keep]))]
    users, items, times = users[order], items[order], times[order]
    events = None if events is None else events[order]
    context = None if context is None else context[order]
    n_users, n_items = len(user_ids) + len(new_users), len(item_ids) + len(new_items)

    counts = np.bincount(users, minlength=n_users)
    last = np.cumsum(counts)[counts > 0] - 1  # each user's latest row
    old_rows = np.zeros(n_users, np.int64)
    old_rows[: len(old_user_rows)] = old_user_rows
    holdout = np.zeros(users.size, bool)
    eligible = (counts + old_rows)[users[last]] >= 2  # something else to learn the user from
    holdout[last[eligible]] = True
    stats.update(rows_used=int(users.size), min_timestamp=int(times.min()), max_timestamp=int(times.max()),
                 users=int((counts > 0).sum()), new_users=int(len(new_users)), new_items=int(len(new_items)),
                 holdout_users=int(holdout.sum()))
    if events is not None:
        stats["events"] = np.bincount(events, minlength=int(events.max(initial=0)) + 1).tolist()
    return Window(users, items, times, holdout, n_users, n_items, new_users, new_items, stats, events, context)


# ============================================================================================ the model
def entity_tables(model: nn.Module, n_users: int, n_items: int) -> list[tuple[nn.Embedding, str, int]]:
    """(embedding, "user" | "item", padding rows in front) for every nn.Embedding whose rows are the model's
    users or items: num_embeddings == n (or n + 1 with padding_idx 0, the seq model's item table). A size that
    fits both (n_users == n_items) is told apart by the module's name."""
    out = []
    for name, mod in unwrap_model(model).named_modules():
        if not isinstance(mod, nn.Embedding):
            continue
        pad = 1 if mod.padding_idx == 0 else 0
        rows = mod.num_embeddings - pad
        kinds = [k for k, n in (("user", n_users), ("item", n_items)) if rows == n]
        if len(kinds) == 2:
            kinds = ["user"] if "user" in name.rsplit(".", 1)[-1] else ["item"]
        if kinds:
            out.append((mod, kinds[0], pad))
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    from ncf_ray.model import unwrap

    return unwrap(model)


def init_new_rows(model: nn.Module, parent_state: dict[str, torch.Tensor], old_n_users: int, old_n_items: int,
                  n_users: int, n_items: int) -> nn.Module:
    """Fill `model` (built for n_users x n_items) from the parent's state dict (built for old_n_users x
    old_n_items): every tensor of the same shape is copied; each user/item embedding table (entity_tables)
    gets the parent's rows at their old indices and, for the rows appended after them:
    - from features, where the model scores that side from feature tables (`item_features` / `user_features`,
      issue 14): the id row starts at zero, so a new entity is its pooled feature embedding, exactly the
      cold path that id dropout trains;
    - else the mean of the parent's rows (padding excluded): a new entity starts as the average one.
    A tensor whose shape changed any other way is refused (the config does not match the parent)."""
    own = model.state_dict()
    tables = {id(mod.weight): (kind, pad) for mod, kind, pad in entity_tables(model, n_users, n_items)}
    params = dict(model.named_parameters())
    grown: dict[str, torch.Tensor] = {}
    for key, target in own.items():
        if key not in parent_state:
            raise UserError(f"update: the parent's weights lack {key}; the model config does not match them")
        src = parent_state[key]
        if src.shape == target.shape:
            grown[key] = src.clone()
            continue
        param = params.get(key)
        info = tables.get(id(param)) if param is not None else None
        if info is None:
            raise UserError(f"update: {key} has shape {tuple(src.shape)} in the parent and {tuple(target.shape)} "
                            f"in the grown model, and is not a user or item table")
        kind, pad = info
        old_rows = src.shape[0]
        wrong_rows = (kind == "user" and old_rows != old_n_users + pad) or (
            kind == "item" and old_rows != old_n_items + pad)
        if wrong_rows or src.shape[1:] != target.shape[1:]:
            raise UserError(f"update: {key} has shape {tuple(src.shape)} in the parent ({old_n_users} users, "
                            f"{old_n_items} items) and {tuple(target.shape)} in the grown model")
        out = torch.empty_like(target)
        out[:old_rows] = src
        if getattr(unwrap_model(model), f"{kind}_features", None) is not None:
            out[old_rows:] = 0.0  # feature-aware: the new entity is scored from its features
        else:
            out[old_rows:] = src[pad:].float().mean(0).to(src.dtype)
        grown[key] = out
    model.load_state_dict(grown, strict=True)
    return model


def grown_model(parent: nn.Module, cfg: ModelConfig, old_n_users: int, old_n_items: int, n_users: int,
                n_items: int, side: ModelInputs | None = None) -> nn.Module:
    """A model of `cfg` for n_users x n_items warm-started from `parent` (init_new_rows); `side`: the grown
    feature tables and context of a feature-aware model (grown_features)."""
    state = {k: v.detach().cpu() for k, v in unwrap_model(parent).state_dict().items()}
    child = build_model_for(cfg, n_users, n_items, side)
    return init_new_rows(child, state, old_n_users, old_n_items, n_users, n_items)


def grown_features(art: Any, window: Any, item_table: Any = None, user_table: Any = None,
                   ) -> tuple[ModelInputs, dict[str, Any]]:
    """The parent's side inputs with a feature row appended for every new item and user of the window, encoded
    against the parent's frozen feature spec from `item_table` / `user_table` (side tables of the new entities,
    e.g. today's new products) or all-unknown where none is given; returns (ModelInputs, {"items"/"users":
    EncodedFeatures}) ({} for a model without features). A new item with a row is scored from its features
    right after the update, before anyone has bought it."""
    from ncf_ray.data.features import extend_features, read_features

    if not art.model_cfg.features:
        return art.inputs, {}
    encoded = read_features(Path(art.path))
    grown = {}
    for what, new_ids, table in (("items", window.new_item_ids, item_table), ("users", window.new_user_ids,
                                                                               user_table)):
        if what in encoded:
            grown[what] = extend_features(encoded[what], new_ids, table, what)
    return inputs_from_parts(art.dataset_meta, grown).for_model(art.model_cfg), grown


def _tables(features: dict[str, Any]) -> dict[str, Any]:
    """Feature tables as plain arrays for the object store: {"items"/"users": (ids, dense, n_ids)}."""
    return {what: (enc.ids, enc.dense, int(enc.spec["n_ids"])) for what, enc in features.items()}


def model_for_inputs(cfg: TrainConfig, inputs: dict[str, Any]) -> nn.Module:
    """The child model of an update's `inputs` (train_child): its size, feature tables and context."""
    from ncf_ray.batch import FeatureTable

    tables = {what: FeatureTable.from_numpy(ids, dense, n) for what, (ids, dense, n) in
              (inputs.get("features") or {}).items()}
    side = ModelInputs(item_features=tables.get("items"), user_features=tables.get("users"),
                       context=inputs.get("context"))
    model = build_model_for(cfg.model, int(inputs["n_users"]), int(inputs["n_items"]), side)
    model.load_state_dict(inputs["state"])
    return model


# ============================================================================================ the data
def csr_pairs(indptr: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) of a CSR's entries."""
    users = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
    return users, np.asarray(indices, dtype=np.int64)


def append_events(indptr: np.ndarray, items: np.ndarray, n_users: int, users: np.ndarray, new_items: np.ndarray,
                  times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A time-ordered CSR (`indptr` may have fewer rows than n_users) with the new events appended after each
    user's old ones, in time order (then input order)."""
    old_u, old_i = csr_pairs(indptr, items)
    all_u = np.concatenate([old_u, np.asarray(users, np.int64)])
    all_i = np.concatenate([old_i, np.asarray(new_items, np.int64)])
    segment = np.concatenate([np.zeros(old_u.size, np.int8), np.ones(len(users), np.int8)])
    order_key = np.concatenate([np.arange(old_u.size, dtype=np.int64), np.asarray(times, np.int64)])
    order = np.lexsort((order_key, segment, all_u))
    out = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(all_u, minlength=n_users), out=out[1:])
    return out, all_i[order]


def restrict(hist: Histories, n_users: int, n_items: int) -> Histories:
    """The first n_users rows of `hist` keeping only items < n_items (what a smaller parent model can read)."""
    users, items = csr_pairs(hist.indptr.numpy(), hist.items.numpy())
    keep = (users < n_users) & (items < n_items)
    users, items = users[keep], items[keep]
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=n_users), out=indptr[1:])
    return Histories(torch.from_numpy(indptr), torch.from_numpy(items))  # users ascending: stable within a row


def replay_sample(seen_indptr: np.ndarray, seen_indices: np.ndarray, n_new: int, replay: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Old (user, item) pairs so that they make up `replay` of n_new + replayed positives (at most all of them)."""
    if not 0.0 <= replay < 1.0:
        raise UserError(f"--replay={replay} must be in [0, 1)")
    total = len(seen_indices)
    n = min(total, int(round(n_new * replay / (1.0 - replay))))
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pick = np.sort(rng.choice(total, size=n, replace=False))
    users = np.searchsorted(seen_indptr, pick, side="right") - 1
    return users.astype(np.int64), np.asarray(seen_indices[pick], np.int64)


def holdout_negatives(seen_indptr: np.ndarray, seen_indices: np.ndarray, users: np.ndarray, n_items: int,
                      n_neg: int, rng: np.random.Generator) -> np.ndarray:
    """[len(users), n_neg] items < n_items that are not in each user's row of the (child's) seen CSR."""
    from ncf_ray.data.prepare import sample_eval_negatives

    n_neg = max(1, min(n_neg, n_items - 1))
    sub_ptr = np.zeros(len(users) + 1, np.int64)
    rows = [seen_indices[seen_indptr[u]:seen_indptr[u + 1]] for u in users]
    rows = [r[r < n_items] for r in rows]
    np.cumsum([len(r) for r in rows], out=sub_ptr[1:])
    flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    keys = np.unique(np.repeat(np.arange(len(users), dtype=np.int64), np.diff(sub_ptr)) * n_items + flat)
    return sample_eval_negatives(keys, len(users), n_items, n_neg, rng)


def holdout_metrics(model: nn.Module, users: np.ndarray, pos: np.ndarray, neg: np.ndarray, k: int,
                    hist: Histories | None, known: np.ndarray | None = None,
                    context: np.ndarray | None = None) -> dict[str, Any]:
    """HR/NDCG@k of pos[j] among neg[j] for users[j] (with its context[j] for a context model); rows with
    known[j] False (a user or item the model lacks) count as misses. NaN when there is no holdout."""
    from ncf_ray.metrics import evaluate_sampled

    n = len(users)
    if n == 0:
        return {f"hr@{k}": float("nan"), f"ndcg@{k}": float("nan"), "n": 0}
    mask = np.ones(n, bool) if known is None else known
    if mask.any():
        sums = evaluate_sampled(model, users[mask], pos[mask], neg[mask], k=k, reduce=False, histories=hist,
                                context=None if context is None else context[mask])
    else:
        sums = {"hit_sum": 0.0, "ndcg_sum": 0.0}
    return {f"hr@{k}": float(sums["hit_sum"]) / n, f"ndcg@{k}": float(sums["ndcg_sum"]) / n, "n": int(n),
            "scored": int(mask.sum())}


# ============================================================================================ Ray Train
def train_update(model: nn.Module, inputs: dict[str, Any], cfg: TrainConfig, device: torch.device,
                 rank: int = 0, world: int = 1, report: Any = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """cfg.epochs over the update's positives (`inputs`, see `train_child`): each epoch fresh negatives
    (excluding every known positive of the user) for this rank's users (user % world == rank), steps through
    engine.train_epoch (the same on every rank: the largest shard's count). Adam resumes the parent's moments
    (`inputs["optimizer"]`, engine.load_adam_state) when the parent kept them. `model` may be DDP-wrapped;
    `report(history, raw_model, optimizer_state)` is called after each epoch. Returns (history, Adam's state by
    parameter name). Pure torch: the Ray worker and tests call it."""
    from ncf_ray import engine
    from ncf_ray.data.sampler import NegativeSampler
    from ncf_ray.train import _all_reduce

    n_items = int(inputs["n_items"])
    def tensor(key: str) -> torch.Tensor:  # a copy: arrays from the object store are read-only
        return torch.tensor(np.asarray(inputs[key]), device=device)

    def optional(key: str) -> torch.Tensor | None:
        return None if inputs.get(key) is None else tensor(key)

    users, items = tensor("users"), tensor("items")
    sampler = NegativeSampler(tensor("excl_users"), tensor("excl_items"), n_items)
    hist = None
    if inputs.get("hist_indptr") is not None:
        hist = Histories(tensor("hist_indptr"), tensor("hist_items"), optional("hist_events"),
                         optional("hist_context"))
    mine = users % world == rank
    pos_users, pos_items = users[mine], items[mine]
    events, context = optional("events"), optional("row_context")
    events = None if events is None else events[mine]
    context = None if context is None else context[mine]
    raw = unwrap_model(model)
    lr0 = engine.scaled_lr(cfg.lr, cfg.batch_size, cfg.base_batch_size)
    optimizer = engine.build_optimizer(model, lr0, cfg.weight_decay, device)
    resumed = engine.load_adam_state(optimizer, raw, inputs.get("optimizer") or {})
    amp_dtype, _ = engine.amp_dtype_for(cfg.amp, device)
    per_rank_batch = max(1, cfg.batch_size // world)
    gen = torch.Generator(device=device)
    history: list[dict[str, Any]] = []
    for epoch in range(cfg.epochs):
        gen.manual_seed(cfg.seed * 1_000_003 + epoch * 7919 + rank)
        examples = engine.make_examples(raw, pos_users, pos_items, hist, sampler, cfg.negatives, gen, events,
                                        context, inputs.get("purchase_from"))
        if len(examples) == 0:
            raise UserError(f"update worker {rank} of {world} has no training examples: use fewer --workers")
        rows = engine.rows_per_step(per_rank_batch, examples)
        steps = int(_all_reduce(torch.tensor([engine.steps_for(len(examples), rows)], device=device), "max"))
        lr_for_step = engine.schedule(lr0, epoch, steps, 0.0, cfg.epochs)  # no warm-up: warm weights
        with engine.Timer(device) as timer:
            loss = engine.train_epoch(model, optimizer, examples, rows, steps, lr_for_step, amp_dtype, epoch)
        loss_t = _all_reduce(torch.tensor([loss], device=device)) / world
        history.append({"epoch": epoch + 1, "loss": float(loss_t), "epoch_seconds": timer.seconds,
                        "samples_per_second": steps * rows * examples.per_row * world / max(timer.seconds, 1e-9),
                        "optimizer_params_resumed": resumed})
        if report is not None:
            report(history, raw, engine.adam_state_by_name(raw, optimizer.state_dict()))
    return history, engine.adam_state_by_name(raw, optimizer.state_dict())


def update_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of an update: the child's initial weights and the update's positives from the object
    store, `train_update` under DDP; rank 0 reports a checkpoint ({"model", "history", "optimizer"}) each
    epoch."""
    import os

    import ray.train
    import ray.train.torch

    from ncf_ray.train import default_threads

    cfg = from_dict(TrainConfig, config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.threads_per_worker or default_threads(ctx.get_local_world_size()))
    torch.manual_seed(cfg.seed)
    inputs = ray.get(config["inputs"])
    model = ray.train.torch.prepare_model(model_for_inputs(cfg, inputs))

    def report(history: list[dict[str, Any]], raw: nn.Module, optimizer: dict[str, torch.Tensor]) -> None:
        if rank != 0:
            ray.train.report(history[-1])
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({"model": {k: v.detach().cpu() for k, v in raw.state_dict().items()}, "history": history,
                        "optimizer": optimizer}, os.path.join(tmp, "update.pt"))
            ray.train.report(history[-1], checkpoint=ray.train.Checkpoint.from_directory(tmp))

    train_update(model, inputs, cfg, device, rank, world, report)


def plain_runner(cfg: TrainConfig, inputs: dict[str, Any], storage: str | None = None) -> dict[str, Any]:
    """`fit_update` without Ray (one process, CPU): for tests and experiments."""
    torch.manual_seed(cfg.seed)
    model = model_for_inputs(cfg, inputs)
    history, optimizer = train_update(model, inputs, cfg, torch.device("cpu"))
    return {"model": model.state_dict(), "history": history, "optimizer": optimizer}


def fit_update(cfg: TrainConfig, inputs: dict[str, Any], storage: str) -> dict[str, Any]:
    """Run update_loop_per_worker on a TorchTrainer; returns the last checkpoint's {"model", "history",
    "optimizer"}."""
    import os

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    from ncf_ray.train import check_fits_cluster, raise_user_error_from

    check_fits_cluster(cfg.workers, cfg.gpu)
    trainer = TorchTrainer(
        update_loop_per_worker,
        train_loop_config={"train": to_dict(cfg), "inputs": ray.put(inputs)},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu),
        run_config=ray.train.RunConfig(name=f"update-{uuid.uuid4().hex[:8]}", storage_path=storage,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                                       logging_config=LoggingConfig(log_level="WARNING")),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - a worker's UserError becomes one line, bugs re-raise
        raise_user_error_from(exc)
        raise
    if result.error is not None:
        raise_user_error_from(result.error)
        raise RuntimeError(f"update training failed: {result.error}")
    with result.checkpoint.as_directory() as ckpt:
        return torch.load(os.path.join(ckpt, "update.pt"), map_location="cpu", weights_only=True)


# ============================================================================================ the driver
def data_config_of(dataset_meta: dict[str, Any]) -> DataConfig:
    """How the parent's log was read (prepare's meta "data_config"); DataConfig defaults when not recorded."""
    recorded = dataset_meta.get("data_config") or {}
    known = {f.name for f in dataclasses.fields(DataConfig)}
    return dataclasses.replace(DataConfig(), **{k: tuple(v) if isinstance(v, list) else v
                                                for k, v in recorded.items() if k in known})


def update_train_config(metrics: dict[str, Any], model_cfg: ModelConfig, **overrides: Any) -> TrainConfig:
    """The parent's training config (metrics.json "config"), else its family's defaults, with the update's
    flags applied (None = keep)."""
    saved = metrics.get("config")
    base = from_dict(TrainConfig, saved) if isinstance(saved, dict) else default_train_config(model_cfg.name)
    # No weight decay: Adam's coupled L2 gives every row a gradient, and a fresh Adam moves each by ~lr per step,
    # so an update would shrink the rows of every user and item the window never mentions (ML-1M users <= 1500,
    # 9 increments, ncf_ray/bench/continual.py: HR@10 0.118 below a full retrain with it, 0.010 without).
    base = dataclasses.replace(base, model=model_cfg, pretrain_from=None, stream=False, max_failures=0,
                               weight_decay=0.0)
    return build_train_config(base, **{k: v for k, v in overrides.items() if v is not None})


def read_log(path: str, data_cfg: DataConfig) -> Any:
    """NEW_LOG read like the parent's source (Ray Data): prepare.RawLog of its good rows."""
    from ncf_ray.data.prepare import _check_bad, collect
    from ncf_ray.data.sources import read_files

    log = collect(read_files(path, data_cfg).dataset)
    _check_bad(log, data_cfg, path)
    return log


def run_update(model_dir: str | Path, new_log: str, out: str | Path, *, epochs: int = DEFAULT_EPOCHS,
               replay: float = DEFAULT_REPLAY, lr: float | None = None, workers: int | None = None,
               batch_size: int | None = None, seed: int = 0, log: Any = print, item_features: str | None = None,
               user_features: str | None = None, runner: Any = None) -> dict[str, Any]:
    """The whole update (module docstring); returns the child's metrics.json (its "update" block has the
    holdout figures of child and parent, "lineage" the window). `runner`: see `train_child` (a
    `standing.StandingTrainer` for a stream of updates)."""
    from ncf_ray.artifact import load_artifact
    from ncf_ray.model import CLOSED_FORM
    from ncf_ray.runtime import ensure_ray

    src, out = Path(model_dir).resolve(), Path(out).resolve()
    if out == src:
        raise UserError(f"--out {out} is the parent artifact; write the update to a new dir")
    if out.exists():
        raise UserError(f"--out {out} already exists; choose a new dir (an update never overwrites)")
    art = load_artifact(src)
    if art.model_cfg.name in CLOSED_FORM:
        raise UserError(f"update needs an embedding model; {art.model_cfg.name} is fitted in closed form "
                        f"(re-run ncf-ray train on the whole log)")
    cfg = update_train_config(art.metrics, art.model_cfg, epochs=epochs, lr=lr, workers=workers, seed=seed,
                              batch_size=batch_size)
    if not 0.0 <= replay < 1.0:
        raise UserError(f"--replay={replay} must be in [0, 1)")
    tables = side_tables_for(art, item_features, user_features)  # refused here, before the log is read
    ensure_ray()
    data_cfg = data_config_of(art.dataset_meta)
    raw = read_log(new_log, data_cfg)
    context = None
    if art.model_cfg.context and art.inputs.context:
        from ncf_ray.data.shoplog import context_ids_for

        context = context_ids_for(art.inputs.context, raw.times, raw.context)
    window = build_window(as_str_ids(raw.users), as_str_ids(raw.items), raw.times, art.user_ids, art.item_ids,
                          np.diff(art.seen_indptr), art.forgotten, events=raw.events, context=context,
                          dedup_window=data_cfg.dedup_window, keep_all=data_cfg.keep_all_events)
    log(f"update {art.model_version}: {window.stats['rows_used']} new rows, {window.stats['new_users']} new "
        f"users, {window.stats['new_items']} new items, {window.stats['holdout_users']} holdout users")
    result = train_child(art, window, cfg, replay, out, log, runner=runner, auto_batch=batch_size is None, **tables)
    return result


def side_tables_for(art: Any, item_features: str | None, user_features: str | None) -> dict[str, Any]:
    """The side tables of new entities given to an update ({"item_table", "user_table"}), read with the id
    column of the parent's feature spec; refused for a model that reads no such table."""
    from ncf_ray.data.side_read import read_side_table

    out: dict[str, Any] = {}
    for what, path in (("items", item_features), ("users", user_features)):
        if path is None:
            continue
        spec = art.inputs.feature_spec.get(what)
        if spec is None:
            raise UserError(f"--{what[:-1]}-features {path}: this model reads no {what[:-1]} features")
        out[f"{what[:-1]}_table"] = read_side_table(path, spec["id_col"], what)
    return out


def row_side_inputs(art: Any, window: Window, train: np.ndarray, n_replay: int,
                    hist: Histories | None) -> dict[str, Any]:
    """What each training positive carries beside (user, item): its event (labels of a purchase task) and its
    context ids (a context model), new rows first, then the replayed ones; for a sequence model the same per
    position of the training histories. The artifact keeps no events or context of old interactions, so replayed
    pairs and old history positions count as the weakest event (a click, never a purchase) with unknown context."""
    out: dict[str, Any] = {"purchase_from": art.inputs.purchase_from, "events": None, "row_context": None,
                           "hist_events": None, "hist_context": None}
    if PURCHASE in art.model_cfg.tasks:
        if window.events is None:
            raise UserError("this model has a purchase head: the new log needs the event column it was prepared "
                            f"with ({art.dataset_meta.get('data_config', {}).get('event_col')!r})")
        out["events"] = np.concatenate([window.events[train], np.zeros(n_replay, np.int64)])
    if window.context is not None:
        k = window.context.shape[1]
        out["row_context"] = np.concatenate([window.context[train], np.zeros((n_replay, k), np.int64)])
    if hist is not None:
        new_pos = new_positions(hist, window, train)
        if out["events"] is not None:
            events = np.zeros(hist.items.numel(), np.int64)
            events[new_pos] = window.events[train]
            out["hist_events"] = events
        if out["row_context"] is not None:
            ctx = np.zeros((hist.items.numel(), window.context.shape[1]), np.int64)
            ctx[new_pos] = window.context[train]
            out["hist_context"] = ctx
    return out


def new_positions(hist: Histories, window: Window, train: np.ndarray) -> np.ndarray:
    """Where the window's training rows sit in `hist` (append_events: each user's new rows follow the old ones in
    time order, the order they have in the window)."""
    users = window.users[train]  # sorted by user (then time): the window's order
    counts = np.bincount(users, minlength=hist.n_users)
    first_new = hist.indptr.numpy()[1:] - counts  # each user's new rows are its last `counts` positions
    rank = np.arange(users.size) - (np.cumsum(counts) - counts)[users]
    return first_new[users] + rank


def update_batch(cfg: TrainConfig, positives: int) -> int:
    """The batch of an update without --batch-size (see MIN_UPDATE_STEPS)."""
    scored = positives * (1 + cfg.negatives)
    return int(min(cfg.batch_size, max(MIN_UPDATE_BATCH, scored // MIN_UPDATE_STEPS)))


def train_child(art: Any, window: Window, cfg: TrainConfig, replay: float, out: Path, log: Any = print,
                runner: Any = None, auto_batch: bool = True, item_table: Any = None,
                user_table: Any = None) -> dict[str, Any]:
    """Steps 3-6 of the module docstring for a built window. `runner(cfg, inputs, storage) -> {"model",
    "history"}` trains: `fit_update` (a fresh Ray Train run) by default, a `standing.StandingTrainer` (one worker
    group for many updates) in jobs/continual.py, `plain_runner` in tests."""
    from ncf_ray.artifact import load_optimizer_state
    from ncf_ray.metrics import build_csr

    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 15]))
    nu, ni = window.n_users, window.n_items
    old_u, old_i = csr_pairs(art.seen_indptr, art.seen_indices)
    seen_indptr, seen_indices = build_csr(np.concatenate([old_u, window.users]),
                                          np.concatenate([old_i, window.items]), nu)
    old_hist = art.histories if art.histories is not None else Histories(
        torch.from_numpy(art.seen_indptr), torch.from_numpy(art.seen_indices))
    h_old_ptr, h_old_items = old_hist.indptr.numpy(), old_hist.items.numpy()
    tr = window.train
    train_hist = Histories(*map(torch.from_numpy, append_events(
        h_old_ptr, h_old_items, nu, window.users[tr], window.items[tr], window.times[tr])))
    full_hist = Histories(*map(torch.from_numpy, append_events(
        h_old_ptr, h_old_items, nu, window.users, window.items, window.times)))

    side, features = grown_features(art, window, item_table, user_table)
    child = grown_model(art.model, art.model_cfg, art.n_users, art.n_items, nu, ni, side)
    rep_u, rep_i = replay_sample(art.seen_indptr, art.seen_indices, int(tr.sum()), replay, rng)
    seq = int(getattr(child, "history_len", 0)) > 0
    inputs = {"n_users": nu, "n_items": ni, "state": child.state_dict(),
              "users": np.concatenate([window.users[tr], rep_u]), "items": np.concatenate([window.items[tr], rep_i]),
              "excl_users": csr_pairs(seen_indptr, seen_indices)[0], "excl_items": seen_indices,
              "hist_indptr": train_hist.indptr.numpy() if seq else None,
              "hist_items": train_hist.items.numpy() if seq else None,
              "features": _tables(features) if art.model_cfg.features else {}, "context": side.context,
              "optimizer": load_optimizer_state(art),
              **row_side_inputs(art, window, tr, len(rep_u), train_hist if seq else None)}
    if len(inputs["users"]) == 0:
        raise UserError("the new log leaves nothing to train on (each user's only row is held out)")
    if auto_batch:
        cfg = dataclasses.replace(cfg, batch_size=update_batch(cfg, len(inputs["users"])))
    storage = Path(tempfile.mkdtemp(prefix=f".{out.name}.ray-", dir=out.parent if out.parent.exists() else None))
    t0 = time.time()
    try:
        state = (runner or fit_update)(cfg, inputs, str(storage))
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    seconds = time.time() - t0
    child.load_state_dict(state["model"])
    child.eval()

    metrics = score_holdout(art, window, child, train_hist, seen_indptr, seen_indices, cfg.eval_k, rng)
    metrics.update(train_seconds=seconds, epochs=cfg.epochs, train_rows=int(tr.sum()), replay_rows=len(rep_u),
                   history=state["history"], optimizer="resumed from the parent" if inputs["optimizer"] else "fresh")
    lineage = {"kind": "update", "parent_version": art.model_version, "parent_dir": str(Path(art.path).resolve()),
               "data_window": window.stats}
    version = write_child(art, window, child, out, seen_indptr, seen_indices, full_hist, cfg, metrics, lineage,
                          features, state.get("optimizer"))
    k = cfg.eval_k
    log(f"holdout HR@{k}: child {metrics['holdout']['child'][f'hr@{k}']:.4f}, parent "
        f"{metrics['holdout']['parent'][f'hr@{k}']:.4f} ({metrics['holdout']['users']} users); "
        f"{seconds:.1f} s training -> {out} ({version})")
    return {**metrics, "model_version": version, "out": str(out), "lineage": lineage}


def score_holdout(art: Any, window: Window, child: nn.Module, train_hist: Histories, seen_indptr: np.ndarray,
                  seen_indices: np.ndarray, k: int, rng: np.random.Generator) -> dict[str, Any]:
    """Step 5: child and parent on the same holdout rows and negatives (from the parent's catalogue)."""
    h = window.holdout
    users, pos = window.users[h], window.items[h]
    n_neg = int(art.dataset_meta.get("eval_negatives", 99) or 99)
    neg = holdout_negatives(seen_indptr, seen_indices, users, art.n_items, n_neg, rng)
    ctx = None if window.context is None else window.context[h]
    child_m = holdout_metrics(child, users, pos, neg, k, train_hist, context=ctx)
    known = (users < art.n_users) & (pos < art.n_items)
    parent_hist = restrict(train_hist, art.n_users, art.n_items)
    parent_m = holdout_metrics(art.model, users, pos, neg, k, parent_hist, known, context=ctx)
    return {"holdout": {"users": int(len(users)), "negatives": int(neg.shape[1]) if len(users) else 0,
                        "child": child_m, "parent": parent_m, "k": k},
            "parent_version": art.model_version}


def write_child(art: Any, window: Window, child: nn.Module, out: Path, seen_indptr: np.ndarray,
                seen_indices: np.ndarray, hist: Histories, cfg: TrainConfig, update: dict[str, Any],
                lineage: dict[str, Any], features: dict[str, Any] | None = None,
                optimizer: dict[str, torch.Tensor] | None = None) -> str:
    """Step 6: the child artifact, written atomically (with the grown feature tables of a feature model and
    Adam's state at the end of the update, for the next one)."""
    import pyarrow.parquet as pq

    from ncf_ray.artifact import ITEMS_VOCAB_FILE, USERS_VOCAB_FILE, save_artifact, vocab_table
    from ncf_ray.data import schema as S

    nu, ni = window.n_users, window.n_items
    old_uc = pq.read_table(Path(art.path) / USERS_VOCAB_FILE).sort_by(S.USER_IDX)[S.COUNT_COL].to_numpy()
    old_ic = pq.read_table(Path(art.path) / ITEMS_VOCAB_FILE).sort_by(S.ITEM_IDX)[S.COUNT_COL].to_numpy()
    user_counts = np.bincount(window.users, minlength=nu)
    user_counts[: art.n_users] += old_uc
    item_counts = np.bincount(window.items, minlength=ni)
    item_counts[: art.n_items] += old_ic
    popularity = np.bincount(window.items, minlength=ni).astype(np.float64)
    popularity[: art.n_items] += art.popularity
    metrics = {"model": cfg.model.name, "update": update, "config": to_dict(cfg),
               "lineage_depth": int(art.metrics.get("lineage_depth", 0)) + 1,
               "dataset": art.metrics.get("dataset")}
    meta = {**art.dataset_meta, "n_users": nu, "n_items": ni}
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.features-", dir=out.parent) as tmp:
        features_dir = None
        if features:
            from ncf_ray.data.features import write_features

            write_features(tmp, features.get("items"), features.get("users"))
            features_dir = Path(tmp) / "features"
        return save_artifact(
            out, child, cfg.model, nu, ni,
            vocab_table(np.concatenate([art.user_ids, window.new_user_ids]), user_counts, S.USER_IDX, S.USER_COL),
            vocab_table(np.concatenate([art.item_ids, window.new_item_ids]), item_counts, S.ITEM_IDX, S.ITEM_COL),
            seen_indptr, seen_indices, popularity, metrics, meta, histories=hist, lineage=lineage,
            forgotten=art.forgotten, features_dir=features_dir, optimizer_state=optimizer)


def guard(metrics: dict[str, Any], tolerance: float) -> tuple[bool, str]:
    """The promotion rule: the child's holdout HR@K >= the parent's - tolerance. (ok, the reason in words).
    An artifact without an update block (a trained one) passes; a holdout without users cannot pass."""
    upd = metrics.get("update")
    if not isinstance(upd, dict):
        return True, "not an update (no holdout to compare)"
    hold = upd["holdout"]
    k = hold.get("k", 10)
    child, parent = hold["child"][f"hr@{k}"], hold["parent"][f"hr@{k}"]
    if not hold.get("users") or math.isnan(child):
        return False, "the update had no holdout users, so nothing shows it is not worse"
    ok = child >= parent - tolerance
    rel = ">=" if ok else "<"
    return ok, (f"child holdout HR@{k} {child:.4f} {rel} parent {parent:.4f} - tolerance {tolerance:g} "
                f"({hold['users']} users)")
