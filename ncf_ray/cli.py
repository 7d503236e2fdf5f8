"""`ncf-ray`: the command line. Each subcommand parses flags and calls one stage function.

    ncf-ray prepare SOURCE --out DATASET_DIR      # Ray Data: raw log -> split, sharded dataset dir
    ncf-ray train DATASET_DIR --out RUN_DIR       # Ray Train (seq, NCF, MF; ease/pop in closed form) -> RUN_DIR/model
    ncf-ray baselines DATASET_DIR                 # popularity and EASE on valid and test
    ncf-ray evaluate MODEL_DIR DATASET_DIR        # HR@K / NDCG@K, sampled or full ranking
    ncf-ray recommend MODEL_DIR --user RAW_ID     # top-K for one user
    ncf-ray tune DATASET_DIR --out SWEEP_DIR      # Ray Tune sweep (--model auto: every family) -> SWEEP_DIR/best
    ncf-ray serve MODEL_DIR                       # Ray Serve HTTP endpoint
    ncf-ray update MODEL_DIR NEW_LOG --out NEW    # Ray Train: warm-start the model on a new log (vocab grows)
    ncf-ray promote NEW_MODEL_DIR                 # swap an update into the running app if its guard holds
    ncf-ray rollback                              # swap the served model's parent back in
    ncf-ray forget MODEL_DIR --user RAW_ID        # an artifact without that user (hashed in forgotten.json)
    ncf-ray bench {prepare,train,eval,serve,gpu,all}

A user mistake prints one line `error: ...` and exits 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ncf_ray.errors import UserError

if TYPE_CHECKING:
    from ncf_ray.config import ServeConfig, TrainConfig

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad flags already; keep its message on one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message}\n")


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _print_json_last(obj: object) -> None:
    print(json.dumps(obj, sort_keys=True))


# ------------------------------------------------------------------------------------------------- prepare
def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="raw interaction log -> dataset dir (Ray Data)",
                       description="SOURCE: a file, directory, glob or URI (s3://, gs://, file://) of CSV/TSV/TXT/"
                                   "Parquet/JSONL; or synthetic, synthetic-shop, ncf:PATH_PREFIX, "
                                   "movielens-100k|1m|20m.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--out", required=True, metavar="DIR", help="dataset dir to write (atomically)")
    p.add_argument("--user-col", default="user_id")
    p.add_argument("--item-col", default="item_id")
    p.add_argument("--time-col", default="timestamp")
    p.add_argument("--rating-col", default=None, help="rating column (default 'rating' when --min-rating is set)")
    p.add_argument("--min-rating", type=float, default=None, help="keep rows with rating >= this (implicit)")
    p.add_argument("--sep", default=None, help="field separator: default ',' for .csv and tab for .tsv, required for .txt/.dat; one "
                        "character is parsed as CSV (quoted fields may hold it), several (e.g. '::') split exactly")
    p.add_argument("--min-user-interactions", type=int, default=3)
    p.add_argument("--eval-negatives", type=int, default=99)
    p.add_argument("--max-bad-fraction", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=4, help="train Parquet files")
    p.add_argument("--from", dest="local_from", default=None, metavar="LOCAL",
                   help="movielens-*: a local copy of the GroupLens zip or its folder (offline)")
    p.add_argument("--users", type=int, default=None, help="synthetic, synthetic-shop: users (default 6040)")
    p.add_argument("--items", type=int, default=None, help="synthetic: items (default 3706; shop 3700)")
    p.add_argument("--interactions", type=int, default=None, help="synthetic(-shop): interactions (default 1,000,000)")
    g = p.add_argument_group("shop logs (events, context, side tables)")
    g.add_argument("--event-col", default=None, help="event type column (view/cart/purchase ...)")
    g.add_argument("--events", type=_csv_names, default=None,
                   help="event names in funnel order, weakest first (default view,cart,purchase); other values "
                        "are bad rows")
    g.add_argument("--purchase-event", default=None, help="this event and stronger count as a purchase "
                                                          "(default the last of --events)")
    g.add_argument("--dedup-window", type=int, default=None, metavar="SECONDS",
                   help="keep the strongest event per (user, item, window) instead of per (user, item)")
    g.add_argument("--keep-all-events", action="store_true", help="no dedup: every event is a positive")
    g.add_argument("--context-cols", type=_csv_names, default=None,
                   help="categorical context columns of the log, e.g. device,region")
    g.add_argument("--time-context", action=argparse.BooleanOptionalAction, default=None,
                   help="hour-of-day and day-of-week context from the timestamp (UTC); default on with "
                        "--event-col or --context-cols")
    g.add_argument("--item-features", default=None, metavar="FILE", help="item side table (id + columns)")
    g.add_argument("--user-features", default=None, metavar="FILE", help="user side table (id + columns)")
    g.add_argument("--feature-id-col", default=None,
                   help="id column of the side tables: NAME, or items=NAME,users=NAME (default the log's "
                        "--item-col / --user-col)")
    g.add_argument("--text-cols", type=_csv_names, default=None, help="side-table text columns (hashed words)")
    g.add_argument("--vector-cols", type=_csv_names, default=None,
                   help="side-table columns of fixed-length float vectors (precomputed embeddings)")
    g.add_argument("--no-side-tables", action="store_true",
                   help="movielens-*: do not load users/movies files as side tables")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    p.set_defaults(func=_cmd_prepare)


def _csv_names(text: str) -> tuple[str, ...]:
    """'a, b,c' -> ('a', 'b', 'c'); an empty name is refused by argparse as a bad value."""
    names = tuple(n.strip() for n in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r}: empty name in a comma-separated list")
    return names


def _cmd_prepare(args: argparse.Namespace) -> int:
    from ncf_ray.config import DataConfig
    from ncf_ray.data.prepare import format_summary, local_out, prepare
    from ncf_ray.data.synthetic import synthetic_spec

    local_out(args.out)  # refuses a URI --out before Ray starts
    sep = args.sep.encode().decode("unicode_escape") if args.sep else None  # so --sep '\t' means a tab
    cfg = DataConfig(source=args.source, user_col=args.user_col, item_col=args.item_col, time_col=args.time_col,
                     rating_col=args.rating_col, min_rating=args.min_rating, sep=sep,
                     min_user_interactions=args.min_user_interactions, eval_negatives=args.eval_negatives,
                     max_bad_fraction=args.max_bad_fraction, seed=args.seed, shards=args.shards,
                     **_shop_flags(args))
    if args.source == "synthetic-shop":
        from ncf_ray.data.shop import shop_spec

        synthetic = shop_spec(args.users, args.items, args.interactions, seed=args.seed)
    else:
        synthetic = synthetic_spec(args.source, args.users, args.items, args.interactions, seed=args.seed)
    if args.local_from and not args.source.startswith("movielens"):
        raise UserError(f"--from only applies to movielens-* sources, not {args.source!r}")
    from ncf_ray.runtime import ensure_ray

    ensure_ray(log_to_driver=False)
    summary = prepare(cfg, args.out, overwrite=args.overwrite, local_from=args.local_from, synthetic=synthetic)
    print(format_summary(summary))
    if args.json:
        _print_json_last(summary)
    return 0


def _shop_flags(args: argparse.Namespace) -> dict[str, Any]:
    """DataConfig fields of the shop-log flags that were given (the rest keep DataConfig's defaults)."""
    given = {"event_col": args.event_col, "events": args.events, "purchase_event": args.purchase_event,
             "dedup_window": args.dedup_window, "context_cols": args.context_cols, "time_context": args.time_context,
             "item_features": args.item_features, "user_features": args.user_features,
             "feature_id_col": args.feature_id_col, "text_cols": args.text_cols, "vector_cols": args.vector_cols}
    out = {k: v for k, v in given.items() if v is not None}
    if args.keep_all_events:
        out["keep_all_events"] = True
    if args.no_side_tables:
        out["side_tables"] = False
    for flag in ("events", "purchase_event", "dedup_window", "keep_all_events"):
        if flag in out and "event_col" not in out and args.source != "synthetic-shop":
            raise UserError(f"--{flag.replace('_', '-')} needs --event-col (the log's event column)")
    return out


# ------------------------------------------------------------------------------------------------- train
def _add_side_flags(p: argparse.ArgumentParser) -> None:
    """Side information and tasks (issue 14): flags shared by train and tune; None = the config default."""
    g = p.add_argument_group("features, context and tasks (logs prepared with side tables / events)")
    g.add_argument("--no-features", dest="features", action="store_false", default=None,
                   help="ignore the dataset's item/user side tables (the ID-only model)")
    g.add_argument("--no-context", dest="context", action="store_false", default=None,
                   help="ignore per-interaction context (hour, weekday, --context-cols)")
    g.add_argument("--id-dropout", type=float, default=None,
                   help="drop the id embedding per training row with this probability so features learn to "
                        "score new items alone (default 0)")
    g.add_argument("--tasks", default=None, help="click or click,purchase (a head each; default click)")
    g.add_argument("--task-mixture", choices=("shared", "mmoe"), default=None,
                   help="multi-task bottom: shared, or a multi-gate mixture of experts")
    g.add_argument("--experts", type=int, default=None, help="mmoe: number of experts (default 4)")
    g.add_argument("--task-weights", default=None, help="loss weight per task, e.g. 1,2 (default 1 each)")
    g.add_argument("--select-task", default=None,
                   help="the task whose valid HR@K drives early stopping and Tune (default click)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from ncf_ray.config import DEFAULT_MODEL, MODEL_NAMES, ModelConfig, TrainConfig

    d, m = TrainConfig(), ModelConfig()
    p = sub.add_parser("train", help="train a model (NCF data-parallel on Ray Train; ease/pop in closed form)",
                       description="Flags not given take the model family's defaults (config.MODEL_DEFAULTS, "
                                   "chosen on real data), else the values shown.")
    p.add_argument("dataset_dir")
    p.add_argument("--out", required=True, help="run dir: checkpoints, model/ artifact, metrics.json")
    p.add_argument("--model", choices=MODEL_NAMES, default=DEFAULT_MODEL)
    p.add_argument("--factors", type=int, default=None, help=f"embedding size (default {m.factors})")
    p.add_argument("--layers", type=_csv_ints, default=None,
                   help=f"MLP tower widths (default {','.join(map(str, m.layers))}); seq --head neumf: its tower")
    p.add_argument("--dropout", type=float, default=None, help=f"default {m.dropout}")
    p.add_argument("--history-len", type=int, default=None, help="seq: items of each user's history it reads")
    p.add_argument("--blocks", type=int, default=None, help="seq: causal self-attention blocks")
    p.add_argument("--heads", type=int, default=None, help="seq: attention heads")
    p.add_argument("--head", choices=("dot", "neumf"), default=None, help="seq: dot product or NeuMF's head")
    p.add_argument("--use-user-id", action="store_true", default=None, help="seq: add the user-id embedding")
    p.add_argument("--lam", type=float, default=None, help="ease: ridge penalty (default: picked on valid)")
    p.add_argument("--epochs", type=int, default=None, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch in scored candidates, split over workers (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate at batch {d.base_batch_size} "
                                                          f"(default {d.lr:g})")
    p.add_argument("--negatives", type=int, default=None, help=f"sampled negatives per positive (default "
                                                               f"{d.negatives})")
    p.add_argument("--weight-decay", type=float, default=None, help=f"default {d.weight_decay:g}")
    p.add_argument("--patience", type=int, default=None, help=f"early stop after N epochs without gain "
                                                              f"(default {d.patience})")
    p.add_argument("--workers", type=int, default=None, help=f"default {d.workers}")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    p.add_argument("--gpu", action="store_true", default=None)
    p.add_argument("--amp", action="store_true", default=None,
                   help="bf16 autocast (GPU, or a CPU with bf16 units; otherwise ignored with a note)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-failures", type=int, default=None, help="worker-group restarts")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--stream", action="store_true", default=None,
                   help="stream positives per batch (logs larger than memory)")
    p.add_argument("--pretrain-from", default=None, help="GMF_DIR,MLP_DIR model artifacts to initialise NeuMF")
    p.add_argument("--refit", action="store_true",
                   help="after selection on valid, retrain for the best epoch count on all interactions and "
                        "export that")
    p.add_argument("--no-baselines", action="store_true", help="skip EASE beside the model (popularity stays)")
    p.add_argument("--storage", default=None, metavar="DIR_OR_URI",
                   help="checkpoint storage (RunConfig.storage_path): a dir every node sees or a pyarrow URI "
                        "(s3://, gs://); default --out")
    p.add_argument("--json", action="store_true", help="print metrics JSON as the last line")
    _add_side_flags(p)
    p.set_defaults(func=_cmd_train)


SIDE_FLAG_KEYS = ("features", "context", "id_dropout", "tasks", "task_mixture", "experts", "task_weights",
                  "select_task")

# `ncf-ray train` flag (argparse dest) -> TrainConfig key, for the flags whose names differ; every other flag of
# _add_train that is a config key passes through under its own name.
_TRAIN_FLAG_KEYS = {"threads": "threads_per_worker"}
_TRAIN_NOT_CONFIG = ("command", "func", "dataset_dir", "out", "resume", "storage", "json", "refit", "no_baselines",
                     "verbose")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed `ncf-ray train` flags (jobs/train.py too), through config.build_train_config:
    the flags given, over the model family's defaults (config.default_train_config)."""
    from ncf_ray.config import build_train_config, default_train_config

    values = {_TRAIN_FLAG_KEYS.get(k, k): v for k, v in vars(args).items()
              if k not in _TRAIN_NOT_CONFIG and v is not None}
    return build_train_config(default_train_config(values.pop("model")), **values)


def _cmd_train(args: argparse.Namespace) -> int:
    from ncf_ray.train import format_summary, run_training

    cfg = train_config_from_args(args)
    metrics = run_training(args.dataset_dir, args.out, cfg, resume=args.resume, storage_path=args.storage,
                           refit=args.refit, baselines=not args.no_baselines)
    print(format_summary(metrics, cfg.eval_k))
    print(f"model artifact: {Path(args.out) / 'model'}")
    if args.json:
        _print_json_last({k: v for k, v in metrics.items() if k != "history"})
    return 0


# ------------------------------------------------------------------------------------------------- evaluate
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="HR@K / NDCG@K of a model artifact on a dataset's test split")
    p.add_argument("model_dir")
    p.add_argument("dataset_dir")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--protocol", choices=("sampled", "full"), default="sampled")
    p.add_argument("--split", choices=("test", "valid"), default="test")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ncf_ray.artifact import load_artifact
    from ncf_ray.data.dataset import load_dataset
    from ncf_ray.train import evaluate_model

    if args.k <= 0:
        raise UserError(f"--k={args.k} must be > 0")
    art = load_artifact(args.model_dir)
    data = load_dataset(args.dataset_dir)
    if (art.n_users, art.n_items) != (data.n_users, data.n_items):
        raise UserError(f"model has {art.n_users} users x {art.n_items} items but {args.dataset_dir} has "
                        f"{data.n_users} x {data.n_items}: evaluate on the dataset the model was trained on")
    m = evaluate_model(art.model, data, args.k, split=args.split)
    prefix = "full_" if args.protocol == "full" else ""
    out = {"protocol": args.protocol, "split": args.split, "k": args.k,
           f"hr@{args.k}": m[f"{prefix}hr@{args.k}"], f"ndcg@{args.k}": m[f"{prefix}ndcg@{args.k}"],
           "model_version": art.model_version}
    print(f"{args.split} ({args.protocol}): HR@{args.k} {out[f'hr@{args.k}']:.4f}  "
          f"NDCG@{args.k} {out[f'ndcg@{args.k}']:.4f}")
    if args.json:
        _print_json_last(out)
    return 0


# ------------------------------------------------------------------------------------------------- recommend
def _add_recommend(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recommend", help="top-K items for one user from a model artifact")
    p.add_argument("model_dir")
    p.add_argument("--user", required=True, help="raw user id as in the interaction log")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--include-seen", action="store_true", help="do not drop items the user already has")
    p.add_argument("--explain", action="store_true",
                   help="per item, up to 3 of the user's own past items that support it (\"because you viewed X\")")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_recommend)


def _cmd_recommend(args: argparse.Namespace) -> int:
    from ncf_ray.artifact import load_artifact
    from ncf_ray.recommender import Recommender

    if not 1 <= args.k <= 1000:
        raise UserError(f"--k={args.k} must be within 1..1000")
    rec = Recommender(load_artifact(args.model_dir)).recommend([args.user], args.k, exclude_seen=not args.include_seen,
                                                               explain=args.explain)[0]
    if rec["cold_start"]:
        print(f"user {args.user!r} is unknown to the model: most popular items (cold start)")
    for rank, it in enumerate(rec["items"], 1):
        print(f"{rank:>3}  {it['item_id']:<20} {it['score']:.4f}")
        if it.get("because"):
            reasons = ", ".join(f"{b['item_id']} ({b['score']:.2f})" for b in it["because"])
            print(f"     because you viewed {reasons}")
    if args.json:
        _print_json_last(rec)
    return 0


# ------------------------------------------------------------------------------------------------- tune
def _add_tune(sub: argparse._SubParsersAction) -> None:
    from ncf_ray.config import MODEL_NAMES, TuneConfig

    d = TuneConfig()
    p = sub.add_parser("tune", help="Ray Tune sweep (embedding size x MLP depth, ASHA) -> SWEEP_DIR/best")
    p.add_argument("dataset_dir")
    p.add_argument("--out", required=True, help="sweep dir: results.csv, plot.png, best/, TensorBoard logs")
    p.add_argument("--model", choices=(*(m for m in MODEL_NAMES if m not in ("ease", "pop")), "auto"),
                   default="auto", help="a family, or auto (the default): sweep mf, neumf and seq, fit EASE, "
                                        "export the best by valid")
    p.add_argument("--num-samples", type=int, default=d.num_samples,
                   help="trials (default 8); with --search grid: runs of each grid point (default 1)")
    p.add_argument("--max-epochs", type=int, default=d.max_epochs)
    p.add_argument("--workers-per-trial", type=int, default=d.workers_per_trial)
    p.add_argument("--max-concurrent", type=int, default=None, help="default: what the cluster's CPUs/GPUs fit")
    p.add_argument("--space", default=None,
                   help="search space YAML (default: ncf_ray.tune.DEFAULT_SPACE, SEQ_SPACE for seq)")
    p.add_argument("--search", choices=("random", "grid", "optuna"), default=d.search)
    p.add_argument("--grace-period", type=int, default=d.grace_period, help="ASHA: epochs before a trial can stop")
    p.add_argument("--reduction-factor", type=int, default=d.reduction_factor, help="ASHA reduction factor")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="finish an interrupted sweep in --out")
    p.add_argument("--json", action="store_true")
    _add_side_flags(p)
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(args: argparse.Namespace) -> int:
    from ncf_ray.config import TuneConfig, build_train_config, default_train_config
    from ncf_ray.tune import format_auto, format_table, load_space, run_auto_sweep, run_sweep

    tcfg = TuneConfig(model=args.model, num_samples=args.num_samples, max_epochs=args.max_epochs,
                      workers_per_trial=args.workers_per_trial, max_concurrent=args.max_concurrent,
                      search=args.search, grace_period=args.grace_period, reduction_factor=args.reduction_factor,
                      seed=args.seed)
    overrides = {"gpu": args.gpu, **({"batch_size": args.batch_size} if args.batch_size else {})}
    overrides.update({key: getattr(args, key) for key in SIDE_FLAG_KEYS if getattr(args, key) is not None})
    if args.model == "auto":
        if args.space:
            raise UserError("--space applies to one family: add --model FAMILY (--model auto, the default, uses each "
                            "family's default space)")
        summary = run_auto_sweep(args.dataset_dir, args.out, tcfg, overrides, resume=args.resume)
        print(format_auto(summary))
    else:
        base = build_train_config(default_train_config(args.model), **overrides)
        space = load_space(args.space, args.model)  # refused here, before Ray starts, if invalid
        summary = run_sweep(args.dataset_dir, args.out, tcfg, base=base, space=space, resume=args.resume)
        print(format_table(summary["results_csv"]))
    b = summary["best_metrics"]
    print(f"best {summary.get('best_family', 'trial ' + str(summary.get('best')))}: valid HR@10 "
          f"{b['valid']['hr@10']:.4f}, test HR@10 {b['test']['hr@10']:.4f} NDCG@10 {b['test']['ndcg@10']:.4f} "
          f"(popularity {b['popularity']['test']['hr@10']:.4f}); {summary['trials']} trials in "
          f"{summary['seconds']:.0f} s -> {summary['best_dir']}")
    if args.json:
        _print_json_last({k: v for k, v in summary.items() if k != "best_metrics"}
                         | {"best_metrics": {k: v for k, v in b.items() if k != "history"}})
    return 0


# ------------------------------------------------------------------------------------------------- serve
def _replicas(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"replicas must be >= 1, got {n}")
    return n


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from ncf_ray.config import SERVE_PRECISIONS, ServeConfig

    d = ServeConfig()
    p = sub.add_parser("serve", help="serve a model artifact over HTTP (Ray Serve; blocks until Ctrl-C)")
    p.add_argument("model_dir")
    p.add_argument("--host", default=d.host, help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--replicas", type=_replicas, default=d.replicas, help="N or 'auto' (autoscaling)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="requests per forward pass")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_timeout_s * 1000,
                   help="how long a batch waits to fill")
    p.add_argument("--max-ongoing-requests", type=int, default=d.max_ongoing_requests)
    p.add_argument("--precision", choices=SERVE_PRECISIONS, default=d.precision,
                   help="all-items scoring: auto = bf16 shortlist re-ranked in fp32 where bf16 is fast")
    p.add_argument("--ha-proxy", action=argparse.BooleanOptionalAction, default=True,
                   help="HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1; figures in README, Serve)")
    p.add_argument("--emit-config", action="store_true", help="print a `serve deploy` YAML and exit")
    p.set_defaults(func=_cmd_serve)


def serve_config_from_flags(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of parsed `ncf-ray serve` flags (also used by jobs/deploy.py), via config.build_serve_config."""
    from ncf_ray.config import build_serve_config

    return build_serve_config(model_dir=str(Path(args.model_dir).resolve()), host=args.host, port=args.port,
                              replicas=args.replicas, max_batch_size=args.max_batch_size,
                              batch_wait_timeout_s=args.batch_wait_ms / 1000,
                              max_ongoing_requests=args.max_ongoing_requests, precision=args.precision)


def _cmd_serve(args: argparse.Namespace) -> int:
    from ncf_ray.artifact import load_artifact
    from ncf_ray.serve import emit_config, run_server

    cfg = serve_config_from_flags(args)
    art = load_artifact(args.model_dir)  # verify (manifest, weights) before starting Ray
    if args.emit_config:
        print(emit_config(cfg), end="")
        return 0
    print(f"model {art.model_version}: {art.n_users} users x {art.n_items} items", flush=True)
    run_server(cfg, blocking=True, ha_proxy=args.ha_proxy)
    return 0


# ------------------------------------------------------------------------------------------------- bench
def _add_bench(sub: argparse._SubParsersAction) -> None:
    from ncf_ray.bench import BENCHES, DEFAULT_OUT, QUICK_OUT

    p = sub.add_parser("bench", help="benchmarks, each figure beside a same-run baseline -> bench/RESULTS.md")
    p.add_argument("name", choices=(*BENCHES, "all"))
    p.add_argument("--quick", action="store_true", help="tiny sizes (minutes, not tens of minutes)")
    p.add_argument("--out", default=None, help=f"results dir (default {DEFAULT_OUT}; {QUICK_OUT} with --quick); "
                                               "RESULTS.md goes beside it")
    p.add_argument("--json", action="store_true", help="print the results JSON as the last line")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from ncf_ray.bench import format_rows, run_bench

    command = "ncf-ray bench " + " ".join(
        [args.name, *(["--quick"] if args.quick else []), *(["--out", args.out] if args.out else [])])
    results = run_bench(args.name, args.quick, args.out, command=command)
    print(format_rows(results))
    if args.json:
        _print_json_last(results if args.name == "all" else results[args.name])
    return 0


# ------------------------------------------------------------------------------------------------- baselines
def _add_baselines(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("baselines", help="popularity and EASE on a dataset's valid and test splits",
                       description="Popularity and EASE (closed-form item-item, lambda picked on valid HR@K) on "
                                   "valid and test, sampled and full ranking, with test segments.")
    p.add_argument("dataset_dir")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--no-ease", action="store_true", help="popularity only")
    p.add_argument("--lambdas", default=None, metavar="L1,L2,...",
                   help="EASE L2 grid picked on valid (default 10,50,100,200,500,1000,2000,5000); one value per "
                        "Cholesky inverse, so a shorter grid is faster")
    p.add_argument("--json", action="store_true", help="print the metrics JSON as the last line")
    p.set_defaults(func=_cmd_baselines)


def _cmd_baselines(args: argparse.Namespace) -> int:
    from ncf_ray.baselines import baseline_metrics, format_baselines
    from ncf_ray.data.dataset import load_dataset

    if args.k <= 0:
        raise UserError(f"--k={args.k} must be > 0")
    lambdas = None
    if args.lambdas is not None:
        try:
            lambdas = [float(x) for x in args.lambdas.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--lambdas: expected comma-separated numbers, got {args.lambdas!r}") from None
    m = baseline_metrics(load_dataset(args.dataset_dir), k=args.k, ease=not args.no_ease, lambdas=lambdas)
    print(format_baselines(m))
    if args.json:
        _print_json_last(m)
    return 0


# ------------------------------------------------------------------------------------------------- continual
SERVE_ADDRESS_HELP = "Ray address of the cluster running the Serve app (default: RAY_ADDRESS, else auto)"


def _add_update(sub: argparse._SubParsersAction) -> None:
    from ncf_ray.update import DEFAULT_EPOCHS, DEFAULT_REPLAY

    p = sub.add_parser("update", help="warm-start a model artifact on a new log (Ray Train) -> a new artifact",
                       description="Reads NEW_LOG as the parent's log was read, appends new users/items to the "
                                   "vocab, trains on the new rows (minus each user's latest, the holdout) plus a "
                                   "replay of old ones, scores child and parent on the holdout, and writes "
                                   "NEW_MODEL_DIR atomically with its lineage.")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("new_log", metavar="NEW_LOG", help="file, dir or glob of the new interactions")
    p.add_argument("--out", required=True, metavar="NEW_MODEL_DIR", help="the child artifact (must not exist)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--replay", type=float, default=DEFAULT_REPLAY,
                   help="share of the training positives drawn from old interactions")
    p.add_argument("--lr", type=float, default=None, help="default: the parent's training lr")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: the parent's)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: the parent's, smaller for a small window (20 steps an epoch at least)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--item-features", default=None, metavar="FILE",
                   help="side table of the new items (a feature-aware model scores them from it right away)")
    p.add_argument("--user-features", default=None, metavar="FILE", help="side table of the new users")
    p.add_argument("--json", action="store_true", help="print the update's metrics as JSON on the last line")
    p.set_defaults(func=_cmd_update)


def _cmd_update(args: argparse.Namespace) -> int:
    from ncf_ray.update import run_update

    res = run_update(args.model_dir, args.new_log, args.out, epochs=args.epochs, replay=args.replay, lr=args.lr,
                     workers=args.workers, batch_size=args.batch_size, seed=args.seed,
                     item_features=args.item_features, user_features=args.user_features)
    if args.json:
        _print_json_last({k: v for k, v in res.items() if k != "history"})
    return 0


def _add_promote(sub: argparse._SubParsersAction) -> None:
    from ncf_ray.serve import DEFAULT_TOLERANCE

    p = sub.add_parser("promote", help="swap an updated artifact into the running Serve app if its guard holds")
    p.add_argument("model_dir", metavar="NEW_MODEL_DIR")
    p.add_argument("--serve-address", default=None, help=SERVE_ADDRESS_HELP)
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="promote when child holdout HR@10 >= parent's - this")
    p.add_argument("--force", action="store_true", help="promote even when the guard fails")
    p.set_defaults(func=_cmd_promote)


def _cmd_promote(args: argparse.Namespace) -> int:
    from ncf_ray.serve import promote

    res = promote(str(Path(args.model_dir).resolve()), args.serve_address, args.tolerance, args.force)
    print(f"promoted {res['model_version']} (was {res['previous']['model_version']}): {res['guard']}"
          + (" [forced]" if res["forced"] else ""))
    return 0


def _add_rollback(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rollback", help="swap the served model's parent (from its lineage) back in")
    p.add_argument("--serve-address", default=None, help=SERVE_ADDRESS_HELP)
    p.set_defaults(func=_cmd_rollback)


def _cmd_rollback(args: argparse.Namespace) -> int:
    from ncf_ray.serve import rollback

    res = rollback(args.serve_address)
    print(f"rolled back to {res['model_version']} (was {res['previous']['model_version']})")
    return 0


def _add_forget(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forget", help="write an artifact without the given users (embedding rows, history, seen)")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--user", action="append", required=True, metavar="RAW_ID", help="repeat for several users")
    p.add_argument("--out", default=None, metavar="NEW_MODEL_DIR", help="default: replace MODEL_DIR atomically")
    p.set_defaults(func=_cmd_forget)


def _cmd_forget(args: argparse.Namespace) -> int:
    from ncf_ray.privacy import forget_users

    res = forget_users(args.model_dir, args.user, args.out)
    print(f"forgot {res['forgotten_now']} user(s) ({res['already_forgotten']} already forgotten; "
          f"{res['forgotten_total']} in all) -> {res['out']} ({res['model_version']})")
    return 0


# ------------------------------------------------------------------------------------------------- main
ADDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_prepare,
    _add_train,
    _add_evaluate,
    _add_recommend,
    _add_tune,
    _add_serve,
    _add_bench,
    _add_baselines,
    _add_update,
    _add_promote,
    _add_rollback,
    _add_forget,
]


VERBOSE_HELP = "also print Ray's own output (always written to the command's logs/ file)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ncf-ray", description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", "-v", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in ADDERS:
        add(sub)
    for p in sub.choices.values():  # `ncf-ray train ... --verbose` too; SUPPRESS keeps a flag given before it
        p.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


def log_dir_for(args: argparse.Namespace) -> Path | None:
    """Where a command's log file goes: beside what it writes. train/tune: OUT/logs; prepare: DATASET_DIR.logs/
    beside the dataset dir (the dataset dir itself is replaced atomically, and a plain logs/ there could be a
    folder of the log being prepared); serve: logs/ beside the artifact (RUN_DIR/logs for RUN_DIR/model); bench:
    RESULTS_DIR/logs. None for commands that do not start Ray."""
    if args.command in ("train", "tune"):
        return Path(args.out) / "logs"
    if args.command == "prepare":
        out = Path(args.out).resolve()
        return out.with_name(out.name + ".logs")
    if args.command == "serve":
        return Path(args.model_dir).resolve().parent / "logs"
    if args.command == "bench":  # Ray's and Serve's output of the benches that start them, beside the results
        from ncf_ray.bench import DEFAULT_OUT, QUICK_OUT

        return Path(args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)) / "logs"
    if args.command == "update":  # beside the new artifact, like prepare's (the artifact dir is swapped whole)
        out = Path(args.out).resolve()
        return out.with_name(out.name + ".logs")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    from ncf_ray import console

    args = build_parser().parse_args(argv)
    log_dir = log_dir_for(args)
    try:
        with (console.session(log_dir, args.command, verbose=args.verbose) if log_dir is not None
              else contextlib.nullcontext()):
            return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
