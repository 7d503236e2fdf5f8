"""The whole chain in one driver: prepare -> tune (small sweep) -> train the best config at full length -> deploy
to Ray Serve -> smoke-query over HTTP -> summary.

    python jobs/pipeline.py --out RESULTS [--storage DIR_OR_URI] [--quick]      # also under `ray job submit`
    python -m ncf_ray.demo [--quick]                                            # `make demo`

Both entrypoints are thin wrappers around `run_pipeline`. Every stage is the same function the `ncf-ray`
subcommand calls (prepare, run_sweep, run_training, run_server), so nothing here is a second copy of a stage.
Layout of OUT: `dataset/`, `sweep/` (results.csv, best/), `train/` (model/ artifact, metrics.json), `summary.json`.
Checkpoints go to `--storage` when given (a dir every node sees, or a pyarrow URI such as s3://bucket/prefix),
else under OUT; with a URI the final artifact and summary are copied there too.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ncf_ray.atomic import write_json
from ncf_ray.config import TrainConfig, TuneConfig, build_serve_config, build_train_config, from_dict
from ncf_ray.errors import UserError
from ncf_ray.runtime import ensure_ray

# Sizes per preset (None: the generator's ML-1M-shaped default, ~6,000 users x ~3,700 items, ~1M rows).
# quick: tiny data (tests, reviewers). demo: `make demo`, a mid-sized synthetic shop (3,000 users x 2,000 items,
# 300k view/cart/purchase events with item and user side tables, device and time context, new items) and small
# per-family grids, trained for click and purchase. full: the ML-1M-shaped data with a real sweep.
SHOP_TASKS = ("click", "purchase")
PRESETS: dict[str, dict[str, Any]] = {
    # quick and demo sweep every family (`--model auto`: mf, neumf, seq, and EASE in closed form) on small grids,
    # so the table compares families and the demo serves whichever wins on valid.
    "quick": {"source": "synthetic-shop", "tasks": SHOP_TASKS,
              "users": 300, "items": 200, "interactions": 9_000, "search": "grid", "num_samples": 1,
              # No refit: one Ray Train run less for a preset that exists to show every stage runs (test_train.py
              # covers --refit; demo and full refit).
              "sweep_epochs": 2, "epochs": 3, "batch_size": 1024, "families": ("mf", "seq"), "refit": False,
              "spaces": {"mf": {"factors": [16], "lr": [3e-3]},
                         "seq": {"history_len": [20], "blocks": [1], "factors": [16], "lr": [3e-3]}}},
    "demo": {"source": "synthetic-shop", "tasks": SHOP_TASKS,
             "users": 3000, "items": 2000, "interactions": 300_000, "search": "grid", "num_samples": 1,
             "sweep_epochs": 5, "epochs": 8, "batch_size": None,
             # id_dropout: the feature path learns to score items alone, so the shop's new items rank.
             "spaces": {"mf": {"factors": [64], "id_dropout": [0.5], "batch_size": [2048], "lr": [3e-3]},
                        "neumf": {"factors": [32], "depth": [1], "id_dropout": [0.5]},
                        "seq": {"history_len": [50], "blocks": [1], "factors": [32], "batch_size": [8192]}}},
    "full": {"users": None, "items": None, "interactions": None, "search": "random", "num_samples": 16,
             "sweep_epochs": 10, "epochs": 20, "batch_size": None, "spaces": None},
}


@dataclass(frozen=True)
class PipelineConfig:
    """What the pipeline runs. None sizes mean the synthetic generator's ML-1M-shaped default."""

    out: str
    storage: str | None = None
    source: str = "synthetic"  # synthetic, synthetic-shop, or a log file/dir/URI
    tasks: tuple[str, ...] = ("click",)  # click, or click + purchase on logs with purchase events
    users: int | None = None
    items: int | None = None
    interactions: int | None = None
    model: str = "auto"  # a family, or auto: every family swept, the best by valid trained and served
    search: str = "random"  # random | grid | optuna (grid: num_samples per grid point)
    num_samples: int = 4
    sweep_epochs: int = 3
    epochs: int = 10
    batch_size: int | None = None
    spaces: dict[str, Any] | None = None  # family -> search space (None: each family's default space)
    families: tuple[str, ...] | None = None  # what --model auto sweeps (None: tune.AUTO_FAMILIES)
    refit: bool = True  # the served weights are refitted on every interaction after selection on valid
    workers: int = 1
    gpu: bool = False
    max_failures: int = 3
    seed: int = 0
    host: str = "127.0.0.1"
    port: int = 8000
    keep_serving: bool = True
    overwrite: bool = False


SYNTHETIC_SIZES = ("users", "items", "interactions")
SYNTHETIC_SOURCES = ("synthetic", "synthetic-shop")


def preset(name: str, **overrides: Any) -> PipelineConfig:
    """A PipelineConfig from a named preset; None-valued overrides keep the preset's value. The preset's
    synthetic sizes apply only to the synthetic source; given with another source they are refused (they would
    be ignored)."""
    if name not in PRESETS:
        raise UserError(f"preset {name!r} is not one of {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("source", "synthetic") not in SYNTHETIC_SOURCES:
        sizes = [f"--{k}" for k in SYNTHETIC_SIZES if k in given]
        if sizes:
            raise UserError(f"{'/'.join(sizes)} only apply to --source synthetic or synthetic-shop, not "
                            f"{given['source']!r}")
        values.update(dict.fromkeys(SYNTHETIC_SIZES))  # the preset's sizes describe its synthetic data only
        values["tasks"] = ("click",)  # a log of its own may have no purchase events
    values.update(given)
    return PipelineConfig(**values)


def is_uri(path: str | None) -> bool:
    return bool(path) and "://" in str(path)


def _sub(storage: str | None, name: str) -> str | None:
    """`storage`/name for a dir or a URI (URIs always use '/')."""
    if not storage:
        return None
    return f"{storage.rstrip('/')}/{name}" if is_uri(storage) else str(Path(storage).resolve() / name)


# ------------------------------------------------------------------------------------------------- stages
def stage_prepare(cfg: PipelineConfig, dataset_dir: Path) -> dict[str, Any]:
    from ncf_ray.config import DataConfig
    from ncf_ray.data.prepare import prepare
    from ncf_ray.data.synthetic import synthetic_spec

    if cfg.source == "synthetic-shop":
        from ncf_ray.data.shop import ShopSpec

        sizes = {"users": cfg.users, "items": cfg.items, "interactions": cfg.interactions}
        synthetic = ShopSpec(**{k: v for k, v in sizes.items() if v is not None}, seed=cfg.seed)
    else:
        synthetic = synthetic_spec(cfg.source, cfg.users, cfg.items, cfg.interactions, seed=cfg.seed)
    return prepare(DataConfig(source=cfg.source, seed=cfg.seed), dataset_dir, overwrite=cfg.overwrite,
                   synthetic=synthetic)


def stage_tune(cfg: PipelineConfig, dataset_dir: Path, sweep_dir: Path) -> dict[str, Any]:
    from ncf_ray.config import default_train_config
    from ncf_ray.tune import run_auto_sweep, run_sweep

    tcfg = TuneConfig(model=cfg.model, num_samples=cfg.num_samples, max_epochs=cfg.sweep_epochs,
                      workers_per_trial=cfg.workers, grace_period=max(1, min(2, cfg.sweep_epochs)), seed=cfg.seed,
                      search=cfg.search)
    overrides = {"gpu": cfg.gpu, "tasks": cfg.tasks, **({"batch_size": cfg.batch_size} if cfg.batch_size else {})}
    if cfg.model == "auto":
        from ncf_ray.tune import AUTO_FAMILIES

        return run_auto_sweep(str(dataset_dir), str(sweep_dir), tcfg, overrides, spaces=cfg.spaces,
                              families=cfg.families or AUTO_FAMILIES)
    base = build_train_config(default_train_config(cfg.model), **overrides)
    return run_sweep(str(dataset_dir), str(sweep_dir), tcfg, base=base, space=(cfg.spaces or {}).get(cfg.model))


def best_train_config(sweep: dict[str, Any], cfg: PipelineConfig) -> TrainConfig:
    """The sweep's best trial config, at full length and with the pipeline's scaling and fault tolerance."""
    best = from_dict(TrainConfig, sweep["best_metrics"]["config"])
    return build_train_config(best, epochs=cfg.epochs, workers=cfg.workers, gpu=cfg.gpu, threads_per_worker=None,
                              max_failures=cfg.max_failures, patience=max(best.patience, 3))


def stage_train(cfg: PipelineConfig, dataset_dir: Path, run_dir: Path, tcfg: TrainConfig) -> dict[str, Any]:
    from ncf_ray.train import run_training

    return run_training(str(dataset_dir), str(run_dir), tcfg, storage_path=_sub(cfg.storage, "train"),
                        refit=cfg.refit)


def stage_deploy(cfg: PipelineConfig, model_dir: Path) -> str:
    """Deploy the artifact on Ray Serve (replaces a running `ncf` app in place); returns the base URL."""
    from ncf_ray.serve import run_server

    return run_server(build_serve_config(model_dir=str(model_dir), host=cfg.host, port=cfg.port), blocking=False)


def smoke_query(url: str, user_id: str, k: int = 10, timeout_s: float = 60.0,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """POST /recommend for one known user (retrying while the proxy comes up); fails unless items come back.
    `extra`: more request fields (objective, explain, context)."""
    body = json.dumps({"user_id": user_id, "k": k, **(extra or {})}).encode()
    deadline, last = time.time() + timeout_s, None
    while time.time() < deadline:
        req = urllib.request.Request(f"{url}/recommend", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                answer = json.loads(resp.read())
            if not answer.get("items"):
                raise UserError(f"smoke query for user {user_id!r} returned no items: {answer}")
            return answer
        except OSError as exc:  # connection refused / 503 while Serve starts
            last = exc
            time.sleep(1)
    raise UserError(f"smoke query {url}/recommend for user {user_id!r} failed: {last}")


def publish(local_dir: Path, storage: str | None, name: str) -> str | None:
    """Copy a finished local dir to `storage`/name when storage is a URI (s3://, gs://, ...); returns where."""
    if not is_uri(storage):
        return None
    import pyarrow.fs as pafs

    dest = _sub(storage, name)
    fs, path = pafs.FileSystem.from_uri(dest)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return dest


# ------------------------------------------------------------------------------------------------- driver
def _fresh_out(cfg: PipelineConfig) -> Path:
    out = Path(cfg.out).resolve()
    parts = [out / n for n in ("dataset", "sweep", "train", "summary.json")]
    if any(p.exists() for p in parts):
        if not cfg.overwrite:
            raise UserError(f"{out} already holds pipeline results; pass --overwrite or choose another --out")
        for p in parts:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_pipeline(cfg: PipelineConfig, log: Any = print) -> dict[str, Any]:
    """Run every stage; returns (and writes to OUT/summary.json) what a reader needs to judge the result."""
    from ncf_ray.artifact import load_artifact

    out = _fresh_out(cfg)
    t0 = time.time()
    timings: dict[str, float] = {}

    def timed(name: str, fn: Any, *args: Any) -> Any:
        log(f"== {name}", flush=True)
        t = time.time()
        res = fn(*args)
        timings[name] = round(time.time() - t, 1)
        return res

    ensure_ray()
    dataset_dir, sweep_dir, run_dir = out / "dataset", out / "sweep", out / "train"
    data = timed("prepare", stage_prepare, cfg, dataset_dir)
    sweep = timed("tune", stage_tune, cfg, dataset_dir, sweep_dir)
    tcfg = best_train_config(sweep, cfg)
    metrics = timed("train", stage_train, cfg, dataset_dir, run_dir, tcfg)
    model_dir = run_dir / "model"
    url = timed("deploy", stage_deploy, cfg, model_dir)
    served = load_artifact(str(model_dir))
    user = str(served.user_ids[0])
    # Ask as a shopper would: explanations, and "likely to buy" where the served model has a purchase head.
    extra = {"explain": True,
             **({"objective": "purchase"} if "purchase" in getattr(served.model, "tasks", ()) else {})}
    answer = timed("query", smoke_query, url, user, 10, 60.0, extra)
    summary = {
        "out": str(out),
        "dataset": {k: data.get(k) for k in ("n_users", "n_items", "n_interactions")},
        "sweep": {"results_csv": sweep.get("results_csv"), "best_trial": sweep.get("best"),
                  "best_family": sweep.get("best_family", tcfg.model.name), "families": sweep.get("families"),
                  "trials": sweep["trials"], "best_dir": sweep["best_dir"]},
        "best_config": {"model": dataclasses.asdict(tcfg.model), "lr": tcfg.lr, "negatives": tcfg.negatives,
                        "weight_decay": tcfg.weight_decay, "epochs": tcfg.epochs},
        "valid": metrics["valid"], "test": metrics["test"], "popularity": metrics["popularity"],
        "ease": metrics["baselines"].get("ease", {}), "exported": metrics.get("exported"),
        "model_dir": str(model_dir), "model_version": metrics["model_version"],
        "checkpoints": _sub(cfg.storage, "train") or str(run_dir),
        "serve_url": url,
        "query": {"url": f"{url}/recommend", "user_id": user, "items": [i["item_id"] for i in answer["items"]],
                  "cold_start": answer["cold_start"], "request": extra,
                  "because": {i["item_id"]: [b["item_id"] for b in i.get("because", [])] for i in answer["items"]}},
        "seconds": timings | {"total": round(time.time() - t0, 1)},
    }
    summary["published"] = publish(run_dir / "model", cfg.storage, "model")  # None unless storage is a URI
    write_json(out / "summary.json", summary)
    if summary["published"]:
        publish_file(out / "summary.json", cfg.storage)
    if not cfg.keep_serving:
        from ray import serve

        serve.shutdown()
        summary["serve_url"] = None
    return summary


def publish_file(path: Path, storage: str) -> None:
    """Copy one local file to the root of a storage URI."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage)
    with fs.open_output_stream(f"{root.rstrip('/')}/{path.name}") as f:
        f.write(path.read_bytes())


def format_report(summary: dict[str, Any], k: int = 10) -> str:
    """Human-readable report: metrics beside popularity, the sweep table, where everything is."""
    from ncf_ray.tune import format_auto, format_table

    v, t, p, e = summary["valid"], summary["test"], summary["popularity"], summary.get("ease") or {}
    sweep = summary["sweep"]
    table = (format_auto({"families": sweep["families"], "best_family": sweep["best_family"]}, k)
             if sweep.get("families") else format_table(sweep["results_csv"]))
    model = summary["best_config"]["model"]
    query = summary["query"]
    lines = [
        "",
        f"sweep ({sweep['trials']} trials; best by valid: {sweep['best_family']}):",
        table,
        "",
        (f"best config ({model['name']}) fitted in closed form" if model["name"] in ("ease", "pop") else
         f"best config ({model['name']}) trained for up to {summary['best_config']['epochs']} epochs, selected on "
         f"valid") + f"; served weights: {(summary.get('exported') or {}).get('weights', 'best-by-valid')}",
        f"{'':<12} {'HR@' + str(k):>8} {'NDCG@' + str(k):>8}",
        f"{'valid':<12} {v[f'hr@{k}']:>8.4f} {v[f'ndcg@{k}']:>8.4f}",
        f"{'test':<12} {t[f'hr@{k}']:>8.4f} {t[f'ndcg@{k}']:>8.4f}",
        f"{'  popularity':<12} {p['test'][f'hr@{k}']:>8.4f} {p['test'][f'ndcg@{k}']:>8.4f}",
        *([f"{'  EASE':<12} {e['test'][f'hr@{k}']:>8.4f} {e['test'][f'ndcg@{k}']:>8.4f}"] if "test" in e else []),
        *([f"{'purchase':<12} {t['purchase'][f'hr@{k}']:>8.4f} {t['purchase'][f'ndcg@{k}']:>8.4f}  "
           f"(test users whose held-out event is a purchase, n={t['purchase']['n']}, {t['purchase']['head']} head)"]
          if t.get("purchase") else []),
        *([f"{'new items':<12} {t['new_items'][f'hr@{k}']:>8.4f} {t['new_items'][f'ndcg@{k}']:>8.4f}  "
           f"(new-item targets among {t['new_items']['candidates']} new items, n={t['new_items']['n']}; random "
           f"{t['new_items'][f'random_hr@{k}']:.3f})"] if t.get("new_items") else []),
        "",
        f"smoke query: POST {summary['query']['url']} {json.dumps(query.get('request', {}))} user "
        f"{query['user_id']} -> {', '.join(query['items'][:5])} ..."
        f"{'' if summary['serve_url'] else '  (Serve now shut down)'}",
        *([f"             because: {first} <- {', '.join(query['because'][first]) or '-'}"]
          if query.get("because") and (first := query["items"][0]) in query["because"] else []),
        f"results:     {summary['out']}  (dataset/, sweep/<family>/results.csv, sweep/best/, train/model/, summary.json)",
        f"checkpoints: {summary['checkpoints']}",
    ]
    if summary.get("published"):
        lines.append(f"published:   {summary['published']}")
    secs = summary["seconds"]
    lines.append("seconds:     " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items()))
    return "\n".join(lines)


def run_job(main: Any, argv: list[str] | None = None) -> int:
    """Exit status of a `jobs/*.py` entrypoint: its own code; 2 with ONE stderr line `error: ...` for a user
    mistake (UserError: the job log's last line is what `ray job status/logs` users see first); 130 on Ctrl-C.
    Anything else is a bug: its traceback is printed in full and the status is 1."""
    import sys
    import traceback

    try:
        return int(main(argv if argv is not None else sys.argv[1:]) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        return 1
