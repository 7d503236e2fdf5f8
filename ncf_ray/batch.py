"""The model-input contract: what every model family reads, built on the device by the engine, never per sample.

    Batch
      user     [B]          int64  user_idx (-1: a user the model does not know; served from history only)
      item     [B] | [B, C] | [B, L, C]
                            int64  candidate item_idx: one per row (pairs), C per row (evaluation, serving,
                                   training with negatives), or C per history position (sequence training)
      history  [B, L]       int64  the user's last L items before the target, oldest first, right-aligned:
                                   item_idx + 1, 0 = padding (so index 0 never means an item)
      mask     [B, L]       bool   sequence training only: which positions are real targets
      context  [B, K]       int64  categorical context ids, optional
      labels   {task: tensor shaped like item} float, training only

    Histories: each user's items in time order as CSR (indptr [n_users + 1], items [nnz]); `last` gathers the
    right-aligned window before the end of a row, `windows` the windows ending at given CSR positions, with one
    index matrix `end - L + arange(L)` masked below the row start.

Pure torch: models, the engine, metrics and the serving scorer all import it, and none of them imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


@dataclass
class Batch:
    user: Tensor
    item: Tensor
    history: Tensor | None = None
    mask: Tensor | None = None
    context: Tensor | None = None
    labels: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.user.shape[0])


@dataclass
class Histories:
    """Each user's items in time order (oldest first) as CSR on one device."""

    indptr: Tensor  # int64 [n_users + 1]
    items: Tensor  # int64 [nnz]

    @property
    def n_users(self) -> int:
        return int(self.indptr.numel()) - 1

    @classmethod
    def from_arrays(
        cls, users: np.ndarray, items: np.ndarray, times: np.ndarray | None, n_users: int,
        device: torch.device | str = "cpu",
    ) -> Histories:
        """CSR of (user, item) events sorted by user, then time, then input order (a stable sort, so events
        without timestamps keep file order)."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        keys = (users,) if times is None else (np.asarray(times, dtype=np.int64), users)
        order = np.lexsort(keys)  # the last key is the primary one
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(users, minlength=n_users), out=indptr[1:])
        return cls(torch.from_numpy(indptr).to(device), torch.from_numpy(items[order].copy()).to(device))

    def append(self, users: Tensor, items: Tensor) -> Histories:
        """A new CSR with items[j] appended at the end of row users[j] (each user at most once), e.g. the valid
        item after the train items: the history a test target sees."""
        n = self.n_users
        extra = torch.zeros(n, dtype=torch.int64, device=self.indptr.device)
        extra[users.long()] = 1
        lengths = self.indptr[1:] - self.indptr[:-1]
        new_indptr = torch.zeros_like(self.indptr)
        new_indptr[1:] = torch.cumsum(lengths + extra, 0)
        out = torch.empty(int(new_indptr[-1]), dtype=torch.int64, device=self.indptr.device)
        # Old items keep their offset within the row; the appended one lands at the row's new end.
        row_of = torch.repeat_interleave(torch.arange(n, device=self.indptr.device), lengths)
        pos_in_row = torch.arange(self.items.numel(), device=self.indptr.device) - self.indptr[:-1][row_of]
        out[new_indptr[:-1][row_of] + pos_in_row] = self.items
        out[new_indptr[1:][users.long()] - 1] = items.long()
        return Histories(new_indptr, out)

    def windows(self, ends: Tensor, users: Tensor, length: int) -> Tensor:
        """[N, length] right-aligned windows of items[max(start_u, end - length) : end] (item_idx + 1, 0 padding):
        the history before CSR position `end` of row `users[n]`."""
        ends = ends.long()
        if self.items.numel() == 0:
            return torch.zeros((ends.numel(), length), dtype=torch.int64, device=ends.device)
        idx = ends[:, None] - length + torch.arange(length, device=ends.device)
        start = self.indptr[users.long()][:, None]
        valid = idx >= start
        gathered = self.items[idx.clamp(min=0, max=self.items.numel() - 1)] + 1
        return torch.where(valid, gathered, torch.zeros_like(gathered))

    def last(self, users: Tensor, length: int) -> Tensor:
        """[B, length] the last `length` items of each user's row (right-aligned, 0 padding)."""
        users = users.long()
        return self.windows(self.indptr[users + 1], users, length)

    def to(self, device: torch.device | str) -> Histories:
        return Histories(self.indptr.to(device), self.items.to(device))


__all__ = ["Batch", "Histories"]
