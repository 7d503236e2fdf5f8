"""Explanations: which of the user's own past items support each recommended item ("because you viewed X").

    ncf-ray recommend MODEL_DIR --user RAW_ID --explain          # and {"explain": true} on POST /recommend(/batch)

Only the user's own items ever appear: a known user's stored items plus the request's recent_items, or, for an
anonymous shopper, the recent_items alone. Per recommended item up to `MAX_BECAUSE` of them come back with a
score > 0, best first.

How a past item h supports a recommended item r:

- Every family: `sim(h, r)`, the cosine of their item vectors (`model.item_repr`, the vectors the head scores
  with) after subtracting the catalogue's mean vector. Centring removes what every item shares — the tower's
  first-layer bias inside NeuMF/MLP/seq-neumf item vectors, MF's constant 1 column, a common popularity
  direction — which would otherwise make every pair look alike. The past items are the user's seen set (and
  recent_items).
- Sequence models (seq): the final state is built by attention over the history window the model read (its last
  L items), so h is weighted by how much of that state comes from h: `support = attention(h) * sim(h, r)`.
  Attention alone is per user (the same ranking for every recommendation); the cosine makes it per item, so a
  history item supports r when the state attended to it *and* it lies near r in the space the head scores in.
  The attention is the **rollout** across blocks (Abnar & Zuidema 2020): per block the head-averaged weights A
  of the pre-norm residual block become 0.5 * (A + I) (the residual stream carries each position's own input
  forward), rows renormalised, and the blocks' matrices are multiplied; the final position's row says how much
  of the final state flows from each input position. The last block's weights alone would name positions whose
  states already mix earlier items (block 1's outputs), not items. The rollout weights of repeated items add
  up. Padding gets no weight (no real query attends to it).

The attention is recomputed here from each block's public parts (`norm1`, `qkv`, `heads`): forward pre-hooks
capture every block's input and mask during one full causal pass (`states`), and the weights that the fused
`scaled_dot_product_attention` never materialises are rebuilt from the same q and k (a test checks them against
the block's own output). Nothing here runs unless an explanation is asked for. Pure torch, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_BECAUSE = 3
# Users per attention-rollout pass (64 x L 200 x L 200 floats: 10 MiB per head).
EXPLAIN_CHUNK_USERS = 64


def head_attention(block: nn.Module, x: Tensor, allowed: Tensor) -> Tensor:
    """[B, heads, L, L] attention weights of one causal block on its input x [B, L, D] under the boolean mask
    `allowed` ([B, 1, L, L] or broadcastable: True = may attend), as the block's fused attention computes them."""
    b, n, d = x.shape
    heads = int(block.heads)
    q, k, _ = block.qkv(block.norm1(x)).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(d // heads)
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1)


def block_attention(block: nn.Module, x: Tensor, allowed: Tensor) -> Tensor:
    """[B, L, L] the block's attention weights averaged over its heads."""
    return head_attention(block, x, allowed).mean(1)


def block_inputs(model: nn.Module, users: Tensor, history: Tensor) -> list[tuple[nn.Module, Tensor, Tensor]]:
    """(block, input x, mask) of every attention block of a sequence model during one full causal pass over
    `history` (every position: scoring's last-position shortcut would leave the blocks other widths)."""
    seen: list[tuple[nn.Module, Tensor, Tensor]] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["x"]
        allowed = args[1] if len(args) > 1 else kwargs["allowed"]
        seen.append((module, x, allowed))

    hooks = [block.register_forward_pre_hook(capture, with_kwargs=True) for block in model.blocks]
    try:
        model.states(history, users)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@torch.inference_mode()
def attention_rollout(model: nn.Module, users: Tensor, history: Tensor) -> Tensor:
    """[B, L] share of each user's final state that flows from each history position (attention rollout over
    the blocks, see the module docstring); rows sum to 1, padding positions get 0. `history` as the model reads
    it: [B, L] item_idx + 1, right-aligned, 0 = padding."""
    history = history[:, -int(model.history_len) :]
    n = history.shape[1]
    eye = torch.eye(n, device=history.device)
    steps = []
    for block, x, allowed in block_inputs(model, users, history):
        a = 0.5 * (block_attention(block, x, allowed) + eye)
        steps.append(a / a.sum(-1, keepdim=True))
    # The final row of A_last @ ... @ A_first, as a row vector carried back block by block: [B, L] @ [B, L, L]
    # per block instead of the [B, L, L] @ [B, L, L] products of the whole matrix.
    weights = eye[-1].expand(history.shape[0], n)
    for step in reversed(steps):
        weights = (weights[:, None, :] @ step)[:, 0]
    weights = weights * (history > 0)
    return weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)


class Explainer:
    """Builds the "because" lists of one model; build once per Recommender, on the first explain request (it
    holds the catalogue's centred, unit-length item vectors, [M, D])."""

    def __init__(self, model: nn.Module, item_ids: np.ndarray) -> None:
        self.model = model
        self.item_ids = item_ids
        self.reads_history = int(getattr(model, "history_len", 0)) > 0 and hasattr(model, "blocks")
        with torch.inference_mode():
            catalogue = model.item_repr(None).float()
            self._unit = F.normalize(catalogue - catalogue.mean(0, keepdim=True), dim=-1)

    def similarity(self, recommended: Tensor, past: Tensor) -> Tensor:
        """[R, H] centred cosine between recommended items [R] and past items [H] (item indices)."""
        return self._unit[recommended] @ self._unit[past].t()

    def because(self, recommended: Sequence[int], past: Sequence[int], weights: Sequence[float] | None = None,
                limit: int = MAX_BECAUSE) -> list[list[dict[str, Any]]]:
        """Per recommended item (indices), up to `limit` past items (indices, the user's own) with support > 0,
        best first, as [{"item_id": raw id, "score": support}], never the recommended item itself. `weights` (one per past entry: attention) scale
        the cosine; repeated past items add their weights up. Without past items every list is empty."""
        if not len(recommended) or not len(past):
            return [[] for _ in recommended]
        device = self._unit.device
        past_t = torch.as_tensor(list(past), dtype=torch.int64, device=device)
        items, where = torch.unique(past_t, return_inverse=True)
        if weights is None:
            weight = torch.ones(len(items), device=device)
        else:
            weight = torch.zeros(len(items), device=device).index_add_(
                0, where, torch.as_tensor(list(weights), dtype=torch.float32, device=device))
        rec_t = torch.as_tensor(list(recommended), dtype=torch.int64, device=device)
        support = self.similarity(rec_t, items) * weight  # [R, H]
        support[rec_t[:, None] == items[None, :]] = 0.0  # an item never explains itself (exclude_seen=False)
        top, order = torch.topk(support, min(limit, len(items)), dim=1)
        ids = self.item_ids[items[order].cpu().numpy()].tolist()
        return [[{"item_id": i, "score": s} for i, s in zip(row_ids, row_scores) if s > 0]
                for row_ids, row_scores in zip(ids, top.cpu().tolist())]

    def history_support(self, users: Tensor, history: Tensor) -> list[tuple[list[int], list[float]]]:
        """Per user: (past item indices of the window the model read, their rollout weights), for seq models."""
        hist = history[:, -int(self.model.history_len) :]
        # Chunks of users: the [chunk, heads, L, L] weights stay small for a 1,000-user /recommend/batch.
        weights = torch.cat([attention_rollout(self.model, users[s : s + EXPLAIN_CHUNK_USERS],
                                               hist[s : s + EXPLAIN_CHUNK_USERS])
                             for s in range(0, len(users), EXPLAIN_CHUNK_USERS)])
        out = []
        for row, w in zip(hist.tolist(), weights.tolist()):
            real = [(item - 1, wt) for item, wt in zip(row, w) if item > 0]
            out.append(([i for i, _ in real], [wt for _, wt in real]))
        return out


__all__ = ["MAX_BECAUSE", "Explainer", "attention_rollout", "block_attention", "block_inputs", "head_attention"]
