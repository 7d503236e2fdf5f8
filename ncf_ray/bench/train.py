"""`ncf-ray bench train`: Ray Train throughput beside a plain torch loop, worker scaling, batch sweep, time to quality.

    ncf-ray bench train [--quick]

- Ray Train per-worker samples/s (1 worker, `run_training`) vs a plain torch loop on engine.py in this process
  (same model, batch, threads), steady-state epochs only, plain runs before and after the Ray run so that drift in
  machine load hits both;
- 1 -> 2 worker scaling (not with --quick); plain-loop throughput vs batch size;
- time to quality: valid HR@10 vs seconds of the real 2-worker Ray Train run on the ML-1M-shape synthetic default
  (--quick: the 1-worker run's curve).

The plain loop is `plain_epochs` (one small function over engine.py's epoch pieces), so it can follow the training
core wherever that goes. Stage modules are imported inside the functions: importing this module starts nothing.
"""

from __future__ import annotations

import os
import tempfile
import time
from statistics import median
from typing import Any

from ncf_ray.bench import row

PAPER_NEUMF = {"name": "neumf", "factors": 8, "layers": (64, 32, 16, 8)}  # He et al. 2017's ML-1M shape

# Sizes: full = ML-1M shape; quick = small enough for the test suite.
TRAIN_SIZES = {
    False: {"users": 6040, "items": 3706, "interactions": 1_000_000, "batch": 4096, "ray_epochs": 4,
            "plain_epochs": 3, "sweep": (1024, 4096, 16384, 65536), "sweep_samples": 600_000,
            "seq": {"factors": 64, "history_len": 200, "blocks": 2, "dropout": 0.2}, "seq_batch": 32768},
    True: {"users": 200, "items": 150, "interactions": 6000, "batch": 1024, "ray_epochs": 2,
           "plain_epochs": 2, "sweep": (256, 1024), "sweep_samples": 8192,
           "seq": {"factors": 16, "history_len": 20, "blocks": 1, "dropout": 0.2}, "seq_batch": 4096},
}
# Time-to-quality runs: the TrainConfig defaults, then the large-batch schedule recommended for 2 CPU workers.
# (--quick reuses the 1-worker run as its curve.)
TTQ_RUNS = [{"label": "defaults (batch 8192)", "overrides": {}},
            {"label": "batch 32768 (same lr rule)", "overrides": {"batch_size": 32768}}]



def _dataset(tmp: str, users: int, items: int, interactions: int) -> str:
    """Prepare a synthetic dataset dir (Ray Data) under tmp."""
    from ncf_ray.config import DataConfig
    from ncf_ray.data.prepare import prepare
    from ncf_ray.data.synthetic import SyntheticSpec

    out = os.path.join(tmp, "ds")
    prepare(DataConfig(seed=0), out, synthetic=SyntheticSpec(users=users, items=items, interactions=interactions))
    return out


# ------------------------------------------------------------------------------------------------ train
def plain_epochs(data: Any, model_cfg: Any, batch: int, threads: int, epochs: int, negatives: int = 4,
                 seed: int = 0, lr: float = 1e-3) -> list[float]:
    """The baseline: engine.fit_plain, the worker loop's recipe in one process without Ray, timed exactly like
    the Ray worker times its epoch (the optimiser steps only; negatives are drawn before the timer). Returns
    samples/s of each epoch."""
    import torch

    from ncf_ray import engine
    from ncf_ray.evaluation import train_histories
    from ncf_ray.model import model_from_config

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = model_from_config(model_cfg, data.n_users, data.n_items)
        users, items = torch.from_numpy(data.train_users), torch.from_numpy(data.train_items)
        hist = train_histories(data) if model.history_len else None
        rows = engine.fit_plain(model, users, items, data.n_items, epochs, negatives=negatives, batch_size=batch,
                                lr=lr, weight_decay=1e-6, hist=hist, generator=torch.Generator().manual_seed(seed))
        return [r["samples_per_second"] for r in rows]
    finally:
        torch.set_num_threads(prev)


def batch_sweep(data: Any, model_cfg: Any, batches: tuple[int, ...], threads: int, n_samples: int) -> list[dict]:
    """Plain-loop samples/s at each batch size over the same `n_samples` samples (after one warm-up step)."""
    import torch

    from ncf_ray import engine
    from ncf_ray.data.sampler import NegativeSampler
    from ncf_ray.model import model_from_config

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        users, items = torch.from_numpy(data.train_users), torch.from_numpy(data.train_items)
        sampler = NegativeSampler(users, items, data.n_items)
        ex = engine.pair_examples(users, items, sampler, 4, torch.Generator().manual_seed(0))
        out = []
        for b in batches:
            torch.manual_seed(0)
            model = model_from_config(model_cfg, data.n_users, data.n_items)
            opt = engine.build_optimizer(model, 1e-3, 1e-6, torch.device("cpu"))
            rows = engine.rows_per_step(b, ex)
            engine.train_epoch(model, opt, ex, rows, 1)  # warm-up: allocator and optimiser state
            steps = max(2, n_samples // b)
            t0 = time.perf_counter()
            engine.train_epoch(model, opt, ex, rows, steps)
            out.append({"batch_size": b, "samples_per_s": steps * rows * ex.per_row / (time.perf_counter() - t0)})
        return out
    finally:
        torch.set_num_threads(prev)


def _ray_history(ds: str, tmp: str, name: str, cfg: Any) -> tuple[list[dict], dict[str, Any]]:
    from ncf_ray.train import run_training

    metrics = run_training(ds, os.path.join(tmp, name), cfg, baselines=False)  # throughput, not quality
    return metrics["history"], metrics


def _steady(history: list[dict], key: str) -> float:
    """Median over the epochs after the first (the first pays for warm-up)."""
    xs = [h[key] for h in history[1:]] or [h[key] for h in history]
    return median(xs)


def curve(history: list[dict]) -> list[dict[str, float]]:
    """valid HR@10 against seconds of training: wall-clock since the workers started when train.py reports it,
    else the summed epoch times."""
    out, total = [], 0.0
    for h in history:
        total += h["epoch_seconds"]
        out.append({"epoch": h["epoch"], "seconds": h.get("elapsed_seconds", total),
                    "train_seconds": total, "valid_hr@10": h["valid_hr@10"]})
    return out


def time_to_quality(curves: dict[str, list[dict]], tolerance: float = 0.01) -> dict[str, Any]:
    """Seconds each run needs to come within `tolerance` of the best valid HR@10 seen in any run (the converged
    value)."""
    best = max(p["valid_hr@10"] for c in curves.values() for p in c)
    target = best - tolerance
    reached = {label: next((p["seconds"] for p in c if p["valid_hr@10"] >= target), None)
               for label, c in curves.items()}
    return {"converged_hr@10": best, "target_hr@10": target, "seconds_to_target": reached}


def _ttq_run(label: str, history: list[dict], metrics: dict[str, Any]) -> dict[str, Any]:
    return {"label": label, "config": metrics["config"], "curve": curve(history),
            "train_seconds": metrics["train_seconds"], "best_epoch": metrics["best_epoch"],
            "epochs": metrics["epochs"], "valid": metrics["valid"], "test": metrics["test"],
            "popularity_test": metrics["popularity"]["test"]}


def measure(quick: bool) -> dict[str, Any]:
    from ncf_ray.config import ModelConfig
    from ncf_ray.train import default_threads

    size = TRAIN_SIZES[quick]
    threads = default_threads(1)  # what train.py gives a lone worker
    model_cfg = ModelConfig(**PAPER_NEUMF)
    from ncf_ray.runtime import ensure_ray

    owns_ray = ensure_ray(log_to_driver=False)  # the workers' epoch tables are not wanted here
    try:
        return _measure(quick, size, threads, model_cfg)
    finally:
        if owns_ray:
            import ray

            ray.shutdown()


def seq_compare(data: Any, ds: str, tmp: str, base: Any, size: dict[str, Any], threads: int,
                ) -> tuple[list[float], list[dict]]:
    """The sequence model through the same comparison (its examples are history windows, not pairs):
    plain-loop epochs before and after one Ray Train worker's run, same model, batch and threads."""
    import dataclasses

    from ncf_ray.config import ModelConfig

    seq_cfg = ModelConfig(name="seq", layers=(), **size["seq"])
    seq_base = dataclasses.replace(base, model=seq_cfg, batch_size=size["seq_batch"],
                                   base_batch_size=size["seq_batch"], workers=1, threads_per_worker=threads)
    plain = plain_epochs(data, seq_cfg, size["seq_batch"], threads, size["plain_epochs"])[1:]
    one, _ = _ray_history(ds, tmp, "seq1", seq_base)
    plain += plain_epochs(data, seq_cfg, size["seq_batch"], threads, size["plain_epochs"])[1:]
    return plain, one


def seq_row(size: dict[str, Any], plain: list[float], one: list[dict]) -> dict[str, Any]:
    return row(f"Ray Train per-worker samples/s, seq (L {size['seq']['history_len']}, {size['seq']['blocks']} "
               f"block(s), batch {size['seq_batch']})", _steady(one, "samples_per_second_per_worker"), "samples/s",
               "plain torch loop, same seq model", median(plain), goal=">= 0.9")


def measure_seq(quick: bool = False) -> dict[str, Any]:
    """Only the seq row of `measure` (issue 13's goal), at the same sizes: `python -m ncf_ray.bench.train --seq`."""
    from ncf_ray.config import TrainConfig
    from ncf_ray.data.dataset import load_dataset
    from ncf_ray.runtime import ensure_ray
    from ncf_ray.train import default_threads

    size, threads = TRAIN_SIZES[quick], default_threads(1)
    owns_ray = ensure_ray(log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="ncf-bench-train-seq-") as tmp:
            ds = _dataset(tmp, size["users"], size["items"], size["interactions"])
            base = TrainConfig(epochs=size["ray_epochs"], lr=1e-3, warmup_epochs=0.0, patience=size["ray_epochs"] + 1)
            plain, one = seq_compare(load_dataset(ds), ds, tmp, base, size, threads)
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    r = seq_row(size, plain, one)
    return {"rows": [r], "ratio": r["ratio"], "threads": threads, "plain_epochs_samples_per_s": plain,
            "ray1_history": one, "settings": size["seq"] | {"batch": size["seq_batch"]},
            "dataset": {k: size[k] for k in ("users", "items", "interactions")}}


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    from pathlib import Path

    from ncf_ray import console
    from ncf_ray.atomic import write_json

    p = argparse.ArgumentParser(description="the seq row of `ncf-ray bench train` alone")
    p.add_argument("--seq", action="store_true", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    with console.session(Path(a.out) / "logs", "bench-train-seq"):  # Ray's output to a file, not the console
        res = measure_seq(a.quick)
    write_json(Path(a.out) / "train_seq.json", res)
    print(json.dumps(res["rows"][0]))


def _measure(quick: bool, size: dict[str, Any], threads: int, model_cfg: Any) -> dict[str, Any]:
    import dataclasses

    from ncf_ray.config import TrainConfig
    from ncf_ray.data.dataset import load_dataset

    all_cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="ncf-bench-train-") as tmp:
        ds = _dataset(tmp, size["users"], size["items"], size["interactions"])
        data = load_dataset(ds)
        base = TrainConfig(model=model_cfg, batch_size=size["batch"], epochs=size["ray_epochs"], lr=1e-3,
                           base_batch_size=size["batch"], warmup_epochs=0.0, patience=size["ray_epochs"] + 1)

        def compare(t: int, name: str) -> tuple[list[float], list[dict], dict[str, Any]]:
            # Interleaved: plain, Ray 1 worker, plain again, so load drift on a shared machine hits both sides.
            plain = plain_epochs(data, model_cfg, size["batch"], t, size["plain_epochs"])[1:]
            hist, metrics = _ray_history(ds, tmp, name, dataclasses.replace(base, workers=1, threads_per_worker=t))
            plain += plain_epochs(data, model_cfg, size["batch"], t, size["plain_epochs"])[1:]
            return plain, hist, metrics

        plain, one, one_metrics = compare(threads, "ray1")
        seq_plain, seq_one = seq_compare(data, ds, tmp, base, size, threads)
        # Every core in one OpenMP team (the old default): shows why train.py leaves a core to Ray.
        plain_all, one_all, _ = compare(all_cores, "ray1_all") if all_cores > threads and not quick else ([], [], {})
        # --quick skips the 2-worker run (a Ray Train start for a figure tiny sizes cannot show; the test suite
        # trains 2 workers elsewhere) and draws its time-to-quality curve from the 1-worker run.
        two, two_metrics = ([], {}) if quick else _ray_history(
            ds, tmp, "ray2", dataclasses.replace(base, workers=2, batch_size=2 * size["batch"]))
        sweep = batch_sweep(data, model_cfg, size["sweep"], threads, size["sweep_samples"])

        if quick:
            ttq_runs = [_ttq_run("quick (1 worker)", one, one_metrics)]
        else:  # full size is the synthetic default (ML-1M shape); time to quality uses the default model
            ttq_ds = ds
            ttq_runs = []
            for spec in TTQ_RUNS:
                cfg = dataclasses.replace(TrainConfig(workers=2), **spec["overrides"])
                ttq_runs.append(_ttq_run(spec["label"], *_ray_history(ttq_ds, tmp, f"ttq{len(ttq_runs)}", cfg)))
    ttq = time_to_quality({r["label"]: r["curve"] for r in ttq_runs})

    plain_sps = median(plain)
    ray1 = _steady(one, "samples_per_second_per_worker")
    ray2 = _steady(two, "samples_per_second") if two else None
    rows = [
        row(f"Ray Train per-worker samples/s (1 worker, {threads} thread(s), batch {size['batch']})", ray1,
            "samples/s", f"plain torch loop ({threads} thread(s))", plain_sps, goal=">= 0.9"),
        *([row(f"Ray Train 2 workers, total samples/s (batch {size['batch']} per worker)", ray2, "samples/s",
               "Ray Train 1 worker", ray1)] if two else []),
        seq_row(size, seq_plain, seq_one),
    ]
    extra: dict[str, Any] = {}
    if one_all:
        ray_all, plain_all_sps = _steady(one_all, "samples_per_second_per_worker"), median(plain_all)
        rows += [row(f"Ray Train per-worker samples/s (1 worker, {all_cores} threads)", ray_all, "samples/s",
                     f"plain torch loop ({all_cores} threads)", plain_all_sps),
                 row(f"plain torch loop, {all_cores} threads", plain_all_sps, "samples/s",
                     f"plain torch loop, {threads} thread(s)", plain_sps)]
        extra = {"all_cores": {"threads": all_cores, "plain_samples_per_s": plain_all_sps,
                               "plain_epochs_samples_per_s": plain_all, "ray_samples_per_s_per_worker": ray_all,
                               "ratio": ray_all / plain_all_sps, "ray1_history": one_all}}
    first = ttq_runs[0]["label"]
    for label, secs in ttq["seconds_to_target"].items():
        ref = label != first
        workers = "" if quick else " (2 workers)"
        rows.append(row(f"seconds to valid HR@10 >= {ttq['target_hr@10']:.4f}: {label}{workers}",
                        secs if secs is not None else float("nan"), "s", first if ref else None,
                        ttq["seconds_to_target"][first] if ref else None, goal="<= 60 s"))
    return {
        "rows": rows,
        "ratio": ray1 / plain_sps,
        "plain_samples_per_s": plain_sps,
        "ray_samples_per_s_per_worker": ray1,
        "plain_epochs_samples_per_s": plain,
        "ray1_history": one,
        "ray2_history": two,
        "seq": {"settings": size["seq"] | {"batch": size["seq_batch"]}, "plain_epochs_samples_per_s": seq_plain,
                "ray1_history": seq_one},
        "scaling_1_to_2": ray2 / ray1 if ray2 else None,
        "ray2_samples_per_s": ray2,
        "settings": {"model": PAPER_NEUMF, "batch_per_worker": size["batch"], "threads": threads, "negatives": 4,
                     "dataset": {k: size[k] for k in ("users", "items", "interactions")}},
        "batch_sweep": sweep,
        "time_to_quality": ttq | {"runs": ttq_runs},
        **extra,
    }


if __name__ == "__main__":
    main()
