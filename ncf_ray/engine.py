"""The one training core in plain torch: examples with fresh negatives, the lr schedule, optimiser steps, a
non-finite-loss guard and validation sums. No Ray here: the Ray Train worker loop (train.py), the plain-torch
baseline of `ncf-ray bench train` and the bare-GPU benchmark (`python -m ncf_ray.bench.gpu`) all call it.

Every tensor stays on the worker's device: positives are materialised once; each epoch draws fresh negatives and
one permutation on the device; batches are index slices of those tensors, never per-sample Python.

Two kinds of examples, chosen by the model (`history_len`):
- pairs (ID models): one row per positive with its C = 1 + negatives candidates, labels [1, 0, ..., 0];
- sequences (history models): the user's time-ordered items cut into windows of L, every position a next-item
  target with its own negatives (SASRec-style: one pass over a window trains L targets).
Both become the same `Batch` and go through the same step.

Labels are per task (`Examples.labels[task]`, the tasks of the model): click = 1 for the positive; purchase = 1
for a positive whose event code is >= `purchase_from` (the funnel index of the purchase event); negatives are 0
for every task. Context ids of a positive ([P, K]) travel with it, and its negatives share them. Sequence
windows take events and context per target position from the Histories.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncf_ray.batch import Batch, Histories
from ncf_ray.data.sampler import NegativeSampler
from ncf_ray.errors import UserError
from ncf_ray.metrics import evaluate_sampled
from ncf_ray.model import unwrap

TASK = "click"  # the first task of every model (forward's logits)


class NonFiniteLoss(UserError):
    """Training diverged: the mean loss of an epoch was NaN or infinite."""


# ------------------------------------------------------------------------------------------- schedule
def scaled_lr(lr: float, batch_size: int, base_batch_size: int) -> float:
    """Adam's learning rate grows with the square root of the batch (not linearly: Adam normalises step size),
    so `--lr` keeps meaning "the rate at base_batch_size" whatever batch the user picks."""
    return lr * math.sqrt(max(batch_size, 1) / max(base_batch_size, 1))


def lr_multiplier(progress: float, warmup: float, total: float) -> float:
    """Linear warm-up over `warmup` epochs, then cosine decay to 10% at `total` epochs. `progress` is fractional
    epochs done. Warm-up keeps large-batch Adam from blowing up the freshly initialised embeddings."""
    if warmup > 0 and progress < warmup:
        return 0.1 + 0.9 * progress / warmup
    span = max(total - warmup, 1e-9)
    t = min(max((progress - warmup) / span, 0.0), 1.0)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t))


def schedule(lr0: float, epoch: int, steps: int, warmup: float, total: float) -> Callable[[int], float]:
    """The learning rate of each step of `epoch` (of `steps` steps): the one schedule every loop uses."""
    return lambda step: lr0 * lr_multiplier(epoch + min(step / max(steps, 1), 1.0), warmup, total)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam with coupled L2 (the embeddings' regulariser). Fused kernels on CUDA, foreach on CPU."""
    extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, **extra)


ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


def adam_state_by_name(model: nn.Module, optimizer_state: dict | None) -> dict[str, Tensor]:
    """Adam's per-parameter state (an `optimizer.state_dict()` over `model.parameters()`) keyed by parameter name,
    "<name>.exp_avg" / ".exp_avg_sq" / ".step", on the CPU: what an artifact keeps so that an update resumes the
    moments instead of starting Adam afresh ({} without state)."""
    if not optimizer_state or not optimizer_state.get("state"):
        return {}
    ids = [i for group in optimizer_state["param_groups"] for i in group["params"]]
    out: dict[str, Tensor] = {}
    for pid, (name, _) in zip(ids, unwrap(model).named_parameters()):
        st = optimizer_state["state"].get(pid)
        if st and all(k in st for k in ADAM_KEYS):
            for k in ADAM_KEYS:
                out[f"{name}.{k}"] = torch.as_tensor(st[k]).detach().cpu().contiguous()
    return out


def load_adam_state(optimizer: torch.optim.Optimizer, model: nn.Module, named: dict[str, Tensor]) -> int:
    """Put `adam_state_by_name` entries into a fresh Adam over `model`; returns how many parameters got them.

    A parameter whose saved moments have fewer rows (a vocab grown by an update) keeps them for its old rows; its
    new rows start with zero first moments and the column mean of the old rows' second moments, so they step like
    an average row (with the saved step count, zero second moments would skip Adam's bias correction and give a
    new row steps several times the lr). A parameter without saved state, or with another shape, starts fresh."""
    if not named:
        return 0
    sd = optimizer.state_dict()
    ids = [i for group in sd["param_groups"] for i in group["params"]]
    state: dict[int, dict[str, Tensor]] = {}
    for pid, (name, p) in zip(ids, unwrap(model).named_parameters()):
        m, v, step = (named.get(f"{name}.{k}") for k in ADAM_KEYS)
        if m is None or v is None or step is None or m.shape != v.shape:
            continue
        if m.shape != p.shape:
            if m.dim() == 0 or m.shape[1:] != p.shape[1:] or m.shape[0] > p.shape[0]:
                continue
            extra = p.shape[0] - m.shape[0]
            m = torch.cat([m, m.new_zeros((extra, *m.shape[1:]))])
            v = torch.cat([v, v.mean(0, keepdim=True).expand(extra, *v.shape[1:])])
        state[pid] = {"step": step.clone(), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    sd["state"] = state
    optimizer.load_state_dict(sd)  # moves and casts the moments to each parameter's device and dtype
    return len(state)


def amp_dtype_for(amp: bool, device: torch.device) -> tuple[torch.dtype | None, str]:
    """bf16 autocast where it pays: on CUDA, and on CPUs with bf16 matmul units; else None with the reason."""
    if not amp:
        return None, ""
    if device.type == "cuda":
        return torch.bfloat16, ""
    from ncf_ray.scoring import bf16_is_fast

    if bf16_is_fast(device):
        return torch.bfloat16, ""
    return None, f"--amp ignored: no bf16 matmul units on {device.type}; training in fp32"


# ------------------------------------------------------------------------------------------- examples
@dataclass
class Examples:
    """One epoch's training examples on the device, as rows of a future Batch (already shuffled).
    `per_row` is the number of scored candidates in a row (loss terms), so rows_per_step = batch_size // per_row."""

    user: Tensor  # [R]
    item: Tensor  # [R, C] or [R, L, C]
    labels: dict[str, Tensor]  # task -> like item
    history: Tensor | None = None  # [R, L]
    mask: Tensor | None = None  # [R, L]
    context: Tensor | None = None  # [R, K] or [R, L, K] (per target)

    def __len__(self) -> int:
        return int(self.user.numel())

    @property
    def per_row(self) -> int:
        return int(self.item[0].numel()) if len(self) else 1

    def batch(self, start: int, size: int) -> Batch:
        """Rows start..start+size, wrapping around at the end (a data-parallel peer with more data takes more
        steps; every rank must take as many)."""
        n = len(self)
        if start + size <= n:
            sl: slice | Tensor = slice(start, start + size)
        else:
            sl = torch.arange(start, start + size, device=self.user.device) % n
        return Batch(user=self.user[sl], item=self.item[sl], labels={k: v[sl] for k, v in self.labels.items()},
                     history=None if self.history is None else self.history[sl],
                     mask=None if self.mask is None else self.mask[sl],
                     context=None if self.context is None else self.context[sl])


def task_labels(shape: torch.Size, tasks: tuple[str, ...], events: Tensor | None, purchase_from: int | None,
                device: torch.device) -> dict[str, Tensor]:
    """{task: labels [..., C]} with the positive in candidate 0 of each row: click 1, purchase 1 where the
    positive's event (shaped like the leading dims) is >= purchase_from, every negative 0."""
    out = {}
    for task in tasks:
        labels = torch.zeros(shape, device=device)
        if task == "click":
            labels[..., 0] = 1.0
        elif task == "purchase":
            if events is None or purchase_from is None:
                raise UserError("a purchase task needs events in the data and purchase_from (the purchase event's "
                                f"index); got events={'none' if events is None else 'given'}, "
                                f"purchase_from={purchase_from}")
            labels[..., 0] = (events.to(device) >= purchase_from).float()
        else:
            raise UserError(f"task={task!r} has no labels (known: click, purchase)")
        out[task] = labels
    return out


def pair_examples(users: Tensor, items: Tensor, sampler: NegativeSampler, negatives: int,
                  generator: torch.Generator | None = None, *, events: Tensor | None = None,
                  context: Tensor | None = None, purchase_from: int | None = None,
                  tasks: tuple[str, ...] = (TASK,)) -> Examples:
    """Each positive with `negatives` fresh negatives: item [P, 1 + n] (the positive first), shuffled rows;
    labels per task (see task_labels), context [P, K] carried along (the negatives share it)."""
    neg = sampler.sample(users, negatives, generator=generator)
    cand = torch.cat([items[:, None], neg], 1)
    labels = task_labels(cand.shape, tasks, events, purchase_from, cand.device)
    perm = torch.randperm(users.numel(), device=users.device, generator=generator)
    return Examples(users[perm], cand[perm], {k: v[perm] for k, v in labels.items()},
                    context=None if context is None else context.to(users.device)[perm])


def sequence_windows(hist: Histories, users: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """Training windows of `users`' rows: each row of n items is cut from its end into windows of `length`
    targets. Returns (window user [W], input CSR end [W], target mask [W, L]); inputs are items[end - L : end]
    right-aligned, the targets the items one position later."""
    users = users.long()
    start, stop = hist.indptr[users], hist.indptr[users + 1]
    targets = (stop - start - 1).clamp(min=0)  # the first item has no history to predict it from
    n_windows = torch.div(targets + length - 1, length, rounding_mode="floor")
    w_user = torch.repeat_interleave(users, n_windows)
    # Window j of a user (j = 0 the latest) ends its input at stop - 1 - j * L.
    first = torch.cumsum(n_windows, 0) - n_windows
    j = torch.arange(w_user.numel(), device=users.device) - torch.repeat_interleave(first, n_windows)
    ends = torch.repeat_interleave(stop, n_windows) - 1 - j * length
    idx = ends[:, None] - length + torch.arange(length, device=users.device)
    mask = idx >= hist.indptr[w_user][:, None]
    return w_user, ends, mask


def sequence_examples(hist: Histories, users: Tensor, length: int, sampler: NegativeSampler, negatives: int,
                      generator: torch.Generator | None = None, *, purchase_from: int | None = None,
                      tasks: tuple[str, ...] = (TASK,)) -> Examples:
    """Windows of `users`' histories, every position a target with `negatives` fresh negatives:
    history [W, L], item [W, L, 1 + n], mask [W, L] (False = padding, no loss); labels per task from the
    targets' events (hist.events), context [W, L, K] of each target (hist.context) when the CSR carries it."""
    w_user, ends, mask = sequence_windows(hist, users, length)
    history = hist.windows(ends, w_user, length)
    idx = (ends[:, None] - length + 1 + torch.arange(length, device=ends.device)).clamp(min=0)
    idx = idx.clamp(max=max(hist.items.numel() - 1, 0))
    target = hist.items[idx]
    rows = w_user[:, None].expand(-1, length).reshape(-1)
    neg = sampler.sample(rows, negatives, generator=generator).view(len(w_user), length, negatives)
    cand = torch.cat([target[..., None], neg], -1)
    events = None if hist.events is None or hist.events.numel() == 0 else hist.events[idx]
    labels = task_labels(cand.shape, tasks, events, purchase_from, cand.device)
    context = None if hist.context is None or hist.context.shape[0] == 0 else hist.context[idx]
    perm = torch.randperm(len(w_user), device=ends.device, generator=generator)
    return Examples(w_user[perm], cand[perm], {k: v[perm] for k, v in labels.items()}, history[perm], mask[perm],
                    None if context is None else context[perm])


def make_examples(model: nn.Module, users: Tensor, items: Tensor, hist: Histories | None,
                  sampler: NegativeSampler, negatives: int, generator: torch.Generator | None = None,
                  events: Tensor | None = None, context: Tensor | None = None,
                  purchase_from: int | None = None) -> Examples:
    """The examples `model` trains on: sequence windows of the users' histories for models that read history
    (`history_len` > 0; events/context then come from `hist`), else one row per positive (users[j], items[j])
    with its events[j] and context[j]. Labels for each of the model's tasks; purchase_from is the event index
    from which a positive counts as a purchase."""
    net = unwrap(model)
    tasks = tuple(getattr(net, "tasks", (TASK,)))
    length = int(getattr(net, "history_len", 0))
    if length > 0:
        if hist is None:
            raise ValueError("a history model needs the users' histories to build examples")
        return sequence_examples(hist, torch.unique(users), length, sampler, negatives, generator,
                                 purchase_from=purchase_from, tasks=tasks)
    return pair_examples(users, items, sampler, negatives, generator, events=events, context=context,
                         purchase_from=purchase_from, tasks=tasks)


def rows_per_step(batch_size: int, examples: Examples) -> int:
    """Rows of `examples` in one step of `batch_size` scored candidates (at least one row)."""
    return max(1, batch_size // max(examples.per_row, 1))


def steps_for(n_rows: int, rows: int) -> int:
    return max(1, math.ceil(n_rows / max(rows, 1)))


# ------------------------------------------------------------------------------------------- steps
def _bce(logits: Tensor, labels: Tensor, mask: Tensor | None) -> Tensor:
    """Mean binary cross-entropy of the candidates (padding positions of sequence windows excluded)."""
    if mask is None:
        return F.binary_cross_entropy_with_logits(logits.float(), labels)
    weight = mask[..., None].expand_as(labels).float()
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels, weight=weight, reduction="sum")
    return loss / weight.sum().clamp(min=1.0)


def batch_loss(model: nn.Module, batch: Batch, amp_dtype: torch.dtype | None = None,
               task_weights: dict[str, float] | None = None) -> Tensor:
    """Mean binary cross-entropy of the batch's candidates; for a multi-task model the sum over its tasks of
    task_weights[task] (default 1) times that task's mean BCE. Multi-task logits come through
    `model(batch, all_tasks=True)`, so DDP / compile wrappers see an ordinary forward call."""
    device = batch.user.device
    tasks = tuple(getattr(unwrap(model), "tasks", (TASK,)))
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(batch) if len(tasks) == 1 else model(batch, all_tasks=True)
    if len(tasks) == 1:
        return _bce(logits, batch.labels[tasks[0]], batch.mask)
    weights = task_weights or {}
    return sum(float(weights.get(t, 1.0)) * _bce(logits[t], batch.labels[t], batch.mask) for t in tasks)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    examples: Examples,
    rows: int,
    steps: int | None = None,
    lr_for_step: Callable[[int], float] | None = None,
    amp_dtype: torch.dtype | None = None,
    epoch: int = 0,
    task_weights: dict[str, float] | None = None,
) -> float:
    """`steps` optimiser steps over `rows`-row slices of `examples` (wrapping around). Returns the mean loss;
    raises NonFiniteLoss when it is NaN or infinite (one host sync per epoch, not per step)."""
    model.train()
    steps = steps or steps_for(len(examples), rows)
    total = torch.zeros((), device=examples.user.device)
    lr = optimizer.param_groups[0]["lr"]
    for step in range(steps):
        if lr_for_step is not None:
            lr = lr_for_step(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
        loss = batch_loss(model, examples.batch((step * rows) % max(len(examples), 1), rows), amp_dtype,
                          task_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    mean = float(total) / steps
    check_finite(mean, epoch, float(lr))
    return mean


def check_finite(loss: float, epoch: int, lr: float) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"training loss became {loss} at epoch {epoch + 1} (lr {lr:.3g}): lower --lr")


class GraphedStep:
    """The whole train step (forward, loss, backward, fused Adam) captured once as a CUDA graph and replayed:
    per step the host only copies the batch into static buffers and sets the lr tensor, so launch overhead
    vanishes. Needs fixed-size batches (Examples.batch wraps around) and an optimiser built with
    `capturable=True` and a tensor lr (see `graph_optimizer`). CUDA only. Multi-task models and context
    capture the same way (every task's labels and the context are static buffers too)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, warmup: Batch,
                 amp_dtype: torch.dtype | None, task_weights: dict[str, float] | None = None) -> None:
        self.model, self.optimizer, self.amp_dtype = model, optimizer, amp_dtype
        self.static = Batch(user=warmup.user.clone(), item=warmup.item.clone(),
                            labels={k: v.clone() for k, v in warmup.labels.items()},
                            history=None if warmup.history is None else warmup.history.clone(),
                            mask=None if warmup.mask is None else warmup.mask.clone(),
                            context=None if warmup.context is None else warmup.context.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream (allocator, cuBLAS handles), as the docs advise
            for _ in range(3):
                optimizer.zero_grad(set_to_none=True)
                batch_loss(model, self.static, amp_dtype, task_weights).backward()
                optimizer.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.loss = batch_loss(model, self.static, amp_dtype, task_weights)
            self.loss.backward()
            optimizer.step()

    def run(self, batch: Batch, lr: float) -> Tensor:
        s = self.static
        s.user.copy_(batch.user)
        s.item.copy_(batch.item)
        for k, v in batch.labels.items():
            s.labels[k].copy_(v)
        if s.history is not None:
            s.history.copy_(batch.history)
        if s.mask is not None:
            s.mask.copy_(batch.mask)
        if s.context is not None:
            s.context.copy_(batch.context)
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)  # a device tensor: no host sync, captured by the graph
        self.graph.replay()
        return self.loss


def graph_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """The Adam of `build_optimizer`, capturable, with the lr as a device tensor (for GraphedStep)."""
    return torch.optim.Adam(model.parameters(), lr=torch.tensor(lr, device=device), weight_decay=weight_decay,
                            fused=True, capturable=True)


def train_epoch_graphed(stepper: GraphedStep, examples: Examples, rows: int, steps: int,
                        lr_for_step: Callable[[int], float], epoch: int = 0) -> float:
    """train_epoch through a captured CUDA graph (same slicing, schedule and guard)."""
    total = torch.zeros((), device=examples.user.device)
    lr = 0.0
    for step in range(steps):
        lr = lr_for_step(step)
        total += stepper.run(examples.batch((step * rows) % len(examples), rows), lr)
    mean = float(total) / steps
    check_finite(mean, epoch, lr)
    return mean


def negative_pool(items: Tensor, n_items: int) -> Tensor | None:
    """The items negatives are drawn from: those among the training positives when some catalogue items have
    none (new items of a shop log, released after the training window), else None (the whole catalogue)."""
    present = torch.unique(items)
    return present if present.numel() < n_items else None


def fit_plain(
    model: nn.Module, users: Tensor, items: Tensor, n_items: int, epochs: int, *, negatives: int = 4,
    batch_size: int = 8192, lr: float = 2e-3, base_batch_size: int = 1024, warmup_epochs: float = 1.0,
    weight_decay: float = 0.0, hist: Histories | None = None, generator: torch.Generator | None = None,
    amp_dtype: torch.dtype | None = None, events: Tensor | None = None, context: Tensor | None = None,
    purchase_from: int | None = None, task_weights: dict[str, float] | None = None,
) -> list[dict[str, float]]:
    """The single-process loop: the worker loop's recipe (examples, schedule, steps) without Ray or DDP, for
    the plain-torch baseline of `ncf-ray bench train`, tests and experiments. Returns per-epoch loss and
    samples/s of the optimiser steps (negatives are drawn before the timer, as the Ray worker times it)."""
    device = users.device
    sampler = NegativeSampler(users, items, n_items, pool=negative_pool(items, n_items))
    lr0 = scaled_lr(lr, batch_size, base_batch_size)
    optimizer = build_optimizer(model, lr0, weight_decay, device)
    out = []
    for epoch in range(epochs):
        examples = make_examples(model, users, items, hist, sampler, negatives, generator, events, context,
                                 purchase_from)
        rows = rows_per_step(batch_size, examples)
        steps = steps_for(len(examples), rows)
        with Timer(device) as t:
            loss = train_epoch(model, optimizer, examples, rows, steps,
                               schedule(lr0, epoch, steps, warmup_epochs, epochs), amp_dtype, epoch, task_weights)
        out.append({"epoch": epoch + 1, "loss": loss, "seconds": t.seconds,
                    "samples_per_second": steps * rows * examples.per_row / max(t.seconds, 1e-9)})
    return out


# ------------------------------------------------------------------------------------------- validation
def sampled_sums(
    model: nn.Module, users: Tensor, pos_items: Tensor, neg_items: Tensor, k: int,
    histories: Histories | None = None, context: Tensor | None = None, task: str | None = None,
) -> Tensor:
    """[hit_sum, ndcg_sum, n] of the leave-one-out protocol on the users' device: sums, not means, so
    data-parallel ranks can all-reduce them. `context` [n, K]: each held-out event's context; `task`: the head
    to rank by (None: the model's first)."""
    sums = evaluate_sampled(model, users, pos_items, neg_items, k=k, reduce=False, histories=histories,
                            context=context, task=task)
    return torch.tensor([sums["hit_sum"], sums["ndcg_sum"], sums["n"]], dtype=torch.float64, device=users.device)


class Timer:
    """Wall-clock seconds that respect asynchronous CUDA work."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> Timer:
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self.start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
