"""The model-input contract: logits pinned from the earlier API, score_all == forward, shapes, pretraining (no Ray)."""

from __future__ import annotations

import pytest
import torch

from ncf_ray.batch import Batch
from ncf_ray.config import ModelConfig
from ncf_ray.errors import UserError
from ncf_ray.model import GMF, MF, MLP, NeuMF, build_model, model_from_config, naive_score_items, user_batch

N_USERS, N_ITEMS = 23, 41
NAMES = ("gmf", "mlp", "neumf", "mf")


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # Default init makes every logit ~0; spread the weights so equality checks mean something.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _pair(model, users, items):
    return model(Batch(user=users, item=items))


def _all(model, users, items=None):
    return model.score_items(user_batch(users), items)


@pytest.mark.parametrize("name,layers", [("gmf", (16,)), ("mlp", (16, 8, 4)), ("mlp1", (16,)),
                                         ("neumf", (16, 8, 4)), ("mf", (16,))])
def test_logits_are_pinned_from_the_earlier_api(name, layers):
    """tests/unit/data/pinned_logits.safetensors holds seeded weights, a batch and the logits that the earlier
    `model(users, items)` / `score_items(users)` classes gave (written once, before the port): the contract
    gives the same numbers for each family, pairwise, per-row candidates and against all items."""
    from safetensors.torch import load_file

    pinned = load_file("tests/unit/data/pinned_logits.safetensors")
    model = build_model(name.rstrip("1"), 7, 9, factors=6, layers=layers).eval()
    model.load_state_dict({k.split("/", 1)[1]: v for k, v in pinned.items() if k.startswith(name + "/")})
    users, items = pinned["users"], pinned["items"]
    with torch.no_grad():
        torch.testing.assert_close(_pair(model, users, items), pinned[f"{name}.logits"], rtol=0, atol=2e-6)
        torch.testing.assert_close(_all(model, users[:5]), pinned[f"{name}.all"], rtol=0, atol=2e-6)
        cand = model(Batch(user=users[:5], item=torch.arange(9).repeat(5, 1)))
        torch.testing.assert_close(cand, pinned[f"{name}.all"], rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layers", [(16, 8, 4), (8,)])
def test_forward_shapes(name, layers):
    model = build_model(name, N_USERS, N_ITEMS, factors=6, layers=layers, dropout=0.1)
    users = torch.randint(0, N_USERS, (17,))
    items = torch.randint(0, N_ITEMS, (17,))
    out = _pair(model, users, items)
    assert out.shape == (17,)
    out.sum().backward()  # trainable end to end
    assert model(Batch(user=users[:5], item=items[:15].view(5, 3))).shape == (5, 3)
    assert _all(model, users[:5]).shape == (5, N_ITEMS)
    assert _all(model, users[:5], items[:3]).shape == (5, 3)
    assert _all(model, users[:0]).shape == (0, N_ITEMS)
    assert model.item_repr(None).shape[0] == N_ITEMS
    assert model.user_repr(Batch(user=users, item=items)).shape[0] == 17


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layers", [(16, 8, 4), (12, 6), (8,)])
def test_score_items_equals_forward(name, layers):
    model = _randomise(build_model(name, N_USERS, N_ITEMS, factors=6, layers=layers, dropout=0.3)).eval()
    users = torch.randint(0, N_USERS, (9,))
    subset = torch.tensor([5, 0, 40, 5, 17])
    with torch.no_grad():
        torch.testing.assert_close(
            _all(model, users), naive_score_items(model, users), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            _all(model, users, subset), naive_score_items(model, users, subset), rtol=1e-5, atol=1e-5
        )


def test_score_items_chunks_and_cache_invalidation(monkeypatch):
    import ncf_ray.model as model_mod

    monkeypatch.setattr(model_mod, "SCORE_CHUNK_ELEMENTS", 50)  # forces one user per chunk
    model = _randomise(NeuMF(N_USERS, N_ITEMS, 4, (8, 4))).eval()
    users = torch.arange(N_USERS)
    with torch.inference_mode():
        first = _all(model, users)
        torch.testing.assert_close(first, naive_score_items(model, users), rtol=1e-5, atol=1e-5)
    # A weight change (as an optimiser step or load_state_dict does) must not serve a stale cached catalogue.
    with torch.inference_mode():
        model.tower.item_emb.weight.mul_(2.0)
        model.tower.linears[0].bias.add_(1.0)
        torch.testing.assert_close(
            _all(model, users), naive_score_items(model, users), rtol=1e-5, atol=1e-5
        )
    other = _randomise(NeuMF(N_USERS, N_ITEMS, 4, (8, 4)), seed=3).eval()
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            _all(model, users), naive_score_items(other, users), rtol=1e-5, atol=1e-5
        )


def test_paper_init_scales():
    model = NeuMF(500, 400, 16, (32, 16, 8))
    assert model.gmf_user_emb.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert model.tower.item_emb.weight.std().item() == pytest.approx(0.01, rel=0.1)
    bound = (3.0 / model.predict.in_features) ** 0.5  # LeCun uniform
    assert model.predict.weight.abs().max().item() <= bound
    mf = MF(10, 10, 4)
    assert mf.user_bias.weight.abs().sum() == 0 and mf.bias.item() == 0


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_neumf_load_pretrained_mixes_logits(alpha):
    gmf = _randomise(GMF(N_USERS, N_ITEMS, 6), seed=1).eval()
    mlp = _randomise(MLP(N_USERS, N_ITEMS, (16, 8, 4)), seed=2).eval()
    neumf = NeuMF(N_USERS, N_ITEMS, 6, (16, 8, 4)).load_pretrained(gmf, mlp, alpha=alpha).eval()
    users = torch.randint(0, N_USERS, (30,))
    items = torch.randint(0, N_ITEMS, (30,))
    with torch.no_grad():
        expected = alpha * _pair(gmf, users, items) + (1 - alpha) * _pair(mlp, users, items)
        torch.testing.assert_close(_pair(neumf, users, items), expected, rtol=1e-5, atol=1e-5)
        if alpha == 1.0:
            torch.testing.assert_close(_pair(neumf, users, items), _pair(gmf, users, items))
        if alpha == 0.0:
            torch.testing.assert_close(_pair(neumf, users, items), _pair(mlp, users, items), rtol=1e-5, atol=1e-6)


def test_load_pretrained_refuses_mismatched_shapes():
    neumf = NeuMF(N_USERS, N_ITEMS, 6, (16, 8))
    with pytest.raises(UserError, match="factors=4"):
        neumf.load_pretrained(GMF(N_USERS, N_ITEMS, 4), MLP(N_USERS, N_ITEMS, (16, 8)))
    with pytest.raises(UserError, match=r"layers=\[16, 4\]"):
        neumf.load_pretrained(GMF(N_USERS, N_ITEMS, 6), MLP(N_USERS, N_ITEMS, (16, 4)))
    with pytest.raises(UserError, match="n_users=24"):
        neumf.load_pretrained(GMF(N_USERS + 1, N_ITEMS, 6), MLP(N_USERS, N_ITEMS, (16, 8)))
    with pytest.raises(UserError, match="alpha"):
        neumf.load_pretrained(GMF(N_USERS, N_ITEMS, 6), MLP(N_USERS, N_ITEMS, (16, 8)), alpha=1.5)


def test_builders_and_bad_args():
    cfg = ModelConfig(name="mlp", factors=8, layers=(32, 16, 8), dropout=0.1)
    model = model_from_config(cfg, 5, 7)
    assert isinstance(model, MLP) and model.layers == (32, 16, 8)
    assert isinstance(model_from_config(ModelConfig(name="mf"), 5, 7), MF)
    with pytest.raises(UserError, match="layers\\[0\\]=15"):
        build_model("neumf", 5, 7, factors=8, layers=(15, 8))
    with pytest.raises(UserError, match="'nope'"):
        build_model("nope", 5, 7, factors=8, layers=(16,))
    with pytest.raises(UserError, match="n_users=0"):
        GMF(0, 7, 8)
