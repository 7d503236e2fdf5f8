"""`ncf-ray bench features`: training samples/s of feature-aware models beside the ID-only model of the same
family, same batch, same process (plain torch on engine.py, no Ray).

    ncf-ray bench features [--quick]
    python -m ncf_ray.bench.features [--quick]

ML-1M-like shapes: 6,040 users, 3,706 items, ~1M positives; the item table has a genre bag of 4 slots, a year
bucket and 24 hashed title-token slots (29 slots), the user table 4 slots (gender, age, occupation, zip prefix);
random ids of those vocabulary sizes. Each family trains `steps` optimiser steps per run with the same negatives
and batch, featured and ID-only runs interleaved over `repeats` rounds so that load drift hits both; the median
of each is reported and the ratio featured / ID-only is the figure (goal >= 0.6). The featured model also has
id_dropout 0.2 (its training cost is part of the feature path). One torch thread by default: on a shared
machine a single thread is what holds still long enough to compare. --quick: tiny sizes, a second or two.
"""

from __future__ import annotations

import argparse
import json
from statistics import median
from typing import Any

from ncf_ray.bench import row

FAMILIES = ("gmf", "mf", "mlp", "neumf", "seq")
# name -> (users, items, positives, batch size in scored candidates, steps per run, repeats)
SIZES = {False: (6040, 3706, 1_000_000, 8192, 10, 7), True: (200, 150, 4000, 512, 3, 1)}
# Item columns: genre bag (18 genres, 4 slots), year (~10 buckets), title tokens (24 slots, 4096 hash buckets).
ITEM_COLUMNS = (("genres", 18, 4), ("year", 10, 1), ("title", 4096, 24))
# User columns: gender, age bucket, occupation, zip prefix (one slot each).
USER_COLUMNS = (("gender", 2, 1), ("age", 7, 1), ("occupation", 21, 1), ("zip", 100, 1))


def synthetic_table(n_rows: int, columns: tuple[tuple[str, int, int], ...], seed: int) -> Any:
    """A FeatureTable of random codes laid out as data/features.py lays them: column c owns global ids
    [offset, offset + 1 + vocab) (offset = its unseen value); bag/text columns leave ~1/4 of their slots as
    padding (0), as short titles and few genres do."""
    import torch

    from ncf_ray.batch import FeatureTable

    g = torch.Generator().manual_seed(seed)
    parts, offset = [], 1
    for _, vocab, slots in columns:
        ids = offset + 1 + torch.randint(0, vocab, (n_rows, slots), generator=g)
        if slots > 1:
            ids[:, 1:] = torch.where(torch.rand((n_rows, slots - 1), generator=g) < 0.25, 0, ids[:, 1:])
        parts.append(ids)
        offset += 1 + vocab
    return FeatureTable(torch.cat(parts, 1), offset, None)


def _family_args(name: str) -> dict[str, Any]:
    # The ModelConfig defaults of each family at ML-1M scale.
    if name == "seq":
        return {"factors": 64, "history_len": 50, "blocks": 2, "heads": 1, "dropout": 0.2}
    return {"factors": 64, "layers": (256, 128, 64), "dropout": 0.0}


def run_family(name: str, quick: bool) -> dict[str, Any]:
    """Median samples/s of the ID-only and the feature-aware model of family `name` (same examples)."""
    import torch

    from ncf_ray import engine
    from ncf_ray.batch import Histories
    from ncf_ray.bench.gpu import synthetic_positives
    from ncf_ray.data.sampler import NegativeSampler
    from ncf_ray.model import build_model

    n_users, n_items, n_pos, batch, steps, repeats = SIZES[quick]
    device = torch.device("cpu")
    users, items = synthetic_positives(n_users, n_items, n_pos, device)
    hist = Histories.from_arrays(users.numpy(), items.numpy(), None, n_users) if name == "seq" else None
    sampler = NegativeSampler(users, items, n_items)
    side = {"item_features": synthetic_table(n_items, ITEM_COLUMNS, 1),
            "user_features": synthetic_table(n_users, USER_COLUMNS, 2), "id_dropout": 0.2}
    args = _family_args(name)
    if quick:
        args = {**args, "factors": 16, "layers": (32, 16), "history_len": 10}
    torch.manual_seed(0)
    models = {"id": build_model(name, n_users, n_items, **args),
              "features": build_model(name, n_users, n_items, **args, **side)}
    optims = {k: engine.build_optimizer(m, 1e-3, 0.0, device) for k, m in models.items()}
    examples = engine.make_examples(models["id"], users, items, hist, sampler, 4, torch.Generator().manual_seed(0))
    rows = engine.rows_per_step(batch, examples)
    runs: dict[str, list[float]] = {"id": [], "features": []}
    for k in models:  # one untimed step each: allocator and first-touch costs stay out of the figures
        engine.train_epoch(models[k], optims[k], examples, rows, 1)
    for _ in range(repeats):
        for k, m in models.items():
            with engine.Timer(device) as t:
                engine.train_epoch(m, optims[k], examples, rows, steps)
            runs[k].append(steps * rows * examples.per_row / max(t.seconds, 1e-9))
    med = {k: median(v) for k, v in runs.items()}
    return {"family": name, "id_samples_per_s": med["id"], "features_samples_per_s": med["features"],
            "ratio": med["features"] / med["id"], "runs": runs, "rows_per_step": rows, "per_row": examples.per_row,
            "parameters": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}}


def measure(quick: bool, threads: int = 1) -> dict[str, Any]:
    """Per family: samples/s featured vs ID-only, one process, same batch and examples, `threads` torch threads."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = [run_family(name, quick) for name in FAMILIES]
    finally:
        torch.set_num_threads(prev)
    n_users, n_items, n_pos, batch, steps, repeats = SIZES[quick]
    slots = sum(s for *_, s in ITEM_COLUMNS), sum(s for *_, s in USER_COLUMNS)
    table = [row(f"{r['family']} training samples/s with item ({slots[0]} slots) + user ({slots[1]} slots) features"
                 f", batch {batch}, {threads} thread(s)",
                 r["features_samples_per_s"], "samples/s", f"{r['family']} ID-only, same batch",
                 r["id_samples_per_s"], goal=">= 0.6x") for r in results]
    return {"rows": table, "families": results, "users": n_users, "items": n_items, "positives": n_pos,
            "batch_size": batch, "steps": steps, "repeats": repeats, "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m ncf_ray.bench.features", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    res = measure(args.quick, args.threads)
    for r in res["families"]:
        print(f"{r['family']:>6}: features {r['features_samples_per_s']:,.0f} samples/s, ID-only "
              f"{r['id_samples_per_s']:,.0f} samples/s, ratio {r['ratio']:.2f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
