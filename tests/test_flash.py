"""flash_attention (FlashAttention-2 in plain PyTorch) against the float64 oracle.

Besides the usual grid (forward and gradients), the tests check what makes it
FlashAttention: its own backward (gradcheck, no autograd graph through the tiles),
only O and the log-sum-exp saved for the backward, and a peak memory far below naive.

The grid shared with the other tiled variant (lengths, dtypes, masks, GQA) is in
tests/test_tiled_variants.py.
"""

from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_lib import attention_ref, flash_attention, peak_memory, scaled_dot_product_attention
from attention_lib.softmax import logsumexp
from helpers import MASKS, assert_matches_ref, dense_mask, make_qkv


def flash(block_q=5, block_k=7):
    return partial(flash_attention, block_q=block_q, block_k=block_k)


@pytest.mark.parametrize(
    "is_causal,mask_name,Hkv,blocks",
    [(False, "none", 2, (2, 3)), (True, "none", 2, (2, 2)), (False, "padding", 1, (3, 2)), (False, "window_or_prefix", 2, (1, 4))],
)
def test_gradcheck_float64(is_causal, mask_name, Hkv, blocks):
    q, k, v = make_qkv(2, 2, 5, 6, 3, Hkv=Hkv, dtype=torch.float64, requires_grad=True)
    mask = dense_mask(mask_name, 2, 5, 6)
    f = lambda q, k, v: flash_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True, block_q=blocks[0], block_k=blocks[1]
    )
    assert torch.autograd.gradcheck(f, (q, k, v))


def test_gradcheck_float64_through_a_float_bias():
    q, k, v = make_qkv(2, 2, 5, 6, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bias[0, 0, 1] = float("-inf")  # one row fully masked in head 0
    bias.requires_grad_()
    f = lambda q, k, v, b: flash_attention(q, k, v, attn_mask=b, block_q=2, block_k=4)
    assert torch.autograd.gradcheck(f, (q, k, v, bias))


def test_backward_is_the_custom_function_not_autograd_through_the_tiles():
    q, k, v = make_qkv(1, 2, 33, 40, 8, requires_grad=True)
    out = flash_attention(q, k, v, block_q=8, block_k=8)
    assert "FlashAttention" in type(out.grad_fn).__name__
    # one node, straight to the leaves: no graph was recorded through the tiles
    leaves = [fn for fn, _ in out.grad_fn.next_functions if fn is not None]
    assert len(leaves) == 3 and all(type(fn).__name__ == "AccumulateGrad" for fn in leaves)


def test_forward_saves_only_the_inputs_o_and_lse():
    B, H, L, S, D = 2, 4, 50, 70, 16
    q, k, v = make_qkv(B, H, L, S, D, Hkv=2, requires_grad=True)
    mask = dense_mask("prefix_lm", B, L, S)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = flash_attention(q, k, v, attn_mask=mask, enable_gqa=True, block_q=16, block_k=16)
    inputs = [t for t in (q, k, v, mask)]
    extra = [t for t in saved if not any(t is x for x in inputs)]
    assert len(saved) == 6, [tuple(t.shape) for t in saved]
    # O is saved in the accumulation dtype, grouped by key/value head: (B, Hkv, n_rep, L, Dv)
    assert sorted(tuple(t.shape) for t in extra) == sorted([(B, 2, 2, L, D), (B, 2, 2, L)])
    (o_saved,) = [t for t in extra if t.dim() == 5]
    (lse,) = [t for t in extra if t.dim() == 4]
    assert torch.equal(o_saved.reshape(out.shape), out)
    # lse is the log-sum-exp of each query's scores: O(L) numbers, not O(L * S)
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-2, -1)) * D**-0.5  # (B, H, L, S)
    ref = logsumexp(scores.detach().masked_fill(~mask, float("-inf")))  # (B, H, L)
    torch.testing.assert_close(lse.reshape(B, H, L), ref)


def test_memory_is_far_below_naive_forward_and_backward():
    L = 1024
    q, k, v = make_qkv(1, 1, L, L, 64)
    naive = peak_memory(scaled_dot_product_attention, q, k, v)[1]
    ours = peak_memory(flash(128, 128), q, k, v)[1]
    assert naive >= L * L * 4  # at least the score matrix
    assert ours * 10 < naive, f"flash forward peak {ours} B vs naive {naive} B"

    def train_step(f):
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out = f(qg, kg, vg)
        out.backward(torch.ones_like(out))
        return out

    naive_train = peak_memory(train_step, scaled_dot_product_attention)[1]
    ours_train = peak_memory(train_step, flash(128, 128))[1]
    assert ours_train * 10 < naive_train, f"flash training peak {ours_train} B vs naive {naive_train} B"


def test_default_blocks_and_no_grad_path():
    q, k, v = make_qkv(1, 2, 137, 141, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(flash_attention(q, k, v), attention_ref(q, k, v))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dropout_p=0.1), "dropout"),
        (dict(block_q=0), "block_q"),
        (dict(block_k=2.5), "block_k"),
        (dict(block_k=True), "block_k"),
        (dict(scale=float("inf")), "scale"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    q, k, v = make_qkv(1, 2, 5, 5, 8)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, **kwargs)


def test_shape_errors_come_from_the_shared_checks():
    q, k, v = make_qkv(1, 4, 5, 5, 8, Hkv=3)
    with pytest.raises(ValueError, match="divisible"):
        flash_attention(q, k, v, enable_gqa=True)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2), Hkv=st.integers(1, 2), rep=st.integers(1, 3),
    Lq=st.integers(1, 24), Lk=st.integers(1, 24), D=st.sampled_from([1, 4, 8]),
    block_q=st.integers(1, 30), block_k=st.integers(1, 30),
    mask_name=st.sampled_from(list(MASKS)), seed=st.integers(0, 2**16),
)
def test_property_random_shapes_masks_and_blocks(B, Hkv, rep, Lq, Lk, D, block_q, block_k, mask_name, seed):
    q, k, v = make_qkv(B, Hkv * rep, Lq, Lk, D, Hkv=Hkv, seed=seed, dtype=torch.float64)
    mask = dense_mask(mask_name, B, Lq, Lk)
    out = flash_attention(q, k, v, attn_mask=mask, enable_gqa=True, block_q=block_q, block_k=block_k)
    torch.testing.assert_close(out, attention_ref(q, k, v, attn_mask=mask, enable_gqa=True))
