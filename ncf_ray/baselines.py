"""Strong simple baselines beside every model: popularity and EASE (Steck 2019), torch only, no Ray.

    ncf-ray baselines DATASET_DIR [--k 10] [--no-ease] [--lambdas 10,100,1000] [--json]

EASE is a closed-form item-item model: with X the binary user x item train matrix,
    G = XᵀX + λI,   P = G⁻¹,   B = I − P·diag(P)⁻¹  (B_ij = −P_ij / P_jj for i != j),   B_jj = 0,
and a user's scores are X_u · B. One Gram matrix serves every λ of the grid; each λ costs one Cholesky inverse
and one scoring pass, and λ is picked on valid HR@k under the sampled protocol (largest λ first, stopping after two
worse in a row), so test is scored once, for the chosen λ only. B is dense [n_items, n_items]: a catalogue whose matrices do not
fit in the memory available is refused with one line saying how much it would need.

`baseline_metrics(data, k)` scores both baselines on valid and test, sampled (the dataset's fixed negatives) and
full ranking (all items, excluding the user's known positives), with test segments (metrics.segments).
`EASE` and `Popularity` are the same baselines as `RecModel`s on the model-input contract (user_repr / item_repr /
head / score_all), ready for the registry, export and serving.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from ncf_ray.batch import Batch
from ncf_ray.errors import UserError
from ncf_ray.metrics import (
    build_csr,
    csr_rows,
    hit_ndcg_from_ranks,
    popularity_scores,
    rank_full,
    rank_sampled,
    seen_mask,
    segments,
)
from ncf_ray.model import RecModel

if TYPE_CHECKING:
    from ncf_ray.data.dataset import Dataset

DEFAULT_LAMBDAS: tuple[float, ...] = (10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)
# Peak memory of a fit, bytes per [n, n] cell: the float64 Gram matrix and two work matrices beside it (Cholesky
# factor and its inverse, float64 at worst), + two float32 B (the best λ's so far and the next one's).
EASE_BYTES_PER_CELL = 3 * 8 + 2 * 4
Csr = tuple[np.ndarray, np.ndarray]  # (indptr [n_users + 1], indices): items per user


# ------------------------------------------------------------------------------------------------ memory
def available_memory_bytes() -> int:
    """Memory the kernel says a new allocation can get now (MemAvailable), else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def ease_memory_bytes(n_items: int) -> int:
    """Peak bytes of an EASE fit over n_items items."""
    return n_items * n_items * EASE_BYTES_PER_CELL


def check_ease_fits(n_items: int, available: int | None = None) -> None:
    """Refuse (UserError, one line with both figures) a catalogue whose dense item x item matrices do not fit."""
    need = ease_memory_bytes(n_items)
    have = available_memory_bytes() if available is None else available
    if need > have:
        raise UserError(
            f"EASE needs a dense {n_items:,} x {n_items:,} item matrix: ~{need / 2**30:.1f} GiB "
            f"({n_items:,}² x {EASE_BYTES_PER_CELL} bytes: 3 float64 work matrices + 2 float32 B) but only "
            f"{have / 2**30:.1f} GiB is available; use a smaller catalogue or skip EASE (--no-ease)"
        )


# ------------------------------------------------------------------------------------------------ fit
def _rows_coo(csr: Csr, users: Tensor, n_items: int) -> Tensor:
    """Sparse COO multi-hot (float32 [len(users), n_items]) of the CSR rows of `users`."""
    row_pos, cols = csr_rows(users, torch.as_tensor(csr[0]), torch.as_tensor(csr[1]))
    values = torch.ones(len(cols), dtype=torch.float32)
    return torch.sparse_coo_tensor(torch.stack([row_pos, cols]), values, (len(users), n_items),
                                   check_invariants=False).coalesce()


def gram_matrix(csr: Csr, n_items: int, batch_users: int = 4096) -> Tensor:
    """G = XᵀX (float64 [n_items, n_items]) of the binary matrix X whose rows are the CSR's users, accumulated a
    block of users at a time (sparse block x dense block: cost ~ nnz x n_items, memory ~ batch x n_items)."""
    n_users = len(csr[0]) - 1
    gram = torch.zeros((n_items, n_items), dtype=torch.float64)
    for s in range(0, n_users, batch_users):
        users = torch.arange(s, min(s + batch_users, n_users))
        x = _rows_coo(csr, users, n_items)
        # float32 is exact for counts below 2**24 per block; accumulate in float64.
        gram += torch.sparse.mm(x.t().coalesce(), x.to_dense()).to(torch.float64)
    return gram


def ease_weights(gram: Tensor, lam: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """EASE's B (float32 [n, n]) from the Gram matrix XᵀX (not modified) and the L2 weight λ > 0:
    P = (G + λI)⁻¹, B_ij = −P_ij / P_jj, B_jj = 0. The inverse is L⁻ᵀL⁻¹ from the Cholesky factor L (a triangular
    solve and one matrix product: faster on this project's CPUs than cholesky_inverse or inv), in float32 by
    default: on an ML-1M-sized synthetic log it gave the same valid HR/NDCG@10 as float64 (to 4 digits at λ = 10,
    500, 2000) for ~60% of the CPU time. Should float32 lose positive definiteness (a tiny λ), it is redone in
    float64."""
    if not lam > 0:
        raise UserError(f"EASE lambda={lam} must be > 0")
    a = gram.to(dtype=dtype, copy=True)
    a.diagonal().add_(float(lam))
    chol, info = torch.linalg.cholesky_ex(a)  # G + λI is positive definite for λ > 0, up to rounding
    del a
    if int(info) != 0:
        if dtype == torch.float64:
            raise RuntimeError(f"EASE: G + {lam}·I is not positive definite in float64 (cholesky info={int(info)})")
        return ease_weights(gram, lam, torch.float64)
    chol_inv = torch.linalg.solve_triangular(chol, torch.eye(len(chol), dtype=dtype), upper=False)
    del chol
    p = chol_inv.T @ chol_inv
    del chol_inv
    p.div_(p.diagonal().clone()).neg_()  # column j divided by P_jj
    p.fill_diagonal_(0.0)
    return p.to(torch.float32)


def ease_scores(b: Tensor, csr: Csr, users: Tensor) -> Tensor:
    """Scores X_u · B (float32 [len(users), n_items]) with X_u the CSR rows of `users`. A dense multi-hot block
    times B: on CPU the dense matrix product beats torch's sparse kernels many times over at MovieLens density."""
    x = seen_mask(users, torch.as_tensor(csr[0]), torch.as_tensor(csr[1]), b.shape[0]).to(b.dtype)
    return x @ b


# ------------------------------------------------------------------------------------------------ evaluation
def _history_csr(data: Dataset, split: str) -> Csr:
    """The items a user is known to have by `split` time: train, plus the valid item for test. EASE's X_u and the
    full-ranking exclusion are both this set (the valid item is a known positive by test time, which matches how
    sequence models see history)."""
    users, items = data.train_users, data.train_items
    if split == "test":
        users = np.concatenate([users, np.arange(data.n_users)])
        items = np.concatenate([items, data.valid_items])
    return build_csr(users, items, data.n_users)


def _targets(data: Dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in ("valid", "test"):
        raise ValueError(f"split={split!r} must be 'valid' or 'test'")
    return (data.valid_items, data.valid_neg) if split == "valid" else (data.test_items, data.test_neg)


def rank_split(
    score_rows: Callable[[Tensor], Tensor], data: Dataset, split: str, batch_users: int = 1024
) -> tuple[Tensor, Tensor]:
    """Per-user ranks (sampled, full) of `split`'s held-out item, every user, from score_rows(users) ->
    [len(users), n_items] scores. Full ranking excludes _history_csr(data, split) (the target never)."""
    targets, negs = _targets(data, split)
    indptr, indices = (torch.as_tensor(a) for a in _history_csr(data, split))
    targets_t, negs_t = torch.as_tensor(targets), torch.as_tensor(negs)
    sampled, full = [], []
    for s in range(0, data.n_users, batch_users):
        users = torch.arange(s, min(s + batch_users, data.n_users))
        scores = score_rows(users).float()
        t = targets_t[users]
        cand_scores = scores.gather(1, torch.cat([t.unsqueeze(1), negs_t[users]], 1))
        sampled.append(rank_sampled(cand_scores[:, 0], cand_scores[:, 1:]))
        full.append(rank_full(scores, t, seen_mask(users, indptr, indices, data.n_items)))
    empty = torch.zeros(0, dtype=torch.int64)
    return (torch.cat(sampled) if sampled else empty), (torch.cat(full) if full else empty)


def _mean_at_k(ranks: Tensor, k: int) -> tuple[float, float]:
    hits, ndcgs = hit_ndcg_from_ranks(ranks, k)
    return (float(hits.mean()), float(ndcgs.mean())) if len(ranks) else (0.0, 0.0)


def _split_metrics(ranks: tuple[Tensor, Tensor], k: int) -> dict[str, float]:
    (hr, ndcg), (fhr, fndcg) = _mean_at_k(ranks[0], k), _mean_at_k(ranks[1], k)
    return {f"hr@{k}": hr, f"ndcg@{k}": ndcg, f"full_hr@{k}": fhr, f"full_ndcg@{k}": fndcg}


def _evaluate(score_rows: Callable[[Tensor], Tensor], data: Dataset, k: int, splits: Sequence[str] = ("valid", "test")
              ) -> dict[str, Any]:
    """{split: metrics} plus "test_segments": {"sampled": ..., "full": ...} (metrics.segments of the test ranks)."""
    out: dict[str, Any] = {}
    for split in splits:
        ranks = rank_split(score_rows, data, split)
        out[split] = _split_metrics(ranks, k)
        if split == "test":
            history_len = np.bincount(data.train_users, minlength=data.n_users)
            out["test_segments"] = {
                name: segments(r, history_len, data.test_items, data.item_counts, k)
                for name, r in zip(("sampled", "full"), ranks)
            }
    return out


def popularity_metrics(data: Dataset, k: int = 10) -> dict[str, Any]:
    """The popularity baseline (train interaction counts, metrics.popularity_scores) on valid and test."""
    pop = popularity_scores(data.item_counts).to(torch.float32)
    return _evaluate(lambda users: pop.expand(len(users), -1), data, k)


def select_ease_lambda(
    data: Dataset, lambdas: Sequence[float], k: int, gram: Tensor, dtype: torch.dtype = torch.float32,
    patience: int = 2,
) -> tuple[float, Tensor, list[dict[str, float]], tuple[Tensor, Tensor]]:
    """Pick λ on valid HR@k (sampled protocol): fit B for each λ from the largest down, keep the best (ties -> the
    larger λ), and stop once `patience` λ in a row score below the best — valid HR is unimodal in log λ for a ridge
    penalty in practice, and the small λ skipped this way are the slowest to be worth anything. Returns (λ, its B,
    [{"lambda", "valid_hr@k", "valid_ndcg@k"} per λ tried], its valid ranks (sampled, full)): the valid figures
    come out of the selection pass itself. Test is never looked at."""
    csr = _history_csr(data, "valid")
    best: tuple[float, float, Tensor | None, tuple[Tensor, Tensor] | None] = (-1.0, 0.0, None, None)
    grid: list[dict[str, float]] = []
    worse = 0
    for lam in sorted(lambdas, reverse=True):
        b = ease_weights(gram, lam, dtype)
        ranks = rank_split(lambda users, b=b: ease_scores(b, csr, users), data, "valid")
        hr, ndcg = _mean_at_k(ranks[0], k)
        grid.append({"lambda": float(lam), f"valid_hr@{k}": hr, f"valid_ndcg@{k}": ndcg})
        if hr > best[0]:
            best, worse = (hr, float(lam), b, ranks), 0
        else:
            worse += 1
        del b
        if worse >= patience:
            break
    assert best[2] is not None and best[3] is not None
    return best[1], best[2], grid, best[3]


def _check_lambdas(lambdas: Sequence[float] | None) -> tuple[float, ...]:
    grid = tuple(DEFAULT_LAMBDAS if lambdas is None else lambdas)
    if not grid or any(not lam > 0 for lam in grid):
        raise UserError(f"EASE lambdas {list(grid)} must be a non-empty list of values > 0")
    return grid


def ease_metrics(
    data: Dataset, k: int = 10, lambdas: Sequence[float] | None = None, memory_bytes: int | None = None
) -> dict[str, Any]:
    """EASE with λ picked on valid: {"lambda", "grid", "valid", "test", "test_segments", "fit_seconds",
    "seconds"}. Raises UserError when the catalogue is too large for the memory (memory_bytes, default what the
    machine has available) or a λ is not > 0."""
    lambdas = _check_lambdas(lambdas)
    check_ease_fits(data.n_items, memory_bytes)
    t0 = time.perf_counter()
    gram = gram_matrix(_history_csr(data, "valid"), data.n_items)
    lam, b, grid, valid_ranks = select_ease_lambda(data, lambdas, k, gram)
    del gram
    fit_seconds = time.perf_counter() - t0
    out: dict[str, Any] = {"lambda": lam, "grid": grid, "valid": _split_metrics(valid_ranks, k)}
    csr = _history_csr(data, "test")  # X_u holds the valid item too by test time
    out |= _evaluate(lambda users: ease_scores(b, csr, users), data, k, splits=("test",))
    return out | {"fit_seconds": fit_seconds, "seconds": time.perf_counter() - t0}


def baseline_metrics(
    data: Dataset, k: int = 10, ease: bool = True, lambdas: Sequence[float] | None = None,
    memory_bytes: int | None = None,
) -> dict[str, Any]:
    """Popularity and EASE beside a model: {"k", "popularity": {"valid", "test", "test_segments"},
    "ease": {"lambda", "grid", "valid", "test", "test_segments", "fit_seconds", "seconds"} | {"skipped": why}}.
    Each split holds hr@k/ndcg@k (sampled) and full_hr@k/full_ndcg@k (all items, the user's known items
    excluded: train, and for test the valid item too)."""
    if k <= 0:
        raise UserError(f"k={k} must be > 0")
    out: dict[str, Any] = {"k": k, "popularity": popularity_metrics(data, k)}
    if not ease:
        out["ease"] = {"skipped": "not requested (--no-ease)"}
        return out
    lambdas = _check_lambdas(lambdas)  # a bad grid is the caller's mistake: refused, not skipped
    try:
        check_ease_fits(data.n_items, memory_bytes)
    except UserError as exc:  # a catalogue too large is a property of the data: the run goes on without EASE
        out["ease"] = {"skipped": str(exc)}
        return out
    out["ease"] = ease_metrics(data, k, lambdas, memory_bytes)
    return out


def format_baselines(m: dict[str, Any]) -> str:
    """The table `ncf-ray baselines` prints: rows valid/test x sampled/full, columns HR@k NDCG@k per baseline,
    then the test segments (HR@k, sampled) and EASE's λ and time."""
    k = m["k"]
    ease = m["ease"]
    names = [("popularity", m["popularity"])] + ([] if "skipped" in ease else [("EASE", ease)])
    head = f"{'':<14}" + "".join(f" {name + ' HR@' + str(k):>18} {'NDCG@' + str(k):>8}" for name, _ in names)
    lines = [head]
    for split in ("valid", "test"):
        for label, prefix in ((split, ""), (f"{split} (full)", "full_")):
            lines.append(f"{label:<14}" + "".join(
                f" {b[split][f'{prefix}hr@{k}']:>18.4f} {b[split][f'{prefix}ndcg@{k}']:>8.4f}" for _, b in names))
    lines.append("test segments (sampled): users by train history length, target items by popularity")
    pop_seg = m["popularity"]["test_segments"]["sampled"]
    for group, label_fmt in (("users", "history {}"), ("items", "{} items")):
        for label, seg in pop_seg[group].items():
            cells = "".join(f" {s['hr']:>18.4f} {s['ndcg']:>8.4f}"
                            for s in (b["test_segments"]["sampled"][group][label] for _, b in names))
            lines.append(f"{label_fmt.format(label):<14}{cells}  n={seg['n']:,}")
    if "skipped" in ease:
        lines.append(f"EASE skipped: {ease['skipped']}")
    else:
        tried = ", ".join(f"{g['lambda']:g}: {g[f'valid_hr@{k}']:.4f}" for g in ease["grid"])
        lines.append(f"EASE lambda {ease['lambda']:g} picked on valid HR@{k} ({tried}); "
                     f"fit {ease['fit_seconds']:.1f} s, total {ease['seconds']:.1f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ models
class _ClosedFormModel(RecModel):
    """A RecModel fitted in closed form, not by gradient steps: its state is parameters with requires_grad=False
    (so the device, state dict and artifact code paths of trained models apply unchanged), and its catalogue
    table is a view of that state rather than RecModel's cached copy (for EASE the copy would be another n²)."""

    def item_repr(self, items: Tensor | None = None) -> Tensor:
        return self._catalogue() if items is None else self._item_repr(items)

    def _catalogue(self) -> Tensor:
        raise NotImplementedError

    def head(self, users: Tensor, items: Tensor) -> Tensor:
        return (users * items).sum(-1)  # broadcast over leading dims, as RecModel.forward arranges them

    def score_all(self, users: Tensor, items: Tensor) -> Tensor:
        return users @ items.t()


class EASE(_ClosedFormModel):
    """EASE as a model: U = the user's multi-hot history X_u [B, n_items], I = column B[:, i] ([..., n_items]),
    head = X_u · B[:, i]. B is filled by fit() (or loaded from an artifact's state dict). The batch's
    history must hold every item of the user (needs_full_history; history_len = n_items is enough for any user)."""

    needs_full_history = True

    def __init__(self, n_users: int, n_items: int, lam: float = 500.0) -> None:
        super().__init__()
        self.n_users, self.n_items, self.lam = n_users, n_items, float(lam)
        self.history_len = n_items
        self.pair_width = n_items
        self.B = nn.Parameter(torch.zeros((n_items, n_items), dtype=torch.float32), requires_grad=False)

    @torch.no_grad()
    def fit(self, train_users: np.ndarray, train_items: np.ndarray) -> EASE:
        """Closed-form B from the train positives with this model's λ (refused if it does not fit in memory)."""
        check_ease_fits(self.n_items)
        gram = gram_matrix(build_csr(train_users, train_items, self.n_users), self.n_items)
        self.B.copy_(ease_weights(gram, self.lam))
        return self

    def user_repr(self, batch: Batch) -> Tensor:
        if batch.history is None:
            raise ValueError("EASE scores a user from their history: the batch must carry history")
        return _multi_hot(batch.history, self.n_items, self.B.dtype)

    def _item_repr(self, items: Tensor) -> Tensor:
        return self.B.T[items.long()]

    def _catalogue(self) -> Tensor:
        return self.B.T


class Popularity(_ClosedFormModel):
    """Popularity as a model: every user's U is [1], an item's I is its train interaction count, so an item's
    score is its count (the ranking metrics.popularity_scores gives)."""

    needs_full_history = False

    def __init__(self, n_users: int, n_items: int) -> None:
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        # float32 counts are exact below 2**24, so no two different counts tie.
        self.counts = nn.Parameter(torch.zeros(n_items, dtype=torch.float32), requires_grad=False)

    @torch.no_grad()
    def fit(self, item_counts: np.ndarray) -> Popularity:
        self.counts.copy_(torch.as_tensor(np.asarray(item_counts), dtype=torch.float32))
        return self

    def user_repr(self, batch: Batch) -> Tensor:
        return torch.ones((len(batch.user), 1), dtype=self.counts.dtype, device=self.counts.device)

    def _item_repr(self, items: Tensor) -> Tensor:
        return self.counts[items.long()].unsqueeze(-1)

    def _catalogue(self) -> Tensor:
        return self.counts.unsqueeze(-1)


def _multi_hot(history: Tensor, n_items: int, dtype: torch.dtype) -> Tensor:
    """[B, L] of item_idx + 1 (0 = padding) -> float multi-hot [B, n_items]."""
    x = torch.zeros((history.shape[0], n_items + 1), dtype=dtype, device=history.device)
    x.scatter_(1, history.long(), 1.0)
    return x[:, 1:]


# ------------------------------------------------------------------------------------------------ as a run
def fit_closed_form(dataset_dir: str, out_dir: str, cfg: Any, refit: bool = False,
                    baselines: bool = True) -> dict[str, Any]:
    """`ncf-ray train DS --model ease|pop`: fit in closed form (EASE's λ picked on valid unless cfg.model.lam
    is set), score valid and test once with the same evaluation as every trained model, beside the baselines,
    and export RUN_DIR/model and RUN_DIR/metrics.json like a trained run. `refit`: the exported weights are
    refitted on every interaction (train, valid and test) with the chosen λ."""
    import dataclasses
    from pathlib import Path

    from ncf_ray.atomic import write_json
    from ncf_ray.config import to_dict
    from ncf_ray.data.dataset import load_dataset
    from ncf_ray.evaluation import evaluate_model
    from ncf_ray.train import baseline_block, export_artifact, training_positives

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(dataset_dir)
    k, name = cfg.eval_k, cfg.model.name
    print(f"fitting {name} in closed form on {data.n_users} users x {data.n_items} items -> {out}", flush=True)
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    if name == "ease":
        lam = float(cfg.model.lam)
        if lam <= 0:  # pick λ on valid
            check_ease_fits(data.n_items)
            gram = gram_matrix(_history_csr(data, "valid"), data.n_items)
            lam, _, grid, _ = select_ease_lambda(data, DEFAULT_LAMBDAS, k, gram)
            del gram
            info["grid"] = grid
        model: _ClosedFormModel = EASE(data.n_users, data.n_items, lam).fit(data.train_users, data.train_items)
        info["lambda"] = lam
    else:
        model = Popularity(data.n_users, data.n_items).fit(data.item_counts)
    fit_seconds = time.perf_counter() - t0
    model.eval()
    valid = evaluate_model(model, data, k, split="valid")
    result: dict[str, Any] = {
        "model": name, "closed_form": info,
        "valid": {f"hr@{k}": valid[f"hr@{k}"], f"ndcg@{k}": valid[f"ndcg@{k}"]},
        "test": evaluate_model(model, data, k),
        "baselines": baseline_block(data, k, ease=baselines and name != "ease"),
        "epochs": 0, "best_epoch": 0, "train_seconds": fit_seconds, "samples_per_second": 0.0, "history": [],
        "config": to_dict(cfg), "dataset": data.meta.get("source"),
        "exported": {"weights": "fitted on train"},
    }
    if name == "ease":  # the model is the EASE baseline: report it once, not fitted twice
        result["baselines"]["ease"] = {"lambda": info["lambda"], "grid": info.get("grid", []), "valid": valid,
                                       "test": result["test"], "fit_seconds": fit_seconds}
    result["popularity"] = result["baselines"]["popularity"]
    if refit:
        users, items, _ = training_positives(data, refit=True)
        if name == "ease":
            model = EASE(data.n_users, data.n_items, info["lambda"]).fit(users.numpy(), items.numpy())
        else:
            model = Popularity(data.n_users, data.n_items).fit(
                np.bincount(items.numpy(), minlength=data.n_items))
        result["exported"] = {"weights": "refit", "note": "refitted on train + valid + test; valid/test figures "
                                                          "are the train-only fit's"}
    if name == "ease":  # the artifact records the λ it was fitted with, so it loads without re-selecting
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lam=info["lambda"]))
    result["model_version"] = export_artifact(out / "model", model.eval(), cfg, data, result)
    write_json(out / "metrics.json", result)
    return result
