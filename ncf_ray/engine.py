"""The training core in plain torch: learning-rate schedule, per-epoch negative sampling, one epoch of steps,
validation sums. No Ray here, so the same code runs inside Ray Train workers (train.py), in the plain-torch
baseline of `ncf-ray bench train`, and on a bare GPU box (`python -m ncf_ray.bench_gpu`).

The fast path keeps every tensor on the worker's device: positives are materialised once, each epoch draws fresh
negatives and one permutation on the device, and batches are slices of those tensors — no per-batch host copies,
no per-sample Python.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ncf_ray.data.sampler import NegativeSampler
from ncf_ray.metrics import evaluate_sampled


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


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam with coupled L2 (the embeddings' regulariser). Fused kernels on CUDA, foreach on CPU."""
    extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, **extra)


# ------------------------------------------------------------------------------------------- one epoch
@dataclass
class EpochSamples:
    users: torch.Tensor
    items: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.users.numel())


def epoch_samples(
    pos_users: torch.Tensor,
    pos_items: torch.Tensor,
    sampler: NegativeSampler,
    negatives: int,
    generator: torch.Generator | None = None,
) -> EpochSamples:
    """Positives plus `negatives` fresh negatives per positive, shuffled, all on the positives' device."""
    neg_items = sampler.sample(pos_users, negatives, generator=generator).reshape(-1)
    users = torch.cat([pos_users, pos_users.repeat_interleave(negatives)])
    items = torch.cat([pos_items, neg_items])
    labels = torch.cat(
        [
            torch.ones(pos_users.numel(), device=pos_users.device),
            torch.zeros(neg_items.numel(), device=pos_users.device),
        ]
    )
    perm = torch.randperm(users.numel(), device=users.device, generator=generator)
    return EpochSamples(users[perm], items[perm], labels[perm])


def steps_for(n_samples: int, batch_size: int) -> int:
    return max(1, math.ceil(n_samples / batch_size))


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    samples: EpochSamples,
    batch_size: int,
    steps: int | None = None,
    lr_for_step: Callable[[int], float] | None = None,
    amp_dtype: torch.dtype | None = None,
) -> float:
    """Run `steps` optimiser steps over slices of `samples` (wrapping around when a data-parallel peer has more
    data, so every rank takes the same number of steps). Returns the mean training loss."""
    model.train()
    n = len(samples)
    steps = steps or steps_for(n, batch_size)
    device = samples.users.device
    total = torch.zeros((), device=device)
    for step in range(steps):
        start = (step * batch_size) % n
        end = start + batch_size
        if end <= n:
            u, i, y = samples.users[start:end], samples.items[start:end], samples.labels[start:end]
        else:  # wrap around: only the last step of a shorter shard
            idx = torch.arange(start, end, device=device) % n
            u, i, y = samples.users[idx], samples.items[idx], samples.labels[idx]
        if lr_for_step is not None:
            lr = lr_for_step(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(u, i)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    return float(total) / steps  # one host sync per epoch


# ------------------------------------------------------------------------------------------- validation
def sampled_sums(
    model: nn.Module, users: torch.Tensor, pos_items: torch.Tensor, neg_items: torch.Tensor, k: int
) -> torch.Tensor:
    """[hit_sum, ndcg_sum, n] of the leave-one-out protocol on the users' device: sums, not means, so
    data-parallel ranks can all-reduce them."""
    sums = evaluate_sampled(model, users, pos_items, neg_items, k=k, reduce=False)
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
