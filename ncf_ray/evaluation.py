"""Evaluation of a model on a prepared dataset: the held-out protocol of ARCHITECTURE.md in one place.

    ncf-ray evaluate MODEL_DIR DATASET_DIR [--protocol sampled|full] [--split test|valid]

valid ranks each user's valid item with the user's train items as history (and as the full-ranking exclusions);
test ranks the test item with train + valid before it, since the valid item is a known positive by then. Sampled
ranks against the dataset's fixed negatives, full against every item. Used by training's closing report, Tune's
best-trial export and `ncf-ray evaluate`. No Ray.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ncf_ray.batch import Histories
from ncf_ray.data.dataset import Dataset
from ncf_ray.metrics import build_csr, evaluate_full, evaluate_sampled
from ncf_ray.model import unwrap


def train_histories(data: Dataset, device: torch.device | str = "cpu") -> Histories:
    """Each user's train items in time order (file order where the log had no timestamps)."""
    return Histories.from_arrays(data.train_users, data.train_items, data.train_times, data.n_users, device,
                                 events=data.train_events, context=data.train_context)


def split_histories(data: Dataset, split: str, device: torch.device | str = "cpu",
                    train: Histories | None = None) -> Histories:
    """What a `split` target may see: train items for valid, train + the valid item for test."""
    hist = train if train is not None else train_histories(data, device)
    if split == "valid":
        return hist
    device = hist.indptr.device
    users = torch.arange(data.n_users, device=device)
    return hist.append(users, torch.as_tensor(data.valid_items, device=device),
                       *held_out_extras(data, "valid", device))


def held_out_extras(data: Dataset, split: str, device: torch.device | str = "cpu",
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(events [n_users], context [n_users, K]) of each user's held-out `split` event, as tensors (or None), for
    Histories.append."""
    events, context = getattr(data, f"{split}_events", None), getattr(data, f"{split}_context", None)
    return (None if events is None else torch.as_tensor(events, device=device),
            None if context is None else torch.as_tensor(context, device=device))


def split_arrays(data: Dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(targets [n_users], negatives [n_users, C]) of `split`."""
    if split not in ("valid", "test"):
        raise ValueError(f"split={split!r} is not valid or test")
    return (data.test_items, data.test_neg) if split == "test" else (data.valid_items, data.valid_neg)


def full_exclusions(data: Dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The CSR of known positives excluded in full ranking: train items, plus the valid item for test."""
    ex_users, ex_items = data.train_users, data.train_items
    if split == "test":
        ex_users = np.concatenate([ex_users, np.arange(data.n_users)])
        ex_items = np.concatenate([ex_items, data.valid_items])
    return build_csr(ex_users, ex_items, data.n_users)


def split_context(data: Dataset, split: str) -> np.ndarray | None:
    """[n_users, K] context ids of each user's held-out `split` event, or None (no context in the dataset)."""
    return getattr(data, f"{split}_context", None)


def purchase_users(data: Dataset, split: str) -> np.ndarray | None:
    """Users whose held-out `split` event is a purchase (the purchase task's eval set), or None for logs
    without purchase events."""
    from ncf_ray.inputs import inputs_from_dataset

    events = getattr(data, f"{split}_events", None)
    purchase_from = inputs_from_dataset(data).purchase_from
    if events is None or purchase_from is None:
        return None
    return np.flatnonzero(np.asarray(events) >= purchase_from)


def new_item_negatives(data: Dataset, targets: np.ndarray, n_neg: int, seed: int = 7,
                       ) -> tuple[np.ndarray, np.ndarray] | None:
    """(users, negatives [n, C]) for ranking each new-item target (no train interactions) among other new
    items: the question features answer ("which of today's new products will this user take?"), free of the
    shortcut that an untrained item scores above the trained negatives of the ordinary protocol. C = n_neg, or
    fewer when the catalogue has fewer new items; None when there are under 10 new items to rank among.
    Negatives exclude the user's own held-out and train items and are fixed by `seed`."""
    cold = np.flatnonzero(data.item_counts == 0)
    rows = np.flatnonzero(data.item_counts[targets] == 0)
    c = min(n_neg, cold.size - 1)
    if rows.size == 0 or c < 9:
        return None
    rng = np.random.default_rng(seed)
    out = np.empty((rows.size, c), dtype=np.int64)
    for j, u in enumerate(rows):  # one draw per user with a new-item target: a few thousand at most
        own = {int(targets[u]), int(data.valid_items[u])}
        pool = cold[~np.isin(cold, list(own))]
        out[j] = rng.choice(pool, size=min(c, pool.size), replace=False) if pool.size >= c else np.resize(pool, c)
    return rows, out


def evaluate_model(model: nn.Module, data: Dataset, k: int, split: str = "test",
                   histories: Histories | None = None) -> dict[str, Any]:
    """Sampled and full-ranking HR/NDCG@k of `split`, with per-segment figures of the sampled protocol
    (ncf_ray.metrics.segments). `histories`: train histories already built (else built here).

    On a log with events, "purchase" adds HR/NDCG@k of the users whose held-out event is a purchase, ranked by
    the model's purchase head where it has one (else its click head: the click-only comparison). Where some
    held-out items have no train interactions (new items), segments gain "catalogue": {"new", "known"}."""
    from ncf_ray.metrics import _summarise, segments

    targets, negs = split_arrays(data, split)
    hist = split_histories(data, split, train=histories)
    ctx = split_context(data, split)
    users = np.arange(data.n_users)
    sampled = evaluate_sampled(model, users, targets, negs, k=k, histories=hist, return_ranks=True, context=ctx)
    full = evaluate_full(model, users, targets, full_exclusions(data, split), k=k, histories=hist, context=ctx)
    out: dict[str, Any] = {f"hr@{k}": sampled["hr"], f"ndcg@{k}": sampled["ndcg"],
                           f"full_hr@{k}": full["hr"], f"full_ndcg@{k}": full["ndcg"]}
    out["segments"] = segments(sampled["ranks"], np.bincount(data.train_users, minlength=data.n_users),
                               targets, data.item_counts, k)
    new = data.item_counts[targets] == 0
    if new.any():
        ranks = sampled["ranks"]
        out["segments"]["catalogue"] = {"new": _summarise(ranks[torch.from_numpy(new)], k, True),
                                        "known": _summarise(ranks[torch.from_numpy(~new)], k, True)}
        among = new_item_negatives(data, targets, negs.shape[1])
        if among is not None:
            rows, cand = among
            m = evaluate_sampled(model, rows, targets[rows], cand, k=k, histories=hist,
                                 context=None if ctx is None else ctx[rows])
            out["new_items"] = {f"hr@{k}": m["hr"], f"ndcg@{k}": m["ndcg"], "n": m["n"],
                                "candidates": int(cand.shape[1]), f"random_hr@{k}": min(1.0, k / (cand.shape[1] + 1))}
    buyers = purchase_users(data, split)
    if buyers is not None and buyers.size:
        tasks = tuple(getattr(unwrap(model), "tasks", ("click",)))
        head = "purchase" if "purchase" in tasks else tasks[0]
        m = evaluate_sampled(model, buyers, targets[buyers], negs[buyers], k=k, histories=hist,
                             context=None if ctx is None else ctx[buyers], task=head)
        out["purchase"] = {f"hr@{k}": m["hr"], f"ndcg@{k}": m["ndcg"], "n": m["n"], "head": head}
    return out
