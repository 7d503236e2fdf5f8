"""Frozen configuration dataclasses for every stage, and the one builder of each from flat keys.

Every way a run is configured — `ncf-ray` flags, a job's flags, a Tune trial's sampled values, a saved
`config.json`, a `serve run key=value` list — goes through `build_train_config` / `build_serve_config` (or
`from_dict`, which calls them), so coercion, aliases (`model`, `depth`) and validation live here once.
Config never reaches inside a model: `model.py` turns a ModelConfig into the model's flat constructor args.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ncf_ray.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DataConfig:
    """How `prepare` reads a raw log and splits it (leave-one-out by time)."""

    source: str = "synthetic"
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str = "timestamp"
    rating_col: str | None = None
    min_rating: float | None = None
    sep: str | None = None
    min_user_interactions: int = 3
    eval_negatives: int = 99
    max_bad_fraction: float = 0.01
    seed: int = 0
    shards: int = 4  # Parquet files under train/: the unit Ray Data hands to workers
    # Shop logs (issue 14). All optional: without event_col / context / side tables the dataset is ID-only.
    event_col: str | None = None  # raw column holding the event type
    events: tuple[str, ...] = ("view", "cart", "purchase")  # funnel order, weakest first
    purchase_event: str | None = None  # this event and the stronger ones count as a purchase; None = events[-1]
    dedup_window: int | None = None  # seconds: keep the strongest event per (user, item, window), not per pair
    keep_all_events: bool = False  # no dedup at all: every event is a positive
    context_cols: tuple[str, ...] = ()  # categorical per-interaction context columns (device, region, ...)
    time_context: bool | None = None  # hour-of-day + day-of-week context; None = on with events or context_cols
    item_features: str | None = None  # side table files (any format prepare reads)
    user_features: str | None = None
    feature_id_col: str | None = None  # id column of the side tables; None = the log's item_col / user_col
    text_cols: tuple[str, ...] = ()  # side-table columns read as text (bag of hashed tokens)
    vector_cols: tuple[str, ...] = ()  # side-table columns holding fixed-length float vectors
    side_tables: bool = True  # movielens-*: load users/movies files as side tables when present

    def __post_init__(self) -> None:
        if self.event_col is not None:
            if not self.events or len(set(self.events)) != len(self.events) or "" in self.events:
                raise UserError(f"--events {','.join(self.events)!r} must be distinct, non-empty names")
            if self.purchase_event is not None and self.purchase_event not in self.events:
                raise UserError(f"--purchase-event {self.purchase_event!r} is not one of --events "
                                f"{','.join(self.events)}")
        if self.dedup_window is not None and self.dedup_window <= 0:
            raise UserError(f"--dedup-window={self.dedup_window} must be > 0 seconds")
        if self.keep_all_events and self.dedup_window is not None:
            raise UserError("--keep-all-events and --dedup-window exclude each other")
        bad = [c for c in self.context_cols if not c or "," in c]
        if bad or len(set(self.context_cols)) != len(self.context_cols):
            raise UserError(f"--context-cols {','.join(self.context_cols)!r} must be distinct column names")

    @property
    def purchase_name(self) -> str | None:
        """The purchase event's name (None without events)."""
        if self.event_col is None:
            return None
        return self.purchase_event or self.events[-1]

    @property
    def with_time_context(self) -> bool:
        return self.time_context if self.time_context is not None else bool(self.event_col or self.context_cols)


@dataclass(frozen=True)
class ModelConfig:
    """Which model family and its capacity. `layers` are the MLP tower widths; layers[0] is the concatenated
    user+item embedding width (so each MLP embedding is layers[0] // 2), as in the NCF paper. A family reads only
    the fields listed for it in MODEL_FIELDS; the others keep their defaults and are ignored."""

    name: str = "neumf"
    factors: int = 32
    layers: tuple[int, ...] = (64, 32, 16)
    dropout: float = 0.0
    # seq only: attention over the user's last history_len items, `blocks` causal blocks of `heads` heads, a
    # dot or NeuMF head (`layers` is then its tower, starting at 2 * factors), plus the user-id embedding.
    history_len: int = 50
    blocks: int = 2
    heads: int = 1
    head: str = "dot"
    use_user_id: bool = False
    # ease only: the ridge penalty; 0 = pick it on valid from baselines.DEFAULT_LAMBDAS.
    lam: float = 0.0
    # Side information, every neural family (issue 14): use the dataset's item/user feature tables and its
    # per-interaction context when it has them (False: the ID-only model, for comparisons); drop the id embedding
    # with probability id_dropout per training row so the feature path learns to score cold items alone.
    features: bool = True
    context: bool = True
    id_dropout: float = 0.0
    # Tasks: "click" (any event) and, on logs with events, "purchase"; one head each over a shared bottom, or a
    # multi-gate mixture of `experts` experts (MMoE, Ma et al. KDD 2018).
    tasks: tuple[str, ...] = ("click",)
    task_mixture: str = "shared"
    experts: int = 4

    def __post_init__(self) -> None:
        if self.name not in MODEL_FIELDS:
            raise UserError(f"model={self.name!r} is not one of {', '.join(MODEL_NAMES)}")
        if self.factors <= 0:
            raise UserError(f"factors={self.factors} must be > 0")
        if any(w <= 0 for w in self.layers):
            raise UserError(f"layers={list(self.layers)} must all be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout={self.dropout} must be in [0, 1)")
        if not 0.0 <= self.id_dropout <= 1.0:
            raise UserError(f"id_dropout={self.id_dropout} must be in [0, 1]")
        unknown = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown or len(set(self.tasks)) != len(self.tasks) or self.tasks[0] != "click":
            raise UserError(f"tasks={','.join(self.tasks)} must be click, optionally followed by "
                            f"{', '.join(TASKS[1:])} (each once)")
        if self.task_mixture not in ("shared", "mmoe"):
            raise UserError(f"task_mixture={self.task_mixture!r} is not one of shared, mmoe")
        if self.experts < 1:
            raise UserError(f"experts={self.experts} must be >= 1")
        for check in MODEL_CHECKS.get(self.name, ()):
            check(self)


# The tasks a model can predict: "click" = any event (the implicit-feedback target every family trains on),
# "purchase" = the log's purchase event (or a stronger one), on logs prepared with --event-col.
TASKS = ("click", "purchase")


def _seq_shape(cfg: ModelConfig) -> None:
    if cfg.history_len <= 0 or cfg.blocks <= 0 or cfg.heads <= 0:
        raise UserError(f"history_len={cfg.history_len}, blocks={cfg.blocks}, heads={cfg.heads} must be > 0")
    if cfg.head not in ("dot", "neumf"):
        raise UserError(f"head={cfg.head!r} is not one of dot, neumf")
    if cfg.factors % cfg.heads:
        raise UserError(f"factors={cfg.factors} must be divisible by heads={cfg.heads}")
    if cfg.head == "neumf" and cfg.layers and cfg.layers[0] != 2 * cfg.factors:
        raise UserError(f"head=neumf: layers[0]={cfg.layers[0]} must be 2 * factors = {2 * cfg.factors}")


def _needs_mlp_tower(cfg: ModelConfig) -> None:
    if not cfg.layers:
        raise UserError(f"model={cfg.name} needs at least one MLP layer")
    if cfg.layers[0] % 2:
        raise UserError(f"layers[0]={cfg.layers[0]} must be even (it is user+item embedding width)")


# The registry of model families as the config layer sees them. A new family (with any new ModelConfig fields it
# needs) adds one line to MODEL_FIELDS — the fields it reads; Tune leaves space keys for the others out — and, if
# it has rules of its own, one to MODEL_CHECKS. MODEL_NAMES (the CLI's --model choices) follows the dict.
# Every neural family reads the side-information and task fields.
SIDE_FIELDS = frozenset({"features", "context", "id_dropout", "tasks", "task_mixture", "experts"})
MODEL_FIELDS: dict[str, frozenset[str]] = {
    "gmf": frozenset({"factors"}) | SIDE_FIELDS,
    "mlp": frozenset({"layers", "dropout"}) | SIDE_FIELDS,
    "neumf": frozenset({"factors", "layers", "dropout"}) | SIDE_FIELDS,
    "mf": frozenset({"factors"}) | SIDE_FIELDS,
    "seq": frozenset({"factors", "layers", "dropout", "history_len", "blocks", "heads", "head", "use_user_id"})
    | SIDE_FIELDS,
    "ease": frozenset({"lam"}),
    "pop": frozenset(),
}
MODEL_CHECKS: dict[str, tuple[Callable[[ModelConfig], None], ...]] = {
    "mlp": (_needs_mlp_tower,),
    "neumf": (_needs_mlp_tower,),
    "seq": (_seq_shape,),
}
MODEL_NAMES = tuple(MODEL_FIELDS)


def tower(factors: int, depth: int) -> tuple[int, ...]:
    """MLP widths for `depth` hidden layers: input = user+item embeddings of `factors` each, then halving."""
    if depth < 0:
        raise UserError(f"depth={depth} must be >= 0")
    return tuple(max(1, (2 * factors) >> j) for j in range(depth + 1))


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and Ray Train scaling. `lr` is the learning rate at `base_batch_size`; larger batches scale it
    by sqrt(batch / base_batch_size) with a linear warm-up (see train.py)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 20
    batch_size: int = 8192
    lr: float = 2e-3
    base_batch_size: int = 1024
    warmup_epochs: float = 1.0
    negatives: int = 4
    weight_decay: float = 1e-6
    patience: int = 3
    eval_k: int = 10
    workers: int = 1
    gpu: bool = False
    amp: bool = False
    seed: int = 0
    stream: bool = False
    threads_per_worker: int | None = None
    max_failures: int = 0
    pretrain_from: tuple[str, ...] | None = None
    pretrain_alpha: float = 0.5
    # Multi-task: loss weight per task of model.tasks (empty = 1 each), and the task whose valid HR@k drives early
    # stopping and Tune ("purchase": on the users whose held-out event is a purchase).
    task_weights: tuple[float, ...] = ()
    select_task: str = "click"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "negatives", "workers", "patience", "eval_k"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name}={getattr(self, name)} must be > 0")
        if self.lr <= 0:
            raise UserError(f"lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise UserError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.task_weights and len(self.task_weights) != len(self.model.tasks):
            raise UserError(f"task_weights={','.join(map(str, self.task_weights))} must give one weight per task "
                            f"({','.join(self.model.tasks)})")
        if any(w < 0 for w in self.task_weights):
            raise UserError(f"task_weights={','.join(map(str, self.task_weights))} must be >= 0")
        if self.select_task not in self.model.tasks:
            raise UserError(f"select_task={self.select_task!r} is not one of the model's tasks "
                            f"({','.join(self.model.tasks)})")


@dataclass(frozen=True)
class TuneConfig:
    """A Ray Tune sweep over embedding size x MLP depth (+ lr, negatives, weight decay), ASHA on valid HR@10."""

    model: str = "neumf"
    num_samples: int | None = None  # None: 8 random/optuna samples, or each grid point once (tune.plan_sweep)
    max_epochs: int = 10
    workers_per_trial: int = 1
    max_concurrent: int | None = None
    search: str = "random"
    grace_period: int = 2
    reduction_factor: int = 2
    seed: int = 0


@dataclass(frozen=True)
class ServeConfig:
    """Ray Serve deployment settings. Binds loopback unless told otherwise."""

    model_dir: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int | str = 1
    max_batch_size: int = 64
    batch_wait_timeout_s: float = 0.002
    max_ongoing_requests: int = 128
    # All-items scoring (ncf_ray/scoring.py): "auto" = a bf16 shortlist re-ranked in fp32 where bf16 matmuls are
    # fast (AVX512-BF16/AMX CPUs, GPUs), else exact fp32; "bf16" forces the shortlist; "fp32" is always exact.
    precision: str = "auto"

    def __post_init__(self) -> None:
        # model_dir is checked by build_serve_config: the defaults above are a config without one.
        if self.replicas != "auto" and (isinstance(self.replicas, bool) or not isinstance(self.replicas, int)
                                        or self.replicas < 1):
            raise UserError(f"replicas={self.replicas!r} must be a positive integer or 'auto'")
        if not 1 <= self.max_batch_size <= self.max_ongoing_requests:
            raise UserError(f"max_batch_size={self.max_batch_size} must be within 1..max_ongoing_requests "
                            f"({self.max_ongoing_requests}) so batches can fill")
        if self.precision not in SERVE_PRECISIONS:
            raise UserError(f"precision={self.precision!r} is not one of {', '.join(SERVE_PRECISIONS)}")
        if not 0 <= self.batch_wait_timeout_s <= 1:
            raise UserError(f"batch_wait_timeout_s={self.batch_wait_timeout_s} must be within 0..1 seconds")
        if not 0 < self.port < 65536:
            raise UserError(f"port={self.port} must be within 1..65535")


SERVE_PRECISIONS = ("auto", "bf16", "fp32")  # the same names as ncf_ray.scoring.PRECISIONS


# ----------------------------------------------------------------------------------------------- builders
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "name")
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "model")


def _coerce(owner: str, name: str, value: Any, default: Any) -> Any:
    """`value` as the type of the field's `default`: strings from `key=value` lists and numpy scalars from Tune
    become Python numbers, lists (JSON/YAML) become tuples. A value that does not fit is refused by name."""
    if owner == "ServeConfig" and name == "replicas":  # an int or "auto", whatever the base holds
        return "auto" if value == "auto" else _coerce(owner, "replicas (int)", value, 1)
    try:
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            if isinstance(value, bool):
                return value
            raise ValueError
        if isinstance(default, int):
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if not isinstance(value, str) else float(value.strip())
            if number != int(number):
                raise ValueError
            return int(number)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(value, list) or (isinstance(default, tuple) and isinstance(value, tuple)):
            return tuple(value)
        if isinstance(default, str) and not isinstance(value, str):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{owner} {name}={value!r} is not a valid {type(default).__name__}") from None
    return value


def _replace(cls: type[T], base: T, values: dict[str, Any], **ready: Any) -> T:
    """`base` with `values` applied after coercion (and `ready` values as they are, in the same construction, so
    fields checked together — a model's tasks and their weights — are checked once, together); unknown keys are
    refused by name."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown {cls.__name__} key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    coerced = {k: _coerce(cls.__name__, k, v, getattr(base, k)) for k, v in values.items()}
    return dataclasses.replace(base, **coerced, **ready)  # type: ignore[type-var]


def build_model_config(base: ModelConfig | None = None, **overrides: Any) -> ModelConfig:
    """A ModelConfig from `base` (default ModelConfig()) and flat keys: `name` (or its alias `model`), any
    ModelConfig field, and `depth` — the number of MLP hidden layers, whose widths `tower(factors, depth)` derives
    from the (new or base) factors; `depth` and `layers` together are refused."""
    base = base or ModelConfig()
    values = dict(overrides)
    if "model" in values:
        if "name" in values and values["name"] != values["model"]:
            raise UserError(f"model={values['model']!r} and name={values['name']!r} disagree")
        values["name"] = values.pop("model")
    if isinstance(values.get("tasks"), str):  # the CLI's "click,purchase"
        values["tasks"] = tuple(x.strip() for x in values["tasks"].split(",") if x.strip())
    depth = values.pop("depth", None)
    if depth is not None:
        if "layers" in values:
            raise UserError(f"give depth={depth} or layers={values['layers']}, not both")
        depth = _coerce("ModelConfig", "depth", depth, 0)
        factors = _coerce("ModelConfig", "factors", values.get("factors", base.factors), 0)
        values["layers"] = tower(factors, depth)
    return _replace(ModelConfig, base, values)


def build_train_config(base: TrainConfig | None = None, **overrides: Any) -> TrainConfig:
    """The one TrainConfig builder: CLI and job flags, Tune trials, the pipeline and saved configs all call it.

    `base` (default TrainConfig()) supplies every key not given. Keys are flat: any TrainConfig field; the model's
    `model` — a family name, a ModelConfig, or a nested dict as written by `to_dict` —; and the ModelConfig keys
    (`factors`, `layers`, `dropout`, `depth`, ...) next to it (see `build_model_config`). A value of None is a
    value (e.g. threads_per_worker=None: the default threads); callers drop flags that were not given."""
    base = base or TrainConfig()
    values = dict(overrides)
    model_values = {k: values.pop(k) for k in (*MODEL_KEYS, "depth", "name") if k in values}
    model = values.pop("model", None)
    model_base = base.model
    if isinstance(model, ModelConfig):
        model_base = model
    elif isinstance(model, dict):
        model_values = {**model, **model_values}
    elif model is not None:
        model_values["model"] = model
    model_cfg = build_model_config(model_base, **model_values)
    if isinstance(values.get("pretrain_from"), str):  # the CLI's "GMF_DIR,MLP_DIR"
        values["pretrain_from"] = tuple(p for p in values["pretrain_from"].split(",") if p)
    if isinstance(values.get("task_weights"), str):  # the CLI's "1,2"
        try:
            values["task_weights"] = tuple(float(x) for x in values["task_weights"].split(",") if x.strip())
        except ValueError:
            raise UserError(f"task_weights={values['task_weights']!r} must be comma-separated numbers") from None
    if "task_weights" in values and isinstance(values["task_weights"], (list, tuple)):
        values["task_weights"] = tuple(float(w) for w in values["task_weights"])
    return _replace(TrainConfig, base, values, model=model_cfg)


# Defaults per family, chosen on the valid split of real MovieLens-1M (bench/RESULTS.md, "Defaults on real
# data"): what `ncf-ray train --model X` uses for every flag not given. Keys are build_train_config's flat keys.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "mf": {"factors": 128, "negatives": 4, "weight_decay": 3e-6, "lr": 2e-3, "batch_size": 8192, "epochs": 15,
           "patience": 5},
    "gmf": {"factors": 64, "negatives": 8, "weight_decay": 3e-6, "lr": 2e-3, "batch_size": 8192, "epochs": 12,
            "patience": 5},
    "neumf": {"factors": 32, "layers": (64, 32, 16), "negatives": 8, "weight_decay": 1e-6, "lr": 1e-3,
              "batch_size": 8192, "epochs": 12, "patience": 5},
    "seq": {"factors": 64, "layers": (), "history_len": 200, "blocks": 2, "heads": 1, "dropout": 0.2, "head": "dot",
            "negatives": 4, "batch_size": 32768, "lr": 1e-3, "weight_decay": 0.0, "epochs": 40, "patience": 4},
}


# What `ncf-ray train` trains without --model: the family that beat EASE on real data by the widest margin.
DEFAULT_MODEL = "seq"


def default_train_config(model: str) -> TrainConfig:
    """TrainConfig() with `model`'s family defaults (MODEL_DEFAULTS) applied."""
    if model not in MODEL_FIELDS:
        raise UserError(f"model={model!r} is not one of {', '.join(MODEL_NAMES)}")
    return build_train_config(None, model=model, **MODEL_DEFAULTS.get(model, {}))


def build_serve_config(base: ServeConfig | None = None, **overrides: Any) -> ServeConfig:
    """The one ServeConfig builder (`ncf-ray serve` / jobs/deploy.py flags, `serve run key=value` args, a
    `serve deploy` YAML's `args`). Strings are coerced to each field's type; model_dir is required."""
    cfg = _replace(ServeConfig, base or ServeConfig(), overrides)
    if not cfg.model_dir:
        raise UserError("model_dir is required (the model artifact dir, e.g. RUN_DIR/model)")
    return cfg


# ----------------------------------------------------------------------------------------------- round trips
def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config dataclass (tuples become lists, nested configs dicts)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild `cls` from `to_dict`'s output (or a YAML/JSON mapping), refusing unknown keys by name. TrainConfig,
    ModelConfig and ServeConfig go through their builders, so a saved config is read like a flag."""
    if not isinstance(data, dict):
        raise UserError(f"a {cls.__name__} must be a mapping, got {type(data).__name__}")
    if cls is TrainConfig:
        return build_train_config(None, **data)  # type: ignore[return-value]
    if cls is ModelConfig:
        return build_model_config(None, **data)  # type: ignore[return-value]
    if cls is ServeConfig:
        return build_serve_config(None, **data)  # type: ignore[return-value]
    return _replace(cls, cls(), data)
