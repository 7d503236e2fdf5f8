"""The sequence model (SeqNCF): causal, padding-blind, trainable through the engine, scored like every model."""

from __future__ import annotations

import pytest
import torch

from ncf_ray.batch import Batch
from ncf_ray.errors import UserError
from ncf_ray.model import SeqNCF, build_model, causal_chunks, naive_score_items, user_batch

N_USERS, N_ITEMS = 9, 30


def _model(head: str = "dot", history_len: int = 6, **kw) -> SeqNCF:
    torch.manual_seed(0)
    m = SeqNCF(N_USERS, N_ITEMS, factors=16, history_len=history_len, blocks=2, heads=2, dropout=0.0, head=head,
               **kw)
    with torch.no_grad():  # spread the weights so equality checks mean something
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


@pytest.mark.parametrize("head", ["dot", "neumf"])
def test_a_position_never_sees_later_items(head):
    model = _model(head)
    history = torch.tensor([[3, 7, 1, 9, 4, 2]])
    later = history.clone()
    later[0, 4:] = torch.tensor([11, 12])  # change what comes after position 3
    with torch.no_grad():
        before, after = model.states(history), model.states(later)
    torch.testing.assert_close(before[:, :4], after[:, :4], rtol=0, atol=0)
    assert not torch.allclose(before[:, 4:], after[:, 4:])


@pytest.mark.parametrize("head", ["dot", "neumf"])
def test_padding_never_changes_a_score(head):
    """The same three items scored by a model reading 6 positions and by the same weights reading 10: the extra
    positions are padding, so the scores are equal (positions count from the latest item, padding is never read)."""
    short, long = _model(head, 6), _model(head, 10)
    with torch.no_grad():
        long.pos_emb.weight[:6] = short.pos_emb.weight
    state = {k: v for k, v in short.state_dict().items() if not k.startswith("pos_emb")}
    long.load_state_dict(state | {"pos_emb.weight": long.pos_emb.weight.detach().clone()})
    items = [5, 8, 2]
    h_short = torch.tensor([[0, 0, 0, *[i + 1 for i in items]]])
    h_long = torch.tensor([[0] * 7 + [i + 1 for i in items]])
    cand = torch.arange(N_ITEMS)[None]
    with torch.no_grad():
        a = short(Batch(user=torch.tensor([1]), item=cand, history=h_short))
        b = long(Batch(user=torch.tensor([1]), item=cand, history=h_long))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["dot", "neumf"])
def test_score_all_equals_forward_and_unknown_users_score_from_history(head):
    model = _model(head, use_user_id=True)
    users = torch.tensor([0, 4, -1])  # -1: a user the model does not know, scored from the history alone
    history = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 7, 8]])
    with torch.no_grad():
        all_items = model.score_items(user_batch(users, history))
        naive = naive_score_items(model, users, history=history)
    torch.testing.assert_close(all_items, naive, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(all_items).all()


def test_sequence_batches_train_every_position_and_refuse_bad_shapes():
    model = _model()
    model.train()
    history = torch.tensor([[0, 1, 2, 3, 4, 5]])
    mask = history > 0
    item = torch.randint(0, N_ITEMS, (1, 6, 3))
    logits = model(Batch(user=torch.tensor([0]), item=item, history=history, mask=mask))
    assert logits.shape == (1, 6, 3)
    logits.sum().backward()
    assert model.item_emb.weight.grad is not None and model.blocks[0].qkv.weight.grad is not None
    with pytest.raises(UserError, match="heads=3"):
        SeqNCF(N_USERS, N_ITEMS, factors=16, heads=3)
    with pytest.raises(UserError, match="head='cosine'"):
        build_model("seq", N_USERS, N_ITEMS, factors=16, head="cosine")
    with pytest.raises(UserError, match="2 \\* factors = 32"):
        SeqNCF(N_USERS, N_ITEMS, factors=16, head="neumf", layers=(16, 8))


@pytest.mark.parametrize("head", ["dot", "neumf"])
def test_scoring_state_is_the_last_position_of_the_full_pass(head):
    """Scoring runs the last block for the latest position only, after cutting padding columns every row shares:
    the state equals the last row of the full causal pass."""
    model = _model(head, history_len=8, use_user_id=True)
    users = torch.tensor([0, 3, -1])
    history = torch.tensor([[0, 0, 0, 0, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 0, 0, 7, 8]])
    with torch.no_grad():
        full = model.states(history, users)[:, -1]
        fast = model.states(history, users, last_only=True)[:, -1]
        reps = model.user_repr(user_batch(users, history))
    assert fast.shape == full.shape
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reps[:, :16], full, rtol=1e-5, atol=1e-6)
    empty = torch.zeros((2, 8), dtype=torch.int64)  # no history at all: still one position, finite
    with torch.no_grad():
        assert torch.isfinite(model.states(empty, torch.tensor([0, -1]), last_only=True)).all()


def test_chunked_inference_attention_equals_one_full_causal_pass():
    """Inference cuts the queries into chunks that read only the keys up to their own last query
    (model.causal_chunks): the states equal one full masked pass (training mode, dropout 0) at every position,
    with padded rows and a history long enough for several chunks."""
    model = _model(history_len=160)
    torch.manual_seed(1)
    history = torch.randint(1, N_ITEMS + 1, (3, 160))
    history[1, :100] = 0  # padded rows: keys the mask hides stay hidden in every chunk
    history[2, :159] = 0
    with torch.no_grad():
        reference = model.train().states(history)
        model.eval()
        every, last = model.states(history), model.states(history, last_only=True)[:, -1]
    real = history > 0
    torch.testing.assert_close(every[real], reference[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, reference[:, -1], rtol=1e-5, atol=1e-5)
    q, k, v = torch.randn(3, 2, 4, 130, 8).unbind(0)
    allowed = torch.ones(130, 130, dtype=torch.bool).tril() & (torch.rand(2, 1, 1, 130) > 0.3)
    allowed = allowed | torch.eye(130, dtype=torch.bool)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(causal_chunks(q, k, v, allowed, rows=30), full, rtol=1e-5, atol=1e-6)
