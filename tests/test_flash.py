"""flash_attention (FlashAttention-2 in plain PyTorch): what makes it FlashAttention.

Its own backward (gradcheck in float64, no autograd graph through the tiles), and
only O and the log-sum-exp saved for the backward.

The grid shared with the other tiled variant (lengths, dtypes, masks, GQA, random
shapes), peak memory and bad arguments are in tests/test_tiled_variants.py.
"""

import pytest
import torch

from attention_lib import flash_attention
from attention_lib.softmax import logsumexp
from helpers import dense_mask, make_qkv


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
