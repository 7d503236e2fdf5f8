"""`ncf-ray bench eval`: users/s of sampled and full-ranking evaluation beside the popularity baseline.

    ncf-ray bench eval [--quick]

NeuMF (the ModelConfig default) at ML-1M size (--quick: 300 users x 200 items), one CPU thread, model and baseline
interleaved over `repeats` runs so that load drift hits both; the median of each is reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from statistics import median
from typing import Any

from ncf_ray.bench import row


def measure(quick: bool, repeats: int = 3) -> dict[str, Any]:
    """Users/s of sampled and full-ranking evaluation (default NeuMF) vs the popularity baseline."""
    import numpy as np
    import torch

    from ncf_ray.bench.gpu import hold_out_one, synthetic_positives
    from ncf_ray.config import ModelConfig
    from ncf_ray.data.sampler import NegativeSampler
    from ncf_ray.metrics import (
        build_csr,
        evaluate_full,
        evaluate_popularity_full,
        evaluate_popularity_sampled,
        evaluate_sampled,
    )
    from ncf_ray.model import model_from_config

    n_users, n_items, n_pos = (300, 200, 6000) if quick else (6040, 3706, 1_000_000)
    device = torch.device("cpu")
    split = hold_out_one(*synthetic_positives(n_users, n_items, n_pos, device))
    sampler = NegativeSampler(split["train_users"], split["train_items"], n_items,
                              split["eval_users"], split["eval_items"])
    users, targets = split["eval_users"].numpy(), split["eval_items"].numpy()
    negs = sampler.sample(split["eval_users"], 99 if not quick else 50).numpy()
    csr = build_csr(split["train_users"].numpy(), split["train_items"].numpy(), n_users)
    counts = np.bincount(split["train_items"].numpy(), minlength=n_items)
    model_cfg = ModelConfig()
    torch.manual_seed(0)
    model = model_from_config(model_cfg, n_users, n_items).eval()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # "on one CPU core": the figure the metrics module promises

    def timed(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return len(users) / (time.perf_counter() - t0)

    runs: dict[str, list[float]] = {"sampled": [], "pop_sampled": [], "full": [], "pop_full": []}
    for _ in range(repeats):  # interleaved, so load drift hits model and baseline alike
        runs["sampled"].append(timed(lambda: evaluate_sampled(model, users, targets, negs)))
        runs["pop_sampled"].append(timed(lambda: evaluate_popularity_sampled(counts, targets, negs)))
        runs["full"].append(timed(lambda: evaluate_full(model, users, targets, csr)))
        runs["pop_full"].append(timed(lambda: evaluate_popularity_full(counts, users, targets, csr)))
    torch.set_num_threads(prev_threads)
    med = {k: median(v) for k, v in runs.items()}
    name = f"NeuMF factors {model_cfg.factors}, layers {list(model_cfg.layers)}"
    return {
        "rows": [
            row(f"sampled eval users/s ({negs.shape[1]} negatives, 1 thread), {name}", med["sampled"], "users/s",
                "popularity, same protocol", med["pop_sampled"]),
            row(f"full-ranking eval users/s ({n_items} items, train positives excluded, 1 thread), {name}", med["full"],
                "users/s", "popularity, same protocol", med["pop_full"]),
            row("sampled eval seconds for all users", len(users) / med["sampled"], "s"),
            row("full-ranking eval seconds for all users", len(users) / med["full"], "s"),
        ],
        "users": len(users), "items": n_items, "train_positives": int(split["train_users"].numel()),
        "threads": 1, "runs_users_per_s": runs,
    }


