"""What a model reads beyond user and item ids: feature tables, context and tasks (issue 14), in one place.

A dataset dir (and the artifact exported from it) may carry item/user side tables (`features/`, see
ncf_ray/data/features.py), per-interaction context columns (hour, weekday, `--context-cols`) and an event column
(view -> cart -> purchase). `ModelInputs` gathers what of that a model uses, and `build_model_for` builds the
model with it, so the worker loop, the closing evaluation, the refit, the artifact loader and updates all build
the same model from the same config. A ModelConfig with `features=False` / `context=False` ignores the
dataset's tables (the ID-only model of a comparison).

    inputs = inputs_from_dataset(data)            # or inputs_from_artifact_dir(path)
    model = build_model_for(cfg.model, data.n_users, data.n_items, inputs)

No Ray; torch and numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ncf_ray.batch import FeatureTable
from ncf_ray.config import ModelConfig
from ncf_ray.errors import UserError
from ncf_ray.model import RecModel, build_model, model_args

PURCHASE = "purchase"


@dataclass
class ModelInputs:
    """Side information of one dataset, as the model and the engine see it.

    item_features / user_features: per-entity feature ids (+ dense vectors), rows = entity index.
    feature_spec: features.json ({"items": TABLE_SPEC, "users": TABLE_SPEC}), for `/model` and new entities.
    context: meta.json's context spec ({"n_ids", "columns": [...]}) or None.
    events: the funnel's event names (weakest first), () for logs without events.
    purchase_from: the index in `events` from which an event counts as a purchase, or None."""

    item_features: FeatureTable | None = None
    user_features: FeatureTable | None = None
    feature_spec: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] | None = None
    events: tuple[str, ...] = ()
    purchase_from: int | None = None

    @property
    def n_context_ids(self) -> int:
        return int(self.context["n_ids"]) if self.context else 0

    @property
    def context_columns(self) -> list[str]:
        return [c["name"] for c in self.context["columns"]] if self.context else []

    def for_model(self, cfg: ModelConfig) -> ModelInputs:
        """The part of these inputs `cfg` uses: tables only with cfg.features, context only with cfg.context."""
        return ModelInputs(
            item_features=self.item_features if cfg.features else None,
            user_features=self.user_features if cfg.features else None,
            feature_spec=self.feature_spec if cfg.features else {},
            context=self.context if cfg.context else None,
            events=self.events,
            purchase_from=self.purchase_from,
        )

    def to(self, device: torch.device | str) -> ModelInputs:
        return ModelInputs(
            item_features=None if self.item_features is None else self.item_features.to(device),
            user_features=None if self.user_features is None else self.user_features.to(device),
            feature_spec=self.feature_spec, context=self.context, events=self.events,
            purchase_from=self.purchase_from,
        )


def _table(enc: Any) -> FeatureTable | None:
    if enc is None:
        return None
    return FeatureTable.from_numpy(enc.ids, enc.dense, int(enc.spec["n_ids"]))


def inputs_from_parts(meta: dict[str, Any], features: dict[str, Any]) -> ModelInputs:
    """ModelInputs from a dataset's meta.json and its read_features() dict (keys "items"/"users")."""
    events = tuple(meta.get("events") or ())
    purchase_from = None
    if events:
        name = meta.get("purchase_event") or events[-1]
        purchase_from = events.index(name) if name in events else None
    return ModelInputs(
        item_features=_table(features.get("items")),
        user_features=_table(features.get("users")),
        feature_spec={k: v.spec for k, v in features.items()},
        context=meta.get("context") or None,
        events=events,
        purchase_from=purchase_from,
    )


def inputs_from_dataset(data: Any) -> ModelInputs:
    """ModelInputs of a loaded ncf_ray.data.dataset.Dataset."""
    return inputs_from_parts(data.meta, getattr(data, "features", None) or {})


def inputs_from_dir(path: str | Path, meta: dict[str, Any]) -> ModelInputs:
    """ModelInputs of a dir holding `features/` (a dataset dir or an artifact) with its dataset meta."""
    from ncf_ray.data.features import read_features

    return inputs_from_parts(meta, read_features(Path(path)))


def check_tasks(cfg: ModelConfig, inputs: ModelInputs) -> None:
    """Refuse a purchase task on a log without purchase events, before any worker starts."""
    if PURCHASE in cfg.tasks and inputs.purchase_from is None:
        raise UserError("--tasks purchase needs a log with purchase events (prepare with --event-col and "
                        "--events ...,purchase)")


def build_model_for(cfg: ModelConfig, n_users: int, n_items: int, inputs: ModelInputs | None = None) -> RecModel:
    """The model of `cfg` with the side information it uses: the one builder every stage calls."""
    used = (inputs or ModelInputs()).for_model(cfg)
    args = model_args(cfg)
    for key in ("features", "context"):  # config switches, not constructor args
        args.pop(key, None)
    args.update(item_features=used.item_features, user_features=used.user_features,
                n_context_ids=used.n_context_ids)
    return build_model(cfg.name, n_users, n_items, **args)


def describe(inputs: ModelInputs, cfg: ModelConfig) -> dict[str, Any]:
    """What `/model` and the run summary say the model reads: feature columns per table, context columns, tasks."""
    used = inputs.for_model(cfg)
    feats = {what: [c["name"] + ":" + c["kind"] for c in spec.get("columns", [])]
             for what, spec in used.feature_spec.items()}
    return {"features": feats, "context": used.context_columns, "tasks": list(cfg.tasks),
            "task_mixture": cfg.task_mixture if len(cfg.tasks) > 1 else None, "id_dropout": cfg.id_dropout}


__all__ = ["ModelInputs", "inputs_from_dataset", "inputs_from_dir", "inputs_from_parts", "build_model_for",
           "check_tasks", "describe", "PURCHASE"]
