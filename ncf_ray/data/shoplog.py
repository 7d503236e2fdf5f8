"""The shop-log steps of `ncf-ray prepare` (issue 14): event dedup, context ids, and the side-table wiring around
data/features.py. prepare.py calls them from build_loo and prepare(); all pure numpy/pyarrow, no Ray.

- events: `dedup_events` keeps the strongest event per (user, item[, time window]) at its latest time;
  `event_meta` is meta.json's account (names in funnel order, counts, the purchase event, held-out purchases);
- context (contract.md 2): `encode_context` turns hour of day and day of week (UTC, `hour_dow`) and categorical
  columns (vocab from train rows) into one global id space, 0 = unknown;
- side tables (contract.md 3): `read_side_tables` reads --item-features / --user-features (or takes the source's
  own), `encode_side_tables` encodes them against the built vocab, `features_meta` summarises them for meta.json.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ncf_ray.config import DataConfig
from ncf_ray.errors import UserError

if TYPE_CHECKING:  # annotations only: prepare imports this module
    from ncf_ray.data.prepare import Built, Split


# ============================================================================================ events
def dedup_events(users: np.ndarray, items: np.ndarray, times: np.ndarray, events: np.ndarray | None,
                 window: int | None = None, keep_all: bool = False) -> np.ndarray:
    """Indices of the rows to keep, sorted by (user, item, time).

    One row per (user, item) — or per (user, item, time // window) with a window in seconds: the strongest
    event (highest funnel index), and among rows of that event the latest. `keep_all` keeps every row. Without
    events and a window this is prepare.dedup_latest's rule (which prepare uses then: one sort fewer)."""
    if keep_all:
        return np.lexsort((times, items, users))
    ev = np.zeros(users.size, np.int8) if events is None else events
    win = np.zeros(users.size, np.int64) if window is None else times // np.int64(window)
    order = np.lexsort((times, ev, win, items, users))
    u, i, w = users[order], items[order], win[order]
    last = np.ones(order.size, bool)
    last[:-1] = (u[1:] != u[:-1]) | (i[1:] != i[:-1]) | (w[1:] != w[:-1])
    kept = order[last]
    return kept[np.lexsort((times[kept], items[kept], users[kept]))]


def dedup_rule(cfg: DataConfig, has_events: bool) -> str:
    """meta.json's "dedup": which rows dedup kept, in words."""
    if cfg.keep_all_events:
        return "none (every event kept)"
    what = "strongest event, latest among those" if has_events else "latest"
    per = f"(user, item, {cfg.dedup_window}s window)" if cfg.dedup_window else "(user, item)"
    return f"{what}, per {per}"


def event_meta(cfg: DataConfig, ev: np.ndarray, split: Split) -> dict[str, Any]:
    """meta.json's event fields: names in funnel order, rows kept per type (all splits), the purchase event,
    and how many held-out rows of each split are purchases (the purchase task's evaluation users)."""
    names = list(cfg.events)
    purchase = cfg.purchase_name
    assert purchase is not None
    purchase_from = names.index(purchase)
    counts = np.bincount(ev, minlength=len(names))
    return {
        "events": names,
        "event_counts": {n: int(c) for n, c in zip(names, counts)},
        "purchase_event": purchase,
        "held_out_purchases": {"valid": int((split.valid_events >= purchase_from).sum()),
                               "test": int((split.test_events >= purchase_from).sum())},
    }


# ============================================================================================ context
HOUR, DOW = "hour", "dow"
EPOCH_DOW = 3  # 1970-01-01 was a Thursday; Monday = 0


def hour_dow(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UTC hour of day (0..23) and day of week (0..6, Monday = 0) of int seconds since the epoch."""
    t = np.asarray(times, dtype=np.int64)
    return (t // 3600) % 24, (t // 86400 + EPOCH_DOW) % 7


def encode_context(times: np.ndarray | None, categorical: dict[str, tuple[np.ndarray, np.ndarray]],
                   train_rows: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-row global context ids [n, K] int64 and meta["context"] (contract.md 2).

    `times` (None: no time context) gives the hour and dow columns; `categorical` maps a column name to (codes
    into its raw vocab, raw vocab of str). A categorical column's vocab is its non-empty values seen in the
    `train_rows`, sorted; other values (valid/test only, or '') map to 0, the global unknown id."""
    cols: list[np.ndarray] = []
    specs: list[dict[str, Any]] = []
    offset = 1
    if times is not None:
        hour, dow = hour_dow(times)
        for name, values, size in ((HOUR, hour, 24), (DOW, dow, 7)):
            cols.append(offset + values)
            specs.append({"name": name, "kind": name, "offset": offset, "size": size})
            offset += size
    for name, (codes, raw_vocab) in categorical.items():
        in_train = np.zeros(raw_vocab.size, bool)
        in_train[codes[train_rows]] = True
        in_train &= raw_vocab != ""
        vocab = raw_vocab[in_train]
        ids = np.where(in_train, offset + np.cumsum(in_train) - 1, 0)
        cols.append(ids[codes])
        specs.append({"name": name, "kind": "categorical", "offset": offset, "size": int(vocab.size),
                      "vocab": vocab.tolist()})
        offset += int(vocab.size)
    n = train_rows.size if not cols else cols[0].size
    ids = np.stack(cols, axis=1).astype(np.int64) if cols else np.zeros((n, 0), np.int64)
    return ids, {"n_ids": offset, "columns": specs}


def context_ids_for(spec: dict[str, Any] | None, times: np.ndarray, raw: dict[str, Any]) -> np.ndarray:
    """[n, K] global context ids of new rows against an existing spec (a trained model's meta["context"]): hour
    and dow from `times` (UTC), categorical columns' raw values (`raw[name]`, text) through the spec's vocab;
    a value the spec never saw, or a column the new log lacks, is 0 (unknown), as in training."""
    times = np.asarray(times, dtype=np.int64)
    if not spec:
        return np.zeros((times.size, 0), np.int64)
    out = np.zeros((times.size, len(spec["columns"])), np.int64)
    hour, dow = hour_dow(times) if times.size else (times, times)
    for j, col in enumerate(spec["columns"]):
        offset = int(col["offset"])
        if col["kind"] in (HOUR, DOW):
            out[:, j] = offset + (hour if col["kind"] == HOUR else dow)
        elif col["name"] in raw:
            values = raw[col["name"]]
            text = np.asarray(values.to_numpy(zero_copy_only=False) if hasattr(values, "to_numpy") else values,
                              dtype=object)
            index = {v: offset + k for k, v in enumerate(col.get("vocab") or [])}
            out[:, j] = [index.get(v, 0) if isinstance(v, str) else 0 for v in text]
    return out


# ============================================================================================ side tables
SideTable = tuple[pa.Table, Any]  # (raw table, features.SideOptions)


def read_side_tables(cfg: DataConfig, source_tables: dict[str, SideTable]) -> dict[str, SideTable]:
    """The side tables to encode: --item-features / --user-features files (read now, so a bad file fails before
    the log is read), else those the source brings (synthetic-shop, MovieLens; none with --no-side-tables).
    --text-cols / --vector-cols apply to whichever table has the column; one that neither has is a UserError."""
    tables = dict(source_tables) if cfg.side_tables else {}
    if cfg.item_features or cfg.user_features:
        from ncf_ray.data.features import SideOptions, read_side_table
    for what, path, log_col in (("items", cfg.item_features, cfg.item_col), ("users", cfg.user_features,
                                                                              cfg.user_col)):
        if path:
            id_col = feature_id_col(cfg.feature_id_col, what, log_col)
            try:
                table = read_side_table(path, id_col, what)
            except UserError as exc:  # name the flag: "path not found: x.csv" alone does not say which file
                raise UserError(f"--{what[:-1]}-features: {exc}") from None
            names = set(table.column_names)
            opts = SideOptions(id_col=id_col, text_cols=tuple(c for c in cfg.text_cols if c in names),
                               vector_cols=tuple(c for c in cfg.vector_cols if c in names))
            tables[what] = (table, opts)
    for flag, cols in (("--text-cols", cfg.text_cols), ("--vector-cols", cfg.vector_cols)):
        for col in cols:
            if not any(col in t.column_names for t, _ in tables.values()):
                where = ", ".join(f"{w} table: {', '.join(t.column_names)}" for w, (t, _) in tables.items())
                raise UserError(f"{flag} {col!r} is not a column of any side table ({where or 'none given'})")
    return tables


def feature_id_col(flag: str | None, what: str, log_col: str) -> str:
    """The id column of side table `what`: --feature-id-col NAME names it for both tables, `items=sku,users=uid`
    per table; a table it does not name uses the log's id column name."""
    if not flag:
        return log_col
    if "=" not in flag:
        return flag
    named = {}
    for part in flag.split(","):
        key, _, col = part.partition("=")
        if key.strip() not in ("items", "users") or not col.strip():
            raise UserError(f"--feature-id-col {flag!r}: expected NAME or items=NAME,users=NAME")
        named[key.strip()] = col.strip()
    return named.get(what, log_col)


def table_ids(tables: dict[str, SideTable], what: str) -> np.ndarray | None:
    """Raw ids (str) of one side table, None without it."""
    if what not in tables:
        return None
    from ncf_ray.data.features import side_ids

    table, opts = tables[what]
    return side_ids(table, opts.id_col)


def encode_side_tables(tables: dict[str, SideTable], b: Built) -> dict[str, Any]:
    """Encode each side table against the built vocab ("items"/"users" -> features.EncodedFeatures). Bucket
    edges come from entities with train interactions only."""
    if not tables:
        return {}
    from ncf_ray.data.features import encode_side_table

    s = b.split
    out = {}
    for what, vocab, train in (("items", b.item_ids, s.train_items), ("users", b.user_ids, s.train_users)):
        if what in tables:
            table, opts = tables[what]
            mask = np.bincount(train, minlength=vocab.size) > 0
            out[what] = encode_side_table(table, opts, vocab, mask, what)
    return out


def features_meta(encoded: dict[str, Any], b: Built) -> dict[str, Any]:
    """meta.json's short account of the side tables (the full specs are features/features.json)."""
    if not encoded:
        return {}
    meta: dict[str, Any] = {"features": {
        what: {"source": enc.spec.get("source"), "n_ids": enc.n_ids, "slots": enc.spec["slots"],
               "dense_dim": enc.spec["dense_dim"], "stats": enc.spec.get("stats", {}),
               "columns": [{"name": c["name"], "kind": c["kind"]} for c in enc.spec["columns"]]}
        for what, enc in encoded.items()}}
    if "items" in encoded:
        counts = np.bincount(b.split.train_items, minlength=b.item_ids.size)
        meta["cold_items"] = int((counts == 0).sum())
    return meta


# ============================================================================================ summary
def shop_summary(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """format_summary's lines for events, context and side tables, each only when the dataset has it."""
    rows = []
    if summary.get("events"):
        counts = ", ".join(f"{n} {c:,}" for n, c in summary["event_counts"].items())
        held = summary.get("held_out_purchases", {})
        rows.append(("events", f"{counts} (purchase = {summary['purchase_event']}+; test purchases "
                               f"{held.get('test', 0):,})"))
    if summary.get("dedup"):
        rows.append(("dedup", summary["dedup"]))
    if summary.get("context"):
        cols = ", ".join(f"{c['name']} ({c['size']})" for c in summary["context"]["columns"])
        rows.append(("context", cols))
    for what, spec in summary.get("features", {}).items():
        cols = ", ".join(f"{c['name']}:{c['kind']}" for c in spec.get("columns", []))
        stats = spec.get("stats", {})
        rows.append((f"{what} features", f"{cols} (rows {stats.get('rows', 0):,}, unknown ids "
                                          f"{stats.get('unknown_ids', 0):,}, without a row "
                                          f"{stats.get('entities_without_row', 0):,})"))
    if "cold_items" in summary:
        none = summary.get("items_without_interactions")
        rows.append(("cold items", f"{summary['cold_items']:,} without train interactions"
                                   + (f" ({none:,} in the item table only)" if none is not None else "")))
    return rows
