"""scaled_dot_product_attention and attention_ref against PyTorch's SDPA.

The grid follows flash-attention's tests: dtypes, odd lengths with Lq != Lk, head
dims, every mask in the registry, causal, GQA ratios; outputs and gradients.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_lib import attention_ref, attention_weights, scaled_dot_product_attention
from helpers import FLOOR, MASKS, assert_matches_ref, dense_mask, make_qkv, max_err

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
LENGTHS = [(1, 1), (7, 9), (97, 33), (33, 129)]
HEAD_DIMS = [16, 64, 80]


def torch_sdpa_ref(q, k, v, **kw):
    """PyTorch's SDPA on float64 copies, cast back: a second, independent oracle."""
    mask = kw.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kw["attn_mask"] = mask.double()
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw).to(q.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq,Lk", LENGTHS)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_grid_against_oracle_and_torch(dtype, Lq, Lk, D, is_causal):
    q, k, v = make_qkv(2, 3, Lq, Lk, D, dtype=dtype)
    assert_matches_ref(scaled_dot_product_attention, q, k, v, is_causal=is_causal)
    out = scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    ref = torch_sdpa_ref(q, k, v, is_causal=is_causal)
    # ours is no further from float64 than PyTorch's own kernel (+ floor)
    assert max_err(out, ref) <= 2 * max_err(theirs, ref) + FLOOR[dtype]


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("Lq,Lk", [(7, 9), (9, 7), (16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_mask(mask_name, Lq, Lk, dtype):
    q, k, v = make_qkv(3, 2, Lq, Lk, 16, dtype=dtype)
    mask = dense_mask(mask_name, 3, Lq, Lk)
    assert_matches_ref(scaled_dot_product_attention, q, k, v, attn_mask=mask)
    theirs = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    ours = attention_ref(q.double(), k.double(), v.double(), attn_mask=mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (4, 1), (6, 3), (8, 2)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_gqa(Hq, Hkv, is_causal):
    q, k, v = make_qkv(2, Hq, 11, 13, 16, Hkv=Hkv, dtype=torch.float64)
    ours = scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    torch.testing.assert_close(ours, theirs)
    assert_matches_ref(scaled_dot_product_attention, *make_qkv(2, Hq, 11, 13, 16, Hkv=Hkv), is_causal=is_causal, enable_gqa=True)


def test_fully_masked_rows_give_zero_output_and_gradient():
    q, k, v = make_qkv(2, 2, 5, 6, 8, requires_grad=True)
    mask = torch.ones(2, 1, 5, 6, dtype=torch.bool)
    mask[0, :, 1] = False  # query 1 of batch 0 sees nothing
    mask[1] = False  # batch 1 sees nothing at all
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[0, :, 1], torch.zeros_like(out[0, :, 1]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out, theirs)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0, :, 1], torch.zeros_like(q.grad[0, :, 1]))
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    assert torch.equal(k.grad[1], torch.zeros_like(k.grad[1]))


def test_additive_float_mask_equals_bool_mask():
    q, k, v = make_qkv(2, 2, 6, 6, 8)
    bool_mask = dense_mask("sliding_window", 2, 6, 6)
    add_mask = torch.zeros(bool_mask.shape).masked_fill(~bool_mask, float("-inf"))
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v, attn_mask=add_mask),
        scaled_dot_product_attention(q, k, v, attn_mask=bool_mask),
    )
    bias = torch.randn(1, 2, 6, 6)  # a real additive bias (ALiBi-like), broadcast over batch
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v, attn_mask=bias),
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
    )


@pytest.mark.parametrize("shape", [(1, 6), (5, 1), (1, 1, 5, 1), (2, 1, 5, 6), (2, 2, 5, 6)])
def test_masks_broadcast(shape):
    q, k, v = make_qkv(2, 2, 5, 6, 8)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(3)) > 0.3
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v, attn_mask=mask),
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
    )


@pytest.mark.parametrize("scale", [None, 0.05, 1.0, 3.0])
def test_scale(scale):
    q, k, v = make_qkv(1, 2, 5, 7, 8, dtype=torch.float64)
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v, scale=scale),
        F.scaled_dot_product_attention(q, k, v, scale=scale),
    )


def test_value_dim_may_differ():
    q, k, v = make_qkv(1, 2, 5, 7, 8, Dv=12, dtype=torch.float64)
    out = scaled_dot_product_attention(q, k, v)
    assert out.shape == (1, 2, 5, 12)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_dropout_zero_is_deterministic_and_dropout_one_half_changes_output():
    q, k, v = make_qkv(1, 2, 8, 8, 8)
    a = scaled_dot_product_attention(q, k, v, dropout_p=0.0)
    torch.testing.assert_close(a, scaled_dot_product_attention(q, k, v))
    torch.manual_seed(0)
    b = scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert not torch.allclose(a, b)
    # dropout is unbiased: averaged over many draws it approaches the dropout-free output
    torch.manual_seed(0)
    mean = torch.stack([scaled_dot_product_attention(q, k, v, dropout_p=0.5) for _ in range(400)]).mean(0)
    assert max_err(mean, a) < 0.2


def test_attention_weights_rows_sum_to_one_and_reproduce_output():
    q, k, v = make_qkv(2, 2, 5, 7, 8, dtype=torch.float64)
    w = attention_weights(q, k, is_causal=True)
    assert w.shape == (2, 2, 5, 7)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 5, dtype=torch.float64))
    torch.testing.assert_close(w @ v, scaled_dot_product_attention(q, k, v, is_causal=True))


def test_attention_ref_is_float64_and_rejects_dropout():
    q, k, v = make_qkv(1, 1, 4, 4, 8, dtype=torch.bfloat16)
    assert attention_ref(q, k, v).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dropout_p"):
        attention_ref(q, k, v, dropout_p=0.1)


@pytest.mark.parametrize("is_causal,mask_name,gqa", [(False, "none", False), (True, "none", False), (False, "padding", False), (False, "prefix_lm", True)])
def test_gradcheck_float64(is_causal, mask_name, gqa):
    q, k, v = make_qkv(2, 2, 4, 5, 3, Hkv=1 if gqa else 2, dtype=torch.float64, requires_grad=True)
    mask = dense_mask(mask_name, 2, 4, 5)
    f = lambda q, k, v: scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
    assert torch.autograd.gradcheck(f, (q, k, v))
    assert torch.autograd.gradgradcheck(f, (q, k, v))


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3), Hkv=st.integers(1, 3), rep=st.integers(1, 3),
    Lq=st.integers(1, 20), Lk=st.integers(1, 20), D=st.sampled_from([1, 4, 8, 16]),
    mask_name=st.sampled_from(list(MASKS)), seed=st.integers(0, 2**16),
)
def test_property_random_shapes_and_masks(B, Hkv, rep, Lq, Lk, D, mask_name, seed):
    q, k, v = make_qkv(B, Hkv * rep, Lq, Lk, D, Hkv=Hkv, seed=seed, dtype=torch.float64)
    mask = dense_mask(mask_name, B, Lq, Lk)
    ours = scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(ours, theirs)
    assert torch.isfinite(ours).all()
