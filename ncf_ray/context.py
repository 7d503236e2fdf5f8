"""Request context -> the model's context ids, with the dataset's context spec (meta.json "context").

A model trained on a log with context (hour of day, day of week from the timestamp, and `--context-cols` such as
device or region) reads one id per context column. At serving time a request gives them by name:

    {"context": {"hour": 21, "dow": 4, "device": "mobile"}}

hour is 0..23, dow 0..6 (Monday = 0) or a day name (mon..sun); categorical columns take their raw value, and a
value the training log never had maps to that column's unknown id (0), as unseen values did in training. An
omitted hour/dow is taken from the server's clock (UTC, as prepare derived them); an omitted categorical column
is unknown. A field the model does not read, or an hour/dow out of range, is the caller's mistake: a UserError
naming the field (HTTP 422). No Ray, no torch.
"""

from __future__ import annotations

import time
from typing import Any

from ncf_ray.errors import UserError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _clock_value(kind: str, now: float) -> int:
    t = time.gmtime(now)
    return t.tm_hour if kind == "hour" else t.tm_wday  # tm_wday: Monday = 0, as prepare's weekday


def _time_value(name: str, kind: str, value: Any) -> int:
    size = 24 if kind == "hour" else 7
    if kind == "dow" and isinstance(value, str) and value[:3].lower() in DAYS:
        return DAYS.index(value[:3].lower())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
        want = "an integer 0..23" if kind == "hour" else "an integer 0..6 (Monday = 0) or a day name"
        raise UserError(f"context.{name}={value!r} must be {want}")
    return value


def encode_context(spec: dict[str, Any] | None, raw: dict[str, Any] | None, now: float | None = None) -> list[int]:
    """The context ids [K] (column order of `spec`) of one request's `raw` context. `spec` None: the model reads
    no context, and a non-empty `raw` is refused."""
    raw = dict(raw or {})
    if not spec:
        if raw:
            raise UserError(f"context: this model reads no context (got {', '.join(sorted(raw))})")
        return []
    columns = spec["columns"]
    names = [c["name"] for c in columns]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise UserError(f"context.{unknown[0]}: not a context field of this model (it reads {', '.join(names)})")
    now = time.time() if now is None else now
    ids = []
    for col in columns:
        name, kind, offset = col["name"], col["kind"], int(col["offset"])
        if kind in ("hour", "dow"):
            value = _time_value(name, kind, raw[name]) if name in raw else _clock_value(kind, now)
            ids.append(offset + value)
            continue
        if name not in raw or raw[name] is None:
            ids.append(0)
            continue
        value = raw[name]
        if isinstance(value, (bool, float)) or not isinstance(value, (str, int)):
            raise UserError(f"context.{name}={value!r} must be a string or integer value")
        vocab = col.get("vocab") or []
        text = str(value)
        ids.append(offset + vocab.index(text) if text in vocab else 0)
    return ids


__all__ = ["encode_context", "DAYS"]
