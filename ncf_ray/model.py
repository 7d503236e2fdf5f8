"""Every model family on one contract, pure torch: GMF, MLP, NeuMF (He et al., WWW 2017), MF with biases (Rendle
et al. 2020), and a registry name -> class.

A model reads a `Batch` (ncf_ray/batch.py) and splits its score into three parts:

    user_repr(batch)   -> U [B, D]     everything about the user (id embedding; attention over history; features)
    item_repr(items)   -> I [..., D]   everything about an item; `item_repr(None)` is the whole catalogue [M, D],
                                       cached in eval mode, so serving computes it once per model
    head(U, I)         -> logits       broadcasts over leading dims: U [B, D] with I [B, D] gives [B]; U[:, None]
                                       with I [B, C, D] gives [B, C]
    forward(batch) = head(user_repr(batch), item_repr(batch.item)); score_all(U, I) -> [B, M] scores a user batch
    against a whole item set without per-pair Python, chunked so the widest tensor stays cache-sized.

NeuMF and MLP fold the tower's first layer into the representations: Linear(concat[p_u, q_i]) = W_u p_u + W_i q_i + b,
so U carries W_u p_u and I carries W_i q_i + b, and scoring all items never builds a [B*M, layers[0]] concat. The
tower head (`tower_logits`) is a function of (U, I) and is shared with other families that want NeuMF's head. GMF
and MF are dot products of their representations (MF folds its biases into U and I), which keeps them open to
ANN retrieval over `item_repr`.

Parameter names are those of the earlier `model(users, items)` classes, so their artifacts load unchanged; a test
pins each model's logits on a seeded batch. Config never reaches inside: `build_model` takes flat args.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncf_ray.batch import Batch
from ncf_ray.errors import UserError

if TYPE_CHECKING:
    from ncf_ray.config import ModelConfig

# score_all works on chunks of users so that the [chunk, M, width] hidden tensor stays near this many elements
# (4 MiB of float32): big enough for fast matmuls, small enough to stay in cache between the tower's layers.
SCORE_CHUNK_ELEMENTS = 1 << 20
# A GPU wants few, large launches: with the CPU budget an ML-20M-size tower would score ~1 user per launch.
GPU_SCORE_CHUNK_ELEMENTS = 1 << 28


def chunk_users(n_items: int, width: int, device: torch.device, cpu_elements: int = 0) -> int:
    """Users per scoring chunk so a [users, n_items, width] tensor stays near the device's element budget
    (`cpu_elements` overrides the CPU budget; score_all and the serving scorer share this rule)."""
    budget = (cpu_elements or SCORE_CHUNK_ELEMENTS) if device.type == "cpu" else GPU_SCORE_CHUNK_ELEMENTS
    return max(1, budget // max(1, n_items * width))


# ------------------------------------------------------------------------------------------------ init
def init_embedding(emb: nn.Embedding) -> None:
    # Paper: embeddings drawn from N(0, 0.01).
    nn.init.normal_(emb.weight, mean=0.0, std=0.01)


def init_hidden(linear: nn.Linear) -> None:
    # Paper's Keras code: Glorot-uniform hidden layers, zero biases.
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)


def init_prediction(linear: nn.Linear) -> None:
    # Paper: LeCun-uniform prediction layer (Kaiming-uniform with gain 1 == U(+-sqrt(3 / fan_in))).
    nn.init.kaiming_uniform_(linear.weight, nonlinearity="sigmoid")
    nn.init.zeros_(linear.bias)


def check_sizes(n_users: int, n_items: int) -> None:
    if n_users <= 0 or n_items <= 0:
        raise UserError(f"n_users={n_users} and n_items={n_items} must be > 0")


def check_factors(factors: int) -> None:
    if factors <= 0:
        raise UserError(f"factors={factors} must be > 0")


def check_layers(layers: Sequence[int], dropout: float) -> tuple[int, ...]:
    layers = tuple(int(w) for w in layers)
    if not layers or any(w <= 0 for w in layers):
        raise UserError(f"mlp layers={list(layers)} must be non-empty and all > 0")
    if layers[0] % 2:
        raise UserError(f"mlp layers[0]={layers[0]} must be even (it is user+item embedding width)")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout={dropout} must be in [0, 1)")
    return layers


# ------------------------------------------------------------------------------------------------ base
class RecModel(nn.Module):
    """The contract every family implements (see the module docstring). Subclasses set n_users, n_items and
    `history_len` (> 0: the batch must carry the user's last history_len items) and define user_repr,
    _item_repr and head; score_all has a chunked default that dot-product models replace with one matmul."""

    n_users: int
    n_items: int
    history_len: int = 0
    # Widest per-pair tensor head() builds, in floats (sizes score_all's user chunks).
    pair_width: int = 1

    def user_repr(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    def _item_repr(self, items: Tensor) -> Tensor:
        raise NotImplementedError

    def head(self, users: Tensor, items: Tensor) -> Tensor:
        raise NotImplementedError

    def item_repr(self, items: Tensor | None = None) -> Tensor:
        """I [..., D] of `items` (any shape), or of every item [M, D] when None. The whole-catalogue table is cached
        while the module is in eval mode and no gradient is recorded; the key holds the storage and version counter
        of every parameter, so an optimiser step, load_state_dict or .to() invalidates it."""
        if items is not None:
            return self._item_repr(items)
        device = self.device
        cacheable = not self.training and not torch.is_grad_enabled()
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())
        cache = self.__dict__.get("_item_cache")
        if cacheable and cache is not None and cache[0] == key:
            return cache[1]
        table = self._item_repr(torch.arange(self.n_items, device=device))
        self.__dict__["_item_cache"] = (key, table) if cacheable else None
        return table

    def forward(self, batch: Batch) -> Tensor:
        """Logits shaped like batch.item."""
        users = self.user_repr(batch)
        items = self.item_repr(batch.item)
        while users.dim() < items.dim():
            users = users.unsqueeze(-2)
        return self.head(users, items)

    def score_all(self, users: Tensor, items: Tensor) -> Tensor:
        """Logits [B, M] of user representations [B, D] against item representations [M, D]."""
        chunk = chunk_users(items.shape[0], self.pair_width, items.device)
        parts = [self.head(users[s : s + chunk, None, :], items[None]) for s in range(0, users.shape[0], chunk)]
        return torch.cat(parts) if parts else users.new_zeros((0, items.shape[0]))

    def score_items(self, batch: Batch, items: Tensor | None = None) -> Tensor:
        """Logits [B, M] of the batch's users against `items` [M] (every item when None); batch.item is unused."""
        return self.score_all(self.user_repr(batch), self.item_repr(items))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True) -> RecModel:
        self.__dict__["_item_cache"] = None  # free the cache; rebuilt on the next eval-mode call
        return super().train(mode)


def user_batch(users: Tensor, history: Tensor | None = None) -> Batch:
    """A Batch for scoring users against items chosen later (score_items, the serving scorer)."""
    return Batch(user=users, item=users.new_zeros((users.shape[0], 0)), history=history)


# ------------------------------------------------------------------------------------------------ tower head
class Tower(nn.Module):
    """NCF's MLP tower: embeddings of width layers[0] // 2 each, then Linear+ReLU(+Dropout) between consecutive
    widths. The first Linear is applied split (W_u p_u and W_i q_i + b) by the representations; `hidden` holds
    the rest."""

    def __init__(self, n_users: int, n_items: int, layers: Sequence[int], dropout: float) -> None:
        super().__init__()
        layers = check_layers(layers, dropout)
        self.layers = layers
        self.user_emb = nn.Embedding(n_users, layers[0] // 2)
        self.item_emb = nn.Embedding(n_items, layers[0] // 2)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(layers[:-1], layers[1:]))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_features = layers[-1]
        # First-layer width: what the representations carry for this tower.
        self.repr_width = layers[1] if len(layers) > 1 else layers[0] // 2
        self.pair_width = max(layers[1:]) if len(layers) > 1 else layers[0]
        init_embedding(self.user_emb)
        init_embedding(self.item_emb)
        for lin in self.linears:
            init_hidden(lin)

    def user_half(self, users: Tensor) -> Tensor:
        """W_u p_u [B, h1] (or p_u itself when the tower has no hidden layer)."""
        emb = self.user_emb(users)
        if not self.linears:
            return emb
        return emb @ self.linears[0].weight[:, : emb.shape[-1]].t()

    def item_half(self, items: Tensor) -> Tensor:
        """W_i q_i + b [..., h1] (or q_i itself when the tower has no hidden layer)."""
        emb = self.item_emb(items)
        if not self.linears:
            return emb
        first = self.linears[0]
        return emb @ first.weight[:, emb.shape[-1] :].t() + first.bias


def tower_logits(
    u_half: Tensor, i_half: Tensor, hidden: Sequence[nn.Linear], dropout: Callable[[Tensor], Tensor],
    w_out: Tensor, u_half_w: Tensor | None = None,
) -> Tensor:
    """h^T MLP(...) of the tower from its split first layer: ReLU(u_half + i_half), then the hidden layers, dotted
    with w_out. Without hidden linears (`u_half_w` given) the tower is concat[p_u, q_i] itself and the dot splits
    into w_u.p_u + w_i.q_i. Broadcasts over leading dims."""
    if u_half_w is not None:
        d = u_half.shape[-1]
        return u_half @ w_out[:d] + i_half @ w_out[d:]
    x = dropout(torch.relu(u_half + i_half))
    for lin in hidden:
        x = dropout(torch.relu(lin(x)))
    return x @ w_out


@dataclass
class TowerParts:
    """What the serving scorer's fused kernel needs from a model with NeuMF's tower head: U and I are
    [gmf part (factors wide) | tower half], logit = (U_g * I_g) @ w_gmf + tower(U_t + I_t) @ w_tower + bias."""

    factors: int
    hidden: Sequence[nn.Linear]
    w_gmf: Tensor
    w_tower: Tensor
    bias: Tensor


# ------------------------------------------------------------------------------------------------ ID models
class GMF(RecModel):
    """Generalized Matrix Factorization: h^T (p_u * q_i) + b. U = p_u, I = q_i."""

    def __init__(self, n_users: int, n_items: int, factors: int) -> None:
        super().__init__()
        check_sizes(n_users, n_items)
        check_factors(factors)
        self.n_users, self.n_items, self.factors = n_users, n_items, factors
        self.user_emb = nn.Embedding(n_users, factors)
        self.item_emb = nn.Embedding(n_items, factors)
        self.predict = nn.Linear(factors, 1)
        self.pair_width = factors
        init_embedding(self.user_emb)
        init_embedding(self.item_emb)
        init_prediction(self.predict)

    def user_repr(self, batch: Batch) -> Tensor:
        return self.user_emb(batch.user)

    def _item_repr(self, items: Tensor) -> Tensor:
        return self.item_emb(items)

    def head(self, users: Tensor, items: Tensor) -> Tensor:
        return (users * items) @ self.predict.weight[0] + self.predict.bias[0]

    def score_all(self, users: Tensor, items: Tensor) -> Tensor:
        # h^T (u * i) = (u * h) @ i^T: one matmul.
        return (users * self.predict.weight[0]) @ items.t() + self.predict.bias


class MF(RecModel):
    """Matrix factorization with biases: p_u . q_i + b_u + b_i + b, as a pure dot product:
    U = [p_u, b_u, 1], I = [q_i, 1, b_i] (the global bias is added by the head)."""

    def __init__(self, n_users: int, n_items: int, factors: int) -> None:
        super().__init__()
        check_sizes(n_users, n_items)
        check_factors(factors)
        self.n_users, self.n_items, self.factors = n_users, n_items, factors
        self.user_emb = nn.Embedding(n_users, factors)
        self.item_emb = nn.Embedding(n_items, factors)
        self.user_bias = nn.Embedding(n_users, 1)
        self.item_bias = nn.Embedding(n_items, 1)
        self.bias = nn.Parameter(torch.zeros(1))
        self.pair_width = factors + 2
        init_embedding(self.user_emb)
        init_embedding(self.item_emb)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def user_repr(self, batch: Batch) -> Tensor:
        u = batch.user
        return torch.cat([self.user_emb(u), self.user_bias(u), torch.ones_like(self.user_bias(u))], -1)

    def _item_repr(self, items: Tensor) -> Tensor:
        bias = self.item_bias(items)
        return torch.cat([self.item_emb(items), torch.ones_like(bias), bias], -1)

    def head(self, users: Tensor, items: Tensor) -> Tensor:
        return (users * items).sum(-1) + self.bias[0]

    def score_all(self, users: Tensor, items: Tensor) -> Tensor:
        return users @ items.t() + self.bias


class MLP(RecModel):
    """NCF's MLP: a ReLU tower over concat[p_u, q_i], then a linear prediction layer. U = W_u p_u, I = W_i q_i + b."""

    def __init__(self, n_users: int, n_items: int, layers: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        check_sizes(n_users, n_items)
        self.n_users, self.n_items = n_users, n_items
        self.tower = Tower(n_users, n_items, layers, dropout)
        self.layers = self.tower.layers
        self.predict = nn.Linear(self.tower.out_features, 1)
        self.pair_width = self.tower.pair_width
        self.factors = 0  # no GMF branch: the whole representation is the tower's
        init_prediction(self.predict)

    def user_repr(self, batch: Batch) -> Tensor:
        return self.tower.user_half(batch.user)

    def _item_repr(self, items: Tensor) -> Tensor:
        return self.tower.item_half(items)

    def head(self, users: Tensor, items: Tensor) -> Tensor:
        t = self.tower
        split = users if not t.linears else None
        return tower_logits(users, items, t.linears[1:], t.dropout, self.predict.weight[0], split) + self.predict.bias[0]

    def tower_parts(self) -> TowerParts | None:
        if not self.tower.linears:
            return None
        w = self.predict.weight[0]
        return TowerParts(0, self.tower.linears[1:], w[:0], w, self.predict.bias)


class NeuMF(RecModel):
    """Neural Matrix Factorization: a GMF branch and an MLP tower with their own embeddings, concatenated into one
    linear prediction layer. U = [p_u^gmf, W_u p_u^mlp], I = [q_i^gmf, W_i q_i^mlp + b]."""

    def __init__(
        self, n_users: int, n_items: int, factors: int, layers: Sequence[int], dropout: float = 0.0
    ) -> None:
        super().__init__()
        check_sizes(n_users, n_items)
        check_factors(factors)
        self.n_users, self.n_items, self.factors = n_users, n_items, factors
        self.gmf_user_emb = nn.Embedding(n_users, factors)
        self.gmf_item_emb = nn.Embedding(n_items, factors)
        self.tower = Tower(n_users, n_items, layers, dropout)
        self.layers = self.tower.layers
        self.predict = nn.Linear(factors + self.tower.out_features, 1)
        self.pair_width = self.tower.pair_width
        init_embedding(self.gmf_user_emb)
        init_embedding(self.gmf_item_emb)
        init_prediction(self.predict)

    def user_repr(self, batch: Batch) -> Tensor:
        return torch.cat([self.gmf_user_emb(batch.user), self.tower.user_half(batch.user)], -1)

    def _item_repr(self, items: Tensor) -> Tensor:
        return torch.cat([self.gmf_item_emb(items), self.tower.item_half(items)], -1)

    def head(self, users: Tensor, items: Tensor) -> Tensor:
        f, t, w = self.factors, self.tower, self.predict.weight[0]
        gmf = (users[..., :f] * items[..., :f]) @ w[:f]
        split = users[..., f:] if not t.linears else None
        tower = tower_logits(users[..., f:], items[..., f:], t.linears[1:], t.dropout, w[f:], split)
        return gmf + tower + self.predict.bias[0]

    def score_all(self, users: Tensor, items: Tensor) -> Tensor:
        # The GMF half is one matmul; only the tower needs the chunked per-pair pass.
        f, w = self.factors, self.predict.weight[0]
        gmf = (users[:, :f] * w[:f]) @ items[:, :f].t() + self.predict.bias
        t = self.tower
        chunk = chunk_users(items.shape[0], self.pair_width, items.device)
        parts = []
        for s in range(0, users.shape[0], chunk):
            u = users[s : s + chunk, None, f:]
            split = u if not t.linears else None
            parts.append(tower_logits(u, items[None, :, f:], t.linears[1:], t.dropout, w[f:], split))
        return gmf + torch.cat(parts) if parts else gmf

    def tower_parts(self) -> TowerParts | None:
        if not self.tower.linears:
            return None
        f, w = self.factors, self.predict.weight[0]
        return TowerParts(f, self.tower.linears[1:], w[:f], w[f:], self.predict.bias)

    @torch.no_grad()
    def load_pretrained(self, gmf: GMF, mlp: MLP, alpha: float = 0.5) -> NeuMF:
        """Initialise from trained GMF and MLP models (paper, section 3.4.1): copy both models' embeddings and
        the MLP tower; the prediction layer becomes [alpha * h_gmf, (1 - alpha) * h_mlp] with the biases mixed
        the same way, so the initial NeuMF logit is alpha * GMF logit + (1 - alpha) * MLP logit. Returns self."""
        if not isinstance(gmf, GMF) or not isinstance(mlp, MLP):
            raise UserError(
                f"pretraining needs a GMF and an MLP model, got {type(gmf).__name__} and {type(mlp).__name__}"
            )
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"pretrain alpha={alpha} must be in [0, 1]")
        expect = (self.n_users, self.n_items)
        for name, other in (("GMF", gmf), ("MLP", mlp)):
            if (other.n_users, other.n_items) != expect:
                raise UserError(
                    f"pretrained {name} has n_users={other.n_users}, n_items={other.n_items} but NeuMF has "
                    f"n_users={self.n_users}, n_items={self.n_items} (trained on a different dataset?)"
                )
        if gmf.factors != self.factors:
            raise UserError(f"pretrained GMF factors={gmf.factors} != NeuMF factors={self.factors}")
        if tuple(mlp.layers) != tuple(self.layers):
            raise UserError(f"pretrained MLP layers={list(mlp.layers)} != NeuMF layers={list(self.layers)}")
        self.gmf_user_emb.weight.copy_(gmf.user_emb.weight)
        self.gmf_item_emb.weight.copy_(gmf.item_emb.weight)
        self.tower.load_state_dict(mlp.tower.state_dict())
        f = self.factors
        self.predict.weight[:, :f].copy_(alpha * gmf.predict.weight)
        self.predict.weight[:, f:].copy_((1.0 - alpha) * mlp.predict.weight)
        self.predict.bias.copy_(alpha * gmf.predict.bias + (1.0 - alpha) * mlp.predict.bias)
        return self


# ------------------------------------------------------------------------------------------------ sequence model
class CausalBlock(nn.Module):
    """Pre-norm self-attention block: x + Attn(LN(x)) under a boolean mask, then x + FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise UserError(f"factors={dim} must be divisible by heads={heads}")
        self.heads, self.p = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ff(self.norm2(x)))


class SeqNCF(RecModel):
    """Dynamic interest: causal self-attention over the user's last L items (SASRec, Kang & McAuley 2018) gives
    the user state; candidates share the history's item embeddings; the head is a dot product or NeuMF's
    GMF + MLP tower (`head="neumf"`), so the family stays NCF.

    History positions are right-aligned (the latest item last) and positional embeddings count from the end,
    and attention never reads padding, so padding never changes a score. Position t attends to positions <= t
    only: in sequence training the output at every position is the state that predicts the next item.
    `use_user_id` adds the user-id embedding to the state (users unknown to the model, user = -1, get none).
    U = [state] (dot) or [state, W_u state] (neumf); I = [e_i] or [e_i, W_i e_i + b]."""

    def __init__(self, n_users: int, n_items: int, factors: int = 64, history_len: int = 50, blocks: int = 2,
                 heads: int = 1, dropout: float = 0.2, head: str = "dot", layers: Sequence[int] = (),
                 use_user_id: bool = False) -> None:
        super().__init__()
        check_sizes(n_users, n_items)
        check_factors(factors)
        if history_len <= 0 or blocks <= 0 or heads <= 0:
            raise UserError(f"history_len={history_len}, blocks={blocks} and heads={heads} must be > 0")
        if head not in ("dot", "neumf"):
            raise UserError(f"head={head!r} is not one of dot, neumf")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"dropout={dropout} must be in [0, 1)")
        self.n_users, self.n_items, self.factors = n_users, n_items, factors
        self.history_len, self.head_kind, self.use_user_id = int(history_len), head, bool(use_user_id)
        self.item_emb = nn.Embedding(n_items + 1, factors, padding_idx=0)  # index = item_idx + 1, 0 = padding
        self.pos_emb = nn.Embedding(self.history_len, factors)
        self.user_emb = nn.Embedding(n_users, factors) if use_user_id else None
        self.blocks = nn.ModuleList(CausalBlock(factors, heads, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(factors)
        self.drop = nn.Dropout(dropout)
        for emb in (self.item_emb, self.pos_emb, self.user_emb):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.pair_width = factors
        if head == "neumf":
            tower = tuple(layers) or (2 * factors, factors, factors // 2)
            tower = check_layers(tower, dropout)
            if tower[0] != 2 * factors or len(tower) < 2:
                raise UserError(f"head=neumf needs layers starting at 2 * factors = {2 * factors} with at least "
                                f"one hidden layer, got {list(tower)}")
            self.layers = tower
            self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(tower[:-1], tower[1:]))
            for lin in self.linears:
                init_hidden(lin)
            self.predict = nn.Linear(factors + tower[-1], 1)
            init_prediction(self.predict)
            self.pair_width = max(tower[1:])

    # -- user side
    def states(self, history: Tensor, users: Tensor | None = None) -> Tensor:
        """[B, L, D] state after each history position (causal)."""
        b, n = history.shape
        real = history > 0
        # Position embeddings count from the end: the latest item is position 0 whatever the padding.
        from_end = torch.arange(n - 1, -1, -1, device=history.device).clamp(max=self.history_len - 1)
        x = self.item_emb(history) * math.sqrt(self.factors) + self.pos_emb(from_end)
        x = self.drop(x) * real[..., None]
        # Query t reads keys <= t that are real items; it may always read itself, so no row is all-masked.
        causal = torch.ones(n, n, dtype=torch.bool, device=history.device).tril()
        allowed = (causal & real[:, None, :]) | torch.eye(n, dtype=torch.bool, device=history.device)
        allowed = allowed[:, None]  # [B, 1, L, L]: one mask for every head
        for block in self.blocks:
            x = block(x, allowed) * real[..., None]
        x = self.norm(x)
        if self.user_emb is not None and users is not None:
            known = users >= 0
            ids = self.user_emb(users.clamp(min=0)) * known[:, None]
            x = x + ids[:, None, :]
        return x

    def user_repr(self, batch: Batch) -> Tensor:
        if batch.history is None:
            raise ValueError(f"SeqNCF reads each user's last {self.history_len} items: the batch has no history")
        history = batch.history[:, -self.history_len :]
        states = self.states(history, batch.user)
        state = states if batch.mask is not None else states[:, -1]  # every position in sequence training
        if self.head_kind == "dot":
            return state
        first = self.linears[0]
        return torch.cat([state, state @ first.weight[:, : self.factors].t()], -1)

    # -- item side
    def _item_repr(self, items: Tensor) -> Tensor:
        emb = self.item_emb(items + 1)
        if self.head_kind == "dot":
            return emb
        first = self.linears[0]
        return torch.cat([emb, emb @ first.weight[:, self.factors :].t() + first.bias], -1)

    def head(self, users: Tensor, items: Tensor) -> Tensor:
        if self.head_kind == "dot":
            return (users * items).sum(-1)
        f, w = self.factors, self.predict.weight[0]
        gmf = (users[..., :f] * items[..., :f]) @ w[:f]
        return gmf + tower_logits(users[..., f:], items[..., f:], self.linears[1:], self.drop, w[f:]) + self.predict.bias[0]

    def score_all(self, users: Tensor, items: Tensor) -> Tensor:
        if self.head_kind == "dot":
            return users @ items.t()
        return super().score_all(users, items)

    def tower_parts(self) -> TowerParts | None:
        if self.head_kind != "neumf":
            return None
        f, w = self.factors, self.predict.weight[0]
        return TowerParts(f, self.linears[1:], w[:f], w[f:], self.predict.bias)


# ------------------------------------------------------------------------------------------------ registry
def _gmf(n_users: int, n_items: int, a: dict[str, Any]) -> RecModel:
    return GMF(n_users, n_items, a["factors"])


def _mf(n_users: int, n_items: int, a: dict[str, Any]) -> RecModel:
    return MF(n_users, n_items, a["factors"])


def _mlp(n_users: int, n_items: int, a: dict[str, Any]) -> RecModel:
    return MLP(n_users, n_items, a["layers"], a.get("dropout", 0.0))


def _neumf(n_users: int, n_items: int, a: dict[str, Any]) -> RecModel:
    return NeuMF(n_users, n_items, a["factors"], a["layers"], a.get("dropout", 0.0))


def _seq(n_users: int, n_items: int, a: dict[str, Any]) -> RecModel:
    return SeqNCF(n_users, n_items, a["factors"], a.get("history_len", 50), a.get("blocks", 2), a.get("heads", 1),
                  a.get("dropout", 0.2), a.get("head", "dot"), a.get("layers", ()), a.get("use_user_id", False))


def _ease(n_users: int, n_items: int, a: dict[str, Any]) -> RecModel:
    from ncf_ray.baselines import EASE  # closed-form families live with the baselines they are

    return EASE(n_users, n_items, a.get("lam", 500.0) or 500.0)


def _pop(n_users: int, n_items: int, a: dict[str, Any]) -> RecModel:
    from ncf_ray.baselines import Popularity

    return Popularity(n_users, n_items)


# name -> builder from flat args (a new family is one class and one line here).
REGISTRY: dict[str, Callable[[int, int, dict[str, Any]], RecModel]] = {
    "gmf": _gmf,
    "mlp": _mlp,
    "neumf": _neumf,
    "mf": _mf,
    "seq": _seq,
    "ease": _ease,
    "pop": _pop,
}
# Families fitted in closed form (ncf_ray/baselines.py) rather than by the engine's gradient steps.
CLOSED_FORM = ("ease", "pop")


def build_model(name: str, n_users: int, n_items: int, **args: Any) -> RecModel:
    """A model of family `name` from flat args (factors, layers, dropout, and each family's own)."""
    if name not in REGISTRY:
        raise UserError(f"model={name!r} is not one of {', '.join(REGISTRY)}")
    return REGISTRY[name](n_users, n_items, args)


def model_args(model_cfg: ModelConfig) -> dict[str, Any]:
    """The flat constructor args of a ModelConfig: the only place config meets the model classes."""
    import dataclasses

    args = dataclasses.asdict(model_cfg)
    args.pop("name")
    args["layers"] = tuple(args.get("layers", ()))
    return args


def model_from_config(model_cfg: ModelConfig, n_users: int, n_items: int) -> RecModel:
    return build_model(model_cfg.name, n_users, n_items, **model_args(model_cfg))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (reported by train/bench)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile wrappers (where user_repr, score_all, ... live)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def naive_score_items(model: RecModel, users: Tensor, items: Tensor | None = None,
                      history: Tensor | None = None) -> Tensor:
    """Reference scorer: forward() over every (user, item) pair one row at a time, [B, M]. Slow; for tests."""
    device = model.device
    items = torch.arange(model.n_items, device=device) if items is None else items.to(device)
    b, m = len(users), len(items)
    batch = Batch(user=users.to(device).repeat_interleave(m), item=items.repeat(b),
                  history=None if history is None else history.repeat_interleave(m, 0))
    return model(batch).view(b, m)


__all__ = [
    "Batch",
    "RecModel",
    "GMF",
    "MLP",
    "NeuMF",
    "MF",
    "SeqNCF",
    "REGISTRY",
    "build_model",
    "model_args",
    "model_from_config",
    "count_parameters",
    "unwrap",
    "user_batch",
    "naive_score_items",
    "tower_logits",
    "TowerParts",
    "SCORE_CHUNK_ELEMENTS",
    "GPU_SCORE_CHUNK_ELEMENTS",
    "chunk_users",
]
