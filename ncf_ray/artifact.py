"""The model artifact: everything serving and evaluation need, saved and loaded safely.

Layout of an artifact dir (RUN_DIR/model/, written by `ncf-ray train`, read by `evaluate`, `recommend`, `serve`):

    weights.safetensors      state dict (safetensors: loading never unpickles)
    config.json              {"model": ModelConfig fields, "n_users", "n_items", "model_version", "created",
                              "format_version"}
    vocab/users.parquet      user_idx:int32, user_id:string, count:int64
    vocab/items.parquet      item_idx:int32, item_id:string, count:int64
    seen_indptr.npy          CSR int64 [n_users + 1]: items each user already interacted with in train, valid
    seen_indices.npy         and test (excluded from recommendations), int64
    history_indptr.npy       CSR int64 [n_users + 1] (optional): each user's items in time order, oldest first
    history_items.npy        (what history-reading models see at serving time), int64
    popularity.npy           float64 [n_items]: train interaction counts (cold-start fallback)
    features/                (optional) the dataset's item/user side tables, copied verbatim (data/features.py);
                             context and event specs travel in dataset_meta.json (ncf_ray/inputs.py reads both)
    metrics.json, dataset_meta.json
    optimizer.safetensors    (optional) Adam's moments and step count per parameter at the end of training
                             ("<param>.exp_avg" / ".exp_avg_sq" / ".step"): `ncf-ray update` resumes them, so a
                             row the new log barely touches moves as little as its gradients say. `forget` drops it.
    forgotten.json           (optional) {"salt": hex, "users": [sha256(salt + raw id) ...]}: users removed by
                             `ncf-ray forget`; never a raw id. Every later `update` drops their rows.
    manifest.json            {"files": {relpath: sha256}, "sizes": {relpath: bytes}, "model_version"
                              [, "lineage": {"parent_version", "parent_dir", "data_window": {...}}]}
                             lineage: written by `ncf-ray update` / `forget`, the artifact this one was made from.

Writes go to a temp dir beside the target and are renamed into place. Loading verifies the manifest first (every
listed file present with its size and sha256, no unlisted file) and refuses anything else with a UserError naming
the file. model_version is the first 12 hex digits of the weights' sha256. The manifest is a list of checksums,
not a signature: it catches corrupted, truncated or edited files, not someone who rewrites the manifest too
(hence "does not match its manifest", never "tampered"). Its paths must stay inside the artifact dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from ncf_ray.batch import Histories
from ncf_ray.config import ModelConfig, from_dict, to_dict
from ncf_ray.data.schema import COUNT_COL, ITEM_COL, ITEM_IDX, USER_COL, USER_IDX
from ncf_ray.errors import UserError
from ncf_ray.inputs import ModelInputs, build_model_for, inputs_from_dir
from ncf_ray.model import unwrap

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "config.json"
USERS_VOCAB_FILE = "vocab/users.parquet"
ITEMS_VOCAB_FILE = "vocab/items.parquet"
SEEN_INDPTR_FILE = "seen_indptr.npy"
SEEN_INDICES_FILE = "seen_indices.npy"
HISTORY_INDPTR_FILE = "history_indptr.npy"
HISTORY_ITEMS_FILE = "history_items.npy"
POPULARITY_FILE = "popularity.npy"
METRICS_FILE = "metrics.json"
DATASET_META_FILE = "dataset_meta.json"
MANIFEST_FILE = "manifest.json"
FEATURES_DIR = "features"
FORGOTTEN_FILE = "forgotten.json"
REQUIRED_FILES = (
    WEIGHTS_FILE,
    CONFIG_FILE,
    USERS_VOCAB_FILE,
    ITEMS_VOCAB_FILE,
    SEEN_INDPTR_FILE,
    SEEN_INDICES_FILE,
    POPULARITY_FILE,
    METRICS_FILE,
    DATASET_META_FILE,
)


@dataclass
class Artifact:
    """A loaded, verified artifact. `user_ids[idx]` / `item_ids[idx]` are raw ids as str (numpy object arrays);
    `user_index` / `item_index` map raw str id -> idx."""

    model: nn.Module
    model_cfg: ModelConfig
    n_users: int
    n_items: int
    user_ids: np.ndarray
    item_ids: np.ndarray
    user_index: dict[str, int]
    item_index: dict[str, int]
    seen_indptr: np.ndarray
    seen_indices: np.ndarray
    popularity: np.ndarray
    histories: Histories | None
    metrics: dict[str, Any]
    dataset_meta: dict[str, Any]
    model_version: str
    created: str
    path: str
    inputs: ModelInputs = field(default_factory=ModelInputs)  # what the model reads: features, context, events
    lineage: dict[str, Any] | None = None  # manifest "lineage" (update / forget), None for a trained artifact
    forgotten: dict[str, Any] | None = None  # forgotten.json: {"salt", "users": [hashes]}, None when none


# ------------------------------------------------------------------------------------------------ helpers
def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays and tuples sneak into metrics dicts; store them as plain JSON.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def vocab_table(ids: np.ndarray, counts: np.ndarray, idx_col: str, id_col: str) -> pa.Table:
    """A vocab table from raw ids (by index) and their train counts: idx:int32, id:string, count:int64."""
    return pa.table({idx_col: pa.array(np.arange(len(ids), dtype=np.int32)),
                     id_col: pa.array([str(x) for x in ids], pa.string()),
                     COUNT_COL: pa.array(np.asarray(counts, dtype=np.int64))})


def _vocab_table(vocab: Any, idx_col: str, id_col: str, n: int, what: str) -> pa.Table:
    """Normalise a vocab (pyarrow Table or pandas DataFrame) to idx:int32, id:string, count:int64 sorted by idx,
    checking idx is exactly 0..n-1."""
    table = vocab if isinstance(vocab, pa.Table) else pa.Table.from_pandas(vocab, preserve_index=False)
    missing = [c for c in (idx_col, id_col, COUNT_COL) if c not in table.column_names]
    if missing:
        raise UserError(f"{what} vocab lacks column(s) {missing}; has {table.column_names}")
    idx = np.asarray(table[idx_col].to_numpy(), dtype=np.int64)
    order = np.argsort(idx, kind="stable")
    if len(idx) != n or not np.array_equal(idx[order], np.arange(n)):
        raise UserError(f"{what} vocab has {len(idx)} rows with {idx_col} not exactly 0..{n - 1}")
    ids = [str(x) for x in np.asarray(table[id_col].to_pylist(), dtype=object)[order]]
    counts = np.asarray(table[COUNT_COL].to_numpy(), dtype=np.int64)[order]
    return pa.table(
        {
            idx_col: pa.array(np.arange(n, dtype=np.int32)),
            id_col: pa.array(ids, type=pa.string()),
            COUNT_COL: pa.array(counts, type=pa.int64()),
        }
    )


def _check_csr(indptr: np.ndarray, indices: np.ndarray, n_users: int, n_items: int, what: str = "seen") -> None:
    if indptr.ndim != 1 or len(indptr) != n_users + 1:
        raise UserError(f"{what}_indptr has shape {indptr.shape}, expected ({n_users + 1},)")
    if indptr[0] != 0 or indptr[-1] != len(indices) or np.any(np.diff(indptr) < 0):
        raise UserError(f"{what}_indptr is not a valid CSR index pointer for {len(indices)} indices")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_items):
        raise UserError(f"{what} CSR holds item ids outside 0..{n_items - 1}")


def _manifest(root: Path, model_version: str, lineage: dict[str, Any] | None = None) -> dict[str, Any]:
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    files = [f for f in files if f != MANIFEST_FILE]
    manifest = {
        "files": {f: sha256_file(root / f) for f in files},
        "sizes": {f: (root / f).stat().st_size for f in files},
        "model_version": model_version,
    }
    if lineage is not None:
        manifest["lineage"] = lineage
    return manifest


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished temp dir to `out`; an existing `out` is moved aside first and removed only after the
    new one is in place, so a reader never sees a half-written artifact."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ save
def save_artifact(
    out_dir: str | Path,
    model: nn.Module,
    model_cfg: ModelConfig,
    n_users: int,
    n_items: int,
    users_vocab: Any,
    items_vocab: Any,
    seen_indptr: np.ndarray,
    seen_indices: np.ndarray,
    popularity: np.ndarray,
    metrics: dict[str, Any],
    dataset_meta: dict[str, Any],
    histories: Histories | None = None,
    features_dir: str | Path | None = None,
    lineage: dict[str, Any] | None = None,
    forgotten: dict[str, Any] | None = None,
    optimizer_state: dict[str, torch.Tensor] | None = None,
) -> str:
    """Write the artifact atomically to out_dir (replacing an existing one) and return its model_version.
    users_vocab / items_vocab: pyarrow Table or pandas DataFrame with (user_idx|item_idx, user_id|item_id, count).
    `features_dir`: a dataset's features/ dir (side tables), copied in when the model reads features.
    `lineage` goes into the manifest (update / forget: the parent and the data window); `forgotten` is written as
    forgotten.json (hashed ids only); `optimizer_state` (engine.adam_state_by_name) as optimizer.safetensors."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    seen_indptr = np.ascontiguousarray(seen_indptr, dtype=np.int64)
    seen_indices = np.ascontiguousarray(seen_indices, dtype=np.int64)
    popularity = np.ascontiguousarray(popularity, dtype=np.float64)
    _check_csr(seen_indptr, seen_indices, n_users, n_items)
    if popularity.shape != (n_items,):
        raise UserError(f"popularity has shape {popularity.shape}, expected ({n_items},)")
    users_table = _vocab_table(users_vocab, USER_IDX, USER_COL, n_users, "users")
    items_table = _vocab_table(items_vocab, ITEM_IDX, ITEM_COL, n_items, "items")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        model_version = sha256_file(tmp / WEIGHTS_FILE)[:12]
        if optimizer_state:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in optimizer_state.items()},
                      str(tmp / OPTIMIZER_FILE), metadata={"format": "pt"})
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        config = {
            "format_version": FORMAT_VERSION,
            "model": to_dict(model_cfg),
            "n_users": int(n_users),
            "n_items": int(n_items),
            "model_version": model_version,
            "created": created,
        }
        _write_json(tmp / CONFIG_FILE, config)
        (tmp / "vocab").mkdir()
        pq.write_table(users_table, tmp / USERS_VOCAB_FILE)
        pq.write_table(items_table, tmp / ITEMS_VOCAB_FILE)
        np.save(tmp / SEEN_INDPTR_FILE, seen_indptr, allow_pickle=False)
        np.save(tmp / SEEN_INDICES_FILE, seen_indices, allow_pickle=False)
        np.save(tmp / POPULARITY_FILE, popularity, allow_pickle=False)
        if histories is not None:
            h_indptr = histories.indptr.cpu().numpy().astype(np.int64)
            h_items = histories.items.cpu().numpy().astype(np.int64)
            _check_csr(h_indptr, h_items, n_users, n_items, "history")
            np.save(tmp / HISTORY_INDPTR_FILE, h_indptr, allow_pickle=False)
            np.save(tmp / HISTORY_ITEMS_FILE, h_items, allow_pickle=False)
        if features_dir is not None and Path(features_dir).is_dir():
            shutil.copytree(features_dir, tmp / FEATURES_DIR)
        _write_json(tmp / METRICS_FILE, metrics)
        _write_json(tmp / DATASET_META_FILE, dataset_meta)
        if forgotten is not None:
            _write_json(tmp / FORGOTTEN_FILE, forgotten)
        _write_json(tmp / MANIFEST_FILE, _manifest(tmp, model_version, lineage))
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; an artifact is meant to be shared with serving
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model_version


# ------------------------------------------------------------------------------------------------ load
def _check_manifest_path(mpath: Path, rel: Any) -> None:
    """A manifest entry must name a file inside the artifact: a relative POSIX path with no `..`, no drive and
    no leading `/`. Otherwise verification itself would hash (and a loader later read) files outside the dir."""
    if not isinstance(rel, str) or not rel:
        raise UserError(f"{mpath} lists a file name that is not a non-empty string: {rel!r}")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or "\\" in rel or ".." in pure.parts or (len(rel) > 1 and rel[1] == ":"):
        raise UserError(f"{mpath} lists {rel!r}: manifest paths must be relative and stay inside the artifact")


def verify_manifest(path: str | Path) -> dict[str, Any]:
    """Check every file against manifest.json: present, same size, same sha256, and nothing unlisted.
    Returns the manifest; raises UserError naming the first bad file."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"model artifact {root} does not exist or is not a directory")
    mpath = root / MANIFEST_FILE
    if not mpath.is_file():
        raise UserError(
            f"model artifact {root} has no {MANIFEST_FILE}; refusing to load an unverified artifact"
        )
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{mpath} is not a valid manifest (expected {{'files': {{path: sha256}}}})") from None
    sizes = manifest.get("sizes") or {}
    for rel in files:
        _check_manifest_path(mpath, rel)
    for required in REQUIRED_FILES:
        if required not in files:
            raise UserError(f"{mpath} does not list required file {required}")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST_FILE}
    extra = sorted(present - set(files))
    if extra:
        raise UserError(f"model artifact {root} holds file(s) not in its manifest: {', '.join(extra)}")
    for rel, digest in files.items():
        fpath = root / rel
        if not fpath.is_file():
            raise UserError(f"model artifact {root} is missing {rel} (listed in {MANIFEST_FILE})")
        size = fpath.stat().st_size
        if rel in sizes and size != sizes[rel]:
            raise UserError(f"{fpath} is {size} bytes, manifest says {sizes[rel]}: truncated or changed")
        if sha256_file(fpath) != digest:
            raise UserError(f"{fpath} does not match its manifest (sha256 in {MANIFEST_FILE}): changed or corrupted")
    return manifest


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise UserError(f"{path} is not a plain numpy array: {exc}") from None


def _read_vocab(path: Path, idx_col: str, id_col: str, n: int) -> np.ndarray:
    table = pq.read_table(path)
    idx = np.asarray(table[idx_col].to_numpy(), dtype=np.int64)
    if len(idx) != n or not np.array_equal(idx, np.arange(n)):
        raise UserError(f"{path} must hold {idx_col} 0..{n - 1} in order")
    return np.asarray(table[id_col].to_pylist(), dtype=object)


def load_optimizer_state(art: Artifact) -> dict[str, torch.Tensor]:
    """The artifact's optimizer.safetensors ({} when it has none); its checksum was verified by load_artifact."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(art.path) / OPTIMIZER_FILE
    if not path.exists():
        return {}
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path} is not a readable safetensors file: {exc}") from None


def load_artifact(path: str | Path, device: str | torch.device = "cpu") -> Artifact:
    """Verify the manifest, then load the model (eval mode, on `device`) and its vocab/seen/popularity arrays."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path)
    manifest = verify_manifest(root)
    config = _read_json(root / CONFIG_FILE)
    try:
        model_cfg = from_dict(ModelConfig, config["model"])
        n_users, n_items = int(config["n_users"]), int(config["n_items"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{root / CONFIG_FILE} is missing or has a bad field: {exc}") from None
    try:
        state = load_file(str(root / WEIGHTS_FILE), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{root / WEIGHTS_FILE} is not a readable safetensors file: {exc}") from None
    dataset_meta = _read_json(root / DATASET_META_FILE)
    inputs = inputs_from_dir(root, dataset_meta) if model_cfg.name not in ("ease", "pop") else ModelInputs()
    model = build_model_for(model_cfg, n_users, n_items, inputs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{root / WEIGHTS_FILE} does not fit model {model_cfg}: {exc}") from None
    model.to(device).eval()

    user_ids = _read_vocab(root / USERS_VOCAB_FILE, USER_IDX, USER_COL, n_users)
    item_ids = _read_vocab(root / ITEMS_VOCAB_FILE, ITEM_IDX, ITEM_COL, n_items)
    seen_indptr = _load_npy(root / SEEN_INDPTR_FILE).astype(np.int64, copy=False)
    seen_indices = _load_npy(root / SEEN_INDICES_FILE).astype(np.int64, copy=False)
    _check_csr(seen_indptr, seen_indices, n_users, n_items)
    popularity = _load_npy(root / POPULARITY_FILE).astype(np.float64, copy=False)
    if popularity.shape != (n_items,):
        raise UserError(f"{root / POPULARITY_FILE} has shape {popularity.shape}, expected ({n_items},)")
    histories = None
    if (root / HISTORY_INDPTR_FILE).is_file() and (root / HISTORY_ITEMS_FILE).is_file():
        h_indptr = _load_npy(root / HISTORY_INDPTR_FILE).astype(np.int64, copy=False)
        h_items = _load_npy(root / HISTORY_ITEMS_FILE).astype(np.int64, copy=False)
        _check_csr(h_indptr, h_items, n_users, n_items, "history")
        histories = Histories(torch.from_numpy(h_indptr), torch.from_numpy(h_items))
    forgotten = _read_json(root / FORGOTTEN_FILE) if (root / FORGOTTEN_FILE).is_file() else None
    lineage = manifest.get("lineage")
    return Artifact(
        model=model,
        model_cfg=model_cfg,
        n_users=n_users,
        n_items=n_items,
        user_ids=user_ids,
        item_ids=item_ids,
        user_index={u: i for i, u in enumerate(user_ids)},
        item_index={it: i for i, it in enumerate(item_ids)},
        seen_indptr=seen_indptr,
        seen_indices=seen_indices,
        popularity=popularity,
        histories=histories,
        metrics=_read_json(root / METRICS_FILE),
        dataset_meta=dataset_meta,
        model_version=str(config.get("model_version") or manifest.get("model_version") or ""),
        created=str(config.get("created", "")),
        path=str(root),
        inputs=inputs.for_model(model_cfg),
        lineage=lineage if isinstance(lineage, dict) else None,
        forgotten=forgotten if isinstance(forgotten, dict) else None,
    )
