"""Single-device NCF training benchmark without Ray: samples/s, seconds per epoch and eval users/s.

    python -m ncf_ray.bench.gpu                                  # ML-20M size on CUDA if present, else CPU
    python -m ncf_ray.bench.gpu --device cuda --amp --batch-size 1048576 --json
    python -m ncf_ray.bench.gpu --device cpu --users 300 --items 200 --positives 5000 --epochs 1   # a smoke run
    (`ncf-ray bench gpu` calls `measure`, which runs this module in a subprocess; bench/gpu_check.sh runs it on a
    lent GPU machine)

It runs the same pieces as `ncf-ray train` — model.py, data/sampler.py's NegativeSampler, engine.py's epoch
examples and train step, metrics.py — on one device with an ML-20M-size synthetic set (138k users, 27k items, 20M
positives, 4 negatives each) generated directly as tensors on the device: no Ray, no files, no host copies.
The GPU fast path: positives stay on the device; each epoch draws negatives and one permutation there; a batch is
a slice of those tensors; Adam is fused (engine.build_optimizer); `--amp` autocasts to bf16; the only host syncs
are a few per epoch (the sampler's rejection rounds and the epoch's loss). `--compile` wraps the model in
torch.compile; `--cuda-graphs` captures the whole step (forward, backward, fused Adam) once and replays it
(engine.GraphedStep). The timed epochs are `train_epochs`; `--model seq` trains on sequence windows.

Imports torch and numpy only (through ncf_ray.model/metrics/engine/data.sampler and the Ray-free ncf_ray.bench
package): the GPU image has no Ray.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import torch

from ncf_ray import engine
from ncf_ray.batch import Histories
from ncf_ray.bench import row, run_module
from ncf_ray.data.sampler import NegativeSampler
from ncf_ray.metrics import evaluate_full, evaluate_sampled
from ncf_ray.model import build_model, count_parameters

ML20M = {"users": 138_000, "items": 27_000, "positives": 20_000_000}


# ------------------------------------------------------------------------------------------------ data
def synthetic_positives(
    n_users: int, n_items: int, n_positives: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct (user, item) positives drawn on `device`: users uniform, items from a power law (popular items
    dominate, as in MovieLens). Returns (users, items) int64, sorted by user then item."""
    g = torch.Generator(device=device).manual_seed(seed)
    cells = n_users * n_items
    want = min(n_positives, cells // 2)  # leave every user free items to sample negatives from
    # ~5% of power-law draws collide; draw a little more, dedupe, then keep `want` of the distinct pairs.
    draw = int(want * 1.15) + 16
    pop = 1.0 / (torch.arange(n_items, device=device, dtype=torch.float64) + 10.0) ** 0.8
    items = torch.multinomial(pop.float(), draw, replacement=True, generator=g)
    users = torch.randint(0, n_users, (draw,), device=device, generator=g)
    keys = torch.unique(users * n_items + items)
    if keys.numel() > want:
        keep = torch.randperm(keys.numel(), device=device, generator=g)[:want]
        keys = torch.sort(keys[keep]).values
    return keys // n_items, keys % n_items


def hold_out_one(users: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
    """Leave-one-out split: each user with >= 2 positives gives its first positive to evaluation.
    `users` must be sorted (synthetic_positives returns them so)."""
    ids, counts = torch.unique_consecutive(users, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    eligible = counts >= 2
    held = starts[eligible]
    train_mask = torch.ones_like(users, dtype=torch.bool)
    train_mask[held] = False
    return {"train_users": users[train_mask], "train_items": items[train_mask],
            "eval_users": ids[eligible], "eval_items": items[held]}


# ------------------------------------------------------------------------------------------------ run
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    return torch.device(name)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 path: TF32 tensor cores (the bf16 path ignores it)
        torch.backends.cudnn.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    timings: dict[str, float] = {}

    with engine.Timer(device) as t:
        users, items = synthetic_positives(args.users, args.items, args.positives, device, args.seed)
        split = hold_out_one(users, items)
        del users, items
        sampler = NegativeSampler(split["train_users"], split["train_items"], args.items,
                                  exclude_users=split["eval_users"], exclude_items=split["eval_items"])
        gen = torch.Generator(device=device).manual_seed(args.seed + 1)
        eval_neg = sampler.sample(split["eval_users"], args.eval_negatives, generator=gen)
    timings["data_seconds"] = t.seconds
    pos_users, pos_items = split["train_users"], split["train_items"]

    model = build_model(args.model, args.users, args.items, factors=args.factors, layers=args.layers,
                        history_len=args.history_len, blocks=args.blocks).to(device)
    n_params = count_parameters(model)
    lr0 = engine.scaled_lr(args.lr, args.batch_size, 1024)
    graphs = args.cuda_graphs and device.type == "cuda"
    if graphs:  # capturable fused Adam with the lr as a device tensor, so the schedule lives inside the graph
        optimizer = engine.graph_optimizer(model, lr0, args.weight_decay, device)
    else:
        optimizer = engine.build_optimizer(model, lr0, args.weight_decay, device)
    net = torch.compile(model) if args.compile else model
    # Sequence models read each user's history: positives are sorted by user, so file order is the time order.
    hist = (Histories.from_arrays(pos_users.cpu().numpy(), pos_items.cpu().numpy(), None, args.users, device)
            if model.history_len else None)

    epochs = train_epochs(net, optimizer, pos_users, pos_items, hist, sampler, gen, lr0, args, device)

    ev = evaluate(model, split, eval_neg, sampler, hist, args, device)
    sv = serving(model, hist, args, device)
    steady = epochs[-1]  # the first epoch pays for warm-up (kernels, allocator, compile, graph capture)
    return {
        "device": str(device), "device_name": _device_name(device), "torch": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "n_users": args.users, "n_items": args.items, "n_train_positives": int(pos_users.numel()),
        "n_eval_users": int(split["eval_users"].numel()), "parameters": n_params, "lr": lr0,
        "samples_per_epoch": steady["samples"], "seconds_per_epoch": steady["epoch_seconds"],
        "train_samples_per_s": steady["train_samples_per_s"],
        "epoch_samples_per_s": steady["epoch_samples_per_s"],
        "epochs": epochs, **timings, **ev, **sv,
    }


def train_epochs(net: torch.nn.Module, optimizer: torch.optim.Optimizer, pos_users: torch.Tensor,
                 pos_items: torch.Tensor, hist: Histories | None, sampler: NegativeSampler, gen: torch.Generator,
                 lr0: float, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """`args.epochs` timed epochs of the engine's recipe: examples with fresh negatives (engine.make_examples),
    then the optimiser steps through engine.train_epoch, or through a replayed CUDA graph
    (engine.GraphedStep) with --cuda-graphs on CUDA; lr from engine.schedule. One row per epoch."""
    amp_dtype = torch.bfloat16 if args.amp else None
    graphs = args.cuda_graphs and device.type == "cuda"
    stepper: engine.GraphedStep | None = None
    epochs = []
    for epoch in range(args.epochs):
        with engine.Timer(device) as ts:
            examples = engine.make_examples(net, pos_users, pos_items, hist, sampler, args.negatives, gen)
        rows = engine.rows_per_step(args.batch_size, examples)
        steps = engine.steps_for(len(examples), rows)
        lr_for_step = engine.schedule(lr0, epoch, steps, 1.0, max(args.epochs, 2))
        with engine.Timer(device) as tt:
            if graphs:
                if stepper is None:
                    stepper = engine.GraphedStep(net, optimizer, examples.batch(0, rows), amp_dtype)
                loss = engine.train_epoch_graphed(stepper, examples, rows, steps, lr_for_step, epoch)
            else:
                loss = engine.train_epoch(net, optimizer, examples, rows, steps, lr_for_step, amp_dtype, epoch)
        trained = steps * rows * examples.per_row
        stats = {"epoch": epoch + 1, "loss": loss, "samples": trained, "steps": steps,
                 "sample_seconds": ts.seconds, "train_seconds": tt.seconds,
                 "epoch_seconds": ts.seconds + tt.seconds,
                 "train_samples_per_s": trained / tt.seconds,
                 "epoch_samples_per_s": trained / (ts.seconds + tt.seconds)}
        epochs.append(stats)
        if not args.json:
            print(f"epoch {stats['epoch']}: loss {loss:.4f}  {stats['epoch_seconds']:.2f} s "
                  f"(negatives+shuffle {ts.seconds:.2f} s)  train {stats['train_samples_per_s'] / 1e6:.2f}M samples/s  "
                  f"epoch {stats['epoch_samples_per_s'] / 1e6:.2f}M samples/s", flush=True)
        del examples

    return epochs


def evaluate(model: torch.nn.Module, split: dict[str, torch.Tensor], eval_neg: torch.Tensor,
             sampler: NegativeSampler, hist: Histories | None, args: argparse.Namespace,
             device: torch.device) -> dict[str, Any]:
    """Users/s of sampled (held-out item among its negatives) and full-ranking evaluation, with HR@10."""
    users, targets = split["eval_users"], split["eval_items"]
    big = device.type == "cuda"
    with engine.Timer(device) as ts:
        sampled = evaluate_sampled(model, users, targets, eval_neg, k=10, batch_size=65536 if big else 2048,
                                   histories=hist)
    n_full = min(len(users), args.full_eval_users)
    fu, ft = users[:n_full], targets[:n_full]
    # Exclude each user's train positives, as `ncf-ray evaluate --protocol full` does (CSR of sorted keys).
    keys = sampler.keys
    ku = keys // args.items
    indptr = torch.zeros(args.users + 1, dtype=torch.int64, device=device)
    indptr[1:] = torch.cumsum(torch.bincount(ku, minlength=args.users), 0)
    seen = (indptr, keys % args.items)
    with engine.Timer(device) as tf:
        full = evaluate_full(model, fu, ft, seen, k=10, batch_size=4096 if big else 256, histories=hist)
    return {"eval_sampled_users_per_s": len(users) / ts.seconds, "eval_sampled_seconds": ts.seconds,
            "eval_full_users_per_s": n_full / tf.seconds, "eval_full_users": n_full, "eval_full_seconds": tf.seconds,
            "valid_hr@10": sampled["hr"], "valid_full_hr@10": full["hr"]}


def serving(model: torch.nn.Module, hist: Histories | None, args: argparse.Namespace,
            device: torch.device) -> dict[str, Any]:
    """Users/s of the Serve replica's top-10 over all items (ncf_ray/scoring.py): exact fp32 vs precision "auto"
    (a compiled bf16 shortlist re-ranked in fp32 where the device has bf16 units), same model and users."""
    from ncf_ray.scoring import AllItemsScorer, reuse_large_allocations

    if device.type == "cpu":
        reuse_large_allocations()  # as each Serve replica does
    users = torch.arange(min(args.users, args.serve_users), device=device)
    history = hist.last(users, model.history_len) if hist is not None else None
    out: dict[str, Any] = {}
    for precision in ("fp32", "auto"):
        scorer = AllItemsScorer(model.eval(), precision=precision)  # compiles and warms up the bf16 kernel
        scorer.top_k(users, 10, history=history)
        reps, t0 = 0, time.perf_counter()
        with engine.Timer(device) as t:
            while reps < 3 or (reps < 1000 and time.perf_counter() - t0 < 2.0):
                scorer.top_k(users, 10, history=history)
                reps += 1
        out[f"serve_top10_users_per_s_{precision}"] = reps * len(users) / t.seconds
        out[f"serve_precision_{precision}"] = scorer.precision
        out[f"serve_note_{precision}"] = scorer.note
    out["serve_users_per_call"] = len(users)
    return out


# ------------------------------------------------------------------------------------------------ ncf-ray bench gpu
def _run_subprocess(extra: list[str]) -> dict[str, Any]:
    return run_module("ncf_ray.bench.gpu", ["--json", *extra], f"python -m ncf_ray.bench.gpu {' '.join(extra)}")


def measure(quick: bool) -> dict[str, Any]:
    """`ncf-ray bench gpu`: this module in a subprocess (a clean process, as on the GPU machine). --quick: tiny
    sizes on CPU; on CUDA the fast run (bf16, batch 1M) beside a plain fp32 run; without CUDA the same code on CPU at
    ML-1M size, so the figure exists and the path is exercised."""
    if quick:
        runs = {"fast": _run_subprocess(["--device", "cpu", "--users", "300", "--items", "200", "--positives",
                                          "5000", "--batch-size", "1024", "--epochs", "2", "--full-eval-users",
                                          "100"])}
    elif torch.cuda.is_available():
        runs = {"baseline": _run_subprocess(["--device", "cuda", "--batch-size", "65536"]),
                "fast": _run_subprocess(["--device", "cuda", "--amp", "--batch-size", "1048576", "--epochs", "3"])}
    else:  # no GPU here: the same code on CPU at ML-1M size, so the figure exists and the path is exercised
        from ncf_ray.train import default_threads

        # As train.py gives a lone worker: a full-width OpenMP team is erratic on a small shared box.
        threads = str(default_threads(1))
        runs = {"fast": _run_subprocess(["--device", "cpu", "--users", "6040", "--items", "3706", "--positives",
                                          "1000000", "--batch-size", "16384", "--full-eval-users", "1000",
                                          "--threads", threads])}
    fast, base = runs["fast"], runs.get("baseline")
    desc = (f"{fast['device_name']}: {fast['n_users']:,} users x {fast['n_items']:,} items, "
            f"batch {fast['settings']['batch_size']:,}{', bf16' if fast['settings']['amp'] else ''}")
    table = [
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
    return {"rows": table, "runs": runs}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _layers(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ncf_ray.bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--users", type=int, default=ML20M["users"])
    p.add_argument("--items", type=int, default=ML20M["items"])
    p.add_argument("--positives", type=int, default=ML20M["positives"])
    p.add_argument("--negatives", type=int, default=4, help="sampled negatives per positive")
    p.add_argument("--eval-negatives", type=int, default=99)
    p.add_argument("--full-eval-users", type=int, default=20_000, help="users ranked against every item")
    p.add_argument("--serve-users", type=int, default=1000, help="users per serving top-10 call (a full batch)")
    p.add_argument("--model", choices=("gmf", "mlp", "neumf", "mf", "seq"), default="neumf")
    p.add_argument("--history-len", type=int, default=50, help="seq: items of history read")
    p.add_argument("--blocks", type=int, default=2, help="seq: causal self-attention blocks")
    p.add_argument("--factors", type=int, default=32)
    p.add_argument("--layers", type=_layers, default=(64, 32, 16))
    p.add_argument("--batch-size", type=int, default=65536)
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate at batch 1024 (sqrt-scaled)")
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--cuda-graphs", action="store_true", help="capture the train step as a CUDA graph")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print only the result JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("users", "items", "positives", "negatives", "batch_size", "epochs", "eval_negatives", "serve_users"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')}={getattr(args, name)} must be > 0")
    if args.items < 2 or args.eval_negatives >= args.items // 2:
        raise SystemExit(f"error: --items={args.items} too few for --eval-negatives={args.eval_negatives}")
    t0 = time.perf_counter()
    out = run(args)
    out["total_seconds"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        print(f"{out['device_name']} ({out['device']}), torch {out['torch']}: {out['n_train_positives']:,} train "
              f"positives x {1 + args.negatives} = {out['samples_per_epoch']:,} samples/epoch, batch {args.batch_size:,}"
              f"{', bf16' if args.amp else ''}{', compile' if args.compile else ''}"
              f"{', CUDA graphs' if args.cuda_graphs else ''}")
        print(f"steady epoch: {out['seconds_per_epoch']:.2f} s, {out['epoch_samples_per_s'] / 1e6:.2f}M samples/s "
              f"(train steps alone {out['train_samples_per_s'] / 1e6:.2f}M samples/s)")
        print(f"eval: sampled {out['eval_sampled_users_per_s']:,.0f} users/s, full ranking "
              f"{out['eval_full_users_per_s']:,.0f} users/s; HR@10 {out['valid_hr@10']:.4f} "
              f"(full {out['valid_full_hr@10']:.4f})")
        print(f"serving top-10 over all items: {out['serve_top10_users_per_s_auto']:,.0f} users/s with precision "
              f"auto ({out['serve_precision_auto']}) vs {out['serve_top10_users_per_s_fp32']:,.0f} in fp32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
