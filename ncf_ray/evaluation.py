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


def train_histories(data: Dataset, device: torch.device | str = "cpu") -> Histories:
    """Each user's train items in time order (file order where the log had no timestamps)."""
    return Histories.from_arrays(data.train_users, data.train_items, data.train_times, data.n_users, device)


def split_histories(data: Dataset, split: str, device: torch.device | str = "cpu",
                    train: Histories | None = None) -> Histories:
    """What a `split` target may see: train items for valid, train + the valid item for test."""
    hist = train if train is not None else train_histories(data, device)
    if split == "valid":
        return hist
    users = torch.arange(data.n_users, device=hist.indptr.device)
    return hist.append(users, torch.as_tensor(data.valid_items, device=hist.indptr.device))


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


def evaluate_model(model: nn.Module, data: Dataset, k: int, split: str = "test",
                   histories: Histories | None = None) -> dict[str, Any]:
    """Sampled and full-ranking HR/NDCG@k of `split`, with per-segment figures of the sampled protocol
    (ncf_ray.metrics.segments). `histories`: train histories already built (else built here)."""
    from ncf_ray.metrics import segments

    targets, negs = split_arrays(data, split)
    hist = split_histories(data, split, train=histories)
    users = np.arange(data.n_users)
    sampled = evaluate_sampled(model, users, targets, negs, k=k, histories=hist, return_ranks=True)
    full = evaluate_full(model, users, targets, full_exclusions(data, split), k=k, histories=hist)
    out: dict[str, Any] = {f"hr@{k}": sampled["hr"], f"ndcg@{k}": sampled["ndcg"],
                           f"full_hr@{k}": full["hr"], f"full_ndcg@{k}": full["ndcg"]}
    out["segments"] = segments(sampled["ranks"], np.bincount(data.train_users, minlength=data.n_users),
                               targets, data.item_counts, k)
    return out
