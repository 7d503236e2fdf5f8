"""Forgetting users: an artifact without a user's embedding, history, seen set and raw id.

    ncf-ray forget MODEL_DIR --user RAW_ID [--user RAW_ID ...] [--out NEW_MODEL_DIR]
    ray job submit -- python jobs/forget.py MODEL_DIR --user RAW_ID [--out NEW_MODEL_DIR]

What forgetting does to the artifact (user indices never move, so nothing else needs re-indexing):
- the user's rows of every user-embedding table (update.entity_tables) are reset to the mean of the other users'
  rows: the model no longer holds anything learnt from that user alone;
- the stored history and the seen set lose the user's row (empty), the vocab count becomes 0;
- the vocab's raw id is replaced by a tombstone `forgotten:<hash prefix>`, so a request for that raw id finds no
  user and takes the cold-start path;
- forgotten.json gains sha256(salt + raw id); every later `ncf-ray update` drops that id's rows from new logs
  (update.build_window). The salt is random per lineage and stored beside the hashes: it stops a precomputed
  table of hashed ids from matching across deployments, not a search over a small id space.
Raw ids are never written anywhere: the log line and metrics name counts only.
No Ray here.
"""

from __future__ import annotations

import hashlib
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncf_ray.errors import UserError

TOMBSTONE_PREFIX = "forgotten:"


def forget_hash(salt: str, raw_id: str) -> str:
    """The stored form of a forgotten raw id: hex sha256 of salt, a NUL, then the id (as its string)."""
    return hashlib.sha256(f"{salt}\x00{raw_id}".encode()).hexdigest()


def new_forgotten(previous: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of an artifact's forgotten.json (or a fresh one with a new random salt)."""
    if previous and isinstance(previous.get("salt"), str):
        return {"salt": previous["salt"], "users": list(previous.get("users") or [])}
    return {"salt": secrets.token_hex(16), "users": []}


def forgotten_mask(raw_users: Sequence[str] | np.ndarray, forgotten: dict[str, Any] | None) -> np.ndarray:
    """bool [n]: which raw user ids are forgotten (hashes each distinct id once)."""
    raw = np.asarray(raw_users, dtype=object)
    if not forgotten or not forgotten.get("users") or raw.size == 0:
        return np.zeros(raw.shape, bool)
    gone = set(forgotten["users"])
    uniq, inverse = np.unique(raw.astype(str), return_inverse=True)
    hit = np.fromiter((forget_hash(forgotten["salt"], u) in gone for u in uniq), bool, len(uniq))
    return hit[inverse.reshape(-1)]


def drop_rows(indptr: np.ndarray, indices: np.ndarray, users: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """A CSR with the rows of `users` emptied (same number of rows)."""
    lengths = np.diff(indptr).copy()
    keep = np.ones(len(indices), bool)
    for u in users:
        keep[indptr[u]:indptr[u + 1]] = False
        lengths[u] = 0
    out = np.zeros_like(indptr)
    np.cumsum(lengths, out=out[1:])
    return out, indices[keep]


def reset_user_rows(model: torch.nn.Module, user_idx: Sequence[int], n_users: int, n_items: int) -> int:
    """Set the rows `user_idx` of every user-embedding table to the mean of the table's other rows; returns the
    number of tables changed."""
    from ncf_ray.update import entity_tables

    rows = torch.as_tensor(list(user_idx), dtype=torch.long)
    changed = 0
    with torch.no_grad():
        for emb, kind, pad in entity_tables(model, n_users, n_items):
            if kind != "user" or rows.numel() == 0:
                continue
            weight = emb.weight
            others = torch.ones(weight.shape[0], dtype=torch.bool)
            others[rows + pad] = False
            others[:pad] = False
            mean = weight[others].mean(0) if others.any() else torch.zeros_like(weight[0])
            weight[rows + pad] = mean
            changed += 1
    return changed


def forget_users(model_dir: str | Path, raw_ids: Sequence[str], out: str | Path | None = None) -> dict[str, Any]:
    """Write the artifact of `model_dir` with `raw_ids` forgotten to `out` (default: in place, atomically).
    Returns counts only (never the ids). Unknown ids are refused, so a typo is not reported as forgotten;
    an id forgotten before counts as already done."""
    from ncf_ray.artifact import load_artifact, save_artifact, vocab_table
    from ncf_ray.data import schema as S

    if not raw_ids:
        raise UserError("forget: give at least one --user RAW_ID")
    src = Path(model_dir).resolve()
    art = load_artifact(src)
    forgotten = new_forgotten(art.forgotten)
    done = set(forgotten["users"])
    hashes = [forget_hash(forgotten["salt"], str(r)) for r in raw_ids]
    unknown = [i for i, (r, h) in enumerate(zip(raw_ids, hashes)) if str(r) not in art.user_index and h not in done]
    if unknown:
        # Name the position, not the id: this line ends up in logs.
        raise UserError(f"forget: {len(unknown)} of {len(raw_ids)} --user id(s) are not users of {src} "
                        f"(positions {[i + 1 for i in unknown][:5]}); nothing written")
    idx = sorted({art.user_index[str(r)] for r in raw_ids if str(r) in art.user_index})
    n_already = len(raw_ids) - len(idx)
    reset_user_rows(art.model, idx, art.n_users, art.n_items)
    seen_indptr, seen_indices = drop_rows(art.seen_indptr, art.seen_indices, idx)
    hist = art.histories
    if hist is not None:
        h_indptr, h_items = drop_rows(hist.indptr.numpy(), hist.items.numpy(), idx)
        from ncf_ray.batch import Histories

        hist = Histories(torch.from_numpy(h_indptr), torch.from_numpy(h_items))
    user_ids = art.user_ids.copy()
    for u in idx:
        h = forget_hash(forgotten["salt"], str(art.user_ids[u]))
        user_ids[u] = TOMBSTONE_PREFIX + h[:16]
        if h not in done:
            forgotten["users"].append(h)
            done.add(h)
    user_counts = np.diff(seen_indptr)
    lineage = {"kind": "forget", "parent_version": art.model_version, "parent_dir": str(src),
               "forgotten_users": len(idx)}
    dest = Path(out).resolve() if out else src
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.features-", dir=dest.parent) as tmp:
        version = save_artifact(
            dest, art.model, art.model_cfg, art.n_users, art.n_items,
            vocab_table(user_ids, user_counts, S.USER_IDX, S.USER_COL),
            vocab_table(art.item_ids, _item_counts(art), S.ITEM_IDX, S.ITEM_COL),
            seen_indptr, seen_indices, art.popularity, art.metrics, art.dataset_meta, histories=hist,
            lineage=lineage, forgotten=forgotten, features_dir=features_without(art, idx, Path(tmp)))
    return {"model_version": version, "forgotten_now": len(idx), "already_forgotten": n_already,
            "forgotten_total": len(forgotten["users"]), "out": str(Path(out).resolve() if out else src)}


def features_without(art: Any, user_idx: Sequence[int], tmp: Path) -> Path | None:
    """The artifact's features/ rewritten under `tmp` with the users' rows reset to "unknown" for every column
    (their profile is gone with them); None when the artifact has no features/."""
    from ncf_ray.data.features import EncodedFeatures, read_features, reserved_row, write_features

    tables = read_features(Path(art.path))
    if not tables:
        return None
    users = tables.get("users")
    if users is not None and len(user_idx):
        ids, dense = users.ids.copy(), None if users.dense is None else users.dense.copy()
        ids[list(user_idx)] = reserved_row(users.spec)
        if dense is not None:
            dense[list(user_idx)] = 0.0
        tables["users"] = EncodedFeatures(ids, dense, users.spec)
    write_features(tmp, tables.get("items"), tables.get("users"))
    return tmp / "features"


def _item_counts(art: Any) -> np.ndarray:
    """The item vocab's counts as stored (read back from the artifact's vocab file)."""
    import pyarrow.parquet as pq

    from ncf_ray.artifact import ITEMS_VOCAB_FILE
    from ncf_ray.data import schema as S

    table = pq.read_table(Path(art.path) / ITEMS_VOCAB_FILE).sort_by(S.ITEM_IDX)
    return np.asarray(table[S.COUNT_COL].to_numpy(), dtype=np.int64)
