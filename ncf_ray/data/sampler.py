"""Vectorised negative sampling for training, on whatever device the positives live (CPU or CUDA).

Used by the training loop (`ncf-ray train`): each epoch draws n negatives per positive, uniformly among the items the
user has no positive for. Exclusion is exact: candidate keys user * n_items + item are looked up in the sorted keys
of all positives with torch.searchsorted, and only the rejected draws are drawn again, until none is rejected.
No per-sample Python. The eval negatives of `prepare` use the numpy twin `prepare.sample_eval_negatives`.
"""

from __future__ import annotations

import torch

from ncf_ray.errors import UserError


class NegativeSampler:
    """Samples items that are not positives of the given users.

    train_users/train_items: the positives (1-D integer tensors, same device). exclude_users/exclude_items: more
    positives to exclude but not train on (e.g. valid and test items). The sorted key table lives on that device.
    """

    def __init__(self, train_users: torch.Tensor, train_items: torch.Tensor, n_items: int,
                 exclude_users: torch.Tensor | None = None, exclude_items: torch.Tensor | None = None) -> None:
        if train_users.shape != train_items.shape or train_users.dim() != 1:
            raise ValueError(f"train_users {tuple(train_users.shape)} and train_items {tuple(train_items.shape)} "
                             f"must be 1-D and the same length")
        if n_items < 2:
            raise UserError(f"n_items={n_items}: negative sampling needs at least 2 items")
        self.n_items = int(n_items)
        self.device = train_users.device
        users, items = train_users.long(), train_items.long()
        if exclude_users is not None and exclude_items is not None:
            users = torch.cat([users, exclude_users.to(self.device).long()])
            items = torch.cat([items, exclude_items.to(self.device).long()])
        if items.numel() and (int(items.min()) < 0 or int(items.max()) >= self.n_items):
            raise ValueError(f"item indices must lie in [0, {self.n_items})")
        self.keys = torch.unique(users * self.n_items + items)  # sorted, distinct
        n_users = int(users.max()) + 1 if users.numel() else 0
        per_user = torch.bincount(torch.div(self.keys, self.n_items, rounding_mode="floor"), minlength=n_users)
        full = torch.nonzero(per_user >= self.n_items).flatten()
        if full.numel():
            raise UserError(f"user index {int(full[0])} has a positive for every one of the {self.n_items} items: "
                            f"no negatives to sample")

    def is_positive(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Bool tensor (same shape as items, users broadcast against it): is (user, item) a known positive?"""
        keys = users.to(self.device).long() * self.n_items + items.to(self.device).long()
        if self.keys.numel() == 0:
            return torch.zeros_like(keys, dtype=torch.bool)
        flat = keys.reshape(-1)
        pos = torch.searchsorted(self.keys, flat).clamp_(max=self.keys.numel() - 1)
        return (self.keys[pos] == flat).reshape(keys.shape)

    def sample(self, users: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """LongTensor [len(users), n] of non-positive items, uniform per user (repeats possible across draws).
        Pass a generator on the sampler's device for reproducible draws."""
        users = users.to(self.device).long().reshape(-1)
        out = torch.randint(0, self.n_items, (users.numel(), n), device=self.device, generator=generator)
        rows = users[:, None].expand(-1, n)
        bad = self.is_positive(rows, out)
        # Each round redraws only the rejected entries; the user has >= 1 free item, so this ends (expected
        # rounds ~ log(count) / log(1 / positive share); for typical sparsity 3-6 rounds).
        while bool(bad.any()):
            idx = torch.nonzero(bad, as_tuple=True)
            redraw = torch.randint(0, self.n_items, (idx[0].numel(),), device=self.device, generator=generator)
            out[idx] = redraw
            bad[idx] = self.is_positive(rows[idx], redraw)
        return out
