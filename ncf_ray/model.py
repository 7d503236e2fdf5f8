"""Every model family on one contract, pure torch: GMF, MLP, NeuMF (He et al., WWW 2017), MF with biases (Rendle
et al. 2020), and a registry name -> class.

A model reads a `Batch` (ncf_ray/batch.py) and splits its score into three parts:

    user_repr(batch)   -> U [B, D]     everything about the user (id embedding; attention over history; features)
    item_repr(items)   -> I [..., D]   everything about an item; `item_repr(None)` is the whole catalogue [M, D],
                                       cached in eval mode, so serving computes it once per model
    head(U, I)         -> logits       broadcasts over leading dims: U [B, D] with I [B, D] gives [B]; U[:, None]
                                       with I [B, C, D] gives [B, C]
    forward(batch) = head(user_repr(batch), item_repr(batch.item)); score_all(U, I) -> [B, M] scores a user batch
    against a whole item set without per-pair Python, chunked so the widest tensor stays cache-sized.

NeuMF and MLP fold the tower's first layer into the representations: Linear(concat[p_u, q_i]) = W_u p_u + W_i q_i + b,
so U carries W_u p_u and I carries W_i q_i + b, and scoring all items never builds a [B*M, layers[0]] concat. The
tower head (`tower_logits`) is a function of (U, I) and is shared with other families that want NeuMF's head. GMF
and MF are dot products of their representations (MF folds its biases into U and I), which keeps them open to
ANN retrieval over `item_repr`.

Side features, context, multi-task (all optional; without them a model is exactly the ID-only single-task one):
- `item_features` / `user_features` (batch.FeatureTable): every id embedding of that side is a FeaturedEmbedding,
  id embedding (zeroed per row with prob `id_dropout` in training) + masked mean of the entity's feature
  embeddings (+ a projection of its dense vector). An item never seen in training is scored from its features.
- `n_context_ids` > 0: the pooled embedding of batch.context [B, K] (0 = unknown, None = all unknown) joins the
  user representation.
- `tasks=("click", "purchase")`: one logit per task from the family's interaction vector (`interaction(U, I)`:
  U*I for dot families, [GMF product ; tower output] for NeuMF/MLP), through one linear head per task
  (`task_mixture="shared"`) or `experts` small MLP experts mixed by a softmax gate per task ("mmoe").
  forward() is the logit of tasks[0] (click); forward_tasks() gives every task's.

Parameter names are those of the earlier `model(users, items)` classes, so their artifacts load unchanged; a test
pins each model's logits on a seeded batch. Feature tables are non-persistent buffers: the state_dict holds
weights only (the tables travel in the artifact's features/). Config never reaches inside: `build_model` takes
flat args.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncf_ray.batch import Batch, FeatureTable
from ncf_ray.errors import UserError

if TYPE_CHECKING:
    from ncf_ray.config import ModelConfig

# score_all works on chunks of users so that the [chunk, M, width] hidden tensor stays near this many elements
# (4 MiB of float32): big enough for fast matmuls, small enough to stay in cache between the tower's layers.
SCORE_CHUNK_ELEMENTS = 1 << 20
# A GPU wants few, large launches: with the CPU budget an ML-20M-size tower would score ~1 user per launch.
GPU_SCORE_CHUNK_ELEMENTS = 1 << 28


def chunk_users(n_items: int, width: int, device: torch.device, cpu_elements: int = 0) -> int:
    """Users per scoring chunk so a [users, n_items, width] tensor stays near the device's element budget
    (`cpu_elements` overrides the CPU budget; score_all and the serving scorer share this rule)."""
    budget = (cpu_elements or SCORE_CHUNK_ELEMENTS) if device.type == "cpu" else GPU_SCORE_CHUNK_ELEMENTS
    return max(1, budget // max(1, n_items * width))


# ------------------------------------------------------------------------------------------------ init
def init_embedding(emb: nn.Embedding) -> None:
    # Paper: embeddings drawn from N(0, 0.01).
    nn.init.normal_(emb.weight, mean=0.0, std=0.01)


def init_hidden(linear: nn.Linear) -> None:
    # Paper's Keras code: Glorot-uniform hidden layers, zero biases.
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)


def init_prediction(linear: nn.Linear) -> None:
    # Paper: LeCun-uniform prediction layer (Kaiming-uniform with gain 1 == U(+-sqrt(3 / fan_in))).
    nn.init.kaiming_uniform_(linear.weight, nonlinearity="sigmoid")
    nn.init.zeros_(linear.bias)


def check_sizes(n_users: int, n_items: int) -> None:
    if n_users <= 0 or n_items <= 0:
        raise UserError(f"n_users={n_users} and n_items={n_items} must be > 0")


def check_factors(factors: int) -> None:
    if factors <= 0:
        raise UserError(f"factors={factors} must be > 0")


def check_layers(layers: Sequence[int], dropout: float) -> tuple[int, ...]:
    layers = tuple(int(w) for w in layers)
    if not layers or any(w <= 0 for w in layers):
        raise UserError(f"mlp layers={list(layers)} must be non-empty and all > 0")
    if layers[0] % 2:
        raise UserError(f"mlp layers[0]={layers[0]} must be even (it is user+item embedding width)")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout={dropout} must be in [0, 1)")
    return layers


TASKS = ("click", "purchase")
TASK_MIXTURES = ("shared", "mmoe")


def check_tasks(tasks: Sequence[str], task_mixture: str, experts: int) -> tuple[str, ...]:
    tasks = tuple(str(t) for t in tasks) or ("click",)
    if tasks[0] != "click" or len(set(tasks)) != len(tasks) or any(t not in TASKS for t in tasks):
        raise UserError(f"tasks={list(tasks)} must start with click and name each of {', '.join(TASKS)} at most once")
    if task_mixture not in TASK_MIXTURES:
        raise UserError(f"task_mixture={task_mixture!r} is not one of {', '.join(TASK_MIXTURES)}")
    if experts <= 0:
        raise UserError(f"experts={experts} must be > 0")
    return tasks


def check_id_dropout(id_dropout: float) -> float:
    if not 0.0 <= id_dropout <= 1.0:
        raise UserError(f"id_dropout={id_dropout} must be in [0, 1]")
    return float(id_dropout)


# ------------------------------------------------------------------------------------------------ features
class _PoolAll(torch.autograd.Function):
    """pooled = M @ W for the fixed sparse pooling matrix M [rows, n_ids] of a feature table, with M^T
    precomputed: the backward is one sparse matmul, where autograd's own (or embedding_bag's) would transpose
    or sort the ids again every step (measured 10-50x slower on CPU at ML-1M sizes)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, m: Tensor, mt: Tensor) -> Tensor:
        ctx.mt = mt
        with torch.autocast(weight.device.type, enabled=False):  # sparse kernels run in fp32 under AMP too
            return m @ weight.float()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        with torch.autocast(grad.device.type, enabled=False):
            return ctx.mt @ grad.float().contiguous(), None, None


def pooling_matrix(ids: Tensor, n_ids: int) -> tuple[Tensor, Tensor]:
    """The sparse [rows, n_ids] matrix M of a masked mean (row r has 1 / (real ids of r) at each of its real
    ids) and its transpose, both CSR: CSR @ dense runs MKL / cuSPARSE kernels, ~5x COO's on CPU."""
    import warnings

    n, slots = ids.shape
    flat = ids.reshape(-1)
    real = flat > 0
    rows = torch.arange(n, device=ids.device).repeat_interleave(slots)[real]
    weight = (1.0 / (ids > 0).sum(1).clamp(min=1).float()).repeat_interleave(slots)[real]
    m = torch.sparse_coo_tensor(torch.stack([rows, flat[real]]), weight, (n, max(n_ids, 1)),
                                check_invariants=True).coalesce()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return m.to_sparse_csr(), m.t().coalesce().to_sparse_csr()


class FeaturePool(nn.Module):
    """The pooled side features of an entity table: masked mean of the embeddings of each row's non-padding
    ids (one nn.Embedding over the table's global id space, padding_idx 0) plus a bias-free projection of its
    dense vector. forward(rows [...]) -> [..., dim]; a negative row (unknown user, sequence padding) gives zeros.

    The table is a non-persistent buffer (it is data, not weights), and it is fixed, so the catalogue cache of
    item_repr stays valid. The sparse pooling matrices derived from it are a per-device cache outside the
    module's buffers (DDP broadcasts buffers, and cannot broadcast sparse tensors)."""

    def __init__(self, table: FeatureTable, dim: int) -> None:
        super().__init__()
        self.n_rows = table.n_rows
        self.emb = nn.Embedding(max(table.n_ids, 1), dim, padding_idx=0)
        init_embedding(self.emb)
        with torch.no_grad():
            self.emb.weight[0].zero_()
        ids = table.ids.long()
        self.register_buffer("ids", ids, persistent=False)
        # Masked mean: divide the sum over slots by the number of real (non-padding) ids, at least 1.
        self.register_buffer("inv_count", 1.0 / (ids > 0).sum(1, keepdim=True).clamp(min=1).float(), persistent=False)
        self.n_ids = max(table.n_ids, 1)
        self.proj = nn.Linear(table.dense_dim, dim, bias=False) if table.dense_dim else None
        self.register_buffer("dense", None if table.dense is None else table.dense.float(), persistent=False)

    def pooling_matrices(self) -> tuple[Tensor, Tensor]:
        """(M, M^T) on the table's current device, built on first use there."""
        key = (self.ids.device, self.ids.data_ptr())
        cache = self.__dict__.get("_pooling")
        if cache is None or cache[0] != key:
            cache = (key, pooling_matrix(self.ids, self.n_ids))
            self.__dict__["_pooling"] = cache
        return cache[1]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_pooling", None)  # derived, per device: rebuilt on first use
        return state

    def pooled_all(self) -> Tensor:
        """[n_rows, dim] of every row (one sparse matmul forward and backward)."""
        out = _PoolAll.apply(self.emb.weight, *self.pooling_matrices())
        if self.proj is not None:
            out = out + self.proj(self.dense)
        return out

    def pools_all(self, lookups: int) -> bool:
        """Whether `lookups` rows are better served by pooling the whole table: when they cover a good part of
        it (a training batch, the catalogue), one sparse matmul per step stops the cost growing with the batch,
        and its backward is a matmul instead of embedding_bag's sort of every looked-up id."""
        return 4 * lookups >= self.n_rows

    def pooled(self, rows: Tensor) -> Tensor:
        """[R, dim] of table rows [R] (all >= 0)."""
        if self.ids.shape[1]:
            out = F.embedding_bag(self.ids[rows], self.emb.weight, mode="sum", padding_idx=0) * self.inv_count[rows]
        else:
            out = self.emb.weight.new_zeros((rows.numel(), self.emb.embedding_dim))
        if self.proj is not None:
            out = out + self.proj(self.dense[rows])
        return out

    def forward(self, rows: Tensor, may_be_negative: bool = True) -> Tensor:
        """[..., dim] of table rows [...]; may_be_negative=False skips the unknown-row mask (ids an
        nn.Embedding just looked up are never negative)."""
        flat = rows.reshape(-1)
        safe = flat.clamp(min=0) if may_be_negative else flat
        if self.pools_all(flat.numel()):
            out = F.embedding(safe, self.pooled_all())
        else:
            out = self.pooled(safe)
        if may_be_negative:
            out = out * (flat >= 0)[:, None].to(out.dtype)
        return out.view(*rows.shape, -1)


class ContextPool(nn.Module):
    """Masked mean of the embeddings of a context row's known ids: [..., K] -> [..., dim] (0 = unknown)."""

    def __init__(self, n_ids: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_ids, dim, padding_idx=0)
        init_embedding(self.emb)
        with torch.no_grad():
            self.emb.weight[0].zero_()

    def forward(self, context: Tensor) -> Tensor:
        context = context.long()
        flat = context.reshape(-1, context.shape[-1])
        # embedding_bag's padding_idx drops unknown ids from the sum whatever row 0 holds.
        summed = F.embedding_bag(flat, self.emb.weight, mode="sum", padding_idx=0)
        count = (flat > 0).sum(-1, keepdim=True).clamp(min=1)
        return (summed / count).view(*context.shape[:-1], -1)


class FeaturedEmbedding(nn.Embedding):
    """An nn.Embedding of entity ids (same `weight`, so an ID-only model's parameter names and logits are
    unchanged) that can add the entity's pooled side features and, on the user side, the pooled context:

        out = (weight * keep)[idx] + features(idx - shift) + context_pool(context)

    keep ~ Bernoulli(1 - id_dropout) per table row (entity) and forward call in training, 1 in eval: every lookup
    of a dropped entity in that call is scored from its features alone. Per row rather than per lookup so the
    id and feature tables are summed first and gathered once (one backward pass over the lookups). Id dropout
    applies only where a feature table exists (it teaches the model to score from features, which cold entities
    are left with).
    `shift`: how far idx is from the table row (1 for the sequence model's item_idx + 1 ids, 0 = padding)."""

    def __init__(self, n: int, dim: int, table: FeatureTable | None = None, id_dropout: float = 0.0,
                 n_context_ids: int = 0, shift: int = 0, padding_idx: int | None = None) -> None:
        super().__init__(n, dim, padding_idx=padding_idx)
        if table is not None and table.n_rows != n - shift:
            raise UserError(f"feature table has {table.n_rows} rows but the model has {n - shift} entities "
                            "(built from another dataset?)")
        self.id_dropout = check_id_dropout(id_dropout) if table is not None else 0.0
        self.shift = int(shift)
        self.features = FeaturePool(table, dim) if table is not None else None
        self.context = ContextPool(n_context_ids, dim) if n_context_ids > 0 else None

    def keep_rows(self) -> Tensor | None:
        """[n] bool: which entities keep their id embedding in this call (None: all of them)."""
        if not self.training or self.id_dropout <= 0.0:
            return None
        return torch.rand(self.num_embeddings, device=self.weight.device) >= self.id_dropout

    def forward(self, idx: Tensor, context: Tensor | None = None, keep_rows: Tensor | None = None) -> Tensor:
        """[..., dim] of ids idx [...]; `keep_rows` (from keep_rows()) lets a caller drop other id parameters of
        the same entities together with these (MF's biases)."""
        if self.features is None and self.context is None:
            return super().forward(idx)
        keep_rows = self.keep_rows() if keep_rows is None else keep_rows
        keep = None if keep_rows is None else keep_rows[:, None].to(self.weight.dtype)
        if self.features is not None and self.features.pools_all(idx.numel()):
            pooled = self.features.pooled_all()
            if self.shift:
                pooled = F.pad(pooled, (0, 0, self.shift, 0))  # rows below shift: no features
            # One pass over the table: pooled + weight (* keep), then one gather.
            table = pooled + self.weight if keep is None else torch.addcmul(pooled, self.weight, keep)
            out = F.embedding(idx, table, self.padding_idx)
        else:
            weight = self.weight if keep is None else self.weight * keep
            out = F.embedding(idx, weight, self.padding_idx)
            if self.features is not None:
                out = out + self.features(idx - self.shift, may_be_negative=self.shift > 0)
        if self.context is not None and context is not None:
            out = out + self.context(context)
        return out


# ------------------------------------------------------------------------------------------------ task heads
class TaskHeads(nn.Module):
    """One logit per task from a family's interaction vector z [..., W]: `shared` = one Linear(W, 1) per task;
    `mmoe` (Ma et al., KDD 2018) = `experts` small ReLU experts over z, mixed per task by a softmax gate over z,
    then that task's Linear."""

    def __init__(self, width: int, tasks: tuple[str, ...], mixture: str, experts: int) -> None:
        super().__init__()
        self.tasks, self.mixture = tasks, mixture
        if mixture == "mmoe":
            self.experts = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(experts))
            self.gates = nn.ModuleDict({t: nn.Linear(width, experts) for t in tasks})
            for expert in self.experts:
                init_hidden(expert[0])
        self.out = nn.ModuleDict({t: nn.Linear(width, 1) for t in tasks})
        for lin in self.out.values():
            init_prediction(lin)

    def forward(self, z: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        tasks = tuple(tasks or self.tasks)
        # A purchase is a click followed by a conversion: its logit needs the click head's too.
        needed = tuple(dict.fromkeys((CLICK, *tasks) if PURCHASE in tasks else tasks))
        if self.mixture == "shared":
            raw = {t: self.out[t](z)[..., 0] for t in needed}
        else:
            e = torch.stack([expert(z) for expert in self.experts], -2)  # [..., E, W]
            raw = {}
            for t in needed:
                gate = torch.softmax(self.gates[t](z), -1)
                raw[t] = self.out[t]((gate[..., None] * e).sum(-2))[..., 0]
        if PURCHASE in raw:
            raw[PURCHASE] = funnel_logit(raw[CLICK], raw[PURCHASE])
        return {t: raw[t] for t in tasks}


CLICK, PURCHASE = "click", "purchase"


def funnel_logit(click: Tensor, conversion: Tensor) -> Tensor:
    """The logit of p(purchase) = p(click) * p(purchase | click) = sigmoid(click) * sigmoid(conversion), as in
    ESMM (Ma et al., SIGIR 2018): the purchase head ranks by "likely to click and then buy", trained with the
    purchase labels over every example (the entire space), so the rare purchases refine the click ranking instead
    of relearning it from 1/10 the positives. Computed in log space: logit = log p - log(1 - p)."""
    log_p = (F.logsigmoid(click.float()) + F.logsigmoid(conversion.float())).clamp(max=-1e-7)
    return (log_p - torch.log(-torch.expm1(log_p))).to(click.dtype)


# ------------------------------------------------------------------------------------------------ base
class RecModel(nn.Module):
    """The contract every family implements (see the module docstring). Subclasses set n_users, n_items and
    `history_len` (> 0: the batch must carry the user's last history_len items) and define user_repr,
    _item_repr, _head (the single-task logit) and interaction (the vector multi-task heads read); _score_all has
    a chunked default that dot-product models replace with one matmul. `_init_side` records the side inputs
    and adds the task heads."""

    n_users: int
    n_items: int
    history_len: int = 0
    # Widest per-pair tensor head() builds, in floats (sizes score_all's user chunks).
    pair_width: int = 1
    tasks: tuple[str, ...] = ("click",)

    def user_repr(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    def _item_repr(self, items: Tensor) -> Tensor:
        raise NotImplementedError

    def _head(self, users: Tensor, items: Tensor) -> Tensor:
        raise NotImplementedError

    def interaction(self, users: Tensor, items: Tensor) -> Tensor:
        """z [..., W]: what the family's own prediction layer reads, for the task heads (broadcasts like head)."""
        raise NotImplementedError

    def _init_side(self, side: SideInputs, width: int) -> None:
        """Record the side inputs (side_args) and add task heads over the interaction vector (of `width` floats)
        when there is more than one task; a single-task model keeps the family's own head, parameters, logits."""
        self.n_context_ids, self.id_dropout = side.n_context_ids, side.id_dropout
        self.has_item_features, self.has_user_features = side.item_features is not None, side.user_features is not None
        tasks, task_mixture, experts = side.tasks, side.task_mixture, side.experts
        self.tasks = check_tasks(tasks, task_mixture, experts)
        self.task_mixture, self.n_experts = task_mixture, int(experts)
        self.task_heads = TaskHeads(width, self.tasks, task_mixture, experts) if len(self.tasks) > 1 else None
        if self.task_heads is not None:
            self.pair_width = max(self.pair_width, width * (experts + 2 if task_mixture == "mmoe" else 1))

    @property
    def multitask(self) -> bool:
        return len(self.tasks) > 1

    @property
    def reads_context(self) -> bool:
        """Whether user_repr reads batch.context (then a user's representation depends on the request)."""
        return any(isinstance(m, ContextPool) for m in self.modules())

    def side_args(self) -> dict[str, Any]:
        """The JSON-able side-input args of build_model this model was built with (tables excluded: they travel
        in features/), e.g. for an artifact's config.json."""
        return {"n_context_ids": int(getattr(self, "n_context_ids", 0)),
                "id_dropout": float(getattr(self, "id_dropout", 0.0)), "tasks": list(self.tasks),
                "task_mixture": getattr(self, "task_mixture", "shared"), "experts": int(getattr(self, "n_experts", 4))}

    def _task(self, task: str | None) -> str:
        task = self.tasks[0] if task is None else task
        if task not in self.tasks:
            raise UserError(f"task={task!r} is not one of this model's tasks {', '.join(self.tasks)}")
        return task

    def head(self, users: Tensor, items: Tensor, task: str | None = None) -> Tensor:
        """Logits of `task` (None: tasks[0]) for representations U and I, broadcasting over leading dims."""
        task = self._task(task)
        if not self.multitask:
            return self._head(users, items)
        return self.task_heads(self.interaction(users, items), (task,))[task]

    def head_tasks(self, users: Tensor, items: Tensor) -> dict[str, Tensor]:
        """{task: logits} of every task (the interaction vector computed once)."""
        if not self.multitask:
            return {self.tasks[0]: self._head(users, items)}
        return self.task_heads(self.interaction(users, items))

    def item_repr(self, items: Tensor | None = None) -> Tensor:
        """I [..., D] of `items` (any shape), or of every item [M, D] when None. The whole-catalogue table is cached
        while the module is in eval mode and no gradient is recorded; the key holds the storage and version counter
        of every parameter, so an optimiser step, load_state_dict or .to() invalidates it."""
        if items is not None:
            return self._item_repr(items)
        device = self.device
        cacheable = not self.training and not torch.is_grad_enabled()
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())
        cache = self.__dict__.get("_item_cache")
        if cacheable and cache is not None and cache[0] == key:
            return cache[1]
        table = self._item_repr(torch.arange(self.n_items, device=device))
        self.__dict__["_item_cache"] = (key, table) if cacheable else None
        return table

    def _reprs(self, batch: Batch) -> tuple[Tensor, Tensor]:
        users = self.user_repr(batch)
        items = self.item_repr(batch.item)
        while users.dim() < items.dim():
            users = users.unsqueeze(-2)
        return users, items

    def forward(self, batch: Batch, all_tasks: bool = False) -> Tensor | dict[str, Tensor]:
        """Logits of tasks[0] (click), shaped like batch.item; with all_tasks, forward_tasks' dict (the engine
        asks so through the module call, so DDP and compile wrappers see a forward)."""
        if all_tasks:
            return self.head_tasks(*self._reprs(batch))
        return self.head(*self._reprs(batch))

    def forward_tasks(self, batch: Batch) -> dict[str, Tensor]:
        """{task: logits shaped like batch.item} for every task of the model."""
        return self.head_tasks(*self._reprs(batch))

    def _chunked(self, users: Tensor, items: Tensor, head: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        chunk = chunk_users(items.shape[0], self.pair_width, items.device)
        parts = [head(users[s : s + chunk, None, :], items[None]) for s in range(0, users.shape[0], chunk)]
        return torch.cat(parts) if parts else users.new_zeros((0, items.shape[0]))

    def _score_all(self, users: Tensor, items: Tensor) -> Tensor:
        # Through the public head, so a subclass that overrides head() alone (the earlier contract) still scores.
        return self._chunked(users, items, self.head)

    def score_all(self, users: Tensor, items: Tensor, task: str | None = None) -> Tensor:
        """Logits [B, M] of `task` (None: tasks[0]) of user representations [B, D] against item representations
        [M, D]."""
        task = self._task(task)
        if not self.multitask:
            return self._score_all(users, items)
        return self._chunked(users, items, lambda u, i: self.head(u, i, task))

    def score_items(self, batch: Batch, items: Tensor | None = None, task: str | None = None) -> Tensor:
        """Logits [B, M] of the batch's users against `items` [M] (every item when None); batch.item is unused."""
        users, catalogue = self.user_repr(batch), self.item_repr(items)
        return self.score_all(users, catalogue) if task is None else self.score_all(users, catalogue, task)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True) -> RecModel:
        self.__dict__["_item_cache"] = None  # free the cache; rebuilt on the next eval-mode call
        return super().train(mode)


def user_batch(users: Tensor, history: Tensor | None = None, context: Tensor | None = None) -> Batch:
    """A Batch for scoring users against items chosen later (score_items, the serving scorer)."""
    return Batch(user=users, item=users.new_zeros((users.shape[0], 0)), history=history, context=context)


@dataclass
class SideInputs:
    """The optional inputs every family takes beyond IDs (see the module docstring); defaults = ID-only."""

    item_features: FeatureTable | None = None
    user_features: FeatureTable | None = None
    n_context_ids: int = 0
    id_dropout: float = 0.0
    tasks: tuple[str, ...] = ("click",)
    task_mixture: str = "shared"
    experts: int = 4

    def __post_init__(self) -> None:
        check_id_dropout(self.id_dropout)
        if self.n_context_ids < 0:
            raise UserError(f"n_context_ids={self.n_context_ids} must be >= 0")
        self.tasks = check_tasks(self.tasks, self.task_mixture, self.experts)

    def user_embedding(self, n: int, dim: int, shift: int = 0, padding_idx: int | None = None) -> FeaturedEmbedding:
        return FeaturedEmbedding(n, dim, self.user_features, self.id_dropout, self.n_context_ids, shift, padding_idx)

    def item_embedding(self, n: int, dim: int, shift: int = 0, padding_idx: int | None = None) -> FeaturedEmbedding:
        return FeaturedEmbedding(n, dim, self.item_features, self.id_dropout, 0, shift, padding_idx)


ID_ONLY = SideInputs()


# ------------------------------------------------------------------------------------------------ tower head
class Tower(nn.Module):
    """NCF's MLP tower: embeddings of width layers[0] // 2 each, then Linear+ReLU(+Dropout) between consecutive
    widths. The first Linear is applied split (W_u p_u and W_i q_i + b) by the representations; `hidden` holds
    the rest."""

    def __init__(self, n_users: int, n_items: int, layers: Sequence[int], dropout: float,
                 side: SideInputs = ID_ONLY) -> None:
        super().__init__()
        layers = check_layers(layers, dropout)
        self.layers = layers
        self.user_emb = side.user_embedding(n_users, layers[0] // 2)
        self.item_emb = side.item_embedding(n_items, layers[0] // 2)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(layers[:-1], layers[1:]))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_features = layers[-1]
        # First-layer width: what the representations carry for this tower.
        self.repr_width = layers[1] if len(layers) > 1 else layers[0] // 2
        self.pair_width = max(layers[1:]) if len(layers) > 1 else layers[0]
        init_embedding(self.user_emb)
        init_embedding(self.item_emb)
        for lin in self.linears:
            init_hidden(lin)

    def user_half(self, users: Tensor, context: Tensor | None = None) -> Tensor:
        """W_u p_u [B, h1] (or p_u itself when the tower has no hidden layer)."""
        emb = self.user_emb(users, context)
        if not self.linears:
            return emb
        return emb @ self.linears[0].weight[:, : emb.shape[-1]].t()

    def item_half(self, items: Tensor) -> Tensor:
        """W_i q_i + b [..., h1] (or q_i itself when the tower has no hidden layer)."""
        emb = self.item_emb(items)
        if not self.linears:
            return emb
        first = self.linears[0]
        return emb @ first.weight[:, emb.shape[-1] :].t() + first.bias


def tower_logits(
    u_half: Tensor, i_half: Tensor, hidden: Sequence[nn.Linear], dropout: Callable[[Tensor], Tensor],
    w_out: Tensor, u_half_w: Tensor | None = None,
) -> Tensor:
    """h^T MLP(...) of the tower from its split first layer: ReLU(u_half + i_half), then the hidden layers, dotted
    with w_out. Without hidden linears (`u_half_w` given) the tower is concat[p_u, q_i] itself and the dot splits
    into w_u.p_u + w_i.q_i. Broadcasts over leading dims."""
    if u_half_w is not None:
        d = u_half.shape[-1]
        return u_half @ w_out[:d] + i_half @ w_out[d:]
    x = dropout(torch.relu(u_half + i_half))
    for lin in hidden:
        x = dropout(torch.relu(lin(x)))
    return x @ w_out


def tower_hidden(u_half: Tensor, i_half: Tensor, hidden: Sequence[nn.Linear], dropout: Callable[[Tensor], Tensor],
                 split: bool) -> Tensor:
    """The tower's last hidden layer (what tower_logits dots with w_out): the interaction vector of the MLP
    half for task heads. `split` (no hidden linears): concat[p_u, q_i] itself."""
    if split:
        return torch.cat(torch.broadcast_tensors(u_half, i_half), -1)
    x = dropout(torch.relu(u_half + i_half))
    for lin in hidden:
        x = dropout(torch.relu(lin(x)))
    return x


@dataclass
class TowerParts:
    """What the serving scorer's fused kernel needs from a model with NeuMF's tower head: U and I are
    [gmf part (factors wide) | tower half], logit = (U_g * I_g) @ w_gmf + tower(U_t + I_t) @ w_tower + bias."""

    factors: int
    hidden: Sequence[nn.Linear]
    w_gmf: Tensor
    w_tower: Tensor
    bias: Tensor


# ------------------------------------------------------------------------------------------------ ID models
class GMF(RecModel):
    """Generalized Matrix Factorization: h^T (p_u * q_i) + b. U = p_u, I = q_i. Interaction z = U * I.
    `side` (SideInputs via build_model's keyword args) adds features, context and task heads."""

    def __init__(self, n_users: int, n_items: int, factors: int, side: SideInputs = ID_ONLY) -> None:
        super().__init__()
        check_sizes(n_users, n_items)
        check_factors(factors)
        self.n_users, self.n_items, self.factors = n_users, n_items, factors
        self.user_emb = side.user_embedding(n_users, factors)
        self.item_emb = side.item_embedding(n_items, factors)
        self.predict = nn.Linear(factors, 1)
        self.pair_width = factors
        init_embedding(self.user_emb)
        init_embedding(self.item_emb)
        init_prediction(self.predict)
        self._init_side(side, factors)

    def user_repr(self, batch: Batch) -> Tensor:
        return self.user_emb(batch.user, batch.context)

    def _item_repr(self, items: Tensor) -> Tensor:
        return self.item_emb(items)

    def _head(self, users: Tensor, items: Tensor) -> Tensor:
        return (users * items) @ self.predict.weight[0] + self.predict.bias[0]

    def interaction(self, users: Tensor, items: Tensor) -> Tensor:
        return users * items

    def _score_all(self, users: Tensor, items: Tensor) -> Tensor:
        # h^T (u * i) = (u * h) @ i^T: one matmul.
        return (users * self.predict.weight[0]) @ items.t() + self.predict.bias


class MF(RecModel):
    """Matrix factorization with biases: p_u . q_i + b_u + b_i + b, as a pure dot product:
    U = [p_u, b_u, 1], I = [q_i, 1, b_i] (the global bias is added by the head). Interaction z = U * I.
    `side` (SideInputs via build_model's keyword args) adds features, context and task heads. The id biases are id parameters too: id dropout drops them with the id embedding."""

    def __init__(self, n_users: int, n_items: int, factors: int, side: SideInputs = ID_ONLY) -> None:
        super().__init__()
        check_sizes(n_users, n_items)
        check_factors(factors)
        self.n_users, self.n_items, self.factors = n_users, n_items, factors
        self.user_emb = side.user_embedding(n_users, factors)
        self.item_emb = side.item_embedding(n_items, factors)
        self.user_bias = nn.Embedding(n_users, 1)
        self.item_bias = nn.Embedding(n_items, 1)
        self.bias = nn.Parameter(torch.zeros(1))
        self.pair_width = factors + 2
        init_embedding(self.user_emb)
        init_embedding(self.item_emb)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)
        self._init_side(side, factors + 2)

    @staticmethod
    def _bias(emb: FeaturedEmbedding, bias: nn.Embedding, idx: Tensor, context: Tensor | None = None
              ) -> tuple[Tensor, Tensor]:
        keep = emb.keep_rows()  # an entity's id bias is dropped with its id embedding
        b = bias(idx)
        return emb(idx, context, keep), b if keep is None else b * keep[idx][..., None].to(b.dtype)

    def user_repr(self, batch: Batch) -> Tensor:
        emb, bias = self._bias(self.user_emb, self.user_bias, batch.user, batch.context)
        return torch.cat([emb, bias, torch.ones_like(bias)], -1)

    def _item_repr(self, items: Tensor) -> Tensor:
        emb, bias = self._bias(self.item_emb, self.item_bias, items)
        return torch.cat([emb, torch.ones_like(bias), bias], -1)

    def _head(self, users: Tensor, items: Tensor) -> Tensor:
        return (users * items).sum(-1) + self.bias[0]

    def interaction(self, users: Tensor, items: Tensor) -> Tensor:
        return users * items

    def _score_all(self, users: Tensor, items: Tensor) -> Tensor:
        return users @ items.t() + self.bias


class MLP(RecModel):
    """NCF's MLP: a ReLU tower over concat[p_u, q_i], then a linear prediction layer. U = W_u p_u, I = W_i q_i + b.
    Interaction z = the tower's last hidden layer. `side` (SideInputs via build_model's keyword args) adds features, context and task heads."""

    def __init__(self, n_users: int, n_items: int, layers: Sequence[int], dropout: float = 0.0,
                 side: SideInputs = ID_ONLY) -> None:
        super().__init__()
        check_sizes(n_users, n_items)
        self.n_users, self.n_items = n_users, n_items
        self.tower = Tower(n_users, n_items, layers, dropout, side)
        self.layers = self.tower.layers
        self.predict = nn.Linear(self.tower.out_features, 1)
        self.pair_width = self.tower.pair_width
        self.factors = 0  # no GMF branch: the whole representation is the tower's
        init_prediction(self.predict)
        self._init_side(side, self.tower.out_features)

    def user_repr(self, batch: Batch) -> Tensor:
        return self.tower.user_half(batch.user, batch.context)

    def _item_repr(self, items: Tensor) -> Tensor:
        return self.tower.item_half(items)

    def _head(self, users: Tensor, items: Tensor) -> Tensor:
        t = self.tower
        split = users if not t.linears else None
        return tower_logits(users, items, t.linears[1:], t.dropout, self.predict.weight[0], split) + self.predict.bias[0]

    def interaction(self, users: Tensor, items: Tensor) -> Tensor:
        t = self.tower
        return tower_hidden(users, items, t.linears[1:], t.dropout, not t.linears)

    def tower_parts(self) -> TowerParts | None:
        if not self.tower.linears or self.multitask:
            return None
        w = self.predict.weight[0]
        return TowerParts(0, self.tower.linears[1:], w[:0], w, self.predict.bias)


class NeuMF(RecModel):
    """Neural Matrix Factorization: a GMF branch and an MLP tower with their own embeddings, concatenated into one
    linear prediction layer. U = [p_u^gmf, W_u p_u^mlp], I = [q_i^gmf, W_i q_i^mlp + b].
    Interaction z = [U_gmf * I_gmf ; the tower's last hidden layer] (what `predict` reads). `side` (SideInputs via build_model's keyword args) adds features, context and task heads.
    The GMF and MLP halves each pool their own feature (and context) embeddings: they differ in width, and
    pretraining copies each half from its own model."""

    def __init__(
        self, n_users: int, n_items: int, factors: int, layers: Sequence[int], dropout: float = 0.0,
        side: SideInputs = ID_ONLY,
    ) -> None:
        super().__init__()
        check_sizes(n_users, n_items)
        check_factors(factors)
        self.n_users, self.n_items, self.factors = n_users, n_items, factors
        self.gmf_user_emb = side.user_embedding(n_users, factors)
        self.gmf_item_emb = side.item_embedding(n_items, factors)
        self.tower = Tower(n_users, n_items, layers, dropout, side)
        self.layers = self.tower.layers
        self.predict = nn.Linear(factors + self.tower.out_features, 1)
        self.pair_width = self.tower.pair_width
        init_embedding(self.gmf_user_emb)
        init_embedding(self.gmf_item_emb)
        init_prediction(self.predict)
        self._init_side(side, factors + self.tower.out_features)

    def user_repr(self, batch: Batch) -> Tensor:
        return torch.cat([self.gmf_user_emb(batch.user, batch.context),
                          self.tower.user_half(batch.user, batch.context)], -1)

    def _item_repr(self, items: Tensor) -> Tensor:
        return torch.cat([self.gmf_item_emb(items), self.tower.item_half(items)], -1)

    def interaction(self, users: Tensor, items: Tensor) -> Tensor:
        f, t = self.factors, self.tower
        gmf = users[..., :f] * items[..., :f]
        tower = tower_hidden(users[..., f:], items[..., f:], t.linears[1:], t.dropout, not t.linears)
        return torch.cat([gmf, tower], -1)  # both broadcast U against I: same leading shape

    def _head(self, users: Tensor, items: Tensor) -> Tensor:
        f, t, w = self.factors, self.tower, self.predict.weight[0]
        gmf = (users[..., :f] * items[..., :f]) @ w[:f]
        split = users[..., f:] if not t.linears else None
        tower = tower_logits(users[..., f:], items[..., f:], t.linears[1:], t.dropout, w[f:], split)
        return gmf + tower + self.predict.bias[0]

    def _score_all(self, users: Tensor, items: Tensor) -> Tensor:
        # The GMF half is one matmul; only the tower needs the chunked per-pair pass.
        f, w = self.factors, self.predict.weight[0]
        gmf = (users[:, :f] * w[:f]) @ items[:, :f].t() + self.predict.bias
        t = self.tower
        chunk = chunk_users(items.shape[0], self.pair_width, items.device)
        parts = []
        for s in range(0, users.shape[0], chunk):
            u = users[s : s + chunk, None, f:]
            split = u if not t.linears else None
            parts.append(tower_logits(u, items[None, :, f:], t.linears[1:], t.dropout, w[f:], split))
        return gmf + torch.cat(parts) if parts else gmf

    def tower_parts(self) -> TowerParts | None:
        if not self.tower.linears or self.multitask:
            return None
        f, w = self.factors, self.predict.weight[0]
        return TowerParts(f, self.tower.linears[1:], w[:f], w[f:], self.predict.bias)

    @torch.no_grad()
    def load_pretrained(self, gmf: GMF, mlp: MLP, alpha: float = 0.5) -> NeuMF:
        """Initialise from trained GMF and MLP models (paper, section 3.4.1): copy both models' embeddings and
        the MLP tower; the prediction layer becomes [alpha * h_gmf, (1 - alpha) * h_mlp] with the biases mixed
        the same way, so the initial NeuMF logit is alpha * GMF logit + (1 - alpha) * MLP logit. Returns self."""
        if not isinstance(gmf, GMF) or not isinstance(mlp, MLP):
            raise UserError(
                f"pretraining needs a GMF and an MLP model, got {type(gmf).__name__} and {type(mlp).__name__}"
            )
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"pretrain alpha={alpha} must be in [0, 1]")
        expect = (self.n_users, self.n_items)
        for name, other in (("GMF", gmf), ("MLP", mlp)):
            if (other.n_users, other.n_items) != expect:
                raise UserError(
                    f"pretrained {name} has n_users={other.n_users}, n_items={other.n_items} but NeuMF has "
                    f"n_users={self.n_users}, n_items={self.n_items} (trained on a different dataset?)"
                )
        if gmf.factors != self.factors:
            raise UserError(f"pretrained GMF factors={gmf.factors} != NeuMF factors={self.factors}")
        if tuple(mlp.layers) != tuple(self.layers):
            raise UserError(f"pretrained MLP layers={list(mlp.layers)} != NeuMF layers={list(self.layers)}")
        try:  # whole embedding modules: their feature and context pools come along
            self.gmf_user_emb.load_state_dict(gmf.user_emb.state_dict())
            self.gmf_item_emb.load_state_dict(gmf.item_emb.state_dict())
            self.tower.load_state_dict(mlp.tower.state_dict())
        except RuntimeError as exc:
            raise UserError("pretrained GMF/MLP were built with other side inputs (features, context) than this "
                            f"NeuMF: {str(exc).splitlines()[0]}") from exc
        f = self.factors
        self.predict.weight[:, :f].copy_(alpha * gmf.predict.weight)
        self.predict.weight[:, f:].copy_((1.0 - alpha) * mlp.predict.weight)
        self.predict.bias.copy_(alpha * gmf.predict.bias + (1.0 - alpha) * mlp.predict.bias)
        return self


# ------------------------------------------------------------------------------------------------ sequence model
CAUSAL_CHUNK_ROWS = 50  # query rows per chunk of inference attention (causal_chunks)


class CausalBlock(nn.Module):
    """Pre-norm self-attention block: x + Attn(LN(x)) under a boolean mask, then x + FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise UserError(f"factors={dim} must be divisible by heads={heads}")
        self.heads, self.p = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor, last_only: bool = False) -> Tensor:
        """[B, n, D] -> [B, n, D]; `last_only`: only the last position's output [B, 1, D] (its query reads every
        key as before; no other position's query, output or FFN is computed)."""
        b, n, d = x.shape
        h, heads = self.norm1(x), self.heads
        if last_only:  # keys and values for every position, the query for the last one alone
            w, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(h[:, -1:], w[:d], bias[:d]).view(b, 1, heads, d // heads).transpose(1, 2)
            k, v = F.linear(h, w[d:], bias[d:]).view(b, n, 2, heads, d // heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[..., -1:, :],
                                               dropout_p=self.p if self.training else 0.0)
            x = x[:, -1:]
        elif self.training:
            q, k, v = self.qkv(h).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.p)
        else:
            q, k, v = self.qkv(h).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            a = causal_chunks(q, k, v, allowed)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, q.shape[2], d)))
        return x + self.drop(self.ff(self.norm2(x)))


def causal_chunks(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, rows: int = CAUSAL_CHUNK_ROWS) -> Tensor:
    """Causal attention (queries and keys [B, H, n, d], `allowed` [B, 1, n, n] already causal) with the queries
    cut into chunks of about `rows`: a chunk reads only the keys up to its own last query, so the keys a causal
    mask would hide are never multiplied (~(C + 1) / 2C of the full product for C chunks). The result is the
    full pass's (the same keys carry every softmax)."""
    n = q.shape[2]
    chunks = max(1, round(n / rows))
    if chunks == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    out, lo = [], 0
    for c in range(1, chunks + 1):
        hi = n * c // chunks
        out.append(F.scaled_dot_product_attention(q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi],
                                                  attn_mask=allowed[:, :, lo:hi, :hi]))
        lo = hi
    return torch.cat(out, 2)


class SeqNCF(RecModel):
    """Dynamic interest: causal self-attention over the user's last L items (SASRec, Kang & McAuley 2018) gives
    the user state; candidates share the history's item embeddings; the head is a dot product or NeuMF's
    GMF + MLP tower (`head="neumf"`), so the family stays NCF.

    History positions are right-aligned (the latest item last) and positional embeddings count from the end,
    and attention never reads padding, so padding never changes a score. Position t attends to positions <= t
    only: in sequence training the output at every position is the state that predicts the next item.
    `use_user_id` adds the user-id embedding to the state (users unknown to the model, user = -1, get none).
    U = [state] (dot) or [state, W_u state] (neumf); I = [e_i] or [e_i, W_i e_i + b].

    Side inputs: item features join every item vector, history positions and candidates alike (one
    FeaturedEmbedding); user features (a pool of their own, zeros for unknown users) join the state with the
    user id; context (batch.context [B, K], or [B, L, K] per target in sequence training) joins the state in
    user_repr. Interaction z = U * I (dot) or [GMF product ; tower hidden] (neumf)."""

    def __init__(self, n_users: int, n_items: int, factors: int = 64, history_len: int = 50, blocks: int = 2,
                 heads: int = 1, dropout: float = 0.2, head: str = "dot", layers: Sequence[int] = (),
                 use_user_id: bool = False, side: SideInputs = ID_ONLY) -> None:
        super().__init__()
        check_sizes(n_users, n_items)
        check_factors(factors)
        if history_len <= 0 or blocks <= 0 or heads <= 0:
            raise UserError(f"history_len={history_len}, blocks={blocks} and heads={heads} must be > 0")
        if head not in ("dot", "neumf"):
            raise UserError(f"head={head!r} is not one of dot, neumf")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"dropout={dropout} must be in [0, 1)")
        self.n_users, self.n_items, self.factors = n_users, n_items, factors
        self.history_len, self.head_kind, self.use_user_id = int(history_len), head, bool(use_user_id)
        # index = item_idx + 1, 0 = padding (so the feature table row is index - 1)
        self.item_emb = side.item_embedding(n_items + 1, factors, shift=1, padding_idx=0)
        self.pos_emb = nn.Embedding(self.history_len, factors)
        self.user_emb = nn.Embedding(n_users, factors) if use_user_id else None
        if side.user_features is not None and side.user_features.n_rows != n_users:
            raise UserError(f"user feature table has {side.user_features.n_rows} rows but the model has "
                            f"{n_users} users (built from another dataset?)")
        self.user_feat = FeaturePool(side.user_features, factors) if side.user_features is not None else None
        self.context_pool = ContextPool(side.n_context_ids, factors) if side.n_context_ids > 0 else None
        self.blocks = nn.ModuleList(CausalBlock(factors, heads, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(factors)
        self.drop = nn.Dropout(dropout)
        for emb in (self.item_emb, self.pos_emb, self.user_emb):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.pair_width = factors
        if head == "neumf":
            tower = tuple(layers) or (2 * factors, factors, factors // 2)
            tower = check_layers(tower, dropout)
            if tower[0] != 2 * factors or len(tower) < 2:
                raise UserError(f"head=neumf needs layers starting at 2 * factors = {2 * factors} with at least "
                                f"one hidden layer, got {list(tower)}")
            self.layers = tower
            self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(tower[:-1], tower[1:]))
            for lin in self.linears:
                init_hidden(lin)
            self.predict = nn.Linear(factors + tower[-1], 1)
            init_prediction(self.predict)
            self.pair_width = max(tower[1:])
        self._init_side(side, factors if head == "dot" else factors + self.layers[-1])

    # -- user side
    def states(self, history: Tensor, users: Tensor | None = None, last_only: bool = False) -> Tensor:
        """[B, L, D] state after each history position (causal); `last_only`: [B, 1, D], the state after the
        latest item alone (what scoring reads), with the leading columns that are padding in every row cut off
        first (positions count from the end and padding is never read, so the state is the same) and the last
        block run for the last position only."""
        if last_only:
            pad = int((history > 0).any(0).long().argmax()) if bool((history > 0).any()) else history.shape[1] - 1
            history = history[:, pad:]
        b, n = history.shape
        real = history > 0
        # Position embeddings count from the end: the latest item is position 0 whatever the padding.
        from_end = torch.arange(n - 1, -1, -1, device=history.device).clamp(max=self.history_len - 1)
        x = self.item_emb(history) * math.sqrt(self.factors) + self.pos_emb(from_end)
        x = self.drop(x) * real[..., None]
        # Query t reads keys <= t that are real items; it may always read itself, so no row is all-masked.
        causal = torch.ones(n, n, dtype=torch.bool, device=history.device).tril()
        allowed = (causal & real[:, None, :]) | torch.eye(n, dtype=torch.bool, device=history.device)
        allowed = allowed[:, None]  # [B, 1, L, L]: one mask for every head
        for j, block in enumerate(self.blocks):
            last = last_only and j == len(self.blocks) - 1
            x = block(x, allowed, last) * (real[:, -1:, None] if last else real[..., None])
        x = self.norm(x)
        if self.user_emb is not None and users is not None:
            known = users >= 0
            if self.user_feat is not None and self.training and self.id_dropout > 0:  # per user, as items
                keep = torch.rand(self.n_users, device=users.device) >= self.id_dropout
                known = known & keep[users.clamp(min=0)]
            ids = self.user_emb(users.clamp(min=0)) * known[:, None]
            x = x + ids[:, None, :]
        if self.user_feat is not None and users is not None:
            x = x + self.user_feat(users)[:, None, :]  # an unknown user (-1) gets zeros
        return x

    def user_repr(self, batch: Batch) -> Tensor:
        if batch.history is None:
            raise ValueError(f"SeqNCF reads each user's last {self.history_len} items: the batch has no history")
        history = batch.history[:, -self.history_len :]
        every = batch.mask is not None  # sequence training: the state at every position is a prediction
        states = self.states(history, batch.user, last_only=not every)
        state = states if every else states[:, -1]
        if self.context_pool is not None and batch.context is not None:
            ctx = self.context_pool(batch.context)  # [B, D], or [B, L, D] with a context per target
            state = state + (ctx[:, None, :] if ctx.dim() < state.dim() else ctx)
        if self.head_kind == "dot":
            return state
        first = self.linears[0]
        return torch.cat([state, state @ first.weight[:, : self.factors].t()], -1)

    # -- item side
    def _item_repr(self, items: Tensor) -> Tensor:
        emb = self.item_emb(items + 1)
        if self.head_kind == "dot":
            return emb
        first = self.linears[0]
        return torch.cat([emb, emb @ first.weight[:, self.factors :].t() + first.bias], -1)

    def _head(self, users: Tensor, items: Tensor) -> Tensor:
        if self.head_kind == "dot":
            return (users * items).sum(-1)
        f, w = self.factors, self.predict.weight[0]
        gmf = (users[..., :f] * items[..., :f]) @ w[:f]
        return gmf + tower_logits(users[..., f:], items[..., f:], self.linears[1:], self.drop, w[f:]) + self.predict.bias[0]

    def interaction(self, users: Tensor, items: Tensor) -> Tensor:
        if self.head_kind == "dot":
            return users * items
        f = self.factors
        tower = tower_hidden(users[..., f:], items[..., f:], self.linears[1:], self.drop, False)
        return torch.cat([users[..., :f] * items[..., :f], tower], -1)

    def _score_all(self, users: Tensor, items: Tensor) -> Tensor:
        if self.head_kind == "dot":
            return users @ items.t()
        return super()._score_all(users, items)

    def tower_parts(self) -> TowerParts | None:
        if self.head_kind != "neumf" or self.multitask:
            return None
        f, w = self.factors, self.predict.weight[0]
        return TowerParts(f, self.linears[1:], w[:f], w[f:], self.predict.bias)


# ------------------------------------------------------------------------------------------------ registry
def side_inputs(a: dict[str, Any]) -> SideInputs:
    """The SideInputs of build_model's flat args (absent or None = the ID-only single-task default)."""
    def get(key: str, default: Any) -> Any:
        value = a.get(key)
        return default if value is None else value

    return SideInputs(item_features=a.get("item_features"), user_features=a.get("user_features"),
                      n_context_ids=int(get("n_context_ids", 0)), id_dropout=float(get("id_dropout", 0.0)),
                      tasks=tuple(get("tasks", ("click",))), task_mixture=str(get("task_mixture", "shared")),
                      experts=int(get("experts", 4)))


def _gmf(n_users: int, n_items: int, a: dict[str, Any]) -> RecModel:
    return GMF(n_users, n_items, a["factors"], side_inputs(a))


def _mf(n_users: int, n_items: int, a: dict[str, Any]) -> RecModel:
    return MF(n_users, n_items, a["factors"], side_inputs(a))


def _mlp(n_users: int, n_items: int, a: dict[str, Any]) -> RecModel:
    return MLP(n_users, n_items, a["layers"], a.get("dropout", 0.0), side_inputs(a))


def _neumf(n_users: int, n_items: int, a: dict[str, Any]) -> RecModel:
    return NeuMF(n_users, n_items, a["factors"], a["layers"], a.get("dropout", 0.0), side_inputs(a))


def _seq(n_users: int, n_items: int, a: dict[str, Any]) -> RecModel:
    return SeqNCF(n_users, n_items, a["factors"], a.get("history_len", 50), a.get("blocks", 2), a.get("heads", 1),
                  a.get("dropout", 0.2), a.get("head", "dot"), a.get("layers", ()), a.get("use_user_id", False),
                  side_inputs(a))


def _ease(n_users: int, n_items: int, a: dict[str, Any]) -> RecModel:
    from ncf_ray.baselines import EASE  # closed-form families live with the baselines they are

    return EASE(n_users, n_items, a.get("lam", 500.0) or 500.0)


def _pop(n_users: int, n_items: int, a: dict[str, Any]) -> RecModel:
    from ncf_ray.baselines import Popularity

    return Popularity(n_users, n_items)


# name -> builder from flat args (a new family is one class and one line here).
REGISTRY: dict[str, Callable[[int, int, dict[str, Any]], RecModel]] = {
    "gmf": _gmf,
    "mlp": _mlp,
    "neumf": _neumf,
    "mf": _mf,
    "seq": _seq,
    "ease": _ease,
    "pop": _pop,
}
# Families fitted in closed form (ncf_ray/baselines.py) rather than by the engine's gradient steps.
CLOSED_FORM = ("ease", "pop")


def build_model(name: str, n_users: int, n_items: int, **args: Any) -> RecModel:
    """A model of family `name` from flat args (factors, layers, dropout, and each family's own), plus the
    optional side inputs of every trained family: item_features / user_features (FeatureTable), n_context_ids,
    id_dropout, tasks, task_mixture, experts (see SideInputs; absent = ID-only, one task "click")."""
    if name not in REGISTRY:
        raise UserError(f"model={name!r} is not one of {', '.join(REGISTRY)}")
    return REGISTRY[name](n_users, n_items, args)


def model_args(model_cfg: ModelConfig) -> dict[str, Any]:
    """The flat constructor args of a ModelConfig: the only place config meets the model classes."""
    import dataclasses

    args = dataclasses.asdict(model_cfg)
    args.pop("name")
    args["layers"] = tuple(args.get("layers", ()))
    return args


def model_from_config(model_cfg: ModelConfig, n_users: int, n_items: int) -> RecModel:
    return build_model(model_cfg.name, n_users, n_items, **model_args(model_cfg))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (reported by train/bench)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile wrappers (where user_repr, score_all, ... live)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def naive_score_items(model: RecModel, users: Tensor, items: Tensor | None = None,
                      history: Tensor | None = None) -> Tensor:
    """Reference scorer: forward() over every (user, item) pair one row at a time, [B, M]. Slow; for tests."""
    device = model.device
    items = torch.arange(model.n_items, device=device) if items is None else items.to(device)
    b, m = len(users), len(items)
    batch = Batch(user=users.to(device).repeat_interleave(m), item=items.repeat(b),
                  history=None if history is None else history.repeat_interleave(m, 0))
    return model(batch).view(b, m)


__all__ = [
    "Batch",
    "FeatureTable",
    "FeaturedEmbedding",
    "FeaturePool",
    "ContextPool",
    "SideInputs",
    "TaskHeads",
    "TASKS",
    "RecModel",
    "GMF",
    "MLP",
    "NeuMF",
    "MF",
    "SeqNCF",
    "REGISTRY",
    "build_model",
    "model_args",
    "model_from_config",
    "count_parameters",
    "unwrap",
    "user_batch",
    "naive_score_items",
    "tower_logits",
    "tower_hidden",
    "TowerParts",
    "SCORE_CHUNK_ELEMENTS",
    "GPU_SCORE_CHUNK_ELEMENTS",
    "chunk_users",
]
