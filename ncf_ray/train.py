"""Data-parallel NCF training on Ray Train, best-by-valid export, and test metrics computed once.

    ncf-ray train DATASET_DIR --out RUN_DIR [--model neumf] [--workers 2] [--epochs 20] [--json]

Per worker (`train_loop_per_worker`): materialise this worker's Ray Data shard of positives once, then each epoch
sample fresh negatives and shuffle on the device (engine.py), step DDP, score the worker's slice of valid users,
all-reduce, report metrics with a checkpoint, stop early on valid HR@K. The checkpoint carries the current state
(to resume) and the best-by-valid weights (to export), so one kept checkpoint is enough.
On the driver (`run_training`): build and fit the TorchTrainer, then export the best weights as the model artifact
and compute test metrics on it — the only time test is read.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncf_ray import console, engine
from ncf_ray.atomic import write_json
from ncf_ray.config import TrainConfig, from_dict, to_dict
from ncf_ray.data import schema as S
from ncf_ray.data.dataset import Dataset, check_dataset_dir, load_dataset, read_meta
from ncf_ray.data.sampler import NegativeSampler
from ncf_ray.errors import UserError
from ncf_ray.metrics import build_csr
from ncf_ray.model import model_from_config
from ncf_ray.runtime import ensure_ray

STATE_FILE = "state.pt"
RAY_RUN_NAME = "ray_train"
ROW_FMT = "{epoch:>5} {loss:>8.4f} {hr:>9.4f} {ndcg:>9.4f} {sps:>12,.0f} {secs:>7.1f}"
HEADER = f"{'epoch':>5} {'loss':>8} {'valid_hr':>9} {'valid_ndcg':>9} {'samples/s':>12} {'sec':>7}"


# ------------------------------------------------------------------------------------------- worker side
def _all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        red = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
        torch.distributed.all_reduce(t, op=red)
    return t


def _materialise_shard(shard: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pull this worker's whole shard of positives once (block-sized batches, no per-row Python)."""
    users, items = [], []
    for batch in shard.iter_batches(batch_size=None, batch_format="numpy"):
        users.append(batch[S.USER_IDX].astype(np.int64))
        items.append(batch[S.ITEM_IDX].astype(np.int64))
    u = np.concatenate(users) if users else np.zeros(0, np.int64)
    i = np.concatenate(items) if items else np.zeros(0, np.int64)
    return torch.from_numpy(u).to(device), torch.from_numpy(i).to(device)


def _stream_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    shard: Any,
    sampler: NegativeSampler,
    negatives: int,
    per_rank_batch: int,
    lr_for_step: Any,
    amp_dtype: torch.dtype | None,
    device: torch.device,
    gen: torch.Generator,
) -> tuple[float, int]:
    """Streaming path for logs larger than memory: positives arrive from Ray Data per batch, negatives are drawn
    for each batch. Ray Train splits the dataset with equal=True and drop_last keeps every rank's step count equal,
    which DDP needs. Returns (mean loss, steps)."""
    pos_batch = max(1, per_rank_batch // (1 + negatives))
    total, steps = 0.0, 0
    for batch in shard.iter_torch_batches(
        batch_size=pos_batch, dtypes=torch.int64, device=device, drop_last=True,
        local_shuffle_buffer_size=pos_batch * 8,
    ):
        samples = engine.epoch_samples(batch[S.USER_IDX], batch[S.ITEM_IDX], sampler, negatives, gen)
        for group in optimizer.param_groups:
            group["lr"] = lr_for_step(steps)
        total += engine.train_epoch(model, optimizer, samples, len(samples), 1, None, amp_dtype)
        steps += 1
    return total / max(steps, 1), steps


def _load_pretrained(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """NeuMF initialised from trained GMF and MLP artifacts (He et al. 2017, alpha-weighted prediction layer)."""
    from ncf_ray.artifact import load_artifact

    if cfg.model.name != "neumf" or not cfg.pretrain_from or len(cfg.pretrain_from) != 2:
        raise UserError("--pretrain-from takes GMF_DIR,MLP_DIR and only applies to --model neumf")
    gmf, mlp = (load_artifact(p).model for p in cfg.pretrain_from)
    model.load_pretrained(gmf, mlp, alpha=cfg.pretrain_alpha)


def _save_state(path: str, state: dict[str, Any]) -> None:
    torch.save(state, os.path.join(path, STATE_FILE))


def load_state(checkpoint_dir: str) -> dict[str, Any]:
    """Checkpoint state: tensors, numbers and lists only, so it loads with weights_only=True (no unpickling)."""
    return torch.load(os.path.join(checkpoint_dir, STATE_FILE), map_location="cpu", weights_only=True)


def default_threads(local_world_size: int, cpus: int | None = None, assigned: float | None = None) -> int:
    """Torch threads per worker when --threads is not given.

    `cpus`: the cores this node offers (default `runtime.usable_cpus()`: the CPU affinity mask, a cgroup quota
    and Ray's CPU resource for the node, whichever is smallest; never `os.cpu_count()`, which counts the host's
    cores even inside a 2-CPU container). `assigned`: the CPUs Ray reserved for this worker (default
    `runtime.assigned_cpus()`, None outside a Ray worker).
    The share is the node's cores less one for Ray's own processes (raylet, GCS, the Train controller and its
    health checks), split between this node's workers: with every core in a worker's OpenMP team, each wake-up
    of those processes stalls a barrier. A larger reservation (resources_per_worker) raises the share to it;
    the result never exceeds `cpus` and is at least 1."""
    from ncf_ray.runtime import assigned_cpus, usable_cpus

    cpus = cpus if cpus is not None else usable_cpus()
    assigned = assigned if assigned is not None else assigned_cpus()
    share = (max(1, cpus) - 1) // max(1, local_world_size)
    if assigned:
        share = max(share, int(assigned))
    return max(1, min(share, cpus))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainConfig, config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.threads_per_worker or default_threads(ctx.get_local_world_size()))
    torch.manual_seed(cfg.seed)  # identical init on every rank; DDP also broadcasts rank 0's weights
    gen = torch.Generator(device=device)  # negatives and shuffles; re-seeded per (seed, rank, epoch) below

    data = load_dataset(config["dataset_dir"])
    # Exclusion needs every train positive of a user, not only this shard's: keys are 8 bytes per interaction.
    sampler = NegativeSampler(
        torch.from_numpy(data.train_users).to(device), torch.from_numpy(data.train_items).to(device), data.n_items
    )
    shard = ray.train.get_dataset_shard("train")
    if not cfg.stream:
        pos_users, pos_items = _materialise_shard(shard, device)
    # This rank's slice of valid users for sharded evaluation.
    eval_users = torch.arange(rank, data.n_users, world, device=device)
    valid_items = torch.from_numpy(data.valid_items).to(device)[eval_users]
    valid_neg = torch.from_numpy(data.valid_neg).to(device)[eval_users]

    model = model_from_config(cfg.model, data.n_users, data.n_items)
    if cfg.pretrain_from:
        _load_pretrained(model, cfg)
    model = ray.train.torch.prepare_model(model)
    raw = model.module if hasattr(model, "module") else model
    lr0 = engine.scaled_lr(cfg.lr, cfg.batch_size, cfg.base_batch_size)
    optimizer = engine.build_optimizer(model, lr0, cfg.weight_decay, device)
    amp_dtype = torch.bfloat16 if (cfg.amp and device.type == "cuda") else None
    per_rank_batch = max(1, cfg.batch_size // world)

    state: dict[str, Any] = {"epoch": 0, "best_hr": -1.0, "best_ndcg": 0.0, "best_epoch": -1, "bad_epochs": 0,
                             "history": [], "best_model": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_state(ckpt_dir)
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if rank == 0:
            print(f"resumed from epoch {state['epoch']} (best valid hr {state['best_hr']:.4f})", flush=True)
        if state["history"] and (state["epoch"] >= cfg.epochs or state["bad_epochs"] >= cfg.patience):
            # Nothing left to train (a run restored after it had finished): repeat the last report so a Tune
            # trial resumed at this point still hands its metrics to the scheduler.
            ray.train.report(state["history"][-1])
            return
    if rank == 0:
        print(HEADER, flush=True)

    started = time.perf_counter()  # wall clock of this worker group, for time-to-quality curves
    for epoch in range(state["epoch"], cfg.epochs):
        if state["bad_epochs"] >= cfg.patience:
            break  # a resumed run that had already stopped early
        # Seeding each epoch from (seed, rank, epoch) makes a run restored from a checkpoint draw the same
        # negatives as an uninterrupted one, so a lost node does not change the result.
        gen.manual_seed(cfg.seed * 1_000_003 + epoch * 7919 + rank)
        if cfg.stream:
            # Step count is only known afterwards; the schedule uses the expected count per rank.
            steps = engine.steps_for(len(data.train_users) * (1 + cfg.negatives) // world, per_rank_batch)
        else:
            samples = engine.epoch_samples(pos_users, pos_items, sampler, cfg.negatives, gen)
            # Every rank must take the same number of DDP steps: use the largest shard's count.
            steps = int(_all_reduce(torch.tensor([engine.steps_for(len(samples), per_rank_batch)], device=device), "max"))

        def lr_for_step(step: int, epoch: int = epoch, steps: int = steps) -> float:
            return lr0 * engine.lr_multiplier(epoch + min(step / steps, 1.0), cfg.warmup_epochs, cfg.epochs)

        with engine.Timer(device) as timer:
            if cfg.stream:
                loss, steps = _stream_epoch(model, optimizer, shard, sampler, cfg.negatives, per_rank_batch,
                                            lr_for_step, amp_dtype, device, gen)
            else:
                loss = engine.train_epoch(model, optimizer, samples, per_rank_batch, steps, lr_for_step, amp_dtype)
        sums = _all_reduce(engine.sampled_sums(raw, eval_users, valid_items, valid_neg, cfg.eval_k))
        loss_t = _all_reduce(torch.tensor([loss], device=device)) / world
        hr, ndcg = float(sums[0] / sums[2]), float(sums[1] / sums[2])
        samples_per_s = steps * per_rank_batch / max(timer.seconds, 1e-9)
        improved = hr > state["best_hr"] + 1e-9
        if improved:
            state.update(best_hr=hr, best_ndcg=ndcg, best_epoch=epoch + 1, bad_epochs=0,
                         best_model={k: v.detach().cpu().clone() for k, v in raw.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        row = {"epoch": epoch + 1, "loss": float(loss_t), f"valid_hr@{cfg.eval_k}": hr,
               f"valid_ndcg@{cfg.eval_k}": ndcg, "samples_per_second_per_worker": samples_per_s,
               "samples_per_second": samples_per_s * world, "epoch_seconds": timer.seconds,
               "elapsed_seconds": time.perf_counter() - started,
               "best_valid_hr": state["best_hr"], "best_valid_ndcg": state["best_ndcg"],
               "best_epoch": state["best_epoch"]}
        state["history"].append(row)
        state["epoch"] = epoch + 1
        state["model"] = {k: v.detach().cpu() for k, v in raw.state_dict().items()}
        state["optimizer"] = optimizer.state_dict()
        if rank == 0:
            print(ROW_FMT.format(epoch=epoch + 1, loss=float(loss_t), hr=hr, ndcg=ndcg, sps=samples_per_s * world,
                                 secs=timer.seconds), flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                _save_state(tmp, state)
                ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(row)
        if state["bad_epochs"] >= cfg.patience:
            if rank == 0:
                print(f"early stop: valid hr@{cfg.eval_k} has not improved for {cfg.patience} epochs", flush=True)
            break


# ------------------------------------------------------------------------------------------- driver side
def read_train(dataset_dir: str, materialize: bool = True) -> Any:
    """The train positives as a Ray Dataset. Materialised for the fast path: read into the object store now,
    before worker groups hold the CPUs — on a cluster whose CPUs all go to workers (or to concurrent Tune
    trials), Ray Data's read tasks would otherwise never be scheduled."""
    import ray

    ds = ray.data.read_parquet(str(Path(dataset_dir) / S.TRAIN_DIR), columns=[S.USER_IDX, S.ITEM_IDX])
    return ds.materialize() if materialize else ds


def build_trainer(
    dataset_dir: str,
    cfg: TrainConfig,
    storage_path: str,
    name: str = RAY_RUN_NAME,
    callbacks: list[Any] | None = None,
    placement_strategy: str = "PACK",
    train_ds: Any = None,
) -> Any:
    """The TorchTrainer for one training run. Tune trials call this too (tune.py), so there is one loop.
    `train_ds` is an already-read Ray Dataset of positives (a sweep reads it once for all its trials).
    `placement_strategy="SPREAD"` puts the workers on different nodes (so losing one node loses one worker)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    check_dataset_dir(dataset_dir)
    if train_ds is None:
        train_ds = read_train(dataset_dir, materialize=not cfg.stream)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": to_dict(cfg), "dataset_dir": str(Path(dataset_dir).resolve())},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu,
                                              placement_strategy=placement_strategy),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=callbacks or [],
            logging_config=LoggingConfig(log_level="WARNING"),  # our epoch table, not per-report INFO lines
        ),
        datasets={"train": train_ds},
    )


def finalize(
    dataset_dir: str, model_dir: Path, metrics_path: Path, cfg: TrainConfig, state: dict[str, Any],
    train_seconds: float,
) -> dict[str, Any]:
    """Export the best-by-valid weights as a model artifact and compute test metrics once, on that model."""
    from ncf_ray.artifact import save_artifact
    from ncf_ray.metrics import evaluate_popularity_sampled

    if state.get("best_model") is None:
        raise UserError(f"training produced no checkpoint with a valid score for {model_dir}")
    data = load_dataset(dataset_dir)
    model = model_from_config(cfg.model, data.n_users, data.n_items)
    model.load_state_dict(state["best_model"])
    model.eval()
    metrics = evaluate_model(model, data, cfg.eval_k)
    history = state["history"]
    best = next(h for h in history if h["epoch"] == state["best_epoch"])
    k = cfg.eval_k
    result = {
        "valid": {f"hr@{k}": best[f"valid_hr@{k}"], f"ndcg@{k}": best[f"valid_ndcg@{k}"]},
        "test": metrics,
        "popularity": {
            "valid": _at_k(evaluate_popularity_sampled(data.item_counts, data.valid_items, data.valid_neg, k), k),
            "test": _at_k(evaluate_popularity_sampled(data.item_counts, data.test_items, data.test_neg, k), k),
        },
        "epochs": state["epoch"],
        "best_epoch": state["best_epoch"],
        "train_seconds": train_seconds,
        "samples_per_second": float(np.mean([h["samples_per_second"] for h in history])),
        "history": history,
        "config": to_dict(cfg),
        "dataset": data.meta.get("source"),
    }
    seen_indptr, seen_indices = build_csr(data.train_users, data.train_items, data.n_users)
    users = _vocab_table(data.user_ids, np.bincount(data.train_users, minlength=data.n_users), S.USER_IDX, S.USER_COL)
    items = _vocab_table(data.item_ids, data.item_counts, S.ITEM_IDX, S.ITEM_COL)
    version = save_artifact(
        model_dir, model, cfg.model, data.n_users, data.n_items, users, items,
        seen_indptr, seen_indices, data.item_counts.astype(np.float64), result, data.meta,
    )
    result["model_version"] = version
    write_json(metrics_path, result)
    return result


def evaluate_model(model: torch.nn.Module, data: Dataset, k: int, split: str = "test") -> dict[str, float]:
    """Sampled (fixed negatives) and full-ranking HR/NDCG@k of `split` ("test" or "valid")."""
    from ncf_ray.metrics import evaluate_full, evaluate_sampled

    targets = data.test_items if split == "test" else data.valid_items
    negs = data.test_neg if split == "test" else data.valid_neg
    users = np.arange(data.n_users)
    sampled = evaluate_sampled(model, users, targets, negs, k=k)
    # Full ranking excludes train positives (and, for test, the valid item: it is a known positive then).
    ex_users, ex_items = data.train_users, data.train_items
    if split == "test":
        ex_users = np.concatenate([ex_users, users])
        ex_items = np.concatenate([ex_items, data.valid_items])
    full = evaluate_full(model, users, targets, build_csr(ex_users, ex_items, data.n_users), k=k)
    return {f"hr@{k}": sampled["hr"], f"ndcg@{k}": sampled["ndcg"],
            f"full_hr@{k}": full["hr"], f"full_ndcg@{k}": full["ndcg"]}


def _at_k(m: dict[str, float], k: int) -> dict[str, float]:
    return {f"hr@{k}": m["hr"], f"ndcg@{k}": m["ndcg"]}


def _vocab_table(ids: np.ndarray, counts: np.ndarray, idx_col: str, id_col: str) -> Any:
    import pyarrow as pa

    return pa.table({idx_col: pa.array(np.arange(len(ids), dtype=np.int32)),
                     id_col: pa.array([str(x) for x in ids], pa.string()),
                     S.COUNT_COL: pa.array(np.asarray(counts, dtype=np.int64))})


def run_training(
    dataset_dir: str, out_dir: str, cfg: TrainConfig, resume: bool = False, storage_path: str | None = None,
    placement_strategy: str = "PACK",
) -> dict[str, Any]:
    """Train on Ray, export RUN_DIR/model, write RUN_DIR/metrics.json; returns the metrics dict.
    `storage_path` (local dir or URI such as s3://...) holds checkpoints; it defaults to RUN_DIR so every node of
    a cluster needs to see RUN_DIR (NFS) unless a URI is given."""
    from ray.train import Result

    meta = read_meta(dataset_dir)
    out = Path(out_dir).resolve()
    storage = storage_path or str(out)
    run_path = out / RAY_RUN_NAME if storage_path is None else None
    if not resume and run_path is not None and run_path.exists():
        raise UserError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    if resume and run_path is not None and not run_path.exists():
        raise UserError(f"--resume: no training run found in {out}")
    out.mkdir(parents=True, exist_ok=True)
    with console.session(out / "logs", "train"):  # a no-op under the CLI's or the pipeline's own session
        print(f"training {cfg.model.name} on {meta.get('n_users')} users x {meta.get('n_items')} items, "
              f"{cfg.workers} worker(s){' (GPU)' if cfg.gpu else ''}", flush=True)
        ensure_ray()
        t0 = time.time()
        # The workers report each epoch; the table prints them on this console, once (see console.epoch_feed).
        table = console.EpochTable(cfg.epochs, cfg.eval_k, cfg.patience)
        with console.epoch_feed(table) as feed:
            trainer = build_trainer(dataset_dir, cfg, storage, placement_strategy=placement_strategy,
                                    callbacks=[feed])
            result: Result = trainer.fit()
        return _finish(result, dataset_dir, out, cfg, t0)


def _finish(result: Any, dataset_dir: str, out: Path, cfg: TrainConfig, t0: float) -> dict[str, Any]:
    """Export and test a finished Ray Train run (see finalize), or say why there is nothing to export."""
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    if result.checkpoint is None:
        raise UserError(f"training reported no checkpoint (epochs={cfg.epochs})")
    with result.checkpoint.as_directory() as ckpt_dir:
        state = load_state(ckpt_dir)
    return finalize(dataset_dir, out / "model", out / "metrics.json", cfg, state, time.time() - t0)


def format_summary(m: dict[str, Any], k: int = 10) -> str:
    pop = m["popularity"]["test"]
    lines = [
        f"{'':<12} {'HR@' + str(k):>8} {'NDCG@' + str(k):>8}",
        f"{'valid':<12} {m['valid'][f'hr@{k}']:>8.4f} {m['valid'][f'ndcg@{k}']:>8.4f}",
        f"{'test':<12} {m['test'][f'hr@{k}']:>8.4f} {m['test'][f'ndcg@{k}']:>8.4f}",
        f"{'test (full)':<12} {m['test'][f'full_hr@{k}']:>8.4f} {m['test'][f'full_ndcg@{k}']:>8.4f}",
        f"{'popularity':<12} {pop[f'hr@{k}']:>8.4f} {pop[f'ndcg@{k}']:>8.4f}",
        f"best epoch {m['best_epoch']} of {m['epochs']}, {m['train_seconds']:.1f} s, "
        f"{m['samples_per_second']:,.0f} samples/s",
    ]
    return "\n".join(lines)
