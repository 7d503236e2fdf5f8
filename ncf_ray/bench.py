"""Benchmarks that print each figure beside a baseline measured in the same run, and the ratio.

    ncf-ray bench {prepare,train,eval,serve,gpu,all} [--quick] [--json] [--out bench/results]

Each bench writes `<out>/<name>.json` atomically and regenerates `<out>/../RESULTS.md` (bench/RESULTS.md by
default): one Markdown table of every results JSON present, with the command, date and machine of each, plus
the plots `<out>/throughput_vs_batch.png` and `<out>/time_to_quality.png`. `--quick` uses tiny sizes (the test
suite runs it; `ncf-ray bench all --quick` takes about two minutes on 2 cores) and writes to bench/quick/results
unless --out says otherwise, so quick figures never overwrite the real ones.

- train: Ray Train per-worker samples/s (1 worker, `run_training`) vs a plain torch loop on engine.py in this
  process (same model, batch, threads), steady-state epochs only, plain runs before and after the Ray run so that
  drift in machine load hits both; 1 -> 2 worker scaling; throughput vs batch size; time to quality (valid HR@10 vs
  seconds of the real 2-worker Ray Train run on the ML-1M-shape synthetic default).
- eval: users/s of sampled and full-ranking evaluation of NeuMF at ML-1M size vs the popularity baseline scored by
  the same code.
- prepare: bench/bench_prepare.py (rows/s, peak memory). serve: ncf_ray.bench_serve (req/s vs a no-op endpoint).
- gpu: `python -m ncf_ray.bench_gpu` in a subprocess (Ray-free); on CUDA a plain fp32 run is the baseline of the
  fast (bf16, 1M batch) run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

from ncf_ray.atomic import replacing, write_json
from ncf_ray.errors import UserError

BENCHES = ("prepare", "train", "eval", "serve", "gpu")
DEFAULT_OUT = "bench/results"
QUICK_OUT = "bench/quick/results"
PAPER_NEUMF = {"name": "neumf", "factors": 8, "layers": (64, 32, 16, 8)}  # He et al. 2017's ML-1M shape

# Sizes: full = ML-1M shape; quick = small enough for the test suite.
TRAIN_SIZES = {
    False: {"users": 6040, "items": 3706, "interactions": 1_000_000, "batch": 4096, "ray_epochs": 4,
            "plain_epochs": 3, "sweep": (1024, 4096, 16384, 65536), "sweep_samples": 600_000},
    True: {"users": 200, "items": 150, "interactions": 6000, "batch": 1024, "ray_epochs": 2,
           "plain_epochs": 2, "sweep": (256, 1024), "sweep_samples": 8192},
}
# Time-to-quality runs: the TrainConfig defaults, then the large-batch schedule recommended for 2 CPU workers.
# (--quick reuses the 2-worker scaling run as its curve.)
TTQ_RUNS = [{"label": "defaults (batch 8192)", "overrides": {}},
            {"label": "batch 32768 (same lr rule)", "overrides": {"batch_size": 32768}}]


# ------------------------------------------------------------------------------------------------ helpers
def machine() -> dict[str, Any]:
    """Where the figures come from."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"host": platform.node(), "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__}
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def row(figure: str, value: float, unit: str, baseline: str | None = None, baseline_value: float | None = None,
        goal: str | None = None) -> dict[str, Any]:
    """One table row: a figure, its same-run baseline and their ratio."""
    ratio = value / baseline_value if baseline_value else None
    return {"figure": figure, "value": value, "unit": unit, "baseline": baseline, "baseline_value": baseline_value,
            "ratio": ratio, "goal": goal}


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
    """The baseline: a single-process torch loop on engine.py, timed exactly like the Ray worker times its epoch
    (the optimiser steps only; negatives are drawn before the timer). Returns samples/s of each epoch."""
    import torch

    from ncf_ray import engine
    from ncf_ray.data.sampler import NegativeSampler
    from ncf_ray.model import model_from_config

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        device = torch.device("cpu")
        gen = torch.Generator().manual_seed(seed)
        users, items = torch.from_numpy(data.train_users), torch.from_numpy(data.train_items)
        sampler = NegativeSampler(users, items, data.n_items)
        model = model_from_config(model_cfg, data.n_users, data.n_items)
        optimizer = engine.build_optimizer(model, lr, 1e-6, device)
        out = []
        for _ in range(epochs):
            samples = engine.epoch_samples(users, items, sampler, negatives, gen)
            steps = engine.steps_for(len(samples), batch)
            with engine.Timer(device) as t:
                engine.train_epoch(model, optimizer, samples, batch, steps)
            out.append(steps * batch / t.seconds)
        return out
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
        s = engine.epoch_samples(users, items, sampler, 4, torch.Generator().manual_seed(0))
        out = []
        for b in batches:
            torch.manual_seed(0)
            model = model_from_config(model_cfg, data.n_users, data.n_items)
            opt = engine.build_optimizer(model, 1e-3, 1e-6, torch.device("cpu"))
            engine.train_epoch(model, opt, s, b, 1)  # warm-up: allocator and optimiser state
            steps = max(2, n_samples // b)
            t0 = time.perf_counter()
            engine.train_epoch(model, opt, s, b, steps)
            out.append({"batch_size": b, "samples_per_s": steps * b / (time.perf_counter() - t0)})
        return out
    finally:
        torch.set_num_threads(prev)


def _ray_history(ds: str, tmp: str, name: str, cfg: Any) -> tuple[list[dict], dict[str, Any]]:
    from ncf_ray.train import run_training

    metrics = run_training(ds, os.path.join(tmp, name), cfg)
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


def bench_train(quick: bool) -> dict[str, Any]:
    from ncf_ray.config import ModelConfig
    from ncf_ray.train import default_threads

    size = TRAIN_SIZES[quick]
    threads = default_threads(1)  # what train.py gives a lone worker
    model_cfg = ModelConfig(**PAPER_NEUMF)
    from ncf_ray.runtime import ensure_ray

    owns_ray = ensure_ray(log_to_driver=False)  # the workers' epoch tables are not wanted here
    try:
        return _bench_train(quick, size, threads, model_cfg)
    finally:
        if owns_ray:
            import ray

            ray.shutdown()


def _bench_train(quick: bool, size: dict[str, Any], threads: int, model_cfg: Any) -> dict[str, Any]:
    import dataclasses

    from ncf_ray.config import TrainConfig
    from ncf_ray.data.dataset import load_dataset

    all_cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="ncf-bench-train-") as tmp:
        ds = _dataset(tmp, size["users"], size["items"], size["interactions"])
        data = load_dataset(ds)
        base = TrainConfig(model=model_cfg, batch_size=size["batch"], epochs=size["ray_epochs"], lr=1e-3,
                           base_batch_size=size["batch"], warmup_epochs=0.0, patience=size["ray_epochs"] + 1)

        def compare(t: int, name: str) -> tuple[list[float], list[dict]]:
            # Interleaved: plain, Ray 1 worker, plain again, so load drift on a shared machine hits both sides.
            plain = plain_epochs(data, model_cfg, size["batch"], t, size["plain_epochs"])[1:]
            hist, _ = _ray_history(ds, tmp, name, dataclasses.replace(base, workers=1, threads_per_worker=t))
            plain += plain_epochs(data, model_cfg, size["batch"], t, size["plain_epochs"])[1:]
            return plain, hist

        plain, one = compare(threads, "ray1")
        # Every core in one OpenMP team (the old default): shows why train.py leaves a core to Ray.
        plain_all, one_all = compare(all_cores, "ray1_all") if all_cores > threads and not quick else ([], [])
        two, two_metrics = _ray_history(ds, tmp, "ray2", dataclasses.replace(base, workers=2,
                                                                              batch_size=2 * size["batch"]))
        sweep = batch_sweep(data, model_cfg, size["sweep"], threads, size["sweep_samples"])

        if quick:
            ttq_runs = [_ttq_run("quick", two, two_metrics)]
        else:  # full size is the synthetic default (ML-1M shape); time to quality uses the default model
            ttq_ds = ds
            ttq_runs = []
            for spec in TTQ_RUNS:
                cfg = dataclasses.replace(TrainConfig(workers=2), **spec["overrides"])
                ttq_runs.append(_ttq_run(spec["label"], *_ray_history(ttq_ds, tmp, f"ttq{len(ttq_runs)}", cfg)))
    ttq = time_to_quality({r["label"]: r["curve"] for r in ttq_runs})

    plain_sps = median(plain)
    ray1 = _steady(one, "samples_per_second_per_worker")
    ray2 = _steady(two, "samples_per_second")
    rows = [
        row(f"Ray Train per-worker samples/s (1 worker, {threads} thread(s), batch {size['batch']})", ray1,
            "samples/s", f"plain torch loop ({threads} thread(s))", plain_sps, goal=">= 0.9"),
        row(f"Ray Train 2 workers, total samples/s (batch {size['batch']} per worker)", ray2, "samples/s",
            "Ray Train 1 worker", ray1),
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
        rows.append(row(f"seconds to valid HR@10 >= {ttq['target_hr@10']:.4f}: {label} (2 workers)",
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
        "scaling_1_to_2": ray2 / ray1,
        "ray2_samples_per_s": ray2,
        "settings": {"model": PAPER_NEUMF, "batch_per_worker": size["batch"], "threads": threads, "negatives": 4,
                     "dataset": {k: size[k] for k in ("users", "items", "interactions")}},
        "batch_sweep": sweep,
        "time_to_quality": ttq | {"runs": ttq_runs},
        **extra,
    }


# ------------------------------------------------------------------------------------------------ eval
def bench_eval(quick: bool, repeats: int = 3) -> dict[str, Any]:
    """Users/s of sampled and full-ranking evaluation (default NeuMF) vs the popularity baseline."""
    import numpy as np
    import torch

    from ncf_ray.bench_gpu import hold_out_one, synthetic_positives
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


# ------------------------------------------------------------------------------------------------ prepare
def bench_prepare_rows(quick: bool) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        from bench_prepare import bench_prepare  # bench/bench_prepare.py
    finally:
        sys.path.pop(0)
    res = bench_prepare(quick)
    rows = []
    for size, r in res.items():
        rows.append(row(f"prepare synthetic {size}: rows/s ({r['rows']:,} rows)", r["rows_per_s"], "rows/s"))
        rows.append(row(f"prepare synthetic {size}: peak memory, all processes (PSS)", r["tree_pss_peak_mib"], "MiB",
                        goal="< 8192 MiB" if size == "20m" else None))
    return {"rows": rows, "sizes": res}


# ------------------------------------------------------------------------------------------------ serve
def bench_serve_rows(quick: bool) -> dict[str, Any]:
    from ncf_ray.bench_serve import bench_serve

    res = bench_serve(None, quick)
    rec, batch, floor = res["recommend"], res["recommend_batch"], res["noop_floor"]
    small, base = res["recommend_batch_small"], res["fp32_baseline"]
    precision = res["scoring"]["precision"]
    full = not quick  # the goals are for the ML-1M-size model; --quick serves a tiny one
    rows = [
        row("POST /recommend (top-10) requests/s", rec["rps"], "req/s", "no-op endpoint, same Serve", floor["rps"],
            goal=">= 1000" if full else None),
        row(f"POST /recommend/batch users/s ({batch['users_per_request']} users per request)", batch["users_per_s"],
            "users/s", "single /recommend users/s", rec["rps"], goal=">= 20000" if full else None),
        row(f"POST /recommend/batch users/s ({small['users_per_request']} users per request)", small["users_per_s"],
            "users/s", f"{batch['users_per_request']} users per request", batch["users_per_s"]),
        row(f"POST /recommend/batch users/s, {precision} scoring", batch["users_per_s"], "users/s",
            "same deployment, exact fp32 scoring", base["recommend_batch"]["users_per_s"]),
        row(f"POST /recommend requests/s, {precision} scoring", rec["rps"], "req/s",
            "same deployment, exact fp32 scoring", base["recommend"]["rps"]),
    ]
    for key in ("p50_ms", "p99_ms"):
        rows.append(row(f"POST /recommend {key.replace('_ms', '')} latency", rec[key], "ms", "no-op endpoint",
                        floor[key], goal="<= 50" if full and key == "p99_ms" else None))
    return {"rows": rows, **res}


# ------------------------------------------------------------------------------------------------ gpu
def _run_bench_gpu(extra: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "ncf_ray.bench_gpu", "--json", *extra], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_gpu {' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_gpu_rows(quick: bool) -> dict[str, Any]:
    import torch

    if quick:
        runs = {"fast": _run_bench_gpu(["--device", "cpu", "--users", "300", "--items", "200", "--positives",
                                        "5000", "--batch-size", "1024", "--epochs", "2", "--full-eval-users",
                                        "100"])}
    elif torch.cuda.is_available():
        runs = {"baseline": _run_bench_gpu(["--device", "cuda", "--batch-size", "65536"]),
                "fast": _run_bench_gpu(["--device", "cuda", "--amp", "--batch-size", "1048576", "--epochs", "3"])}
    else:  # no GPU here: the same code on CPU at ML-1M size, so the figure exists and the path is exercised
        from ncf_ray.train import default_threads

        # As train.py gives a lone worker: a full-width OpenMP team is erratic on a small shared box.
        threads = str(default_threads(1))
        runs = {"fast": _run_bench_gpu(["--device", "cpu", "--users", "6040", "--items", "3706", "--positives",
                                        "1000000", "--batch-size", "16384", "--full-eval-users", "1000",
                                        "--threads", threads])}
    fast, base = runs["fast"], runs.get("baseline")
    desc = (f"{fast['device_name']}: {fast['n_users']:,} users x {fast['n_items']:,} items, "
            f"batch {fast['settings']['batch_size']:,}{', bf16' if fast['settings']['amp'] else ''}")
    rows = [
        row(f"bench_gpu epoch samples/s ({desc})", fast["epoch_samples_per_s"], "samples/s",
            "fp32, batch 65,536" if base else None, base["epoch_samples_per_s"] if base else None,
            goal=">= 70M on one H200" if fast["device"].startswith("cuda") else None),
        row("bench_gpu seconds per epoch", fast["seconds_per_epoch"], "s"),
        row("bench_gpu sampled eval users/s", fast["eval_sampled_users_per_s"], "users/s"),
        row("bench_gpu full-ranking eval users/s", fast["eval_full_users_per_s"], "users/s"),
        row(f"bench_gpu serving top-10 users/s, precision auto ({fast['serve_precision_auto']}), "
            f"{fast['serve_users_per_call']} users per call", fast["serve_top10_users_per_s_auto"], "users/s",
            "exact fp32 scoring", fast["serve_top10_users_per_s_fp32"]),
    ]
    return {"rows": rows, "runs": runs}


# ------------------------------------------------------------------------------------------------ report
RUNNERS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "prepare": bench_prepare_rows, "train": bench_train, "eval": bench_eval, "serve": bench_serve_rows,
    "gpu": bench_gpu_rows,
}


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    if isinstance(x, float):
        if x != x:  # NaN: not reached
            return "not reached"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    return str(x)


def render_report(out: Path) -> str:
    """Markdown of every <out>/*.json, in BENCHES order, plus the plots when present."""
    report = out.parent / "RESULTS.md"
    lines = ["# Benchmark results", "",
             f"Regenerated by `ncf-ray bench` from `{os.path.relpath(out, report.parent)}/*.json`. Each figure stands "
             "beside a baseline measured in the same run; ratio = figure / baseline.", ""]
    for name in BENCHES:
        path = out / f"{name}.json"
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        m = res.get("machine", {})
        lines += [f"## {name}{' (quick sizes)' if res.get('quick') else ''}", "",
                  f"`{res.get('command')}` — {res.get('date')}, {res.get('seconds', 0):.0f} s; {m.get('cpu')} "
                  f"({m.get('cpus')} CPUs), torch {m.get('torch')}, ray {m.get('ray', '—')}, "
                  f"load {m.get('load_avg_1m', '—')}", "",
                  "| figure | value | unit | baseline | baseline value | ratio | goal |",
                  "|---|---:|---|---|---:|---:|---|"]
        for r in res["rows"]:
            lines.append(f"| {r['figure']} | {_fmt(r['value'])} | {r['unit']} | {r['baseline'] or '—'} | "
                         f"{_fmt(r['baseline_value'])} | {_fmt(r['ratio'])} | {r.get('goal') or ''} |")
        if name == "train" and "time_to_quality" in res:
            lines += ["", *_ttq_lines(res)]
        lines.append("")
    for png, title in (("throughput_vs_batch.png", "Throughput vs batch size"),
                       ("time_to_quality.png", "Valid HR@10 vs seconds of training")):
        if (out / png).exists():
            lines += [f"![{title}]({os.path.relpath(out / png, report.parent)})", ""]
    return "\n".join(lines)


def _ttq_lines(res: dict[str, Any]) -> list[str]:
    ttq = res["time_to_quality"]
    lines = [f"Time to quality (2 workers; converged valid HR@10 {ttq['converged_hr@10']:.4f}, target "
             f"{ttq['target_hr@10']:.4f}):", "", "| run | epoch | seconds | valid HR@10 |", "|---|---:|---:|---:|"]
    for run in ttq["runs"]:
        for p in run["curve"]:
            lines.append(f"| {run['label']} | {p['epoch']} | {p['seconds']:.1f} | {p['valid_hr@10']:.4f} |")
    return lines


def plot(out: Path) -> list[str]:
    """PNGs from train.json: plain-loop throughput vs batch size, and valid HR@10 vs seconds."""
    path = out / "train.json"
    if not path.exists():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(path.read_text())
    if "batch_sweep" not in res or "time_to_quality" not in res:
        return []
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    sweep = res["batch_sweep"]
    ax.plot([p["batch_size"] for p in sweep], [p["samples_per_s"] for p in sweep], "o-", label="plain torch loop")
    ax.axhline(res["ray_samples_per_s_per_worker"], ls="--", c="gray",
               label=f"Ray Train 1 worker (batch {res['settings']['batch_per_worker']})")
    ax.set(xscale="log", xlabel="batch size", ylabel="samples/s", title="NeuMF training throughput (CPU)")
    ax.legend()
    written.append(_save(fig, out / "throughput_vs_batch.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in res["time_to_quality"]["runs"]:
        ax.plot([p["seconds"] for p in run["curve"]], [p["valid_hr@10"] for p in run["curve"]], "o-",
                label=run["label"])
    ax.axhline(res["time_to_quality"]["target_hr@10"], ls="--", c="gray", label="converged - 0.01")
    ax.set(xlabel="seconds of training (2 Ray Train workers)", ylabel="valid HR@10", title="Time to quality")
    ax.legend()
    written.append(_save(fig, out / "time_to_quality.png"))
    plt.close("all")
    return written


def _save(fig: Any, path: Path) -> str:
    with replacing(path) as tmp:  # bench/results/.*.png.tmp is git-ignored
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return str(path)


def write_report(out: Path) -> Path:
    plot(out)
    report = out.parent / "RESULTS.md"
    with replacing(report) as tmp:
        tmp.write_text(render_report(out))
    return report


# ------------------------------------------------------------------------------------------------ entry
def run_bench(name: str, quick: bool, out: str | Path | None = None, command: str | None = None) -> dict[str, Any]:
    """Run one bench (or "all"), write its JSON(s) and regenerate RESULTS.md; returns {name: result}."""
    if name != "all" and name not in RUNNERS:
        raise UserError(f"bench {name!r} is not one of {', '.join((*BENCHES, 'all'))}")
    out_dir = Path(out or (QUICK_OUT if quick else DEFAULT_OUT))
    results = {}
    for n in BENCHES if name == "all" else (name,):
        t0 = time.perf_counter()
        res = RUNNERS[n](quick)
        res.update(name=n, quick=quick, seconds=time.perf_counter() - t0,
                   date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), machine=machine(),
                   command=command or f"ncf-ray bench {n}{' --quick' if quick else ''}")
        write_json(out_dir / f"{n}.json", res)
        write_report(out_dir)
        results[n] = res
    return results


def format_rows(results: dict[str, Any]) -> str:
    lines = []
    for name, res in results.items():
        for r in res["rows"]:
            ratio = f"  ratio {r['ratio']:.3f} vs {r['baseline']} ({_fmt(r['baseline_value'])})" if r["ratio"] else ""
            lines.append(f"{name:>8}  {r['figure']}: {_fmt(r['value'])} {r['unit']}{ratio}")
    return "\n".join(lines)
