"""linear_attention against a quadratic reference written from the paper's equation.

Katharopoulos et al. (2020), eq. 2-3 with sim(q, k) = φ(q)ᵀφ(k):

    V'_i = Σ_j sim(Q_i, K_j) V_j / Σ_j sim(Q_i, K_j)      (j <= i when causal)

Linear attention is a different model from softmax attention, so the oracle here is
this equation computed in float64, not attention_ref. The RNN steps are checked
against the causal prefix-sum version.
"""

import pytest
import torch
import torch.nn.functional as F

from attention_lib import LinearAttentionState, MultiHeadAttention, linear_attention, linear_attention_step
from helpers import make_qkv, max_err

EPS = 1e-6


def linear_attention_quadratic(q, k, v, is_causal=False, phi=lambda x: F.elu(x) + 1):
    """The paper's equation, in float64, forming the full L × S similarity matrix."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    sim = phi(q) @ phi(k).transpose(-2, -1)  # (B, H, L, S)
    if is_causal:
        sim = sim * torch.ones(sim.shape[-2:], dtype=torch.bool).tril()  # top-left
    return (sim @ v) / (sim.sum(dim=-1, keepdim=True) + EPS)


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (7, 9), (97, 33), (33, 129), (128, 128)])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_matches_the_paper_equation(Lq, Lk, is_causal, chunk_size):
    q, k, v = make_qkv(2, 3, Lq, Lk, 16, Dv=8, dtype=torch.float64)
    ours = linear_attention(q, k, v, is_causal=is_causal, chunk_size=chunk_size)
    torch.testing.assert_close(ours, linear_attention_quadratic(q, k, v, is_causal), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_low_precision_and_gradients(dtype, is_causal):
    q, k, v = make_qkv(2, 2, 37, 37, 16, dtype=dtype, requires_grad=True)
    out = linear_attention(q, k, v, is_causal=is_causal, chunk_size=8)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = linear_attention_quadratic(*ref_in, is_causal)
    assert out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert max_err(out, ref) < tol
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    for g, rg in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        assert max_err(g, rg) < 20 * tol * rg.abs().max().item()


@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (4, 1)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_gqa(Hq, Hkv, is_causal):
    q, k, v = make_qkv(2, Hq, 11, 13, 16, Hkv=Hkv, dtype=torch.float64)
    ours = linear_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    torch.testing.assert_close(ours, linear_attention_quadratic(q, k, v, is_causal))


def test_gradcheck_float64():
    q, k, v = make_qkv(1, 1, 5, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: linear_attention(*a, is_causal=True, chunk_size=4), (q, k, v))


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (4, 1)])
def test_rnn_steps_equal_the_causal_prefix_sum(Hq, Hkv):
    q, k, v = make_qkv(2, Hq, 23, 23, 16, Hkv=Hkv, Dv=8, dtype=torch.float64)
    full = linear_attention(q, k, v, is_causal=True, enable_gqa=Hq != Hkv)
    state, outs = None, []
    for t in range(23):
        out, state = linear_attention_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=1e-12, atol=1e-12)
    # the state does not grow with the sequence: (B, Hkv, D, Dv) and (B, Hkv, D)
    assert isinstance(state, LinearAttentionState)
    assert state.S.shape == (2, Hkv, 16, 8) and state.z.shape == (2, Hkv, 16)


def test_feature_maps():
    q, k, v = make_qkv(1, 2, 9, 9, 8, dtype=torch.float64)
    relu = linear_attention(q, k, v, feature_map="relu")
    torch.testing.assert_close(relu, linear_attention_quadratic(q, k, v, phi=F.relu))
    square = lambda x: x * x  # a callable works too
    torch.testing.assert_close(
        linear_attention(q, k, v, is_causal=True, feature_map=square),
        linear_attention_quadratic(q, k, v, True, phi=square),
    )


def test_is_not_softmax_attention():
    """Linear attention is a different model: it does not reproduce softmax attention."""
    q, k, v = make_qkv(1, 2, 16, 16, 16, dtype=torch.float64)
    soft = F.scaled_dot_product_attention(q, k, v)
    assert max_err(linear_attention(q, k, v), soft) > 1e-2


def test_swaps_into_multi_head_attention():
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, attn_fn=linear_attention)
    x = torch.randn(2, 10, 32)
    y = mha(x, is_causal=True)
    assert y.shape == (2, 10, 32)
    # causal: the first 5 outputs do not depend on the last 5 inputs
    x2 = x.clone()
    x2[:, 5:] = torch.randn(2, 5, 32)
    torch.testing.assert_close(mha(x2, is_causal=True)[:, :5], y[:, :5])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(attn_mask=torch.ones(5, 5, dtype=torch.bool)), "attn_mask"),
        (dict(dropout_p=0.1), "dropout_p"),
        (dict(scale=0.5), "scale"),
        (dict(feature_map="softmax"), "feature_map"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    q, k, v = make_qkv(1, 1, 5, 5, 8)
    with pytest.raises(ValueError, match=match):
        linear_attention(q, k, v, **kwargs)


def test_step_rejects_more_than_one_token():
    q, k, v = make_qkv(1, 2, 2, 2, 8)
    with pytest.raises(ValueError, match="one token"):
        linear_attention_step(q, k, v)
