"""Top-K recommendation from a loaded artifact: the pure logic behind `ncf-ray recommend` and `ncf-ray serve`.

Known users: one batched pass over all items (or a candidate subset), the user's seen items masked to -inf through
the artifact's CSR (one vectorised scatter), then `torch.topk`. Over all items an `AllItemsScorer`
(ncf_ray/scoring.py) does this: exact fp32 by default; with `precision="bf16"` (or "auto" where bf16 is fast, as
Serve uses) a bf16 shortlist of k + margin items re-scored exactly in fp32, so returned scores are always the
model's fp32 logits. Unknown users get the popularity fallback, flagged `"cold_start": true`. Raw ids are
normalised with str().

Scores: known users get the model's raw logit (higher is better; sigmoid(logit) is the model's predicted
probability of an interaction). Cold-start users get popularity / max popularity, in [0, 1]. The two scales are
not comparable; `cold_start` says which one a result uses.

No Ray here: Serve wraps a Recommender in a deployment; the CLI uses it directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ncf_ray.artifact import Artifact, load_artifact
from ncf_ray.context import encode_context
from ncf_ray.errors import UserError
from ncf_ray.metrics import csr_rows
from ncf_ray.scoring import AllItemsScorer

RawId = str | int
# Serve fills a history model's user-state cache at load up to this many users: about 1 ms per user at L 200,
# D 64 on one core, so at most ~20 s of load; beyond that the cache fills as users are first asked for.
WARM_USERS_MAX = 20_000


class Recommender:
    """Serves top-K lists and pair scores from one artifact. Build once per process/replica; thread-safe for reads."""

    def __init__(self, artifact: Artifact, precision: str = "fp32") -> None:
        self.artifact = artifact
        self.model = artifact.model.eval()
        self.device = next(self.model.parameters()).device
        self.item_ids: np.ndarray = artifact.item_ids
        self.user_index = artifact.user_index
        self.item_index = artifact.item_index
        # Precomputed tensors: nothing in the hot path converts per item.
        self._indptr = torch.as_tensor(artifact.seen_indptr, dtype=torch.int64, device=self.device)
        self._indices = torch.as_tensor(artifact.seen_indices, dtype=torch.int64, device=self.device)
        self.history_len = int(getattr(self.model, "history_len", 0))
        stored = getattr(artifact, "histories", None)
        self._histories = stored.to(self.device) if stored is not None else None
        if self.history_len and self._histories is None:
            raise UserError(f"{artifact.path}: the model reads user histories but the artifact stores none")
        # The scorer caches each known user's state from the stored history (a new artifact means a new
        # Recommender, so the cache never outlives the histories it was computed from).
        self.scorer = AllItemsScorer(self.model, precision=precision,
                                     histories=self._histories if self.history_len else None)
        pop = torch.as_tensor(artifact.popularity, dtype=torch.float64)
        top = float(pop.max()) if len(pop) else 0.0
        self._pop_score = (pop / top if top > 0 else torch.zeros_like(pop)).to(torch.float32)
        # Most popular first; ties broken by item index so the fallback is deterministic.
        self._pop_order = torch.argsort(-pop, stable=True)
        self._explainer: Any = None  # ncf_ray.explain.Explainer, built on the first explain request

    @classmethod
    def from_path(cls, path: str | Path, device: str | torch.device = "cpu", precision: str = "fp32") -> Recommender:
        return cls(load_artifact(path, device=device), precision=precision)

    def warm_users(self, max_users: int = WARM_USERS_MAX) -> float:
        """Compute every known user's cached state now (history models with at most `max_users` users; larger
        ones fill the cache lazily, a chunk of users per request batch). Returns the seconds it took (0: skipped).
        Serve calls it at load; one-off callers (`ncf-ray recommend`) skip it and compute only their users."""
        if not self.history_len or self.n_users > max_users:
            return 0.0
        return self.scorer.warm_users()

    @property
    def model_version(self) -> str:
        return self.artifact.model_version

    @property
    def n_items(self) -> int:
        return self.artifact.n_items

    @property
    def n_users(self) -> int:
        return self.artifact.n_users

    # -------------------------------------------------------------------------------------------- recommend
    def recommend(
        self,
        user_ids: Sequence[RawId | None],
        k: int,
        exclude_seen: bool = True,
        candidates: Sequence[RawId] | None = None,
        recent_items: Sequence[Sequence[RawId] | None] | None = None,
        context: Sequence[dict[str, Any] | None] | None = None,
        objective: str = "click",
        explain: bool = False,
    ) -> list[dict[str, Any]]:
        """Top-k items for each user, in request order: {"user_id", "items": [{"item_id", "score"}],
        "cold_start"} (+ "unknown_items" when candidates are given). k is clipped to the items available.

        `recent_items[j]` (raw ids, oldest first) is what user j just did: it extends a known user's stored
        history, and gives a user the model does not know (or `None`, an anonymous shopper) a personalised list
        from a model that reads history ("history": "request"). Those items are excluded like seen ones; unknown
        ids are skipped and counted ("unknown_recent_items"). Without any history a user gets popularity.

        `context[j]` (hour, dow, device, ...: ncf_ray/context.py) is user j's request context for models that
        read context; `objective` picks the head a multi-task model ranks by ("click" or "purchase").
        `explain`: each item also gets "because": up to 3 of the user's own past items (stored and recent)
        that support it most, [{"item_id", "score"}], best first (ncf_ray/explain.py says how they are scored)."""
        if isinstance(user_ids, (str, bytes)):
            raise UserError(f"user_ids must be a list of ids, got the string {user_ids!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise UserError(f"k={k!r} must be a positive integer")
        if recent_items is not None and len(recent_items) != len(user_ids):
            raise UserError(f"recent_items has {len(recent_items)} lists for {len(user_ids)} users")
        if context is not None and len(context) != len(user_ids):
            raise UserError(f"context has {len(context)} entries for {len(user_ids)} users")
        task = self.check_objective(objective)
        contexts = [self.context_ids(c) for c in context] if context is not None else [self.context_ids(None)] * len(
            user_ids)
        keys = [None if u is None else str(u) for u in user_ids]
        cand_idx, unknown_items = self._candidates(candidates)
        recent = [self.check_recent_items(r) for r in recent_items] if recent_items is not None else [None] * len(keys)
        user_idx = [self.user_index.get(key, -1) if key is not None else -1 for key in keys]
        # Who the model scores: known users, and unknown ones with recent items when the model reads history.
        scored = [pos for pos, u in enumerate(user_idx)
                  if u >= 0 or (self.history_len and recent[pos] is not None and recent[pos][0])]

        lists: list[list[dict[str, Any]]] = [[] for _ in keys]
        if scored:
            users = torch.tensor([user_idx[p] for p in scored], dtype=torch.int64, device=self.device)
            extra = [recent[p][0] if recent[p] is not None else [] for p in scored]
            ctx = (torch.tensor([contexts[p] for p in scored], dtype=torch.int64, device=self.device)
                   if self.context_spec else None)
            for pos, items in zip(scored, self._top_known(users, int(k), exclude_seen, cand_idx, extra, ctx, task)):
                lists[pos] = items
        scored_set = set(scored)
        for pos in range(len(keys)):
            if pos not in scored_set:
                drop = set(recent[pos][0]) if recent[pos] is not None and exclude_seen else set()
                lists[pos] = self._top_popular(int(k), cand_idx, drop)

        if explain:
            self._explain(lists, user_idx, scored, [r[0] if r is not None else [] for r in recent])
        results = []
        for pos, key in enumerate(keys):
            result: dict[str, Any] = {"user_id": key, "items": lists[pos], "cold_start": pos not in scored_set}
            if recent_items is not None:
                result["history"] = self._history_source(user_idx[pos] >= 0, pos in scored_set, recent[pos])
                result["unknown_recent_items"] = recent[pos][1] if recent[pos] is not None else 0
            if candidates is not None:
                result["unknown_items"] = list(unknown_items)
            results.append(result)
        return results

    @property
    def context_spec(self) -> dict[str, Any] | None:
        """The context columns the model reads (meta.json's "context"), or None."""
        return self.artifact.inputs.context

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(getattr(self.model, "tasks", ("click",)))

    def check_objective(self, objective: str) -> str | None:
        """The task to rank by (None: the model's first, click); UserError for one the model does not predict."""
        if objective not in self.tasks:
            raise UserError(f"objective={objective!r}: this model predicts {', '.join(self.tasks)}")
        return None if objective == self.tasks[0] else objective

    def context_ids(self, raw: dict[str, Any] | None) -> list[int]:
        """One request's context ids (ncf_ray/context.py); UserError naming a bad field."""
        return encode_context(self.context_spec, raw)

    def _explain(self, lists: list[list[dict[str, Any]]], user_idx: list[int], scored: list[int],
                 recent: list[list[int]]) -> None:
        """Add "because" to every item of `lists` (in place) from each user's own items: the attention-weighted
        window the model read for scored users of a history model, else the seen set plus recent items."""
        from ncf_ray.explain import Explainer

        if self._explainer is None:  # built on the first explain request only: no cost for plain requests
            self._explainer = Explainer(self.model, self.item_ids)
        explainer = self._explainer
        support: dict[int, tuple[list[int], list[float] | None]] = {}
        if explainer.reads_history and scored:
            users = torch.tensor([user_idx[p] for p in scored], dtype=torch.int64, device=self.device)
            windows = explainer.history_support(users, self._history(users, [recent[p] for p in scored]))
            support.update(zip(scored, windows))
        for pos, items in enumerate(lists):
            if pos not in support:
                u = user_idx[pos]
                seen = self.artifact.seen_indices[self.artifact.seen_indptr[u] : self.artifact.seen_indptr[u + 1]] \
                    if u >= 0 else []
                support[pos] = ([int(i) for i in seen] + list(recent[pos]), None)
            past, weights = support[pos]
            recommended = [self.item_index[it["item_id"]] for it in items]
            for it, because in zip(items, explainer.because(recommended, past, weights)):
                it["because"] = because

    def _history_source(self, known: bool, scored: bool, recent: tuple[list[int], int] | None) -> str:
        """Which history a user's list came from: stored, stored+request, request, or none."""
        used_request = bool(self.history_len and recent is not None and recent[0])
        if known:
            return "stored+request" if used_request else "stored"
        return "request" if scored else "none"

    def check_recent_items(self, items: Sequence[RawId] | None) -> tuple[list[int], int] | None:
        """(known item indices oldest first, count of unknown ids) of one user's recent_items; UserError when
        there are more than the model reads."""
        if items is None:
            return None
        if isinstance(items, (str, bytes)):
            raise UserError(f"recent_items must be lists of item ids, got the string {items!r}")
        limit = max(self.history_len, 1) if self.history_len else None
        if limit is not None and len(items) > limit:
            raise UserError(f"recent_items has {len(items)} ids; this model reads at most {limit}")
        idx = [self.item_index.get(str(i), -1) for i in items]
        return [i for i in idx if i >= 0], sum(1 for i in idx if i < 0)

    def _candidates(self, candidates: Sequence[RawId] | None) -> tuple[Tensor | None, list[str]]:
        """Known candidate item indices (de-duplicated, request order) and the unknown raw ids."""
        if candidates is None:
            return None, []
        if isinstance(candidates, (str, bytes)):
            raise UserError(f"candidates must be a list of item ids, got the string {candidates!r}")
        wanted = dict.fromkeys(str(c) for c in candidates)
        idx = [self.item_index[c] for c in wanted if c in self.item_index]
        unknown = [c for c in wanted if c not in self.item_index]
        return torch.tensor(idx, dtype=torch.int64, device=self.device), unknown

    def _history(self, users: Tensor, extra: list[list[int]] | None = None) -> Tensor | None:
        """[B, L] the users' stored last-L items (none for user -1) extended by each one's request items, for
        models that read history (None otherwise)."""
        if not self.history_len:
            return None
        length = self.history_len
        stored = self._histories.last(users.clamp(min=0), length)
        stored[users < 0] = 0
        if not extra or not any(extra):
            return stored
        rows = []
        for row, more in zip(stored.tolist(), extra):
            seq = [i for i in row if i > 0] + [i + 1 for i in more]
            seq = seq[-length:]
            rows.append([0] * (length - len(seq)) + seq)
        return torch.tensor(rows, dtype=torch.int64, device=self.device)

    @torch.inference_mode()
    def _top_known(
        self, users: Tensor, k: int, exclude_seen: bool, cand_idx: Tensor | None,
        extra: list[list[int]] | None = None, context: Tensor | None = None, task: str | None = None,
    ) -> list[list[dict[str, Any]]]:
        """Top-k lists of users (user -1: unknown, scored from `extra` alone) with each one's `extra` request
        items appended to its history and excluded like seen items; `context` [B, K] and `task` as in
        AllItemsScorer.top_k."""
        # Rows whose history is the stored one (known users without request items) use the cached state.
        stored = (users >= 0) & torch.tensor([not more for more in (extra or [[]] * len(users))], dtype=torch.bool,
                                             device=self.device)
        history, stored_rows = (None, None) if bool(stored.all()) else (self._history(users, extra), stored)
        known = users >= 0
        extra_rows = torch.tensor([r for r, more in enumerate(extra or []) for _ in more], dtype=torch.int64,
                                  device=self.device)
        extra_cols = torch.tensor([i for more in (extra or []) for i in more], dtype=torch.int64, device=self.device)

        def seen_pairs(rows: Tensor) -> tuple[Tensor, Tensor]:
            # (position in rows, item) of everything the users in `rows` already did: stored seen set + request.
            sel = rows[known[rows]]
            pos, cols = csr_rows(users[sel], self._indptr, self._indices)
            pos = torch.nonzero(known[rows]).flatten()[pos] if len(sel) else pos
            if len(extra_cols):
                where = torch.full((len(users),), -1, dtype=torch.int64, device=self.device)
                where[rows] = torch.arange(len(rows), device=self.device)
                keep = where[extra_rows] >= 0
                pos = torch.cat([pos, where[extra_rows][keep]])
                cols = torch.cat([cols, extra_cols[keep]])
            return pos, cols

        def mask_seen(rows: Tensor, scores: Tensor) -> None:
            pos, cols = seen_pairs(rows)
            scores[pos, cols] = float("-inf")

        if cand_idx is None:
            top_scores, top_items = self.scorer.top_k(users, k, mask_seen if exclude_seen else None, history,
                                                      stored_rows, context, task)
        elif len(cand_idx) == 0:
            return [[] for _ in range(len(users))]
        else:
            reps = self.scorer.user_repr(users, history, stored_rows, context)
            scores = self._score_all(reps, self.model.item_repr(cand_idx), task)  # [B, candidates]
            if exclude_seen:
                rows, cols = seen_pairs(torch.arange(len(users), device=self.device))
                # Seen item index -> its column among the candidates (-1 when it is not a candidate).
                column_of = torch.full((self.n_items,), -1, dtype=torch.int64, device=self.device)
                column_of[cand_idx] = torch.arange(len(cand_idx), device=self.device)
                cols = column_of[cols]
                keep = cols >= 0
                scores[rows[keep], cols[keep]] = float("-inf")
            top_scores, top_cols = torch.topk(scores, min(k, len(cand_idx)), dim=1)
            top_items = cand_idx[top_cols]
        return self._item_lists(top_items.cpu().numpy(), top_scores.cpu().numpy())

    def _score_all(self, reps: Tensor, items: Tensor, task: str | None) -> Tensor:
        if task is None:
            return self.model.score_all(reps, items).float()
        return self.model.score_all(reps, items, task=task).float()

    def _top_popular(self, k: int, cand_idx: Tensor | None, drop: set[int] | None = None) -> list[dict[str, Any]]:
        """The popularity list (over the candidates, when given), without the items in `drop`."""
        if cand_idx is None:
            order = self._pop_order[: k + len(drop or ())]
        else:
            cand = cand_idx.cpu()
            order = cand[torch.argsort(-self._pop_score[cand], stable=True)]
        if drop:
            order = order[~torch.isin(order, torch.tensor(sorted(drop), dtype=order.dtype))]
        order = order[:k]
        return self._item_lists(order.numpy()[None], self._pop_score[order].numpy()[None])[0]

    def _item_lists(self, item_idx: np.ndarray, scores: np.ndarray) -> list[list[dict[str, Any]]]:
        """Rows of [B, k] item indices and scores as lists of {"item_id", "score"} (one conversion per array)."""
        ids, values = self.item_ids[item_idx].tolist(), scores.tolist()
        finite = np.isfinite(scores).tolist()  # -inf marks a seen item: fewer than k left to recommend
        return [
            [{"item_id": i, "score": v} for i, v, ok in zip(row_ids, row_values, row_ok) if ok]
            for row_ids, row_values, row_ok in zip(ids, values, finite)
        ]

    # -------------------------------------------------------------------------------------------- score
    @torch.inference_mode()
    def score(self, user_id: RawId, item_ids: Sequence[RawId], context: dict[str, Any] | None = None,
              objective: str = "click") -> dict[str, Any]:
        """Scores of given items for one user: {"user_id", "scores": [{"item_id", "score" | None, "known"}],
        "cold_start"}. Unknown items get score None and known False, in request order. `context` and
        `objective` as in recommend."""
        if isinstance(item_ids, (str, bytes)):
            raise UserError(f"item_ids must be a list of ids, got the string {item_ids!r}")
        task = self.check_objective(objective)
        ctx_ids = self.context_ids(context)
        key = str(user_id)
        keys = [str(i) for i in item_ids]
        idx = [self.item_index.get(i, -1) for i in keys]
        known_idx = torch.tensor([i for i in idx if i >= 0], dtype=torch.int64, device=self.device)
        cold = key not in self.user_index
        if len(known_idx) == 0:
            values: list[float] = []
        elif cold:
            values = self._pop_score[known_idx.cpu()].tolist()
        else:
            user = torch.tensor([self.user_index[key]], dtype=torch.int64, device=self.device)
            ctx = torch.tensor([ctx_ids], dtype=torch.int64, device=self.device) if self.context_spec else None
            reps = self.scorer.user_repr(user, context=ctx)  # a known user: the cached state of a history model
            values = self._score_all(reps, self.model.item_repr(known_idx), task)[0].cpu().tolist()
        it = iter(values)
        scores = [
            {"item_id": item, "score": next(it), "known": True}
            if i >= 0
            else {"item_id": item, "score": None, "known": False}
            for item, i in zip(keys, idx)
        ]
        return {"user_id": key, "scores": scores, "cold_start": cold}
