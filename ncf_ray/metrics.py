"""HR@K and NDCG@K for implicit-feedback ranking, vectorised (torch/numpy only, no Ray).

Two protocols:
- sampled: the held-out positive is ranked among its fixed candidate negatives (valid/test negatives, 99 by
  default), as in the NCF paper;
- full: the held-out positive is ranked among all items, excluding the items the user already interacted with
  (the caller's CSR, typically train positives; the target itself is never excluded).

Ties count against the positive (a constant scorer gets rank = number of candidates, i.e. no credit), so a model
cannot look good by emitting equal scores; NaN and infinite scores count as misses, so a diverged model scores 0.
A popularity baseline is scored by the same code. `segments` splits per-row ranks by the user's train history
length and by the target item's popularity (head/tail).

Every evaluator returns {"hr", "ndcg", "n"}; with reduce=False it returns {"hit_sum", "ndcg_sum", "n"} so Ray Train
workers can all-reduce sums and counts and call `finalize`. Used by `ncf-ray train` (per epoch, on valid),
`ncf-ray evaluate` and the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ArrayLike = Tensor | np.ndarray | Sequence[int]


# ------------------------------------------------------------------------------------------------ ranks
def rank_sampled(pos_scores: Tensor, neg_scores: Tensor) -> Tensor:
    """0-based rank of each positive among its C candidate negatives: the negatives scoring >= the positive.
    [N] int64 in 0..C. Non-finite scores count against the model: a NaN negative beats the positive, and a NaN or
    +/-inf positive gets rank C (a miss at every k <= C, like a constant scorer), so a diverged model scores 0."""
    beats = (neg_scores >= pos_scores.unsqueeze(-1)) | torch.isnan(neg_scores)
    ranks = beats.sum(dim=-1)
    return torch.where(torch.isfinite(pos_scores), ranks, neg_scores.shape[-1])


def hit_ndcg_from_ranks(ranks: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-row hit (rank < k) and NDCG (1 / log2(rank + 2) on a hit, else 0) as float32 tensors [N]."""
    if k <= 0:
        raise ValueError(f"k={k} must be > 0")
    hits = ranks < k
    ndcgs = torch.where(hits, 1.0 / torch.log2(ranks.to(torch.float64) + 2.0), 0.0)
    return hits.to(torch.float32), ndcgs.to(torch.float32)


def csr_rows(rows: Tensor, indptr: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten the CSR rows `rows` into (position in `rows`, column) pairs without a Python loop:
    returns (row_pos[L], cols[L]) where L is the total length of the selected rows."""
    rows = rows.to(torch.int64)
    starts, ends = indptr[rows], indptr[rows + 1]
    lengths = ends - starts
    total = int(lengths.sum())
    row_pos = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), lengths, output_size=total)
    # Offset of each element inside its row = global position - where that row begins in the flat output.
    row_begin = torch.cumsum(lengths, 0) - lengths
    offsets = torch.arange(total, device=rows.device) - torch.repeat_interleave(
        row_begin, lengths, output_size=total
    )
    cols = indices[torch.repeat_interleave(starts, lengths, output_size=total) + offsets]
    return row_pos, cols.to(torch.int64)


def seen_mask(users: Tensor, indptr: Tensor, indices: Tensor, n_items: int) -> Tensor:
    """Boolean [N, n_items] mask of the CSR rows of `users` (True = seen)."""
    mask = torch.zeros((len(users), n_items), dtype=torch.bool, device=users.device)
    row_pos, cols = csr_rows(users, indptr, indices)
    mask[row_pos, cols] = True
    return mask


def rank_full(scores: Tensor, targets: Tensor, exclude: Tensor | None = None) -> Tensor:
    """0-based rank of targets[n] among all items of scores[n] (ties count against the target), ignoring items
    where the boolean mask exclude[n] is True. The target itself is never excluded. [N] int64.
    Non-finite scores count against the model: a NaN item beats the target, and a NaN or +/-inf target gets rank
    n_items (scores.shape[-1]), worse than any finite ranking, so a diverged model scores 0."""
    rows = torch.arange(len(targets), device=scores.device)
    targets = targets.to(scores.device, torch.int64)
    target_scores = scores[rows, targets]
    beats = (scores >= target_scores.unsqueeze(-1)) | torch.isnan(scores)
    beats[rows, targets] = False  # the target does not outrank itself
    if exclude is not None:
        beats &= ~exclude
    return torch.where(torch.isfinite(target_scores), beats.sum(dim=-1), scores.shape[-1])


# ------------------------------------------------------------------------------------------------ summaries
def _summarise(ranks: Tensor, k: int, reduce: bool) -> dict[str, float]:
    hits, ndcgs = hit_ndcg_from_ranks(ranks, k)
    sums = {"hit_sum": float(hits.sum()), "ndcg_sum": float(ndcgs.sum()), "n": int(len(ranks))}
    return finalize(sums) if reduce else sums


def finalize(sums: dict[str, float]) -> dict[str, float]:
    """{"hit_sum", "ndcg_sum", "n"} (e.g. all-reduced over workers) -> {"hr", "ndcg", "n"}."""
    n = int(sums["n"])
    denom = max(n, 1)
    return {"hr": float(sums["hit_sum"]) / denom, "ndcg": float(sums["ndcg_sum"]) / denom, "n": n}


def _as_long(x: ArrayLike, device: torch.device | str = "cpu") -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device=device, dtype=torch.int64)
    return torch.as_tensor(np.asarray(x, dtype=np.int64), device=device)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _history(histories: Any, users: Tensor, length: int) -> Tensor | None:
    """The users' last `length` items from a Histories CSR, or None for models that read no history."""
    if length <= 0:
        return None
    if histories is None:
        raise ValueError(f"the model reads the last {length} items of each user: pass histories")
    return histories.last(users, length).to(users.device)


# ------------------------------------------------------------------------------------------------ model
def task_logits(net: nn.Module, batch: Any, task: str | None) -> Tensor:
    """The model's logits for `task` (None or a single-task model's own task: forward)."""
    tasks = tuple(getattr(net, "tasks", ("click",)))
    if task is None or task == tasks[0]:
        return net(batch)
    return net.forward_tasks(batch)[task]


@torch.no_grad()
def evaluate_sampled(
    model: nn.Module,
    users: ArrayLike,
    pos_items: ArrayLike,
    neg_items: ArrayLike,
    k: int = 10,
    batch_size: int = 2048,
    reduce: bool = True,
    histories: Any = None,
    return_ranks: bool = False,
    context: ArrayLike | None = None,
    task: str | None = None,
) -> dict[str, Any]:
    """HR@k / NDCG@k of the positive pos_items[n] of users[n] among its candidates neg_items[n, :C]: one
    Batch per user chunk with item [B, 1 + C] (and each user's history from `histories`, a
    ncf_ray.batch.Histories, for models that read it; context[n] the held-out event's context ids for models
    that read context). `task` picks a multi-task model's head (None: its first, click). Restores the model's
    train/eval mode. `return_ranks` adds the per-user 0-based ranks ("ranks", CPU int64) for segment metrics."""
    from ncf_ray.batch import Batch
    from ncf_ray.model import unwrap

    net = unwrap(model)
    device = _device_of(net)
    users, pos, neg = _as_long(users, device), _as_long(pos_items, device), _as_long(neg_items, device)
    ctx = None if context is None else _as_long(context, device)
    length = int(getattr(net, "history_len", 0))
    was_training = net.training
    net.eval()
    try:
        ranks = []
        for s in range(0, len(users), batch_size):
            u = users[s : s + batch_size]
            cand = torch.cat([pos[s : s + batch_size, None], neg[s : s + batch_size]], 1)
            batch = Batch(user=u, item=cand, history=_history(histories, u, length),
                          context=None if ctx is None else ctx[s : s + batch_size])
            logits = task_logits(net, batch, task).float()
            ranks.append(rank_sampled(logits[:, 0], logits[:, 1:]).cpu())
    finally:
        net.train(was_training)
    all_ranks = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.int64)
    out: dict[str, Any] = _summarise(all_ranks, k, reduce)
    if return_ranks:
        out["ranks"] = all_ranks
    return out


@torch.no_grad()
def evaluate_full(
    model: nn.Module,
    users: ArrayLike,
    targets: ArrayLike,
    seen_csr: tuple[ArrayLike, ArrayLike] | None = None,
    k: int = 10,
    batch_size: int = 256,
    reduce: bool = True,
    histories: Any = None,
    return_ranks: bool = False,
    context: ArrayLike | None = None,
    task: str | None = None,
) -> dict[str, Any]:
    """HR@k / NDCG@k of targets[n] ranked among all items for users[n] (user_repr once per user against the
    cached catalogue item_repr), excluding the items in row users[n] of seen_csr = (indptr, indices) (the target
    itself never excluded). `context` and `task` as in evaluate_sampled."""
    from ncf_ray.model import unwrap, user_batch

    net = unwrap(model)
    device = _device_of(net)
    users, targets = _as_long(users, device), _as_long(targets, device)
    ctx = None if context is None else _as_long(context, device)
    indptr, indices = (
        (None, None) if seen_csr is None else (_as_long(seen_csr[0], device), _as_long(seen_csr[1], device))
    )
    length = int(getattr(net, "history_len", 0))
    was_training = net.training
    net.eval()
    try:
        catalogue = net.item_repr(None)
        ranks = []
        for s in range(0, len(users), batch_size):
            u, t = users[s : s + batch_size], targets[s : s + batch_size]
            batch = user_batch(u, _history(histories, u, length))
            if ctx is not None:
                batch.context = ctx[s : s + batch_size]
            scores = (net.score_all(net.user_repr(batch), catalogue) if task is None
                      else net.score_all(net.user_repr(batch), catalogue, task=task)).float()
            mask = None if indptr is None else seen_mask(u, indptr, indices, scores.shape[1])
            ranks.append(rank_full(scores, t, mask).cpu())
    finally:
        net.train(was_training)
    all_ranks = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.int64)
    out: dict[str, Any] = _summarise(all_ranks, k, reduce)
    if return_ranks:
        out["ranks"] = all_ranks
    return out


# ------------------------------------------------------------------------------------------------ popularity
def popularity_scores(item_counts: ArrayLike) -> Tensor:
    """The popularity baseline's score of every item: its train interaction count (float64 [n_items])."""
    if isinstance(item_counts, Tensor):
        return item_counts.detach().to(torch.float64)
    return torch.as_tensor(np.asarray(item_counts, dtype=np.float64))


def evaluate_popularity_sampled(
    item_counts: ArrayLike, pos_items: ArrayLike, neg_items: ArrayLike, k: int = 10, reduce: bool = True
) -> dict[str, float]:
    """The popularity baseline under the sampled protocol (same ranks and tie rule as the models)."""
    pop = popularity_scores(item_counts)
    ranks = rank_sampled(pop[_as_long(pos_items)], pop[_as_long(neg_items)])
    return _summarise(ranks, k, reduce)


def evaluate_popularity_full(
    item_counts: ArrayLike,
    users: ArrayLike,
    targets: ArrayLike,
    seen_csr: tuple[ArrayLike, ArrayLike] | None = None,
    k: int = 10,
    batch_size: int = 1024,
    reduce: bool = True,
) -> dict[str, float]:
    """The popularity baseline under the full-ranking protocol (same exclusion as evaluate_full)."""
    pop = popularity_scores(item_counts)
    users, targets = _as_long(users), _as_long(targets)
    indptr, indices = (None, None) if seen_csr is None else (_as_long(seen_csr[0]), _as_long(seen_csr[1]))
    ranks = []
    for s in range(0, len(users), batch_size):
        u, t = users[s : s + batch_size], targets[s : s + batch_size]
        scores = pop.unsqueeze(0).expand(len(u), -1)
        mask = None if indptr is None else seen_mask(u, indptr, indices, len(pop))
        ranks.append(rank_full(scores, t, mask))
    return _summarise(torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.int64), k, reduce)


def build_csr(users: ArrayLike, items: ArrayLike, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr int64 [n_users + 1], indices int64, sorted and de-duplicated per row) of (user, item) pairs;
    e.g. the train positives to exclude in full ranking, or the artifact's seen items."""
    u = np.asarray(users, dtype=np.int64)
    i = np.asarray(items, dtype=np.int64)
    if len(u):
        # One int64 key per pair: np.unique sorts by user then item and drops duplicates, fast on 1-D keys.
        width = int(i.max()) + 1
        keys = np.unique(u * width + i)
        u, i = keys // width, keys % width
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(u, minlength=n_users), out=indptr[1:])
    return indptr, i.copy()


# ------------------------------------------------------------------------------------------------ segments
# Users by train history length: (label, lowest length, highest length). A user with no train rows (none in a
# prepared dataset: leave-one-out keeps >= 1) falls in the first bucket so the counts always add up.
USER_SEGMENTS: tuple[tuple[str, int, float], ...] = (
    ("1-5", 0, 5), ("6-20", 6, 20), ("21-100", 21, 100), (">100", 101, float("inf")),
)
HEAD_SHARE = 0.2  # head items: the most popular items that together hold this share of train interactions


def head_items(item_counts: ArrayLike, share: float = HEAD_SHARE) -> np.ndarray:
    """Boolean [n_items]: True for the head, the most popular items that together hold the top `share` of train
    interactions (the smallest such set: an item is head when the items more popular than it hold < share).
    Equal counts are broken by item index, so the split is deterministic."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share={share} must be in [0, 1]")
    counts = np.asarray(item_counts, dtype=np.float64)
    order = np.argsort(-counts, kind="stable")
    before = np.cumsum(counts[order]) - counts[order]  # interactions held by the items ranked above
    head = np.zeros(counts.size, dtype=bool)
    head[order] = before < share * counts.sum()
    return head


def user_segment_of(history_len: ArrayLike) -> np.ndarray:
    """Index into USER_SEGMENTS of each user's train history length (int64 [N])."""
    lengths = np.asarray(history_len, dtype=np.int64)
    uppers = np.array([hi for _, _, hi in USER_SEGMENTS[:-1]], dtype=np.float64)
    return np.searchsorted(uppers, lengths, side="left").astype(np.int64)


def segments(
    ranks: Tensor,
    history_len: ArrayLike,
    target_items: ArrayLike,
    item_counts: ArrayLike,
    k: int,
    reduce: bool = True,
    head_share: float = HEAD_SHARE,
) -> dict[str, dict[str, dict[str, float]]]:
    """HR/NDCG@k of per-row ranks (from rank_sampled or rank_full) split two ways:
    {"users": {"1-5" | "6-20" | "21-100" | ">100": m}, "items": {"head" | "tail": m}}, where row n belongs to a user
    whose train history has history_len[n] items and whose target is target_items[n], and head/tail come from
    head_items(item_counts) (train popularity). Each m is {"hr", "ndcg", "n"} ({"hit_sum", "ndcg_sum", "n"} with
    reduce=False, to all-reduce over workers and pass to finalize_segments). In each split the n add up to len(ranks).
    """
    ranks = torch.as_tensor(ranks).cpu()
    user_seg = torch.as_tensor(user_segment_of(history_len))
    is_head = torch.as_tensor(head_items(item_counts, head_share)[np.asarray(target_items, dtype=np.int64)])
    if not len(ranks) == len(user_seg) == len(is_head):
        raise ValueError(f"ranks ({len(ranks)}), history_len ({len(user_seg)}) and target_items ({len(is_head)}) "
                         "must have one entry per row")
    users = {label: _summarise(ranks[user_seg == i], k, reduce) for i, (label, _, _) in enumerate(USER_SEGMENTS)}
    items = {"head": _summarise(ranks[is_head], k, reduce), "tail": _summarise(ranks[~is_head], k, reduce)}
    return {"users": users, "items": items}


def finalize_segments(sums: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """segments(..., reduce=False) sums (e.g. all-reduced over workers) -> {"hr", "ndcg", "n"} per segment."""
    return {split: {label: finalize(m) for label, m in parts.items()} for split, parts in sums.items()}
