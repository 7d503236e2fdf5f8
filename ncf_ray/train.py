"""Data-parallel NCF training on Ray Train, best-by-valid export, and test metrics computed once.

    ncf-ray train DATASET_DIR --out RUN_DIR [--model neumf] [--workers 2] [--epochs 20] [--json]

Per worker (`train_loop_per_worker`): materialise this worker's Ray Data shard of positives once, then each epoch
sample fresh negatives and shuffle on the device (engine.py), step DDP, score the worker's slice of valid users,
all-reduce, report metrics with a checkpoint, stop early on valid HR@K. The checkpoint carries the current state
(to resume) and the best-by-valid weights (to export), so one kept checkpoint is enough.
On the driver (`run_training`): build and fit the TorchTrainer, then export the best weights as the model artifact
and compute test metrics on it — the only time test is read.

Memory per worker. Fast path (default): the whole train table (user, item, timestamp: ~24 bytes per interaction)
plus the exact exclusion keys (8 bytes per interaction) plus this worker's positives and their negatives on the
device. `--stream`: no train table — positives arrive from the worker's Ray Data shard (`iter_torch_batches`; Ray
Data's streaming buffers), negatives are excluded through a Bloom filter of all train positives built once on the
driver from record batches (`build_exclusion`, 1.25 bytes per interaction, shared from the object store), plus the
per-user valid/test arrays (n_users x (1 + negatives) int64 each) and the model. Sequence models read whole user
histories and cannot stream. The closing export and test evaluation (`finalize`) still load the dataset on the
driver.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncf_ray import console, engine
from ncf_ray.atomic import write_json
from ncf_ray.config import TrainConfig, from_dict, to_dict
from ncf_ray.data import schema as S
from ncf_ray.data.dataset import Dataset, check_dataset_dir, load_dataset, read_meta
from ncf_ray.data.sampler import BloomFilter, NegativeSampler, bloom_from_parquet
from ncf_ray.errors import UserError
from ncf_ray.evaluation import evaluate_model, held_out_extras, purchase_users, split_context, train_histories
from ncf_ray.inputs import (
    PURCHASE,
    ModelInputs,
    build_model_for,
    check_tasks,
    describe,
    inputs_from_dataset,
    inputs_from_parts,
)
from ncf_ray.metrics import build_csr
from ncf_ray.model import CLOSED_FORM, model_from_config, unwrap
from ncf_ray.runtime import ensure_ray

STATE_FILE = "state.pt"
RAY_RUN_NAME = "ray_train"  # prefix of every run's Ray Train name (and the whole name of runs made before run.json)
RUN_FILE = "run.json"  # RUN_DIR/run.json: the Ray Train run (name, storage) that --resume continues
BLOOM_BITS_PER_KEY = 10.0  # --stream exclusion filter: 1.25 bytes per interaction, ~0.8% false positives


# ------------------------------------------------------------------------------------------- worker side
def _all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        red = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
        torch.distributed.all_reduce(t, op=red)
    return t


def _stream_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    shard: Any,
    sampler: Any,
    negatives: int,
    per_rank_batch: int,
    lr_for_step: Any,
    amp_dtype: torch.dtype | None,
    device: torch.device,
    gen: torch.Generator,
    epoch: int,
) -> tuple[float, int]:
    """Streaming path for logs larger than memory: positives arrive from Ray Data per batch, negatives are drawn
    for each batch through `sampler` (a Bloom-filter sampler, `stream_inputs`). Ray Train splits the dataset
    with equal=True and drop_last keeps every rank's step count equal, which DDP needs. Returns (mean loss, steps)."""
    pos_batch = max(1, per_rank_batch // (1 + negatives))
    total, steps = 0.0, 0
    for batch in shard.iter_torch_batches(
        batch_size=pos_batch, dtypes=torch.int64, device=device, drop_last=True,
        local_shuffle_buffer_size=pos_batch * 8,
    ):
        examples = engine.pair_examples(batch[S.USER_IDX], batch[S.ITEM_IDX], sampler, negatives, gen)
        total += engine.train_epoch(model, optimizer, examples, len(examples), 1,
                                    lambda _s, n=steps: lr_for_step(n), amp_dtype, epoch)
        steps += 1
    return total / max(steps, 1), steps


def stream_inputs(dataset_dir: str, exclusion: BloomFilter, device: torch.device) -> tuple[Dataset, NegativeSampler]:
    """What a streaming worker holds besides its Ray Data shard: the dataset's per-user arrays (valid/test items
    and negatives, vocab, popularity; no train positives) and a sampler excluding through the driver's filter."""
    data = load_dataset(dataset_dir, with_train=False)
    return data, NegativeSampler.from_filter(exclusion.to(device), data.n_items)


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
    """One Ray Train worker: this rank's users' positives (user_idx % world == rank, so a user's history never
    splits across workers) on the device, fresh negatives every epoch through the engine, DDP steps, this rank's
    slice of valid users scored and all-reduced, a report with a checkpoint per epoch, early stop on valid."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainConfig, config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.threads_per_worker or default_threads(ctx.get_local_world_size()))
    torch.manual_seed(cfg.seed)  # identical init on every rank; DDP also broadcasts rank 0's weights
    gen = torch.Generator(device=device)  # negatives and shuffles; re-seeded per (seed, rank, epoch) below

    refit = bool(config.get("refit"))
    if cfg.stream:
        # Only the valid/test arrays and the exclusion filter; positives arrive from this worker's Ray Data shard.
        data, sampler = stream_inputs(config["dataset_dir"], ray.get(config["exclusion"]), device)
        n_train, hist = sampler.exclusion.n_keys, None  # stream refuses models that read histories (build_trainer)
        shard = ray.train.get_dataset_shard("train")
    else:
        data = load_dataset(config["dataset_dir"])
        all_users, all_items, hist = training_positives(data, refit, device)
        all_events, all_context = positive_extras(data, refit, device)
        # Exclusion needs every positive of a user: keys are 8 bytes per interaction.
        sampler = NegativeSampler(all_users, all_items, data.n_items, pool=engine.negative_pool(all_items,
                                                                                         data.n_items))
        mine = all_users % world == rank
        pos_users, pos_items = all_users[mine], all_items[mine]
        pos_events = None if all_events is None else all_events[mine]
        pos_context = None if all_context is None else all_context[mine]
    inputs = inputs_from_dataset(data).for_model(cfg.model)
    model = build_model_for(cfg.model, data.n_users, data.n_items, inputs.to(device))
    if cfg.pretrain_from:
        _load_pretrained(model, cfg)
    eval_users, valid_items, valid_neg, valid_context = validation_slice(data, cfg, inputs, rank, world, device)
    task_weights = task_weight_map(cfg)

    model = ray.train.torch.prepare_model(model)
    raw = unwrap(model)
    lr0 = engine.scaled_lr(cfg.lr, cfg.batch_size, cfg.base_batch_size)
    optimizer = engine.build_optimizer(model, lr0, cfg.weight_decay, device)
    amp_dtype, _ = engine.amp_dtype_for(cfg.amp, device)
    per_rank_batch = max(1, cfg.batch_size // world)

    state: dict[str, Any] = {"epoch": 0, "best_hr": -1.0, "best_ndcg": 0.0, "best_epoch": -1, "bad_epochs": 0,
                             "history": [], "best_model": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_state(ckpt_dir)
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state["history"] and (state["epoch"] >= cfg.epochs or state["bad_epochs"] >= cfg.patience):
            # Nothing left to train (a run restored after it had finished): repeat the last report so a Tune
            # trial resumed at this point still hands its metrics to the scheduler.
            ray.train.report(state["history"][-1])
            return

    started = time.perf_counter()  # wall clock of this worker group, for time-to-quality curves
    for epoch in range(state["epoch"], cfg.epochs):
        if state["bad_epochs"] >= cfg.patience:
            break  # a resumed run that had already stopped early
        # Seeding each epoch from (seed, rank, epoch) makes a run restored from a checkpoint draw the same
        # negatives as an uninterrupted one, so a lost node does not change the result.
        gen.manual_seed(cfg.seed * 1_000_003 + epoch * 7919 + rank)
        if cfg.stream:
            # Step count is only known afterwards; the schedule uses the expected count per rank.
            steps = engine.steps_for(n_train * (1 + cfg.negatives) // world, per_rank_batch)
        else:
            examples = engine.make_examples(raw, pos_users, pos_items, hist, sampler, cfg.negatives, gen,
                                            events=pos_events, context=pos_context,
                                            purchase_from=inputs.purchase_from)
            if len(examples) == 0:
                raise UserError(f"worker {rank} of {world} has no training examples: use fewer --workers")
            rows = engine.rows_per_step(per_rank_batch, examples)
            # Every rank must take the same number of DDP steps: use the largest shard's count.
            steps = int(_all_reduce(torch.tensor([engine.steps_for(len(examples), rows)], device=device), "max"))
        lr_for_step = engine.schedule(lr0, epoch, steps, cfg.warmup_epochs, cfg.epochs)

        with engine.Timer(device) as timer:
            if cfg.stream:
                loss, steps = _stream_epoch(model, optimizer, shard, sampler, cfg.negatives, per_rank_batch,
                                            lr_for_step, amp_dtype, device, gen, epoch)
                trained = steps * per_rank_batch
            else:
                loss = engine.train_epoch(model, optimizer, examples, rows, steps, lr_for_step, amp_dtype, epoch,
                                          task_weights=task_weights)
                trained = steps * rows * examples.per_row
        if refit:  # valid is part of the training data now: nothing to select on, the last epoch is kept
            sums = torch.tensor([float("nan"), float("nan"), 1.0], dtype=torch.float64, device=device)
        else:
            sums = _all_reduce(engine.sampled_sums(raw, eval_users, valid_items, valid_neg, cfg.eval_k, hist,
                                                   context=valid_context, task=cfg.select_task))
        loss_t = _all_reduce(torch.tensor([loss], device=device)) / world
        hr, ndcg = float(sums[0] / sums[2]), float(sums[1] / sums[2])
        samples_per_s = trained / max(timer.seconds, 1e-9)
        improved = refit or hr > state["best_hr"] + 1e-9
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
               "best_epoch": state["best_epoch"], "early_stop": state["bad_epochs"] >= cfg.patience}
        state["history"].append(row)
        state["epoch"] = epoch + 1
        state["model"] = {k: v.detach().cpu() for k, v in raw.state_dict().items()}
        state["optimizer"] = optimizer.state_dict()
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                _save_state(tmp, state)
                ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(row)
        if state["bad_epochs"] >= cfg.patience:
            break


# ------------------------------------------------------------------------------------------- driver side
def raise_user_error_from(exc: BaseException | None) -> None:
    """Re-raise, as one line on the driver, a UserError a worker raised (see `user_error_in`); else return."""
    err = user_error_in(exc)
    if err is not None:
        raise UserError(str(err)) from None


def task_weight_map(cfg: TrainConfig) -> dict[str, float] | None:
    """{task: loss weight} of a multi-task model (None: one task, plain BCE)."""
    tasks = cfg.model.tasks
    if len(tasks) == 1:
        return None
    return dict(zip(tasks, cfg.task_weights or (1.0,) * len(tasks)))


def validation_slice(data: Dataset, cfg: TrainConfig, inputs: ModelInputs, rank: int, world: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """This rank's share of the valid users (every world-th), their valid item, negatives and context. With
    select_task="purchase" only users whose valid event is a purchase count (the task's own eval set)."""
    users = np.arange(rank, data.n_users, world)
    if cfg.select_task == PURCHASE:
        buyers = purchase_users(data, "valid")
        if buyers is None:
            raise UserError("--select-task purchase needs a log with purchase events (prepare with --event-col)")
        users = np.intersect1d(users, buyers)
    ctx = split_context(data, "valid") if inputs.context else None
    return (torch.from_numpy(users).to(device), torch.from_numpy(data.valid_items[users]).to(device),
            torch.from_numpy(data.valid_neg[users]).to(device),
            None if ctx is None else torch.from_numpy(ctx[users]).to(device))


def positive_extras(data: Dataset, refit: bool, device: torch.device | str = "cpu",
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(events [P], context [P, K]) of the positives `training_positives` returns, in the same order (None where
    the dataset has none)."""
    def cat(train: np.ndarray | None, valid: np.ndarray | None, test: np.ndarray | None) -> torch.Tensor | None:
        if train is None:
            return None
        parts = [train, valid, test] if refit else [train]
        return torch.from_numpy(np.concatenate(parts).astype(np.int64)).to(device)

    events = cat(getattr(data, "train_events", None), getattr(data, "valid_events", None),
                 getattr(data, "test_events", None))
    context = cat(getattr(data, "train_context", None), getattr(data, "valid_context", None),
                  getattr(data, "test_context", None))
    return events, context


def training_positives(data: Dataset, refit: bool, device: torch.device | str = "cpu",
                       ) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(users, items, time-ordered histories) a run trains on: the train split, or for a refit every interaction
    (train, then each user's valid and test item, in time order)."""
    hist = train_histories(data, device)
    users, items = torch.from_numpy(data.train_users), torch.from_numpy(data.train_items)
    if refit:
        every = torch.arange(data.n_users)
        valid, test = torch.from_numpy(data.valid_items), torch.from_numpy(data.test_items)
        hist = hist.append(every.to(device), valid.to(device), *held_out_extras(data, "valid", device)).append(
            every.to(device), test.to(device), *held_out_extras(data, "test", device))
        users, items = torch.cat([users, every, every]), torch.cat([items, valid, test])
    return users.to(device), items.to(device), hist


def read_train(dataset_dir: str, materialize: bool = True) -> Any:
    """The train positives as a Ray Dataset. Materialised for the fast path: read into the object store now,
    before worker groups hold the CPUs — on a cluster whose CPUs all go to workers (or to concurrent Tune
    trials), Ray Data's read tasks would otherwise never be scheduled."""
    import ray

    ds = ray.data.read_parquet(str(Path(dataset_dir) / S.TRAIN_DIR), columns=[S.USER_IDX, S.ITEM_IDX])
    return ds.materialize() if materialize else ds


def check_fits_cluster(workers: int, gpu: bool, cpus_per_worker: float = 1.0, extra_cpus: float = 0.0) -> None:
    """Refuse, with one line, a run the connected Ray cluster cannot place: Ray Train would otherwise wait for
    its worker group until it times out. Each worker takes `cpus_per_worker` CPUs (Ray Train's default 1) and,
    with `gpu`, one GPU; `extra_cpus` is what else the run holds (a Tune trial's driver). Checked against
    `ray.cluster_resources()` now, so on an autoscaling cluster start the nodes first."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))
    if gpu and gpus < 1:
        raise UserError(f"--gpu: the Ray cluster has no GPU ({cpus:g} CPUs, 0 GPUs)")
    if gpu and workers > gpus:
        raise UserError(f"--workers={workers} with --gpu needs {workers} GPUs but the Ray cluster has {gpus:g}")
    need = workers * cpus_per_worker + extra_cpus
    if need > cpus:
        why = f"{workers} x {cpus_per_worker:g}" + (f" + {extra_cpus:g} for the trial" if extra_cpus else "")
        raise UserError(f"--workers={workers} needs {need:g} CPUs ({why}) but the Ray cluster has {cpus:g}")


def user_error_in(error: BaseException | None) -> UserError | None:
    """The UserError a worker raised (a non-finite training loss, a shard with no data), recovered from the
    failure Ray Train reports for the run: it wraps worker exceptions in its own, keeping their text (and, where
    it can, the exception itself in the cause chain). None if it was not one."""
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack.extend(x for x in (e.__cause__, e.__context__, getattr(e, "error", None),
                                 *getattr(e, "worker_failures", {}).values()) if isinstance(x, BaseException))
    match = re.search(r"(?:[\w.]+\.)?(?:UserError|NonFiniteLoss): (.+)", str(error or ""))
    return UserError(match.group(1).strip()) if match else None


def fresh_run_name() -> str:
    """A Ray Train run name no earlier run has: Train V2 restores any run with the same (storage, name), so a
    reused name would silently continue (or re-export) an old run."""
    return f"{RAY_RUN_NAME}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def resolve_run(out: Path, storage_path: str | None, resume: bool) -> tuple[str, str]:
    """(Ray Train name, storage path) of the run in RUN_DIR `out`: a fresh name for a new run (`record_run`
    writes it to RUN_DIR/run.json), the recorded one with `resume` (and the recorded storage when --storage is not
    given again). A RUN_DIR that already holds a run is refused without `resume`, and `resume` without one."""
    record, legacy = out / RUN_FILE, out / RAY_RUN_NAME
    if resume:
        if record.is_file():
            saved = json.loads(record.read_text())
            return saved["name"], storage_path or saved.get("storage") or str(out)
        if legacy.exists():  # a run from before run.json: its name was always RAY_RUN_NAME, under RUN_DIR
            return RAY_RUN_NAME, storage_path or str(out)
        raise UserError(f"--resume: no training run found in {out}")
    if record.is_file() or legacy.exists():
        raise UserError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    return fresh_run_name(), storage_path or str(out)


def record_run(out: Path, name: str, storage: str) -> None:
    """Write RUN_DIR/run.json, so `--resume` finds this run's Ray Train name and storage."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RUN_FILE, {"name": name, "storage": storage})


def train_files(dataset_dir: str) -> list[Path]:
    """The dataset dir's train Parquet shards, in name order."""
    return sorted((Path(dataset_dir) / S.TRAIN_DIR).glob("*.parquet"))


def build_exclusion(dataset_dir: str, bits_per_key: float = BLOOM_BITS_PER_KEY) -> BloomFilter:
    """The Bloom filter of every train positive, for `--stream`: built on the driver from the train shards in
    record batches (memory: the filter, ~bits_per_key / 8 bytes per interaction, plus one batch)."""
    n_items = int(read_meta(dataset_dir)["n_items"])
    return bloom_from_parquet(train_files(dataset_dir), S.USER_IDX, S.ITEM_IDX, n_items, bits_per_key)


def check_streamable(cfg: TrainConfig, refit: bool = False) -> None:
    """Refuse, in one line, what `--stream` cannot train: a model that reads each user's history (asked of a
    tiny instance, so a new registry entry needs no list here) — a streamed shard holds no whole histories —
    and a refit, whose valid and test positives are not in the streamed train shards."""
    if model_from_config(cfg.model, 2, 2).history_len > 0:
        raise UserError(f"--stream cannot train --model {cfg.model.name}: it reads each user's whole history, "
                        f"which a streamed shard does not hold; drop --stream")
    if len(cfg.model.tasks) > 1:
        raise UserError("--stream trains the click task only (streamed shards carry no events); drop --stream "
                        "or --tasks")
    if refit:
        raise UserError("--stream cannot --refit: the refit trains on valid and test items too, which only the "
                        "fast path reads; drop --stream")


def build_trainer(
    dataset_dir: str,
    cfg: TrainConfig,
    storage_path: str,
    name: str = RAY_RUN_NAME,
    callbacks: list[Any] | None = None,
    placement_strategy: str = "PACK",
    train_ds: Any = None,
    refit: bool = False,
    exclusion_ref: Any = None,
) -> Any:
    """The TorchTrainer for one training run. Tune trials call this too (tune.py), so there is one loop.
    `train_ds` is an already-read Ray Dataset of positives (a sweep reads it once for all its trials).
    `refit=True` trains on every interaction (train, valid and test) for cfg.epochs, without selection.
    `exclusion_ref` (`--stream` only): an ObjectRef of `build_exclusion(dataset_dir)`, built here when None (a
    sweep builds it once and hands every trial the same ref).
    `placement_strategy="SPREAD"` puts the workers on different nodes (so losing one node loses one worker)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    check_dataset_dir(dataset_dir)
    datasets = {}
    loop_config: dict[str, Any] = {"train": to_dict(cfg), "dataset_dir": str(Path(dataset_dir).resolve()),
                                   "refit": refit}
    if cfg.stream:  # the fast path reads each worker's users from the dataset dir itself
        check_streamable(cfg, refit)
        datasets["train"] = train_ds if train_ds is not None else read_train(dataset_dir, materialize=False)
        loop_config["exclusion"] = exclusion_ref if exclusion_ref is not None else ray.put(
            build_exclusion(dataset_dir))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
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
        datasets=datasets,
    )


def finalize(
    dataset_dir: str, model_dir: Path, metrics_path: Path, cfg: TrainConfig, state: dict[str, Any],
    train_seconds: float, baselines: bool = True,
) -> dict[str, Any]:
    """Export the best-by-valid weights as a model artifact and compute test metrics once, on that model, beside
    popularity and EASE on the same split (`baselines=False` skips EASE; popularity is always there)."""
    if state.get("best_model") is None:
        raise UserError(f"training produced no checkpoint with a valid score for {model_dir}")
    data = load_dataset(dataset_dir)
    model = build_model_for(cfg.model, data.n_users, data.n_items, inputs_from_dataset(data))
    model.load_state_dict(state["best_model"])
    model.eval()
    metrics = evaluate_model(model, data, cfg.eval_k, histories=train_histories(data))
    history = state["history"]
    best = next(h for h in history if h["epoch"] == state["best_epoch"])
    k = cfg.eval_k
    result = {
        "model": cfg.model.name,
        "valid": {f"hr@{k}": best[f"valid_hr@{k}"], f"ndcg@{k}": best[f"valid_ndcg@{k}"]},
        "test": metrics,
        "baselines": baseline_block(data, k, ease=baselines),
        "epochs": state["epoch"],
        "best_epoch": state["best_epoch"],
        "train_seconds": train_seconds,
        "samples_per_second": float(np.mean([h["samples_per_second"] for h in history])),
        "history": history,
        "config": to_dict(cfg),
        "dataset": data.meta.get("source"),
        "inputs": describe(inputs_from_dataset(data), cfg.model),
    }
    result["popularity"] = result["baselines"]["popularity"]  # the earlier key, kept for readers of metrics.json
    result["exported"] = {"weights": "best-by-valid", "epochs": state["best_epoch"]}
    result["model_version"] = export_artifact(model_dir, model, cfg, data, result,
                                              engine.adam_state_by_name(model, state.get("optimizer")))
    write_json(metrics_path, result)
    return result


def baseline_block(data: Dataset, k: int, ease: bool = True) -> dict[str, Any]:
    """Popularity always, EASE where asked and the catalogue allows it (else the reason it was skipped)."""
    from ncf_ray.baselines import baseline_metrics

    return baseline_metrics(data, k=k, ease=ease)


def export_artifact(model_dir: Path, model: torch.nn.Module, cfg: TrainConfig, data: Dataset,
                    metrics: dict[str, Any], optimizer_state: dict[str, torch.Tensor] | None = None) -> str:
    """Write the artifact for serving: the seen set holds train, valid and test items (so /recommend never
    returns what the user already did) and the stored histories end with them too. `optimizer_state`: Adam's
    moments at the end of the run (engine.adam_state_by_name), which `ncf-ray update` resumes."""
    from ncf_ray.artifact import FEATURES_DIR, save_artifact, vocab_table

    all_users, all_items, hist = training_positives(data, refit=True)
    seen_indptr, seen_indices = build_csr(all_users.numpy(), all_items.numpy(), data.n_users)
    return save_artifact(
        model_dir, model, cfg.model, data.n_users, data.n_items,
        vocab_table(data.user_ids, np.bincount(data.train_users, minlength=data.n_users), S.USER_IDX, S.USER_COL),
        vocab_table(data.item_ids, data.item_counts, S.ITEM_IDX, S.ITEM_COL),
        seen_indptr, seen_indices, data.item_counts.astype(np.float64), metrics, data.meta,
        histories=hist, features_dir=Path(data.path) / FEATURES_DIR if cfg.model.features else None,
        optimizer_state=optimizer_state,
    )


def run_training(
    dataset_dir: str, out_dir: str, cfg: TrainConfig, resume: bool = False, storage_path: str | None = None,
    placement_strategy: str = "PACK", refit: bool = False, baselines: bool = True,
) -> dict[str, Any]:
    """Train on Ray, export RUN_DIR/model, write RUN_DIR/metrics.json; returns the metrics dict.
    `storage_path` (local dir or URI such as s3://...) holds checkpoints; it defaults to RUN_DIR so every node of
    a cluster needs to see RUN_DIR (NFS) unless a URI is given. Each run has its own Ray Train name (see
    `resolve_run`), so a second run on the same storage starts afresh unless `resume`."""

    if cfg.model.name in CLOSED_FORM:  # ease, pop: no epochs to run, nothing for Ray Train to do
        from ncf_ray.baselines import fit_closed_form

        return fit_closed_form(dataset_dir, out_dir, cfg, refit, baselines)
    meta = read_meta(dataset_dir)
    check_tasks(cfg.model, inputs_from_parts(meta, {}))  # before Ray starts
    if cfg.stream:
        check_streamable(cfg, refit)  # before Ray starts, not after a first run
        if meta.get("context") and cfg.model.context:
            raise UserError("--stream reads user and item ids only, not this dataset's context columns; add "
                            "--no-context or drop --stream")
    out = Path(out_dir).resolve()
    name, storage = resolve_run(out, storage_path, resume)
    with console.session(out / "logs", "train"):  # a no-op under the CLI's or the pipeline's own session
        ensure_ray()
        check_fits_cluster(cfg.workers, cfg.gpu)  # before run.json, so a refused run leaves nothing to --resume
        if not resume:
            record_run(out, name, storage)
        print(f"training {cfg.model.name} on {meta.get('n_users')} users x {meta.get('n_items')} items, "
              f"{cfg.workers} worker(s){' (GPU)' if cfg.gpu else ''}; run {name}", flush=True)
        if cfg.amp:  # said once here; each worker applies the same rule (engine.amp_dtype_for)
            _, note = engine.amp_dtype_for(True, torch.device("cuda" if cfg.gpu else "cpu"))
            if note:
                print(note, flush=True)
        t0 = time.time()
        state = fit_run(dataset_dir, cfg, storage, name, placement_strategy)
        metrics = finalize(dataset_dir, out / "model", out / "metrics.json", cfg, state, time.time() - t0,
                           baselines)
        if refit:
            metrics = refit_and_export(dataset_dir, out, cfg, metrics, storage, placement_strategy, name + "-refit")
        return metrics


def fit_run(dataset_dir: str, cfg: TrainConfig, storage: str, name: str, placement_strategy: str = "PACK",
            refit: bool = False) -> dict[str, Any]:
    """Fit one Ray Train run, printing its epoch table on this console (console.epoch_feed), and return the
    state of its last checkpoint. A worker's UserError comes back as one line; anything else keeps its trace."""
    table = console.EpochTable(cfg.epochs, cfg.eval_k, cfg.patience)
    try:
        with console.epoch_feed(table) as feed:
            trainer = build_trainer(dataset_dir, cfg, storage, name=name, placement_strategy=placement_strategy,
                                    callbacks=[feed], refit=refit)
            result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - a user mistake inside a worker becomes one line, bugs re-raise
        raise_user_error_from(exc)
        raise
    if result.error is not None:
        raise_user_error_from(result.error)
        raise RuntimeError(f"training failed: {result.error}")
    if result.checkpoint is None:
        raise UserError(f"training reported no checkpoint (epochs={cfg.epochs})")
    with result.checkpoint.as_directory() as ckpt_dir:
        return load_state(ckpt_dir)


def refit_and_export(dataset_dir: str, out: Path, cfg: TrainConfig, metrics: dict[str, Any], storage: str,
                     placement_strategy: str = "PACK", name: str = RAY_RUN_NAME + "-refit") -> dict[str, Any]:
    """Retrain the valid-selected config for its best epoch count on every interaction and export that as
    RUN_DIR/model. metrics.json keeps the valid-selected model's figures (the refit model has no held-out data
    left to score) and says which weights were exported."""
    import dataclasses

    epochs = int(metrics["best_epoch"])
    refit_cfg = dataclasses.replace(cfg, epochs=epochs, patience=epochs + 1)
    print(f"refit: {cfg.model.name} for {epochs} epoch(s) on all interactions", flush=True)
    t0 = time.time()
    state = fit_run(dataset_dir, refit_cfg, storage, name, placement_strategy, refit=True)
    data = load_dataset(dataset_dir)
    model = build_model_for(cfg.model, data.n_users, data.n_items, inputs_from_dataset(data))
    model.load_state_dict(state["best_model"])
    metrics = dict(metrics)
    metrics["exported"] = {"weights": "refit", "epochs": epochs, "train_seconds": time.time() - t0,
                           "note": "refit on train + valid + test; valid/test figures are the valid-selected "
                                   "model's, measured before the refit"}
    metrics["model_version"] = export_artifact(out / "model", model.eval(), cfg, data, metrics,
                                               engine.adam_state_by_name(model, state.get("optimizer")))
    write_json(out / "metrics.json", metrics)
    return metrics


def format_summary(m: dict[str, Any], k: int = 10) -> str:
    """The closing table: the model beside popularity and EASE (when fitted) on the same split, then segments."""
    base = m.get("baselines", {})
    cols: list[tuple[str, dict[str, Any]]] = [(m.get("model", "model"), {"valid": m["valid"], "test": m["test"]})]
    cols.append(("popularity", base.get("popularity") or m.get("popularity", {})))
    ease = base.get("ease") or {}
    if "test" in ease:
        cols.append((f"EASE l={ease.get('lambda', '?'):g}" if isinstance(ease.get("lambda"), (int, float))
                     else "EASE", ease))
    head = f"{'':<12}" + "".join(f" {name[:19]:>19}" for name, _ in cols)
    sub = f"{'':<12}" + "".join(f" {'HR@' + str(k):>9} {'NDCG@' + str(k):>9}" for _ in cols)
    lines = [head, sub]
    for label, split, prefix in (("valid", "valid", ""), ("test", "test", ""), ("test (full)", "test", "full_")):
        cells = []
        for _, block in cols:
            vals = block.get(split, {})
            hr, nd = vals.get(f"{prefix}hr@{k}"), vals.get(f"{prefix}ndcg@{k}")
            cells.append(f" {hr:>9.4f} {nd:>9.4f}" if hr is not None and nd is not None else f" {'-':>9} {'-':>9}")
        lines.append(f"{label:<12}" + "".join(cells))
    if "skipped" in ease:
        lines.append(f"EASE skipped: {ease['skipped']}")
    buy = m["test"].get("purchase") if isinstance(m.get("test"), dict) else None
    if buy:
        lines.append(f"test purchase users (n={buy['n']}, {buy['head']} head): HR@{k} {buy[f'hr@{k}']:.4f}, "
                     f"NDCG@{k} {buy[f'ndcg@{k}']:.4f}")
    new = m["test"].get("new_items") if isinstance(m.get("test"), dict) else None
    if new:
        lines.append(f"test new items among {new['candidates']} new items (n={new['n']}): HR@{k} "
                     f"{new[f'hr@{k}']:.4f}, NDCG@{k} {new[f'ndcg@{k}']:.4f} (random {new[f'random_hr@{k}']:.3f})")
    reads = m.get("inputs") or {}
    if reads.get("features") or reads.get("context") or len(reads.get("tasks", [])) > 1:
        feats = "; ".join(f"{what} {', '.join(cols)}" for what, cols in reads.get("features", {}).items())
        lines.append(f"reads: features [{feats or 'none'}], context [{', '.join(reads.get('context', []))}], "
                     f"tasks {','.join(reads.get('tasks', []))}")
    seg = m["test"].get("segments") if isinstance(m.get("test"), dict) else None
    if seg:
        parts = [f"{name} {v['hr']:.3f} (n={v['n']})" for group in seg.values() for name, v in group.items()]
        lines.append(f"test HR@{k} by segment: {', '.join(parts)}")
    if m.get("history"):
        lines.append(f"best epoch {m['best_epoch']} of {m['epochs']}, {m['train_seconds']:.1f} s, "
                     f"{m['samples_per_second']:,.0f} samples/s")
    else:
        lam = (m.get("closed_form") or {}).get("lambda")
        lines.append(f"fitted in closed form in {m['train_seconds']:.1f} s" + (f" (lambda {lam:g})" if lam else ""))
    return "\n".join(lines)
