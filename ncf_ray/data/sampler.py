"""Vectorised negative sampling for training, on whatever device the positives live (CPU or CUDA).

Used by the training loop (`ncf-ray train`): each epoch draws n negatives per positive, uniformly among the items the
user has no positive for. Candidate keys user * n_items + item are checked against an exclusion structure and only
the rejected draws are drawn again. Two exclusions share one interface (`contains(keys) -> bool`):

- `SortedKeys` (the default, fast path): the sorted distinct keys of all positives, looked up with
  torch.searchsorted. Exact; 8 bytes per positive.
- `BloomFilter` (`--stream`, logs larger than memory): k bit positions per key in a bit array, ~10 bits (1.25 bytes)
  per positive for ~1% false positives. A false positive only rejects a true negative (slightly fewer candidates);
  there are no false negatives, so a sampled negative is never a positive either way. Built by streaming Parquet
  record batches (`bloom_from_parquet`), never the whole table.

No per-sample Python. The eval negatives of `prepare` use the numpy twin `prepare.sample_eval_negatives`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ncf_ray.errors import UserError

# Rejection rounds before the rows still rejected are resolved by scanning their users' whole catalogue. Typical
# sparsity needs 3-6 rounds; the scan is what ends the loop when a user's free items are all Bloom false positives.
MAX_REDRAW_ROUNDS = 64


def pair_keys(users: torch.Tensor, items: torch.Tensor, n_items: int) -> torch.Tensor:
    """int64 keys user * n_items + item (users broadcast against items)."""
    return users.long() * int(n_items) + items.long()


class Exclusion(Protocol):
    """What a NegativeSampler checks candidates against: a set of int64 pair keys on one device."""

    device: torch.device

    def contains(self, keys: torch.Tensor) -> torch.Tensor:
        """Bool tensor, same shape as keys: True where the key is (or, for a Bloom filter, may be) in the set."""
        ...


class SortedKeys:
    """Exact set of keys: sorted, distinct int64 tensor searched with torch.searchsorted (8 bytes per key)."""

    def __init__(self, keys: torch.Tensor) -> None:
        self.keys = torch.unique(keys.long())  # sorted, distinct
        self.device = self.keys.device

    def contains(self, keys: torch.Tensor) -> torch.Tensor:
        keys = keys.to(self.device).long()
        if self.keys.numel() == 0:
            return torch.zeros_like(keys, dtype=torch.bool)
        flat = keys.reshape(-1)
        pos = torch.searchsorted(self.keys, flat).clamp_(max=self.keys.numel() - 1)
        return (self.keys[pos] == flat).reshape(keys.shape)


# splitmix64's finaliser (Steele et al. 2014) as signed int64 constants: torch has no uint64 arithmetic, and int64
# multiplication wraps modulo 2**64, which is the arithmetic the mix needs.
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)
_SALT = 0x9E3779B97F4A7C15 - (1 << 64)  # decorrelates the second hash from the first
_LOW63 = (1 << 63) - 1


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: it would copy the sign bit into the top bits)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """A bijective 64-bit mix of int64 values: every output bit depends on every input bit."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


class BloomFilter:
    """Approximate set of int64 keys: `n_hashes` bit positions per key by double hashing (h1 + i * h2) of two
    64-bit mixes, in a uint8 bit array of `n_bits`. `contains` never misses an added key; it wrongly reports an
    absent key with probability ~ (1 - exp(-k n / m))**k (0.8% at 10 bits per key, k = 7).

    Pickles its bits as a numpy array, so `ray.put` stores it once per node and workers on that node read it from
    shared memory without a copy (CPU) or copy it once to their GPU (`to(device)`)."""

    def __init__(self, n_bits: int, n_hashes: int, bits: torch.Tensor | None = None, n_keys: int = 0) -> None:
        if n_bits < 8 or n_hashes < 1:
            raise ValueError(f"n_bits={n_bits} must be >= 8 and n_hashes={n_hashes} >= 1")
        self.n_bits, self.n_hashes, self.n_keys = int(n_bits), int(n_hashes), int(n_keys)
        n_bytes = (self.n_bits + 7) // 8
        self.bits = torch.zeros(n_bytes, dtype=torch.uint8) if bits is None else bits
        if self.bits.dtype != torch.uint8 or self.bits.numel() != n_bytes:
            raise ValueError(f"bits must be a uint8 tensor of {n_bytes} bytes, got {self.bits.dtype} "
                             f"x {self.bits.numel()}")
        self.device = self.bits.device

    @classmethod
    def for_keys(cls, n_keys: int, bits_per_key: float = 10.0, device: torch.device | str = "cpu") -> BloomFilter:
        """An empty filter sized for `n_keys`: m = bits_per_key * n bits and the k = m / n ln 2 hashes that
        minimise the false-positive rate for that size."""
        if bits_per_key <= 0:
            raise ValueError(f"bits_per_key={bits_per_key} must be > 0")
        n_bits = max(64, math.ceil(max(n_keys, 1) * bits_per_key / 8) * 8)
        n_hashes = max(1, round(bits_per_key * math.log(2)))
        return cls(n_bits, n_hashes, torch.zeros(n_bits // 8, dtype=torch.uint8, device=device))

    @property
    def nbytes(self) -> int:
        return int(self.bits.numel())

    def expected_fp_rate(self) -> float:
        """The design false-positive rate for the keys added so far."""
        return (1.0 - math.exp(-self.n_hashes * self.n_keys / self.n_bits)) ** self.n_hashes

    def _positions(self, keys: torch.Tensor) -> Iterator[torch.Tensor]:
        """The bit positions of each key, one hash at a time (memory stays at one int64 per key)."""
        h1 = mix64(keys)
        h2 = mix64(keys ^ _SALT) | 1  # odd: the k probes of a key never collapse onto one bit
        for i in range(self.n_hashes):
            yield ((h1 + i * h2) & _LOW63) % self.n_bits

    def add(self, keys: torch.Tensor) -> None:
        """Set the bits of `keys` (any shape, int64-compatible)."""
        keys = keys.to(self.device).long().reshape(-1)
        self.n_keys += int(keys.numel())
        for pos in self._positions(keys):
            pos = torch.unique(pos)
            byte, bit = pos >> 3, pos & 7
            # Adding 2**bit to a byte equals OR-ing it when that bit is unset and no other added position is the
            # same (byte, bit) — unique() and the filter below make both true, so index_add_ is a vectorised OR.
            unset = ((self.bits[byte].long() >> bit) & 1) == 0
            self.bits.index_add_(0, byte[unset], (1 << bit[unset]).to(torch.uint8))

    def contains(self, keys: torch.Tensor) -> torch.Tensor:
        keys = keys.to(self.device).long()
        flat = keys.reshape(-1)
        found = torch.ones_like(flat, dtype=torch.bool)
        for pos in self._positions(flat):
            found &= ((self.bits[pos >> 3].long() >> (pos & 7)) & 1).bool()
        return found.reshape(keys.shape)

    def to(self, device: torch.device | str) -> BloomFilter:
        """This filter with its bits on `device` (no copy when already there)."""
        return BloomFilter(self.n_bits, self.n_hashes, self.bits.to(device), self.n_keys)

    def __getstate__(self) -> dict[str, Any]:
        return {"n_bits": self.n_bits, "n_hashes": self.n_hashes, "n_keys": self.n_keys,
                "bits": self.bits.cpu().numpy()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        with warnings.catch_warnings():
            # Ray hands the array back read-only from shared memory; the filter is only read after building.
            warnings.simplefilter("ignore", UserWarning)
            bits = torch.from_numpy(state["bits"])
        self.__init__(state["n_bits"], state["n_hashes"], bits, state["n_keys"])  # type: ignore[misc]


def bloom_from_parquet(files: Sequence[str | Path], user_col: str, item_col: str, n_items: int,
                       bits_per_key: float = 10.0, batch_rows: int = 1 << 20) -> BloomFilter:
    """A Bloom filter of the pair keys of every row of `files`, read in record batches of `batch_rows` (memory:
    the filter plus one batch, never a whole table). Sized from the Parquet footers' row counts."""
    import pyarrow.parquet as pq

    if not files:
        raise UserError("no train Parquet files to build the exclusion filter from")
    n_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    bloom = BloomFilter.for_keys(n_rows, bits_per_key)
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=[user_col, item_col]):
            users = torch.from_numpy(batch.column(user_col).to_numpy().astype(np.int64))
            items = torch.from_numpy(batch.column(item_col).to_numpy().astype(np.int64))
            if items.numel() and (int(items.min()) < 0 or int(items.max()) >= n_items):
                raise UserError(f"{f}: item index outside [0, {n_items}): the dataset dir is inconsistent")
            bloom.add(pair_keys(users, items, n_items))
    return bloom


class NegativeSampler:
    """Samples items that are not positives of the given users.

    train_users/train_items: the positives (1-D integer tensors, same device). exclude_users/exclude_items: more
    positives to exclude but not train on (e.g. valid and test items). The exact sorted key table lives on that
    device. `NegativeSampler.from_filter(bloom, n_items)` excludes through a Bloom filter instead.
    """

    def __init__(self, train_users: torch.Tensor, train_items: torch.Tensor, n_items: int,
                 exclude_users: torch.Tensor | None = None, exclude_items: torch.Tensor | None = None,
                 pool: torch.Tensor | None = None) -> None:
        if train_users.shape != train_items.shape or train_users.dim() != 1:
            raise ValueError(f"train_users {tuple(train_users.shape)} and train_items {tuple(train_items.shape)} "
                             f"must be 1-D and the same length")
        _check_n_items(n_items)
        users, items = train_users.long(), train_items.long()
        if exclude_users is not None and exclude_items is not None:
            users = torch.cat([users, exclude_users.to(users.device).long()])
            items = torch.cat([items, exclude_items.to(users.device).long()])
        if items.numel() and (int(items.min()) < 0 or int(items.max()) >= n_items):
            raise ValueError(f"item indices must lie in [0, {n_items})")
        exact = SortedKeys(pair_keys(users, items, n_items))
        n_users = int(users.max()) + 1 if users.numel() else 0
        per_user = torch.bincount(torch.div(exact.keys, n_items, rounding_mode="floor"), minlength=n_users)
        full = torch.nonzero(per_user >= n_items).flatten()
        if full.numel():
            raise UserError(f"user index {int(full[0])} has a positive for every one of the {n_items} items: "
                            f"no negatives to sample")
        self._setup(exact, n_items, pool)

    @classmethod
    def from_filter(cls, bloom: BloomFilter, n_items: int) -> NegativeSampler:
        """A sampler excluding every key of `bloom` (built with the same n_items), on the filter's device."""
        _check_n_items(n_items)
        self = cls.__new__(cls)
        self._setup(bloom, n_items)
        return self

    def _setup(self, exclusion: Exclusion, n_items: int, pool: torch.Tensor | None = None) -> None:
        self.exclusion = exclusion
        self.n_items = int(n_items)
        self.device = exclusion.device
        # Negatives come from `pool` (distinct item indices) when given: the items the training log shows. An item
        # released after the training window (a cold item of a shop log) is then never taught to be a negative;
        # its score comes from its features (or stays at its initial value for an ID-only model).
        self.pool = None if pool is None else torch.unique(pool.to(self.device).long())
        if self.pool is not None and self.pool.numel() < 2:
            raise UserError(f"negative sampling needs at least 2 items in the pool, got {self.pool.numel()}")

    def _draw(self, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
        if self.pool is None:
            return torch.randint(0, self.n_items, shape, device=self.device, generator=generator)
        return self.pool[torch.randint(0, self.pool.numel(), shape, device=self.device, generator=generator)]

    @property
    def keys(self) -> torch.Tensor:
        """The sorted distinct positive keys (exact sampler only)."""
        if not isinstance(self.exclusion, SortedKeys):
            raise TypeError("a Bloom-filter sampler holds no key list")
        return self.exclusion.keys

    def is_positive(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Bool tensor (same shape as items, users broadcast against it): is (user, item) a known positive?
        With a Bloom filter, True also for ~1% of non-positives; never False for a positive."""
        return self.exclusion.contains(pair_keys(users.to(self.device), items.to(self.device), self.n_items))

    def sample(self, users: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """LongTensor [len(users), n] of non-positive items, uniform per user (repeats possible across draws).
        Pass a generator on the sampler's device for reproducible draws."""
        users = users.to(self.device).long().reshape(-1)
        out = self._draw((users.numel(), n), generator)
        rows = users[:, None].expand(-1, n)
        bad = self.is_positive(rows, out)
        # Each round redraws only the rejected entries (expected rounds ~ log(count) / log(1 / positive share)).
        for _ in range(MAX_REDRAW_ROUNDS):
            if not bool(bad.any()):
                return out
            idx = torch.nonzero(bad, as_tuple=True)
            redraw = self._draw((idx[0].numel(),), generator)
            out[idx] = redraw
            bad[idx] = self.is_positive(rows[idx], redraw)
        self._resolve_stuck(out, rows, bad, generator)
        return out

    def _resolve_stuck(self, out: torch.Tensor, rows: torch.Tensor, bad: torch.Tensor,
                       generator: torch.Generator | None) -> None:
        """Rows still rejected after MAX_REDRAW_ROUNDS belong to users with very few free items: draw those
        uniformly from the user's free items, found by checking the whole catalogue (still uniform over them,
        as rejection sampling is). A user with none left (only possible through Bloom false positives; the exact
        sampler refuses such users when built) is a UserError."""
        catalogue = torch.arange(self.n_items, device=self.device) if self.pool is None else self.pool
        idx = torch.nonzero(bad, as_tuple=True)
        stuck = rows[idx]
        for user in torch.unique(stuck).tolist():
            free = catalogue[~self.is_positive(torch.tensor(user, device=self.device), catalogue)]
            if free.numel() == 0:
                raise UserError(f"user index {user}: every one of the {catalogue.numel()} items is a train positive "
                                f"or an exclusion-filter false positive: no negatives to sample")
            mine = stuck == user
            pick = torch.randint(0, free.numel(), (int(mine.sum()),), device=self.device, generator=generator)
            out[idx[0][mine], idx[1][mine]] = free[pick]


def _check_n_items(n_items: int) -> None:
    if n_items < 2:
        raise UserError(f"n_items={n_items}: negative sampling needs at least 2 items")
