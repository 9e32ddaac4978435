"""attention_lib.circuits: the scores on hand-built patterns, the circuits against the
model's own computation, the model's shapes and causality, and a short training run.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_lib import MultiHeadAttention
from attention_lib.circuits import (
    AttentionOnlyTransformer,
    composition_score,
    copying_score,
    head_weights,
    in_context_loss,
    ov_circuit,
    prefix_matching_score,
    previous_token_score,
    qk_circuit,
    repeated_tokens,
)


def uniform(L):
    return torch.full((L, L), 1.0 / L)  # (L, L): every key the same weight


def causal_uniform(L):
    w = torch.ones(L, L).tril()
    return w / w.sum(-1, keepdim=True)  # (L, L)


def shifted(L, offset):
    """Each query i >= offset puts all its weight on key i - offset; earlier ones on key 0."""
    w = torch.zeros(L, L)
    i = torch.arange(L)
    w[i, (i - offset).clamp(min=0)] = 1.0
    return w


# ----------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [2, 7, 33])
def test_previous_token_score_perfect_and_uniform(L):
    assert previous_token_score(shifted(L, 1)).item() == 1.0
    assert previous_token_score(shifted(L, 0)).item() == 0.0  # attends to itself
    torch.testing.assert_close(previous_token_score(uniform(L)), torch.tensor(1.0 / L))
    expected = sum(1.0 / (i + 1) for i in range(1, L)) / (L - 1)  # mean of 1/(i+1) over queries 1..L-1
    torch.testing.assert_close(previous_token_score(causal_uniform(L)), torch.tensor(expected))


@pytest.mark.parametrize("T, start", [(1, 0), (5, 0), (16, 0), (16, 1), (4, 3)])
def test_prefix_matching_score_perfect_and_uniform(T, start):
    L = start + 2 * T + 1
    induction = shifted(L, T - 1)  # query i looks at key i - T + 1
    assert prefix_matching_score(induction, T, start).item() == 1.0
    torch.testing.assert_close(prefix_matching_score(uniform(L), T, start), torch.tensor(1.0 / L))
    if T > 2:
        assert prefix_matching_score(shifted(L, 1), T, start).item() == 0.0  # a previous-token head


def test_prefix_matching_counts_only_queries_in_the_repeat():
    T, start, L = 4, 1, 9  # [B, r0..r3, r0..r3]: queries 5..8, keys 2..5
    attn = torch.zeros(L, L)
    attn[torch.arange(start + T, L), torch.arange(start + T, L) - T + 1] = 1.0
    assert prefix_matching_score(attn, T, start).item() == 1.0
    attn[start + T - 1, start] = 1.0  # query 4 (last of the first copy) is not counted
    assert prefix_matching_score(attn, T, start).item() == 1.0
    attn[L - 1] = 0.0
    attn[L - 1, 0] = 1.0  # one of the 4 counted queries looks elsewhere
    assert prefix_matching_score(attn, T, start).item() == 0.75


def test_scores_broadcast_over_leading_dims():
    attn = torch.stack([shifted(9, 1), uniform(9), shifted(9, 3)]).view(1, 3, 9, 9)  # (B, H, L, L)
    assert previous_token_score(attn).shape == (1, 3)
    torch.testing.assert_close(prefix_matching_score(attn, 4), torch.tensor([[0.0, 1 / 9, 1.0]]))


@pytest.mark.parametrize(
    "fn, args",
    [
        (previous_token_score, (torch.ones(3, 4),)),
        (previous_token_score, (torch.ones(1, 1),)),
        (prefix_matching_score, (torch.ones(6, 6), 6)),
        (prefix_matching_score, (torch.ones(6, 6), 0)),
        (prefix_matching_score, (torch.ones(6, 6), 3, 3)),
        (copying_score, (torch.ones(3, 4),)),
    ],
)
def test_score_errors(fn, args):
    with pytest.raises(ValueError):
        fn(*args)


def test_copying_score():
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(copying_score(torch.eye(20)), torch.tensor(1.0))
    torch.testing.assert_close(copying_score(-3 * torch.eye(20)), torch.tensor(-1.0))
    A = torch.randn(64, 64, generator=g)
    assert abs(copying_score(A).item()) < 0.2  # eigenvalues of a random matrix: no preferred sign
    assert copying_score(A + 20 * torch.eye(64)).item() > 0.9
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # eigenvalues ±i: copies nothing
    assert abs(copying_score(rotation).item()) < 1e-6


def test_composition_score():
    g = torch.Generator().manual_seed(0)
    E = 64
    A, B = torch.randn(2, E, E, generator=g)
    assert abs(composition_score(A, B).item() - 1 / math.sqrt(E)) < 0.03
    u = torch.randn(E, 1, generator=g)
    assert composition_score(u @ u.T, u @ u.T).item() == pytest.approx(1.0, rel=1e-5)  # reads exactly what is written
    P = torch.zeros(E, E)
    P[: E // 2, : E // 2] = torch.eye(E // 2)
    assert composition_score(P, torch.eye(E) - P).item() == 0.0  # orthogonal subspaces
    with pytest.raises(ValueError):
        composition_score(torch.ones(3, 4), torch.ones(3, 4))


# ----------------------------------------------------------------------------------
# Data and in-context loss
# ----------------------------------------------------------------------------------


@given(
    period=st.integers(1, 12),
    extra=st.integers(-5, 8),
    distinct=st.booleans(),
    bos=st.booleans(),
    seed=st.integers(0, 10**6),
)
@settings(max_examples=40, deadline=None)
def test_repeated_tokens_layout(period, extra, distinct, bos, seed):
    length = max(period, 2 * period + extra)
    g = torch.Generator().manual_seed(seed)
    t = repeated_tokens(3, period, 16, length, generator=g, distinct=distinct, bos=16 if bos else None)
    start = int(bos)
    assert t.shape == (3, start + length) and t.dtype == torch.long
    body = t[:, start:]
    assert (body >= 0).all() and (body < 16).all()
    end = min(2 * period, length)
    assert torch.equal(body[:, period:end], body[:, : end - period])
    if bos:
        assert (t[:, 0] == 16).all()
    if distinct:
        for row in body[:, :period].tolist():
            assert len(set(row)) == period


def test_repeated_tokens_errors():
    with pytest.raises(ValueError):
        repeated_tokens(2, 10, 5, distinct=True)  # 10 distinct tokens from 5
    with pytest.raises(ValueError):
        repeated_tokens(2, 5, 10, length=3)
    with pytest.raises(ValueError):
        repeated_tokens(2, 0, 10)


def test_in_context_loss_picks_the_right_targets():
    V, T, start = 10, 4, 1
    tokens = repeated_tokens(2, T, V, bos=V, generator=torch.Generator().manual_seed(0))  # (2, 9)
    L = tokens.shape[1]
    logits = torch.zeros(2, L, V + 1)
    # a perfect predictor in the repeat (targets start+T+1..L-1), uniform elsewhere
    for i in range(start + T, L - 1):
        logits[:, i, tokens[:, i + 1]] = 0.0
        logits[torch.arange(2), i, tokens[:, i + 1]] = 100.0
    icl = in_context_loss(logits, tokens, T, start)
    torch.testing.assert_close(icl.first, torch.tensor(math.log(V + 1)))
    assert icl.repeated.item() < 1e-6
    assert icl.difference.item() == pytest.approx(-math.log(V + 1), rel=1e-5)
    # the prediction of the first token of the repeat (from position start+T-1) is in neither average
    logits[:, start + T - 1] = torch.randn(2, V + 1) * 50
    torch.testing.assert_close(in_context_loss(logits, tokens, T, start), icl)


def test_in_context_loss_errors():
    logits, tokens = torch.zeros(1, 8, 5), torch.zeros(1, 8, dtype=torch.long)
    for period, start in [(1, 0), (7, 0), (4, 3)]:
        with pytest.raises(ValueError):
            in_context_loss(logits, tokens, period, start)
    with pytest.raises(ValueError):
        in_context_loss(logits, tokens[:, :7], 3)


# ----------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    return AttentionOnlyTransformer(11, 20, dim=16, n_layers=2, n_heads=4, **kw)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_model_shapes_and_causality(layer_norm):
    model = small_model(layer_norm=layer_norm).eval()
    tokens = torch.randint(0, 11, (3, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens)
        assert logits.shape == (3, 13, 11)
        for t in (0, 6, 12):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % 11
            other = model(changed)
            assert torch.equal(other[:, :t], logits[:, :t])  # the past does not see the future
            assert not torch.allclose(other[:, t:], logits[:, t:])
    _, patterns = model.patterns(tokens)
    assert patterns.shape == (2, 3, 4, 13, 13)
    torch.testing.assert_close(patterns.sum(-1), torch.ones(2, 3, 4, 13))
    assert (patterns.triu(1) == 0).all()


def test_model_errors():
    model = small_model()
    with pytest.raises(ValueError):
        model(torch.zeros(2, 21, dtype=torch.long))  # longer than max_len
    with pytest.raises(ValueError):
        model(torch.zeros(2, 5))  # float tokens
    with pytest.raises(ValueError):
        AttentionOnlyTransformer(10, 10, dim=30, n_heads=4)
    with pytest.raises(ValueError):
        AttentionOnlyTransformer(0, 10)
    with pytest.raises(ValueError), model.ablated([(2, 0)]):
        pass
    with pytest.raises(ValueError, match=r"tokens must lie in 0 \.\. 10 \(vocab_size=11\); got 0 \.\. 11"):
        model(torch.tensor([[0, 11]]))


def test_ablation_zeroes_one_head_and_restores():
    model = small_model().double()
    tokens = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        # by hand: layer 0 without head 1's contribution to the residual stream
        mha = model.attn[0]
        x = model.embed(tokens) + model.pos.weight[:9]  # (B, L, E)
        hs = mha.head_dim
        q, k, v = (p(x).view(2, 9, 4, hs).transpose(1, 2) for p in (mha.q_proj, mha.k_proj, mha.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, hs)
        y[:, 1] = 0
        x = x + mha.out_proj(y.transpose(1, 2).reshape(2, 9, 4 * hs))
        x = x + model.attn[1](x, is_causal=True)
        expected = model.unembed(x)
        with model.ablated([(0, 1)]):
            ablated = model(tokens)
        again = model(tokens)
    torch.testing.assert_close(ablated, expected)
    assert not torch.allclose(ablated, full)
    torch.testing.assert_close(again, full)  # restored on exit
    assert all(not fn.ablate for fn in model.attn_fns)


def test_head_weights_and_circuits_match_the_module():
    torch.manual_seed(0)
    mha = MultiHeadAttention(12, 3, bias=False).double()
    x = torch.randn(1, 5, 12, dtype=torch.float64)
    hs = 4
    for h in range(3):
        W_Q, W_K, W_V, W_O = head_weights(mha, h)
        assert (W_Q.shape, W_K.shape, W_V.shape, W_O.shape) == ((hs, 12), (hs, 12), (hs, 12), (12, hs))
        # the QK circuit gives the head's scores, the OV circuit what each key writes
        q = mha.q_proj(x).view(1, 5, 3, hs)[:, :, h]  # (1, 5, hs)
        k = mha.k_proj(x).view(1, 5, 3, hs)[:, :, h]
        torch.testing.assert_close(qk_circuit(mha, h, x[0], x[0]), q[0] @ k[0].T)
        assert qk_circuit(mha, h).shape == (12, 12)
        v = mha.v_proj(x).view(1, 5, 3, hs)[:, :, h]  # (1, 5, hs)
        written = v[0] @ mha.out_proj.weight[:, h * hs : (h + 1) * hs].T  # (5, E)
        torch.testing.assert_close(ov_circuit(mha, h, x[0]), written.T)
        readout = torch.randn(7, 12, dtype=torch.float64)
        assert ov_circuit(mha, h, x[0], readout).shape == (7, 5)
    # the heads' outputs add up to the module's output
    y = mha(x)
    total = sum(
        torch.softmax(qk_circuit(mha, h, x[0], x[0]) / hs**0.5, -1) @ ov_circuit(mha, h, x[0]).T for h in range(3)
    )
    torch.testing.assert_close(total, y[0])
    with pytest.raises(ValueError):
        head_weights(mha, 3)
    with pytest.raises(ValueError):
        head_weights(MultiHeadAttention(12, 4, num_kv_heads=2), 0)
    with pytest.raises(ValueError):
        qk_circuit(mha, 0, torch.ones(3, 11))


@pytest.fixture
def one_thread():
    """Tiny matrices: extra threads only contend (and are slow on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_training_smoke_loss_decreases(one_thread):
    """Two seconds of training on [r, r] sequences: the loss on the repeat must fall.

    (With one fixed period, copying from T - 1 tokens back by position is enough, so
    this learns fast; the chapter varies the period to force an induction head.)
    """
    torch.manual_seed(0)
    V, T = 16, 6
    model = AttentionOnlyTransformer(V, 2 * T, dim=32, n_layers=2, n_heads=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    eval_tokens = repeated_tokens(64, T, V, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = in_context_loss(model(eval_tokens), eval_tokens, T)
    for _ in range(100):
        tokens = repeated_tokens(32, T, V, generator=g)
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = in_context_loss(model(eval_tokens), eval_tokens, T)
    assert after.repeated < 0.5 * before.repeated
    assert after.difference < -1.0
