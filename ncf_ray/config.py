"""Frozen configuration dataclasses for every stage, with dict and YAML round trips.

Config never reaches inside a model: `train.py` turns a ModelConfig into the model's flat constructor args.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ncf_ray.errors import UserError

MODEL_NAMES = ("gmf", "mlp", "neumf", "mf", "seq")

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


@dataclass(frozen=True)
class ModelConfig:
    """Which NCF model and its capacity. `layers` are the MLP tower widths; layers[0] is the concatenated
    user+item embedding width (so each MLP embedding is layers[0] // 2), as in the NCF paper."""

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

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise UserError(f"model={self.name!r} is not one of {', '.join(MODEL_NAMES)}")
        if self.factors <= 0:
            raise UserError(f"factors={self.factors} must be > 0")
        if any(w <= 0 for w in self.layers):
            raise UserError(f"layers={list(self.layers)} must all be > 0")
        if self.name == "seq":
            if self.history_len <= 0 or self.blocks <= 0 or self.heads <= 0:
                raise UserError(f"history_len={self.history_len}, blocks={self.blocks}, heads={self.heads} "
                                f"must be > 0")
            if self.head not in ("dot", "neumf"):
                raise UserError(f"head={self.head!r} is not one of dot, neumf")
            if self.factors % self.heads:
                raise UserError(f"factors={self.factors} must be divisible by heads={self.heads}")
        if self.name in ("mlp", "neumf"):
            if not self.layers:
                raise UserError(f"model={self.name} needs at least one MLP layer")
            if self.layers[0] % 2:
                raise UserError(f"layers[0]={self.layers[0]} must be even (it is user+item embedding width)")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout={self.dropout} must be in [0, 1)")


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
    checkpoint_every: int = 1
    pretrain_from: tuple[str, ...] | None = None
    pretrain_alpha: float = 0.5

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "negatives", "workers", "patience", "eval_k"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name}={getattr(self, name)} must be > 0")
        if self.lr <= 0:
            raise UserError(f"lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise UserError(f"weight_decay={self.weight_decay} must be >= 0")


@dataclass(frozen=True)
class TuneConfig:
    """A Ray Tune sweep over embedding size x MLP depth (+ lr, negatives, weight decay), ASHA on valid HR@10."""

    model: str = "neumf"
    num_samples: int = 8
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


# ----------------------------------------------------------------------------------------------- round trips
def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config dataclass (tuples become lists, nested configs dicts)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build `cls` from a dict, refusing unknown keys by name; nested dataclasses and tuples are rebuilt."""
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UserError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name == "model" and cls is TrainConfig and isinstance(value, dict):
            value = from_dict(ModelConfig, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def save_yaml(cfg: Any, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(cls: type[T], path: str | Path) -> T:
    import yaml

    p = Path(path)
    if not p.exists():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping, got {type(data).__name__}")
    return from_dict(cls, data)
