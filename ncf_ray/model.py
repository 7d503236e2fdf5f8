"""NCF models as plain torch modules: GMF, MLP, NeuMF (He et al., WWW 2017) and MF with biases (Rendle et al. 2020).

Every model takes flat constructor args (config never reaches inside; see `model_from_config`) and returns
logits: `forward(users[B], items[B]) -> [B]`. `score_items(users[B], items[M] | None) -> [B, M]` scores every
user of a batch against all items (or a given item set) for serving and full-ranking evaluation, without
building B*M embedding pairs: the MLP's first layer on concat[u, i] is W_u u + W_i i + b, so the item half is
computed once (and cached in eval mode) and the user half is added by broadcasting.

Used by `ncf-ray train` (ncf_ray/train.py), `ncf-ray evaluate`, `ncf-ray serve` and the GPU benchmark, which runs
this file without Ray — so it imports torch only (plus the config dataclass for `model_from_config`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ncf_ray.errors import UserError

if TYPE_CHECKING:
    from ncf_ray.config import ModelConfig

# score_items works on chunks of users so that the [chunk, M, width] hidden tensor stays near this many
# elements (4 MiB of float32): big enough for fast matmuls, small enough to stay in cache between the layers
# (measured on CPU, NeuMF f32 64-32-16, 256 users x 3,706 items, 1 thread: 2^20 ~12K users/s, 2^22 ~6-8K,
# 2^18 ~9.5K).
SCORE_CHUNK_ELEMENTS = 1 << 20
# A GPU wants few, large launches: with the CPU budget an ML-20M-size tower would score ~1 user per launch.
GPU_SCORE_CHUNK_ELEMENTS = 1 << 28


def chunk_users(n_items: int, width: int, device: torch.device, cpu_elements: int = 0) -> int:
    """Users per scoring chunk so a [users, n_items, width] tensor stays near the device's element budget
    (`cpu_elements` overrides the CPU budget; score_items and the serving scorer share this rule)."""
    budget = (cpu_elements or SCORE_CHUNK_ELEMENTS) if device.type == "cpu" else GPU_SCORE_CHUNK_ELEMENTS
    return max(1, budget // max(1, n_items * width))


# ------------------------------------------------------------------------------------------------ init
def _init_embedding(emb: nn.Embedding) -> None:
    # Paper: embeddings drawn from N(0, 0.01).
    nn.init.normal_(emb.weight, mean=0.0, std=0.01)


def _init_hidden(linear: nn.Linear) -> None:
    # Paper's Keras code: Glorot-uniform hidden layers, zero biases.
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)


def _init_prediction(linear: nn.Linear) -> None:
    # Paper: LeCun-uniform prediction layer (Kaiming-uniform with gain 1 == U(+-sqrt(3 / fan_in))).
    nn.init.kaiming_uniform_(linear.weight, nonlinearity="sigmoid")
    nn.init.zeros_(linear.bias)


def _check_sizes(n_users: int, n_items: int) -> None:
    if n_users <= 0 or n_items <= 0:
        raise UserError(f"n_users={n_users} and n_items={n_items} must be > 0")


def _all_items(items: Tensor | None, n_items: int, device: torch.device) -> Tensor:
    return torch.arange(n_items, device=device) if items is None else items.to(device)


class _Tower(nn.Module):
    """The MLP tower: embeddings of width layers[0] // 2 each, then Linear+ReLU(+Dropout) between consecutive
    widths. `score_items` uses the split first layer (user half + item half) so no [B*M, layers[0]] concat is
    ever built."""

    def __init__(self, n_users: int, n_items: int, layers: Sequence[int], dropout: float) -> None:
        super().__init__()
        layers = [int(w) for w in layers]
        if not layers or any(w <= 0 for w in layers):
            raise UserError(f"mlp layers={layers} must be non-empty and all > 0")
        if layers[0] % 2:
            raise UserError(f"mlp layers[0]={layers[0]} must be even (it is user+item embedding width)")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"dropout={dropout} must be in [0, 1)")
        self.layers = tuple(layers)
        self.user_emb = nn.Embedding(n_users, layers[0] // 2)
        self.item_emb = nn.Embedding(n_items, layers[0] // 2)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(layers[:-1], layers[1:]))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_features = layers[-1]
        # Widest [B, M, width] tensor score_pairs materialises (sizes its user chunks).
        self.pair_width = max(layers[1:]) if len(layers) > 1 else layers[0]
        _init_embedding(self.user_emb)
        _init_embedding(self.item_emb)
        for lin in self.linears:
            _init_hidden(lin)
        self._item_cache: tuple[tuple, Tensor] | None = None

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        x = torch.cat([self.user_emb(users), self.item_emb(items)], dim=-1)
        for lin in self.linears:
            x = self.dropout(torch.relu(lin(x)))
        return x

    # -- serving path: [B] x [M] -> [B, M, out_features] (or [B, M, layers[0]] when there is no hidden layer)
    def item_half(self, items: Tensor | None) -> Tensor:
        """W_i i + b for the given items (all items when None), [M, layers[1]]; cached for all items while the
        module is in eval mode and no gradient is recorded. The cache key holds the storage and version counter
        of every tensor it depends on, so an optimiser step, load_state_dict or .to() invalidates it."""
        first = self.linears[0]
        d = self.user_emb.embedding_dim
        w_item = first.weight[:, d:]
        if items is not None:
            return torch.addmm(first.bias, self.item_emb(items), w_item.t())
        cacheable = not self.training and not torch.is_grad_enabled()
        key = tuple(
            (t.data_ptr(), t._version, t.dtype, t.device)
            for t in (self.item_emb.weight, first.weight, first.bias)
        )
        if cacheable and self._item_cache is not None and self._item_cache[0] == key:
            return self._item_cache[1]
        half = torch.addmm(first.bias, self.item_emb.weight, w_item.t())
        self._item_cache = (key, half) if cacheable else None
        return half

    def score_pairs(self, users: Tensor, items: Tensor | None) -> Tensor:
        """Tower output for every (user, item) pair: [B, M, out_features]."""
        if not self.linears:  # no hidden layer: the "tower" is the concatenated embeddings themselves
            u = self.user_emb(users)
            i = self.item_emb.weight if items is None else self.item_emb(items)
            b, m = u.shape[0], i.shape[0]
            return torch.cat([u[:, None, :].expand(b, m, -1), i[None, :, :].expand(b, m, -1)], dim=-1)
        first = self.linears[0]
        d = self.user_emb.embedding_dim
        item_part = self.item_half(items)  # [M, h1]
        user_part = self.user_emb(users) @ first.weight[:, :d].t()  # [B, h1]
        # In-place ReLU on freshly made tensors: B*M*width is the big allocation here, so make it once per layer.
        x = self.dropout((user_part[:, None, :] + item_part[None, :, :]).relu_())  # [B, M, h1]
        for lin in self.linears[1:]:
            x = self.dropout(lin(x).relu_())
        return x

    def train(self, mode: bool = True) -> _Tower:
        self._item_cache = None  # free the cache; it is rebuilt on the next eval-mode call
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._item_cache = None
        super()._load_from_state_dict(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ models
class GMF(nn.Module):
    """Generalized Matrix Factorization: h^T (p_u * q_i) + b."""

    def __init__(self, n_users: int, n_items: int, factors: int) -> None:
        super().__init__()
        _check_sizes(n_users, n_items)
        if factors <= 0:
            raise UserError(f"factors={factors} must be > 0")
        self.n_users, self.n_items, self.factors = n_users, n_items, factors
        self.user_emb = nn.Embedding(n_users, factors)
        self.item_emb = nn.Embedding(n_items, factors)
        self.predict = nn.Linear(factors, 1)
        _init_embedding(self.user_emb)
        _init_embedding(self.item_emb)
        _init_prediction(self.predict)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        return self.predict(self.user_emb(users) * self.item_emb(items)).squeeze(-1)

    def score_items(self, users: Tensor, items: Tensor | None = None) -> Tensor:
        """Logits [B, M] of every user against all items (items=None) or the given items."""
        items = _all_items(items, self.n_items, self.user_emb.weight.device)
        # h^T (u * i) = (u * h) @ i^T: one matmul.
        u = self.user_emb(users) * self.predict.weight[0]
        return u @ self.item_emb(items).t() + self.predict.bias


class MLP(nn.Module):
    """NCF's MLP: a ReLU tower over concat[p_u, q_i], then a linear prediction layer."""

    def __init__(self, n_users: int, n_items: int, layers: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        _check_sizes(n_users, n_items)
        self.n_users, self.n_items = n_users, n_items
        self.tower = _Tower(n_users, n_items, layers, dropout)
        self.layers = self.tower.layers
        self.predict = nn.Linear(self.tower.out_features, 1)
        _init_prediction(self.predict)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        return self.predict(self.tower(users, items)).squeeze(-1)

    def score_items(self, users: Tensor, items: Tensor | None = None) -> Tensor:
        """Logits [B, M] of every user against all items (items=None) or the given items."""
        m = self.n_items if items is None else len(items)
        chunk = chunk_users(m, self.tower.pair_width, self.predict.weight.device)
        parts = [
            self.predict(self.tower.score_pairs(users[s : s + chunk], items)).squeeze(-1)
            for s in range(0, len(users), chunk)
        ]
        return torch.cat(parts) if parts else self.predict.weight.new_zeros((0, m))


class NeuMF(nn.Module):
    """Neural Matrix Factorization: a GMF branch and an MLP tower with their own embeddings, concatenated into one
    linear prediction layer."""

    def __init__(
        self, n_users: int, n_items: int, factors: int, layers: Sequence[int], dropout: float = 0.0
    ) -> None:
        super().__init__()
        _check_sizes(n_users, n_items)
        if factors <= 0:
            raise UserError(f"factors={factors} must be > 0")
        self.n_users, self.n_items, self.factors = n_users, n_items, factors
        self.gmf_user_emb = nn.Embedding(n_users, factors)
        self.gmf_item_emb = nn.Embedding(n_items, factors)
        self.tower = _Tower(n_users, n_items, layers, dropout)
        self.layers = self.tower.layers
        self.predict = nn.Linear(factors + self.tower.out_features, 1)
        _init_embedding(self.gmf_user_emb)
        _init_embedding(self.gmf_item_emb)
        _init_prediction(self.predict)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        gmf = self.gmf_user_emb(users) * self.gmf_item_emb(items)
        return self.predict(torch.cat([gmf, self.tower(users, items)], dim=-1)).squeeze(-1)

    def score_items(self, users: Tensor, items: Tensor | None = None) -> Tensor:
        """Logits [B, M] of every user against all items (items=None) or the given items."""
        device = self.predict.weight.device
        f = self.factors
        w_gmf, w_mlp = self.predict.weight[0, :f], self.predict.weight[0, f:]
        item_gmf = self.gmf_item_emb(_all_items(items, self.n_items, device))  # [M, f]
        m = item_gmf.shape[0]
        chunk = chunk_users(m, self.tower.pair_width, self.predict.weight.device)
        parts = []
        for s in range(0, len(users), chunk):
            u = users[s : s + chunk]
            # GMF half: h_g^T (p_u * q_i) = (p_u * h_g) @ q_i^T, plus the bias.
            gmf = (self.gmf_user_emb(u) * w_gmf) @ item_gmf.t() + self.predict.bias
            parts.append(gmf + self.tower.score_pairs(u, items) @ w_mlp)
        return torch.cat(parts) if parts else self.predict.weight.new_zeros((0, m))

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


class MF(nn.Module):
    """Matrix factorization with biases: p_u . q_i + b_u + b_i + b (the strong dot-product baseline)."""

    def __init__(self, n_users: int, n_items: int, factors: int) -> None:
        super().__init__()
        _check_sizes(n_users, n_items)
        if factors <= 0:
            raise UserError(f"factors={factors} must be > 0")
        self.n_users, self.n_items, self.factors = n_users, n_items, factors
        self.user_emb = nn.Embedding(n_users, factors)
        self.item_emb = nn.Embedding(n_items, factors)
        self.user_bias = nn.Embedding(n_users, 1)
        self.item_bias = nn.Embedding(n_items, 1)
        self.bias = nn.Parameter(torch.zeros(1))
        _init_embedding(self.user_emb)
        _init_embedding(self.item_emb)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        dot = (self.user_emb(users) * self.item_emb(items)).sum(-1)
        return dot + self.user_bias(users).squeeze(-1) + self.item_bias(items).squeeze(-1) + self.bias

    def score_items(self, users: Tensor, items: Tensor | None = None) -> Tensor:
        """Logits [B, M] of every user against all items (items=None) or the given items."""
        items = _all_items(items, self.n_items, self.bias.device)
        scores = self.user_emb(users) @ self.item_emb(items).t()
        return scores + self.user_bias(users) + self.item_bias(items).t() + self.bias


# ------------------------------------------------------------------------------------------------ builders
def build_model(
    name: str, n_users: int, n_items: int, factors: int, layers: Sequence[int], dropout: float = 0.0
) -> nn.Module:
    """One of gmf | mlp | neumf | mf from flat args (GMF/MF ignore layers and dropout; MLP ignores factors)."""
    if name == "gmf":
        return GMF(n_users, n_items, factors)
    if name == "mlp":
        return MLP(n_users, n_items, layers, dropout)
    if name == "neumf":
        return NeuMF(n_users, n_items, factors, layers, dropout)
    if name == "mf":
        return MF(n_users, n_items, factors)
    raise UserError(f"model={name!r} is not one of gmf, mlp, neumf, mf")


def model_from_config(model_cfg: ModelConfig, n_users: int, n_items: int) -> nn.Module:
    """Turn a ModelConfig into a model: the only place config meets the model classes."""
    return build_model(
        model_cfg.name, n_users, n_items, model_cfg.factors, tuple(model_cfg.layers), model_cfg.dropout
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (reported by train/bench)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def naive_score_items(model: nn.Module, users: Tensor, items: Tensor | None = None) -> Tensor:
    """Reference scorer: forward() over every (user, item) pair, [B, M]. Slow; for tests and the benchmark."""
    n_items = int(model.n_items)
    device = next(model.parameters()).device
    items = _all_items(items, n_items, device)
    b, m = len(users), len(items)
    logits = model(users.to(device).repeat_interleave(m), items.repeat(b))
    return logits.view(b, m)


__all__ = [
    "GMF",
    "MLP",
    "NeuMF",
    "MF",
    "build_model",
    "model_from_config",
    "count_parameters",
    "naive_score_items",
    "SCORE_CHUNK_ELEMENTS",
    "GPU_SCORE_CHUNK_ELEMENTS",
    "chunk_users",
]
