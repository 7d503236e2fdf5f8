"""The model-input contract: what every model family reads, built on the device by the engine, never per sample.

    Batch
      user     [B]          int64  user_idx (-1: a user the model does not know; served from history only)
      item     [B] | [B, C] | [B, L, C]
                            int64  candidate item_idx: one per row (pairs), C per row (evaluation, serving,
                                   training with negatives), or C per history position (sequence training)
      history  [B, L]       int64  the user's last L items before the target, oldest first, right-aligned:
                                   item_idx + 1, 0 = padding (so index 0 never means an item)
      mask     [B, L]       bool   sequence training only: which positions are real targets
      context  [B, K]       int64  GLOBAL context ids (0 = unknown), optional; None = every column unknown.
                                   Sequence training: [B, L, K], the context of each target position
      labels   {task: tensor shaped like item} float, training only

    Histories: each user's items in time order as CSR (indptr [n_users + 1], items [nnz], optionally events [nnz]
    and context [nnz, K] aligned with items); `last` gathers the right-aligned window before the end of a row,
    `windows` the windows ending at given CSR positions, with one index matrix `end - L + arange(L)` masked below
    the row start; `gather` applies the same index matrix to events or context.

    FeatureTable: one entity table (items or users) of side features, gathered by entity index:
      ids      [n, S]       int64  GLOBAL feature ids of the table (0 = padding, an unused slot)
      dense    [n, V]       float32, optional
      n_ids    int          size of the table's id space (1 + sum of its columns' sizes)

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
class FeatureTable:
    """Side features of one entity kind, row = entity index (item_idx or user_idx). A model keeps it as a
    non-persistent buffer: the table travels in the dataset's / artifact's features/ dir, not in the weights."""

    ids: Tensor  # int64 [n, S]: global feature ids, 0 = padding
    n_ids: int
    dense: Tensor | None = None  # float32 [n, V]

    def __post_init__(self) -> None:
        if self.ids.dim() != 2:
            raise ValueError(f"FeatureTable ids must be [n, S], got shape {tuple(self.ids.shape)}")
        if self.dense is not None and (self.dense.dim() != 2 or self.dense.shape[0] != self.ids.shape[0]):
            raise ValueError(f"FeatureTable dense must be [n={self.ids.shape[0]}, V], got {tuple(self.dense.shape)}")
        if self.ids.numel() and (int(self.ids.min()) < 0 or int(self.ids.max()) >= self.n_ids):
            raise ValueError(f"FeatureTable ids must be in [0, n_ids={self.n_ids}), got "
                             f"[{int(self.ids.min())}, {int(self.ids.max())}]")

    @property
    def n_rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def slots(self) -> int:
        return int(self.ids.shape[1])

    @property
    def dense_dim(self) -> int:
        return 0 if self.dense is None else int(self.dense.shape[1])

    @classmethod
    def from_numpy(cls, ids: np.ndarray, dense: np.ndarray | None, n_ids: int) -> FeatureTable:
        """From the int32 / float32 arrays of ncf_ray.data.features.EncodedFeatures (ids widened to int64)."""
        return cls(torch.from_numpy(np.asarray(ids, dtype=np.int64).copy()), int(n_ids),
                   None if dense is None else torch.from_numpy(np.asarray(dense, dtype=np.float32).copy()))

    def to(self, device: torch.device | str) -> FeatureTable:
        return FeatureTable(self.ids.to(device), self.n_ids, None if self.dense is None else self.dense.to(device))


@dataclass
class Histories:
    """Each user's items in time order (oldest first) as CSR on one device, with optional per-position event
    codes (int64 [nnz]) and context ids (int64 [nnz, K]) aligned with `items`."""

    indptr: Tensor  # int64 [n_users + 1]
    items: Tensor  # int64 [nnz]
    events: Tensor | None = None  # int64 [nnz]
    context: Tensor | None = None  # int64 [nnz, K]

    @property
    def n_users(self) -> int:
        return int(self.indptr.numel()) - 1

    @classmethod
    def from_arrays(
        cls, users: np.ndarray, items: np.ndarray, times: np.ndarray | None, n_users: int,
        device: torch.device | str = "cpu", events: np.ndarray | None = None, context: np.ndarray | None = None,
    ) -> Histories:
        """CSR of (user, item) events sorted by user, then time, then input order (a stable sort, so events
        without timestamps keep file order). `events` [N] and `context` [N, K], when given, are reordered with
        the items."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        keys = (users,) if times is None else (np.asarray(times, dtype=np.int64), users)
        order = np.lexsort(keys)  # the last key is the primary one
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(users, minlength=n_users), out=indptr[1:])

        def aligned(values: np.ndarray | None) -> Tensor | None:
            if values is None:
                return None
            values = np.asarray(values, dtype=np.int64)
            if values.shape[0] != items.shape[0]:
                raise ValueError(f"history values have {values.shape[0]} rows for {items.shape[0]} items")
            return torch.from_numpy(values[order].copy()).to(device)

        return cls(torch.from_numpy(indptr).to(device), torch.from_numpy(items[order].copy()).to(device),
                   aligned(events), aligned(context))

    def append(self, users: Tensor, items: Tensor, events: Tensor | None = None,
               context: Tensor | None = None) -> Histories:
        """A new CSR with items[j] appended at the end of row users[j] (each user at most once), e.g. the valid
        item after the train items: the history a test target sees. When this CSR carries events/context, the
        appended rows take `events[j]` / `context[j]` (0 = unknown where not given), so they stay aligned."""
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
        old_at = new_indptr[:-1][row_of] + pos_in_row
        new_at = new_indptr[1:][users.long()] - 1

        def spread(old: Tensor | None, new: Tensor | None) -> Tensor | None:
            # Values aligned with items move exactly as the items do.
            if old is None:
                return None
            res = old.new_zeros((int(new_indptr[-1]), *old.shape[1:]))
            res[old_at] = old
            if new is not None:
                res[new_at] = new.to(res.device, res.dtype)
            return res

        out[old_at] = self.items
        out[new_at] = items.long()
        return Histories(new_indptr, out, spread(self.events, events), spread(self.context, context))

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

    def gather(self, values: Tensor, ends: Tensor, users: Tensor, length: int) -> Tensor:
        """[N, length, ...] of `values` (events [nnz] or context [nnz, K], aligned with items) over the same
        right-aligned windows as `windows` (0 = padding / unknown)."""
        ends = ends.long()
        shape = (ends.numel(), length, *values.shape[1:])
        if values.shape[0] == 0:
            return values.new_zeros(shape)
        idx = ends[:, None] - length + torch.arange(length, device=ends.device)
        valid = idx >= self.indptr[users.long()][:, None]
        gathered = values[idx.clamp(min=0, max=values.shape[0] - 1)]
        valid = valid.view(*valid.shape, *([1] * (values.dim() - 1)))
        return torch.where(valid, gathered, torch.zeros_like(gathered))

    def last(self, users: Tensor, length: int) -> Tensor:
        """[B, length] the last `length` items of each user's row (right-aligned, 0 padding)."""
        users = users.long()
        return self.windows(self.indptr[users + 1], users, length)

    def to(self, device: torch.device | str) -> Histories:
        return Histories(self.indptr.to(device), self.items.to(device),
                         None if self.events is None else self.events.to(device),
                         None if self.context is None else self.context.to(device))


__all__ = ["Batch", "FeatureTable", "Histories"]
