"""Chapter 0's scores: Nadaraya–Watson, additive (Bahdanau) and multiplicative (Luong).

Additive attention has no SDPA oracle, so it is tested against the paper's formula
written out by hand in float64 (``additive_ref``); the multiplicative scores *are*
dot-product attention after a projection, so they are tested against ``attention_ref``.
"""

import math

import pytest
import torch
from helpers import FLOOR, dense_mask, make_qkv, max_err
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_lib import attention_ref
from attention_lib.additive import (
    AdditiveAttention,
    LuongAttention,
    additive_attention,
    additive_attention_weights,
    additive_scores,
    multiplicative_attention,
    multiplicative_attention_weights,
    multiplicative_scores,
)
from attention_lib.kernel_regression import (
    KERNELS,
    kernel_scores,
    nadaraya_watson,
    nadaraya_watson_weights,
)


def make_params(Eq, Ek, h, dtype=torch.float32, seed=3, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    ws = (torch.randn(h, Eq, generator=g) / Eq**0.5, torch.randn(h, Ek, generator=g) / Ek**0.5, torch.randn(h, generator=g))
    return {n: w.to(dtype).requires_grad_(requires_grad) for n, w in zip(("w_q", "w_k", "w_v"), ws)}


def additive_ref(q, k, v, w_q, w_k, w_v, attn_mask=None, is_causal=False, scale=1.0, dtype=torch.float64):
    """The formula, term by term, in ``dtype``: e_ij = Σ_u v_u tanh(Σ_e Wq_ue q_ie + Σ_e Wk_ue k_je)."""
    q, k, v, w_q, w_k, w_v = (t.to(dtype) for t in (q, k, v, w_q, w_k, w_v))
    if k.shape[-3] != q.shape[-3]:  # GQA: query head h uses key head h // group
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    pre = torch.einsum("ue,bhie->bhiu", w_q, q)[..., :, None, :] + torch.einsum("ue,bhje->bhju", w_k, k)[..., None, :, :]
    e = torch.einsum("u,bhiju->bhij", w_v, torch.tanh(pre)) * scale  # (B, H, L, S)
    L, S = e.shape[-2:]
    allowed = torch.ones(L, S, dtype=torch.bool)
    if is_causal:
        allowed = allowed.tril()
    if attn_mask is not None:
        allowed = allowed & attn_mask
    e = e.masked_fill(~allowed, -math.inf)
    w = torch.exp(e - e.amax(-1, keepdim=True).nan_to_num(neginf=0.0))  # (B, H, L, S)
    w = w / w.sum(-1, keepdim=True).clamp(min=torch.finfo(dtype).tiny)  # fully masked rows: 0 / tiny = 0
    return w @ v, w


# ----------------------------------------------------------------------------------
# Additive attention
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (7, 7), (5, 9), (8, 3)])
@pytest.mark.parametrize("mask", ["none", "causal", "padding", "sliding_window"])
def test_additive_matches_the_formula_in_float64(Lq, Lk, mask):
    q, k, v = make_qkv(2, 3, Lq, Lk, 6, Dv=4, dtype=torch.float64, requires_grad=True)
    k = k[..., :5].detach().requires_grad_(True)  # Ek = 5 != Eq = 6: additive scores allow it
    params = make_params(6, 5, 8, torch.float64, requires_grad=True)
    m = dense_mask(mask, 2, Lq, Lk)  # (2, 1, Lq, Lk) or None
    out = additive_attention(q, k, v, attn_mask=m, **params)
    ref, _ = additive_ref(q, k, v, **params, attn_mask=m)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    dout = torch.randn_like(out)
    inputs = [q, k, v, *params.values()]
    g_ours = torch.autograd.grad(out, inputs, dout)
    g_ref = torch.autograd.grad(ref, inputs, dout)
    for name, a, b in zip(["q", "k", "v", "w_q", "w_k", "w_v"], g_ours, g_ref):
        assert torch.isfinite(a).all(), f"d{name} is not finite"
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda s, name=name: f"d{name}: {s}")


@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_additive_gqa_causal_and_scale(Hkv):
    q, k, v = make_qkv(2, 4, 7, 7, 8, Hkv=Hkv, dtype=torch.float64)
    params = make_params(8, 8, 5, torch.float64)
    out = additive_attention(q, k, v, is_causal=True, scale=2.5, enable_gqa=Hkv != 4, **params)
    ref, _ = additive_ref(q, k, v, **params, is_causal=True, scale=2.5)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_additive_weights_sum_to_one_and_fully_masked_rows_give_zero():
    q, k, v = make_qkv(3, 2, 6, 9, 4)
    params = make_params(4, 4, 7)
    m = dense_mask("padding", 3, 6, 9)  # batch 0: every key masked
    w = additive_attention_weights(q, k, attn_mask=m, **params)
    assert w.shape == (3, 2, 6, 9)
    torch.testing.assert_close(w[1:].sum(-1), torch.ones(2, 2, 6))
    assert torch.equal(w[0], torch.zeros_like(w[0]))
    assert (w[1:][~m[1:].expand(2, 2, 6, 9)] == 0).all()  # masked keys get exactly 0
    out = additive_attention(q, k, v, attn_mask=m, **params)
    assert torch.isfinite(out).all() and torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out, w @ v)
    scores = additive_scores(q, k, **params)  # (3, 2, 6, 9), unmasked
    torch.testing.assert_close(w[1:], torch.softmax(scores[1:].masked_fill(~m[1:], -math.inf), -1))


def test_additive_float_mask_is_added_to_the_scores():
    q, k, _ = make_qkv(1, 2, 4, 5, 3, dtype=torch.float64)
    params = make_params(3, 3, 4, torch.float64)
    bias = torch.randn(4, 5, dtype=torch.float64)
    w = additive_attention_weights(q, k, attn_mask=bias, **params)
    torch.testing.assert_close(w, torch.softmax(additive_scores(q, k, **params) + bias, -1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_additive_low_precision_is_within_twice_the_naive_error(dtype):
    q, k, v = make_qkv(2, 2, 9, 11, 16)
    params = make_params(16, 16, 32)
    ref, _ = additive_ref(q, k, v, **params)  # float64
    naive, _ = additive_ref(q, k, v, **params, dtype=dtype)  # the formula computed in dtype
    lo = {n: p.to(dtype) for n, p in params.items()}
    out = additive_attention(q.to(dtype), k.to(dtype), v.to(dtype), **lo)
    assert out.dtype == dtype
    err, base = max_err(out, ref), max_err(naive, ref)
    assert base > 0 and err <= 2 * base + FLOOR[dtype], (err, base)
    bias = torch.zeros(9, 11).masked_fill(torch.rand(9, 11, generator=torch.Generator().manual_seed(0)) < 0.3, -math.inf)
    with_mask = additive_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=bias.to(dtype), **lo)  # a mask in dtype
    ref_mask, _ = additive_ref(q, k, v, **params, attn_mask=bias == 0)
    assert max_err(with_mask, ref_mask) <= 2 * max_err(additive_ref(q, k, v, **params, attn_mask=bias == 0, dtype=dtype)[0], ref_mask) + FLOOR[dtype]


def test_additive_empty_and_broadcast_inputs():
    params = make_params(4, 4, 3)
    q, k, v = torch.randn(2, 5, 4), torch.randn(2, 0, 4), torch.randn(2, 0, 6)  # no keys
    out = additive_attention(q, k, v, **params)
    assert out.shape == (2, 5, 6) and torch.equal(out, torch.zeros(2, 5, 6))
    q, k, v = torch.randn(3, 1, 5, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 6)  # batch and heads broadcast
    out = additive_attention(q, k, v, **params)
    ref, _ = additive_ref(q.expand(3, 2, 5, 4), k.expand(3, 2, 7, 4), v.expand(3, 2, 7, 6), **params)
    assert out.shape == (3, 2, 5, 6)
    torch.testing.assert_close(out, ref.float())


def test_additive_module_calls_the_function_with_its_parameters():
    torch.manual_seed(0)
    att = AdditiveAttention(query_dim=6, key_dim=4, hidden_dim=10, dropout=0.5)
    q, k, v = torch.randn(2, 3, 6), torch.randn(2, 5, 4), torch.randn(2, 5, 7)
    params = {"w_q": att.w_q.weight, "w_k": att.w_k.weight, "w_v": att.w_v}
    att.eval()  # no dropout in eval mode
    torch.testing.assert_close(att(q, k, v), additive_attention(q, k, v, **params))
    torch.testing.assert_close(att.weights(q, k).sum(-1), torch.ones(2, 3))
    att.train()
    torch.manual_seed(1)
    dropped = att(q, k, v)
    assert not torch.allclose(dropped, att.eval()(q, k, v))  # dropout acts while training
    assert sum(p.numel() for p in att.parameters()) == 10 * 6 + 10 * 4 + 10


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 3),
    L=st.integers(1, 9),
    S=st.integers(1, 9),
    Eq=st.integers(1, 6),
    Ek=st.integers(1, 6),
    h=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_additive_weights_are_a_distribution_property(B, L, S, Eq, Ek, h, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, L, Eq, generator=g, dtype=torch.float64), torch.randn(B, S, Ek, generator=g, dtype=torch.float64)
    params = make_params(Eq, Ek, h, torch.float64, seed=seed)
    keep = torch.rand(B, 1, S, generator=g) < 0.6  # key padding; some rows may lose every key
    w = additive_attention_weights(q, k, attn_mask=keep, **params)  # (B, L, S)
    assert w.shape == (B, L, S) and (w >= 0).all()
    rows = w.sum(-1)  # (B, L)
    has_key = keep.any(-1).expand(B, L)
    torch.testing.assert_close(rows[has_key], torch.ones_like(rows[has_key]))
    assert (rows[~has_key] == 0).all() and (w[~keep.expand(B, L, S)] == 0).all()
    _, ref = additive_ref(q[:, None], k[:, None], k[:, None], **params, attn_mask=keep[:, None])
    torch.testing.assert_close(w, ref[:, 0])


# ----------------------------------------------------------------------------------
# Multiplicative attention
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", ["none", "causal_lower_right", "padding"])
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (7, 7), (5, 9)])
def test_luong_dot_is_dot_product_attention(mask, Lq, Lk):
    q, k, v = make_qkv(2, 3, Lq, Lk, 8, dtype=torch.float64)
    m = dense_mask(mask, 2, Lq, Lk)
    torch.testing.assert_close(multiplicative_attention(q, k, v, attn_mask=m), attention_ref(q, k, v, attn_mask=m, scale=1.0))
    torch.testing.assert_close(  # with chapter 4's scale it *is* scaled dot-product attention
        multiplicative_attention(q, k, v, attn_mask=m, scale=8**-0.5), attention_ref(q, k, v, attn_mask=m)
    )


@pytest.mark.parametrize("Hkv", [3, 1])
def test_luong_general_is_attention_on_projected_queries(Hkv):
    q, k, v = make_qkv(2, 3, 7, 9, 6, Hkv=Hkv, dtype=torch.float64, requires_grad=True)
    k5 = k[..., :5].detach().requires_grad_(True)  # Ek = 5 != Eq = 6
    W = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    out = multiplicative_attention(q, k5, v, is_causal=True, enable_gqa=Hkv != 3, weight=W)
    ref = attention_ref(q @ W, k5, v, is_causal=True, scale=1.0, enable_gqa=Hkv != 3)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k5, v, W)), torch.autograd.grad(ref.sum(), (q, k5, v, W))):
        torch.testing.assert_close(a, b)
    scores = multiplicative_scores(q, k5[:, :1].expand(2, 3, 9, 5) if Hkv == 1 else k5, W)
    torch.testing.assert_close(scores, torch.einsum("bhie,ef,bhjf->bhij", q, W, k5.expand(2, 3, 9, 5)))


def test_luong_module_weights_and_fully_masked_rows():
    torch.manual_seed(0)
    q, k, v = make_qkv(3, 2, 4, 6, 5)
    m = dense_mask("padding", 3, 4, 6)
    for score in ("dot", "general"):
        att = LuongAttention(5, score=score).eval()
        w = att.weights(q, k, attn_mask=m)
        out = att(q, k, v, attn_mask=m)
        assert torch.equal(w[0], torch.zeros_like(w[0])) and torch.equal(out[0], torch.zeros_like(out[0]))
        torch.testing.assert_close(w[1:].sum(-1), torch.ones(2, 2, 4))
        torch.testing.assert_close(out, w @ v)
        torch.testing.assert_close(w, multiplicative_attention_weights(q, k, attn_mask=m, weight=att.weight))
    assert LuongAttention(5, score="dot").weight is None and LuongAttention(5, 3).weight.shape == (5, 3)


# ----------------------------------------------------------------------------------
# Nadaraya–Watson
# ----------------------------------------------------------------------------------


def nw_ref(xq, xk, y, sigma):
    """Σ_i K(x - x_i) y_i / Σ_j K(x - x_j) with K(u) = exp(-u²/2σ²), in float64, no softmax."""
    xq, xk, y = xq.double(), xk.double(), y.double()
    K = torch.exp(-((xq[:, None] - xk[None, :]) ** 2) / (2 * sigma**2))  # (L, S)
    return (K @ y) / K.sum(-1)


def toy_data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g, dtype=torch.float64) * 5
    return x, torch.sin(x) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 3.0])
def test_nadaraya_watson_matches_the_ratio_of_kernel_sums(sigma):
    x, y = toy_data()
    xq = torch.linspace(-1, 6, 23, dtype=torch.float64)
    torch.testing.assert_close(nadaraya_watson(xq, x, y, sigma), nw_ref(xq, x, y, sigma), rtol=1e-12, atol=1e-12)
    w = nadaraya_watson_weights(xq, x, sigma)
    assert w.shape == (23, 40)
    torch.testing.assert_close(w.sum(-1), torch.ones(23, dtype=torch.float64))


def test_tiny_bandwidth_interpolates_and_huge_bandwidth_gives_the_mean():
    x, y = toy_data()
    # at the data points, a tiny bandwidth puts all the weight on the point itself
    torch.testing.assert_close(nadaraya_watson(x, x, y, 1e-6), y, rtol=0, atol=1e-12)
    # elsewhere it is the nearest neighbour (exp(-d²/2σ²) underflows for all others: softmax keeps it finite)
    xq = torch.tensor([0.123, 2.5, 4.9], dtype=torch.float64)
    nearest = (xq[:, None] - x[None, :]).abs().argmin(-1)
    torch.testing.assert_close(nadaraya_watson(xq, x, y, 1e-6), y[nearest], rtol=0, atol=1e-12)
    assert not torch.isfinite(nw_ref(xq, x, y, 1e-6)).all()  # the naive ratio is 0/0 there
    torch.testing.assert_close(nadaraya_watson(xq, x, y, 1e6), y.mean().expand(3), rtol=1e-9, atol=1e-9)


def test_leave_one_out_mask_and_vector_inputs():
    x, y = toy_data()
    loo = ~torch.eye(40, dtype=torch.bool)
    w = nadaraya_watson_weights(x, x, 0.3, loo)
    assert (w.diagonal() == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(40, dtype=torch.float64))
    K = torch.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * 0.3**2)) * loo
    torch.testing.assert_close(nadaraya_watson(x, x, y, 0.3, loo), (K @ y) / K.sum(-1))
    # d-dimensional inputs and vector values: the Gaussian of the Euclidean distance
    g = torch.Generator().manual_seed(1)
    X, Xq, Y = torch.randn(30, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(30, 2, generator=g)
    K = torch.exp(-torch.cdist(Xq, X) ** 2 / (2 * 0.7**2))  # (4, 30)
    torch.testing.assert_close(nadaraya_watson(Xq, X, Y, 0.7), (K @ Y) / K.sum(-1, keepdim=True))


def test_finite_support_kernels_and_points_out_of_reach():
    x = torch.tensor([0.0, 1.0, 2.0, 10.0])
    y = torch.tensor([1.0, 2.0, 3.0, 4.0])
    xq = torch.tensor([0.9, 5.0])
    box = nadaraya_watson(xq, x, y, 1.5, kernel="boxcar")  # 0.9 sees 0, 1, 2; 5.0 sees nothing
    torch.testing.assert_close(box, torch.tensor([2.0, 0.0]))
    epa = nadaraya_watson_weights(xq, x, 1.5, kernel="epanechnikov")
    k = torch.clamp(1 - ((xq[:1, None] - x) / 1.5) ** 2, min=0)  # (1, 4)
    torch.testing.assert_close(epa[:1], k / k.sum(-1, keepdim=True))
    assert torch.equal(epa[1], torch.zeros(4))
    assert set(KERNELS) == {"gaussian", "boxcar", "epanechnikov"}


def test_bandwidth_is_differentiable():
    x, y = toy_data()
    log_sigma = torch.tensor(math.log(0.4), dtype=torch.float64, requires_grad=True)
    loo = ~torch.eye(40, dtype=torch.bool)
    loss = lambda s: ((nadaraya_watson(x, x, y, s.exp(), loo) - y) ** 2).mean()
    (grad,) = torch.autograd.grad(loss(log_sigma), log_sigma)
    eps = 1e-6
    numeric = (loss(log_sigma + eps) - loss(log_sigma - eps)) / (2 * eps)
    torch.testing.assert_close(grad, numeric.detach(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(kernel_scores(x[:3], x, log_sigma.exp()).detach(), -((x[:3, None] - x) ** 2) / (2 * 0.4**2))


# ----------------------------------------------------------------------------------
# Bad input: a ValueError that names the argument and the shapes
# ----------------------------------------------------------------------------------


def test_bad_input_raises_clear_errors():
    q, k, v = make_qkv(2, 3, 5, 7, 4)
    params = make_params(4, 4, 6)
    cases = [
        (lambda: additive_attention(q, k, v, **{**params, "w_q": torch.randn(6, 3)}), r"w_q must have shape \(h, Eq\) = \(6, 4\).*\(6, 3\)"),
        (lambda: additive_attention(q, k, v, **{**params, "w_k": torch.randn(5, 4)}), r"w_k must have shape.*\(5, 4\)"),
        (lambda: additive_attention(q, k, v, **{**params, "w_v": torch.randn(6, 1)}), r"w_v must be a tensor of shape \(h,\).*\(6, 1\)"),
        (lambda: additive_attention(q, k, v, **{**params, "w_q": params["w_q"].double()}), r"w_q must have the query's dtype"),
        (lambda: additive_attention(q[0, 0, 0], k, v, **params), r"query must have rank >= 2.*\(4\)"),
        (lambda: additive_attention(q, k, v[:, :, :6], **params), r"key and value must agree in length S"),
        (lambda: additive_attention(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool), **params), r"attn_mask of shape \(5, 6\)"),
        (lambda: additive_attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.int64), **params), r"attn_mask must be bool"),
        (lambda: AdditiveAttention(4, 0, 8), r"key_dim must be a positive int"),
        (lambda: multiplicative_attention(q, k[..., :3], v), r'"dot" score needs query and key of one size.*\(2, 3, 7, 3\)'),
        (lambda: multiplicative_attention(q, k, v, weight=torch.randn(3, 4)), r"weight must have shape \(Eq, Ek\) = \(4, 4\).*\(3, 4\)"),
        (lambda: LuongAttention(4, 3, score="dot"), r"key_dim == query_dim"),
        (lambda: LuongAttention(4, score="concat"), r'score must be "dot" or "general"'),
        (lambda: nadaraya_watson(torch.randn(3, 2, 1), torch.randn(4), torch.randn(4), 1.0), r"x_query must be \(L,\) or \(L, d\).*\(3, 2, 1\)"),
        (lambda: nadaraya_watson(torch.randn(3), torch.randn(4, 2), torch.randn(4), 1.0), r"x_query \(3\), x_keys \(4, 2\)"),
        (lambda: nadaraya_watson(torch.randn(3), torch.randn(4), torch.randn(5), 1.0), r"y_values \(5\), x_keys \(4\)"),
        (lambda: nadaraya_watson(torch.randn(3), torch.randn(4), torch.randn(4), 0.0), r"bandwidth must be positive"),
        (lambda: nadaraya_watson(torch.randn(3), torch.randn(4), torch.randn(4), torch.ones(2)), r"bandwidth must be .*shape \(2\)"),
        (lambda: nadaraya_watson(torch.randn(3), torch.randn(4), torch.randn(4), 1.0, kernel="cosine"), r"kernel must be one of"),
        (lambda: nadaraya_watson_weights(torch.randn(3), torch.randn(4), 1.0, torch.ones(4, 4, dtype=torch.bool)), r"attn_mask of shape \(4, 4\) does not broadcast"),
        (lambda: nadaraya_watson(torch.arange(3), torch.arange(4), torch.randn(4), 1.0), r"x_query must be a floating-point"),
    ]
    for fn, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            fn()


def test_scores_reject_a_key_of_another_dtype_and_empty_keys_give_zero():
    # Found in review: additive_scores/multiplicative_scores raised torch's RuntimeError
    # ("expected m1 and m2 to have the same dtype"), additive_attention silently cast the key,
    # and nadaraya_watson with no observations raised an IndexError from amax.
    q, k, v = make_qkv(1, 2, 5, 6, 4)
    params = make_params(4, 4, 6)
    for fn in (
        lambda: additive_scores(q, k.double(), **params),
        lambda: additive_attention(q, k.double(), v, **params),
        lambda: multiplicative_scores(q, k.double()),
    ):
        with pytest.raises(ValueError, match=r"query and key must share one dtype.*float64"):
            fn()
    x = torch.randn(7)
    assert torch.equal(nadaraya_watson(x, x[:0], x[:0], 0.5), torch.zeros(7))
    assert torch.equal(nadaraya_watson_weights(x, x[:0], 0.5), torch.zeros(7, 0))
